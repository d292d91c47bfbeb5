"""Write WebDataset tar shards (``<key>.png|jpg`` + ``<key>.cls``) from Fashion-MNIST or an image folder.

    python -m src.data.write_shards --source fashion_mnist --root /usr/share/datasets/fashion-mnist \\
        --split train --out data/shards --prefix train --maxcount 10000

Prints the brace pattern to pass as ``dataset.train_urls`` (or ``dataset.val_urls``) and writes
``<prefix>-shards.json`` (samples per shard), by which the reader counts what a truncated shard lost.
Shards are written in a hidden staging folder and moved into place only when all succeeded. Folder images
that are PNG/JPEG are stored as their original bytes (no re-encoding loss); other formats become PNG;
unreadable files are left out with a warning so the shards hold only decodable samples.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import webdataset as wds
from PIL import Image

from src.config import ConfigError, exit_on_user_error
from src.data.builtin import load_fashion_mnist
from src.data.folder import DECODE_ERRORS, load_image, scan_image_folder, spread
from src.data.shards import MANIFEST_SUFFIX

log = logging.getLogger(__name__)

STORED_AS_IS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _fashion_mnist_samples(root: str, split: str, limit: int | None) -> Iterator[tuple[str, bytes, int]]:
    images, labels = load_fashion_mnist(root, split)
    for i in range(len(images) if limit is None else min(limit, len(images))):
        yield "png", _png_bytes(Image.fromarray(images[i].numpy())), int(labels[i])


def _folder_samples(root: str, limit: int | None) -> Iterator[tuple[str, bytes, int]]:
    scanned, class_to_idx = scan_image_folder(root, key="--root")
    log.info("%d classes (label = index in sorted order): %s", len(class_to_idx), ", ".join(class_to_idx))
    for path, label in spread(scanned, limit):
        try:
            img = load_image(path)
        except DECODE_ERRORS as exc:
            log.warning("leaving out unreadable image %s: %s", path, exc)
            continue
        ext = STORED_AS_IS.get(Path(path).suffix.lower())
        yield (ext, Path(path).read_bytes(), label) if ext else ("png", _png_bytes(img), label)


def _write_into(folder: Path, prefix: str, samples: Iterator[tuple[str, bytes, int]], maxcount: int) -> dict[str, int]:
    """Write the samples as shards in ``folder``; return samples per shard file (the manifest)."""
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for index, (ext, data, label) in enumerate(samples):
            sink.write({"__key__": f"{prefix}_{index:08d}", ext: data, "cls": label})
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
    return counts


def write_shards(
    source: str,
    root: str,
    split: str,
    out: str | Path,
    prefix: str = "train",
    maxcount: int = 10000,
    limit: int | None = None,
) -> str:
    """Write shards ``<out>/<prefix>-NNNNNN.tar`` of at most ``maxcount`` samples; return their brace pattern.

    ``split`` selects the Fashion-MNIST split; a folder source is one split already (its ``root``).
    ``limit`` keeps the first N Fashion-MNIST images, or N spread evenly over a class-sorted folder.
    What cannot work (a count under 1, a missing source, nothing readable in it) is a ConfigError naming the option.
    """
    for option, value in (("--maxcount", maxcount), ("--limit", limit)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{option} must be a positive integer, got {value!r}")
    if source == "fashion_mnist":
        samples = _fashion_mnist_samples(root, split, limit)
    elif source == "folder":
        samples = _folder_samples(root, limit)
    else:
        raise ConfigError(f"--source must be fashion_mnist or folder, got {source!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{prefix}-writing-"))  # a failure leaves no shard behind
    try:
        counts = _write_into(staging, prefix, samples, maxcount)
        if not counts:
            raise ConfigError(f"no readable images from --source {source} --root {root}; nothing written")
        for name in counts:
            (staging / name).replace(out / name)
        (out / f"{prefix}{MANIFEST_SUFFIX}").write_text(json.dumps(counts, indent=1))
    except FileNotFoundError as e:  # the source is missing: its message names the option
        raise ConfigError(str(e)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    count, last = sum(counts.values()), len(counts) - 1
    pattern = str(out / (f"{prefix}-{last:06d}.tar" if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"))
    log.info(
        "wrote %d samples to %d shards; train with \"dataset.train_urls='%s'\" dataset.samples_per_epoch=%d",
        count,
        len(counts),
        pattern,
        count,
    )
    return pattern


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["fashion_mnist", "folder"], required=True)
    parser.add_argument("--root", required=True, help="Fashion-MNIST directory, or an image folder root/<class>/")
    parser.add_argument("--split", choices=["train", "test"], default="train", help="Fashion-MNIST split")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--prefix", default="train", help="shard file name prefix")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    parser.add_argument("--limit", type=int, default=None, help="write at most N images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        pattern = write_shards(args.source, args.root, args.split, args.out, args.prefix, args.maxcount, args.limit)
    print(pattern)


if __name__ == "__main__":
    main()
