"""Hostile data gets a one-line ConfigError before work, or a counted skip that names it (the Trust issue, data side).

Every image and shard here is made by the test: real files through the real readers, no mocks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from src.config import ConfigError, RunStopped
from src.data import EvalTransform, PretrainTransform, ShardDataset, SkippingDataLoader, build_datamodule
from src.data.datamodule import collate_skipping
from src.data.folder import ImageFolderDataset, decode_or_none, load_image, scan_image_folder
from src.data.shards import expand_shards
from src.data.write_shards import main as write_shards_main
from src.data.write_shards import write_shards

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
MEAN, STD = [0.5] * 3, [0.5] * 3


class Pixels:
    """The decoded image as a uint8 (C, H, W) tensor: what the readers handed the transform, unchanged."""

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": TF.pil_to_tensor(img.convert("RGB"))}


def png(value: int = 128, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def datamodule(labelled: bool = False, batch_size: int = 4, **overrides):
    cfg = OmegaConf.load(CONF / f"{overrides.pop('name')}.yaml")
    cfg.img_size, cfg.mean, cfg.std = 8, MEAN, STD
    for key, value in overrides.items():
        cfg[key] = value
    views = PretrainTransform(8, MEAN, STD), EvalTransform(8, MEAN, STD)
    return build_datamodule(cfg, *views, batch_size=batch_size, num_workers=0, labelled=labelled)


# ---- item 7: every pixel mode to its right range --------------------------------------------------------------
def _pgm16(values: list[int]) -> bytes:
    return b"P5\n%d 1\n65535\n" % len(values) + b"".join(struct.pack(">H", v) for v in values)


def _saved(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


GREY_16 = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)  # 8-bit 0, 1, ~4, 128, 255


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(_saved(Image.fromarray(GREY_16), "PNG"), [0, 1, 4, 128, 255], id="16-bit PNG (I;16)"),
        pytest.param(_saved(Image.new("I;16B", (2, 1), 1000), "TIFF"), [4, 4], id="16-bit TIFF (I;16B)"),
        pytest.param(_pgm16([0, 1000, 65535]), [0, 4, 255], id="16-bit PGM (I)"),
        pytest.param(_saved(Image.fromarray(np.float32([[0, 0.5, 1]])), "TIFF"), [0, 128, 255], id="F in [0, 1]"),
        pytest.param(_saved(Image.fromarray(np.float32([[0, 7.6, 255]])), "TIFF"), [0, 8, 255], id="F in [0, 255]"),
        pytest.param(_saved(Image.new("1", (2, 1), 1), "PNG"), [255, 255], id="bilevel (1)"),
        pytest.param(_saved(Image.new("LA", (2, 1), (90, 0)), "PNG"), [90, 90], id="grey + alpha (LA)"),
        pytest.param(_saved(Image.new("RGB", (2, 1), (200, 10, 30)).quantize(), "PNG"), [(200, 10, 30)], id="P"),
        pytest.param(_saved(Image.new("RGBA", (2, 1), (1, 2, 3, 0)), "PNG"), [(1, 2, 3)], id="RGBA"),
        pytest.param(_saved(Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "TIFF"), [(255, 0, 0)], id="CMYK"),
        pytest.param(_saved(Image.new("RGB", (8, 8), (255,) * 3).convert("YCbCr"), "JPEG"), [255], id="YCbCr"),
    ],
)
def test_every_pixel_mode_comes_out_in_its_8_bit_range(tmp_path, data, expected):
    """16-bit data was clipped to {0, 255}; now each mode is scaled by the range it stores, in both readers.

    ``expected``: the first pixels of the first row, grey values or RGB triples.
    """
    img = load_image(io.BytesIO(data))
    assert img.mode in ("L", "RGB")
    rgb = [list(v) if isinstance(v, tuple) else [v] * 3 for v in expected]
    assert np.asarray(img.convert("RGB"))[0, : len(rgb)].tolist() == rgb

    (tmp_path / "folder" / "a").mkdir(parents=True)
    (tmp_path / "folder" / "a" / "x.tif").write_bytes(data)
    from_folder = ImageFolderDataset(tmp_path / "folder", Pixels())[0]["image"]
    shard = write_tar(tmp_path / "s.tar", [("x.png", data), ("x.cls", b"0")])
    from_shard = next(iter(ShardDataset(str(shard), Pixels())))["image"]
    assert torch.equal(from_folder, from_shard) and torch.equal(from_folder, TF.pil_to_tensor(img.convert("RGB")))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_saved(Image.fromarray(np.float32([[0, 300.5]])), "TIFF"), r"float \(mode F\) pixels range 0.0..300.5"),
        (_saved(Image.fromarray(np.float32([[0, np.nan]])), "TIFF"), r"float \(mode F\) pixels range"),
        (_saved(Image.fromarray(np.int32([[0, 70000]])), "TIFF"), r"integer \(mode I\) pixels range 0..70000"),
        (_saved(Image.fromarray(np.int32([[-5, 9]])), "TIFF"), r"integer \(mode I\) pixels range -5..9"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "cannot identify image file"),  # EPS named .png
        (_saved(Image.new("L", (4, 4)), "GIF"), "cannot identify image file"),  # not a format a folder lists
    ],
    ids=["F above 255", "F NaN", "I 32-bit", "I negative", "EPS", "GIF"],
)
def test_pixels_without_a_known_range_and_other_formats_are_skipped_by_name(data, reason, caplog):
    with caplog.at_level(logging.WARNING, logger="src.data"):
        assert decode_or_none(io.BytesIO(data), "hostile.png") is None
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("skipping unreadable image hostile.png: ")
    assert caplog.records[0].getMessage().count("\n") == 0
    with pytest.raises(ValueError if "range" in reason else OSError, match=reason):
        load_image(io.BytesIO(data))


# ---- item 8: every dropped sample is counted -------------------------------------------------------------------
def test_samples_of_batches_dropped_at_the_end_of_an_epoch_are_counted(tmp_path):
    """A shard whose last 24 samples hold no image: 6 batches dropped after the last real one, all 24 counted."""
    members = [(f"{i:03d}.png", png()) for i in range(8)] + [(f"{i:03d}.cls", b"1") for i in range(8, 32)]
    shard = write_tar(tmp_path / "train-000000.tar", sorted(members))
    dm = datamodule(name="shards", train_urls=str(shard), samples_per_epoch=32, shuffle_buffer=0)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == 8 and len(batches) == 2
    assert sum(len(b["label"]) for b in batches) == 8 and sum(int(b["skipped"]) for b in batches) == 24

    one_pass = datamodule(name="shards", train_urls=str(shard), samples_per_epoch=None, batch_size=5, shuffle_buffer=0)
    batches = list(one_pass.train_dataloader())  # a short last batch of 2 corrupt samples: dropped, and counted
    assert len(batches) == 2 and sum(int(b["skipped"]) for b in batches) == 24

    real = {"x": torch.ones(1)}
    data = [None, None, real, real, None, None, real, None, None]  # batches dropped before, between and after
    batches = list(SkippingDataLoader(data, batch_size=2, collate_fn=collate_skipping))
    assert [int(b["skipped"]) for b in batches] == [2, 1 + 2 + 1]


def test_a_worker_that_gets_nothing_stops_the_run_with_one_line(tmp_path):
    """A cycling reader whose shards give no sample at all: RunStopped from the worker process, on one line."""
    (tmp_path / "train-000000.tar").write_bytes(b"\x00" * 2048)  # a valid, empty tar: no manifest to count against
    data = ShardDataset(str(tmp_path / "train-000000.tar"), Pixels(), num_samples=8, repeat=True, batch_size=4)
    with pytest.raises(RunStopped, match=r"^rank 0/1 worker 0/1 got no samples in a full pass") as caught:
        list(SkippingDataLoader(data, batch_size=4, num_workers=1, collate_fn=collate_skipping))
    assert "\n" not in str(caught.value)
    with pytest.raises(RunStopped, match=r"^every sample of this pass over the data was corrupt \(4 skipped;"):
        list(SkippingDataLoader([None] * 4, batch_size=2, collate_fn=collate_skipping))


# ---- item 17: a folder of corrupt files is refused before work ---------------------------------------------------
def test_an_image_folder_of_corrupt_files_is_refused_before_work(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "train" / cls / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * i)
    first = tmp_path / "train" / "cat" / "0.png"
    refusal = rf"^dataset.root: none of the 8 files tried under .*train is a readable image: {first} "
    with pytest.raises(ConfigError, match=refusal) as e:
        datamodule(name="image_folder", root=str(tmp_path / "train"))
    assert "\n" not in str(e.value)

    Image.new("L", (8, 8)).save(tmp_path / "train" / "dog" / "0.png")  # one good file in ten: a run may go on
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ConfigError, match=r"^dataset.val_root: none of the 1 files tried"):
        datamodule(name="image_folder", root=str(tmp_path / "train"), val_root=str(tmp_path / "val"))
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ConfigError, match=r"^dataset.val_root: class folders \['bird'\] .* not among the training"):
        datamodule(name="image_folder", root=str(tmp_path / "train"), val_root=str(tmp_path / "val"))


def test_a_fifo_named_like_an_image_is_not_listed(tmp_path):
    """Opening a FIFO waits for a writer forever: only regular files are images."""
    (tmp_path / "a").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "a" / "real.png")
    os.mkfifo(tmp_path / "a" / "pipe.png")
    samples, _ = scan_image_folder(tmp_path, "dataset.root")
    assert samples == [(str(tmp_path / "a" / "real.png"), 0)]


def test_num_classes_below_the_labels_is_refused(tmp_path):
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / cls / "0.png")
    with pytest.raises(ConfigError, match=r"dataset.num_classes=2 but dataset.root=.* has class folders for 3 classes"):
        datamodule(name="image_folder", root=str(tmp_path), num_classes=2)
    with pytest.raises(ConfigError, match=r"dataset.num_classes=5 but Fashion-MNIST .* 10 classes"):
        datamodule(name="fashion_mnist", num_classes=5)


# ---- item 18 and labels: shards ----------------------------------------------------------------------------------
def test_shards_with_val_urls_need_num_classes(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.png", png()), ("a.cls", b"3")])
    with pytest.raises(ConfigError, match=r"^dataset.num_classes is required with dataset.val_urls"):
        datamodule(name="shards", train_urls=str(shard), val_urls=str(shard), samples_per_epoch=4)
    dm = datamodule(name="shards", train_urls=str(shard), val_urls=str(shard), samples_per_epoch=4, num_classes=4)
    assert dm.num_classes == 4


HOSTILE_LABELS = [b"-3", b"abc", b"nan", b"1e3", b"99999999999999999999999", b"\xff\xfe", b"", b"10"]


def test_labels_that_are_not_class_indices_are_skipped_counted_and_named(tmp_path, caplog):
    members = [("000.png", png()), ("000.cls", b" 7\n")]
    for i, label in enumerate(HOSTILE_LABELS, 1):
        members += [(f"{i:03d}.png", png()), (f"{i:03d}.cls", label)]
    members += [(f"{len(HOSTILE_LABELS) + 1:03d}.png", png())]  # no label at all
    shard = write_tar(tmp_path / "s.tar", members)
    with caplog.at_level(logging.WARNING, logger="src.data"):
        samples = list(ShardDataset(str(shard), Pixels(), num_classes=10, labelled=True))
    assert int(samples[0]["label"]) == 7 and samples[1:] == [None] * (len(HOSTILE_LABELS) + 1)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(HOSTILE_LABELS) + 1 and all(str(shard) in m and "\n" not in m for m in messages)
    assert "its label (.cls) b'-3' is not a class index" in messages[0]
    assert "its label 10 is not below dataset.num_classes=10" in messages[-2]
    assert "it has no label (.cls member)" in messages[-1]

    unlabelled = write_tar(tmp_path / "u.tar", [("a.png", png())])
    assert int(next(iter(ShardDataset(str(unlabelled), Pixels())))["label"]) == -1  # pretraining needs no label
    with pytest.raises(ConfigError, match=r"^dataset.train_urls: no sample of the first 8 in each of 1 .*no label"):
        datamodule(labelled=True, name="shards", train_urls=str(unlabelled), samples_per_epoch=4)


def test_shards_that_hold_no_image_are_refused_before_work(tmp_path):
    shards = [write_tar(tmp_path / f"s-{i}.tar", [(f"{i}.cls", b"1"), (f"{i}.txt", b"hi")]) for i in range(2)]
    with pytest.raises(ConfigError, match=r"^dataset.train_urls: no sample of the first 8 in each of 2 .*no image"):
        datamodule(name="shards", train_urls=[str(s) for s in shards], samples_per_epoch=4)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty.tar \(.*\); a sample needs a decodable"):
        datamodule(name="shards", train_urls=str(tmp_path / "empty.tar"), samples_per_epoch=4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not readable JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"s.tar": -1}', r"'s.tar' has '-1' samples, not a count >= 0"),
        ('{"s.tar": "12"}', r"'s.tar' has '12' samples, not a count"),
        ('{"s.tar": 2.5}', r"'s.tar' has '2.5' samples, not a count"),
        ('{"s.tar": true}', r"'s.tar' has 'True' samples, not a count"),
        ('{"s.tar": 1000000000000}', r"s.tar is 10240 bytes, too small for the 1000000000000 samples"),
    ],
)
def test_a_manifest_that_is_not_counts_is_refused_by_name(tmp_path, text, message):
    """It used to be a raw ValueError/AttributeError, or silently ignored, or counted as a billion lost samples."""
    shard = write_tar(tmp_path / "s.tar", [("a.png", png()), ("a.cls", b"1")])
    (tmp_path / "s-shards.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"^(shard manifest {tmp_path}/s-shards.json: |shard )?.*{message}"):
        datamodule(name="shards", train_urls=str(shard), samples_per_epoch=4)
    with pytest.raises(ConfigError, match=message):
        ShardDataset(str(shard), Pixels())


def test_shard_lists_and_writer_options_that_cannot_work_are_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^dataset.train_urls=5 must be a shard path or brace pattern"):
        expand_shards(5, "dataset.train_urls")
    with pytest.raises(ConfigError, match=r"expands to no shards"):
        expand_shards([], "dataset.train_urls")
    with pytest.raises(ConfigError, match=r"^--maxcount must be a positive integer, got 0"):
        write_shards("folder", str(tmp_path), "train", tmp_path / "out", maxcount=0)
    with pytest.raises(SystemExit, match=rf"^config error: --root: image folder {tmp_path}/nowhere does not exist"):
        write_shards_main(["--source", "folder", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert json.dumps(capsys.readouterr().out) == '""'  # nothing printed as if a pattern had been written
