"""A COCO instances file is data from anywhere: each fault in it is one named ConfigError line or a counted skip.

Duplicate ids, boxes outside their image, NaN coordinates, an all-crowd training split, missing keys, wrong
types, masks that would not fit, paths out of the image folder, files that are not JSON at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CONF, in_process
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from src.config import ConfigError
from src.detection.build_sets import ensure_built
from src.detection.data import CocoDataModule, CocoDetection, read_coco, rle_total

KEY = "dataset.train_annotations"
SIZES = {1: (20, 30), 2: (16, 16)}  # image id -> (height, width)


def tiny_coco() -> dict[str, Any]:
    """Two images; a polygon, a compressed RLE and a crowd's uncompressed RLE, all inside their images."""
    square = np.zeros(SIZES[2], np.uint8)
    square[1:6, 1:6] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    crowd = {"size": list(SIZES[1]), "counts": [100, 40, 460]}  # 600 = 20 x 30 pixels, column-major runs
    anns = [
        (1, 1, [2, 3, 10, 8], [[2.0, 3.0, 12.0, 3.0, 12.0, 11.0, 2.0, 11.0]], 0),
        (2, 2, [1, 1, 5, 5], {"size": list(SIZES[2]), "counts": compressed["counts"].decode()}, 0),
        (1, 2, [5, 0, 2, 20], crowd, 1),
    ]
    return {
        "images": [
            {"id": i, "file_name": f"{'ab'[i - 1]}.png", "height": h, "width": w} for i, (h, w) in SIZES.items()
        ],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "bbox": b, "segmentation": s, "iscrowd": crowd}
            for n, (i, c, b, s, crowd) in enumerate(anns, 1)
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A set folder with the two real images and both splits written from ``tiny_coco``."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for i, (h, w) in SIZES.items():
        Image.fromarray(np.full((h, w), 60 * i, np.uint8)).save(tmp_path / "images" / f"{'ab'[i - 1]}.png")
    for split in ("train", "val"):
        (tmp_path / f"annotations/instances_{split}.json").write_text(json.dumps(tiny_coco()))
    return tmp_path


def read(root: Path, coco: Any, masks: bool = True, train: bool = False) -> dict[str, Any]:
    """Write ``coco`` (a dict, or the file's text or bytes as they are) and read it as the datamodule does."""
    path = root / "annotations" / "instances_train.json"
    if isinstance(coco, bytes):
        path.write_bytes(coco)
    else:
        path.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return read_coco(path, KEY, root / "images", "dataset.images", masks, train)


def refused(root: Path, coco: Any, *fragments: str, masks: bool = True, train: bool = False) -> str:
    """The one-line message of the ConfigError reading ``coco`` gives; it names the key, the file and fragments."""
    with pytest.raises(ConfigError) as caught:
        read(root, coco, masks, train)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(KEY) or message.startswith("dataset.images"), message
    assert str(root / "annotations" / "instances_train.json") in message or "dataset.images" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def changed(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    coco = tiny_coco()
    edit(coco)
    return coco


def test_the_tiny_set_reads_as_it_is(root: Path) -> None:
    assert read(root, tiny_coco(), train=True) == tiny_coco()


# ---- the items ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "noun"), [("images", "image"), ("annotations", "annotation"), ("categories", "category")]
)
def test_duplicate_ids_are_refused_by_name(root: Path, section: str, noun: str) -> None:
    """Item 9: a second image with the same id used to train on the first one's boxes."""
    coco = tiny_coco()
    coco[section].append(dict(coco[section][1]))
    refused(root, coco, f"duplicate {noun} id(s) 2: each {noun} needs an id of its own")


def test_the_same_image_file_twice_is_refused(root: Path) -> None:
    coco = changed(lambda c: c["images"][1].update(file_name="a.png"))
    refused(root, coco, "images 1 and 2 are both 'a.png': list each image file once")


def test_boxes_outside_the_image_are_clipped_or_dropped_counted_and_named(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 10: boxes reaching out of the image are clipped; those left with nothing inside are dropped."""
    coco = tiny_coco()
    coco["annotations"][0]["bbox"] = [-4, 15, 10, 8]  # on image 1 (30 wide, 20 high): clipped to [0, 15, 6, 5]
    coco["annotations"][1]["bbox"] = [16, 2, 4, 4]  # right of image 2 (16 wide): nothing inside
    coco["annotations"][2]["area"] = 1e30  # more than image 1's 600 pixels
    with caplog.at_level(logging.WARNING):
        kept = read(root, coco)["annotations"]
    assert [a["id"] for a in kept] == [1, 3] and kept[0]["bbox"] == [0.0, 15.0, 6.0, 5.0] and kept[1]["area"] == 600
    assert (
        f"{KEY}: {root}/annotations/instances_train.json: 2 annotation(s) reaching outside their image were "
        "clipped to it (annotations 1, 3); 1 with nothing inside it were dropped (annotations 2)"
    ) in caplog.text
    data = CocoDetection(root / "images", root / "annotations/instances_train.json", masks=True)
    _, target = data[0]
    assert target["boxes"].tolist() == [[0.0, 15.0, 6.0, 20.0], [5.0, 0.0, 7.0, 20.0]]


def test_a_warning_names_the_first_three(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    coco = tiny_coco()
    first = coco["annotations"][0]
    coco["annotations"] = [dict(first, id=i, bbox=[25, 0, 10, 5]) for i in range(10, 15)]
    with caplog.at_level(logging.WARNING):
        read(root, coco, masks=False)
    assert (
        "5 annotation(s) reaching outside their image were clipped to it (annotations 10, 11, 12, ...)" in caplog.text
    )


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused_naming_the_annotation(root: Path, number: float) -> None:
    """Item 11: a NaN or inf coordinate reached training as a skipped NaN step."""
    shown = json.dumps(number)
    coco = changed(lambda c: c["annotations"][1]["bbox"].__setitem__(2, number))
    refused(root, coco, f"annotation 2 has bbox [1, 1, {shown}, 5]; it must be 4 finite numbers", masks=False)
    coco = changed(lambda c: c["annotations"][2].update(area=number))
    refused(root, coco, f"annotation 3 has area {shown}; it must be a finite number >= 0")
    coco = changed(lambda c: c["annotations"][0]["segmentation"][0].__setitem__(3, number))
    refused(root, coco, f"annotation 1's segmentation has polygon [2.0, 3.0, 12.0, {shown}", "3 finite x, y pairs")


def test_an_all_crowd_training_split_fails_before_work_with_the_way_out(root: Path) -> None:
    """Item 19: it used to fail in the sampler with `ValueError ... no step fits`."""
    coco = tiny_coco()
    for ann in coco["annotations"]:
        ann["iscrowd"] = 1
    read(root, coco)  # a validation split may be all crowds
    refused(
        root,
        coco,
        "nothing to train on: training drops crowd regions (iscrowd=1: 3 here) and boxes under 1 px or outside their "
        "image (0 here), which leaves none of its 3 annotations; use a training file with regular instances",
        train=True,
    )


def test_the_front_door_says_it_in_one_line_and_exits_1(root: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """What the user types and sees: `config error: ...` on stderr, status 1, before any model is built."""
    coco = tiny_coco()
    for ann in coco["annotations"]:
        ann["iscrowd"] = 1
    (root / "annotations/instances_train.json").write_text(json.dumps(coco))
    overrides = ["objective=detect", "encoder=pale_t", "dataset=deepforest_trees", "dataset.build=null"]
    overrides += [f"dataset.root={root}", "dataset.num_classes=2", f"runs_dir={tmp_path}", "logger=csv"]
    overrides += ["trainer.accelerator=cpu", "num_workers=0"]
    done = in_process("src.finetune", overrides, capsys, monkeypatch)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"config error: dataset.train_annotations: {root}/annotations/instances_train.json: ")
    assert "nothing to train on" in last and "Traceback" not in done.stderr


# ---- the same class of fault elsewhere in the file ------------------------------------------------------------
def drop(section: str, index: int | None, key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda c: (c[section][index] if index is not None else c).pop(key)


def put(section: str, index: int, key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda c: c[section][index].__setitem__(key, value)


HOSTILE = {
    "no images": (drop("images", None, "images"), 'has no "images" list'),
    "no annotations": (drop("annotations", None, "annotations"), 'has no "annotations" list'),
    "no categories": (drop("categories", None, "categories"), 'has no "categories" list'),
    "empty categories": (lambda c: c.update(categories=[]), "lists no categories"),
    "empty images": (lambda c: c.update(images=[], annotations=[]), "lists no images"),
    "images an object": (lambda c: c.update(images={"1": c["images"][0]}), '"images" is an object; it must be a list'),
    "an annotation a list": (
        lambda c: c["annotations"].__setitem__(0, [1, 2]),
        '"annotations"[0] is an array; it must be an object',
    ),
    "string id": (put("images", 0, "id", "1"), '"images"[0] has "id": "1"; it must be an integer'),
    "true as an id": (put("categories", 0, "id", True), '"categories"[0] has "id": true; it must be an integer'),
    "no annotation id": (drop("annotations", 2, "id"), '"annotations"[2] has no "id"'),
    "no bbox": (drop("annotations", 0, "bbox"), 'annotation 1 has no "bbox"'),
    "no image_id": (drop("annotations", 0, "image_id"), 'annotation 1 has no "image_id"'),
    "no file_name": (drop("images", 0, "file_name"), 'image 1 has no "file_name"'),
    "no width": (drop("images", 1, "width"), 'image 2 has no "width"'),
    "zero height": (put("images", 0, "height", 0), 'image 1 has "height": 0; it must be an integer in [1, 2147483647]'),
    "string width": (
        put("images", 0, "width", "30"),
        'image 1 has "width": "30"; it must be an integer in [1, 2147483647]',
    ),
    "a number as name": (put("categories", 1, "name", 2), "category 2 has a name that is not a string: 2"),
    "string coordinate": (
        put("annotations", 0, "bbox", ["2", 3, 10, 8]),
        'annotation 1 has bbox ["2", 3, 10, 8]; it must be 4 finite numbers [x, y, width, height]',
    ),
    "bbox of 3": (put("annotations", 0, "bbox", [2, 3, 10]), "annotation 1 has bbox [2, 3, 10]; it must be 4"),
    "negative width": (
        put("annotations", 0, "bbox", [2, 3, -4, 8]),
        "annotation 1 has bbox [2, 3, -4, 8] with a negative side: a bbox is [x, y, width, height]",
    ),
    "unknown image": (
        put("annotations", 0, "image_id", 99),
        "annotation 1 refers to image_id 99, which no image has",
    ),
    "unknown category": (
        put("annotations", 1, "category_id", 7),
        "annotation 2 refers to category_id 7, which no category has",
    ),
    "iscrowd 2": (put("annotations", 0, "iscrowd", 2), "annotation 1 has iscrowd 2; it must be 0 or 1"),
    "negative area": (put("annotations", 0, "area", -1), "annotation 1 has area -1; it must be a finite number"),
    "no segmentation": (
        drop("annotations", 1, "segmentation"),
        "annotation 2 (image 2) has no segmentation, which dataset.masks=true needs: set dataset.masks=false",
    ),
    "odd polygon": (
        put("annotations", 0, "segmentation", [[2.0, 3.0, 12.0, 3.0, 12.0, 11.0, 2.0]]),
        "annotation 1's segmentation has polygon [2.0, 3.0, 12.0, 3.0, 12.0, 11.0, 2.0]: a polygon is a flat",
    ),
    "ragged polygon": (
        put("annotations", 0, "segmentation", [[2.0, [3.0], 12.0, 3.0, 12.0, 11.0]]),
        "a polygon is a flat list of at least 3 finite x, y pairs",
    ),
    "far polygon": (
        put("annotations", 0, "segmentation", [[2.0, 3.0, 1e12, 3.0, 12.0, 11.0]]),
        "has a polygon reaching further outside its image (width 30, height 20) than its size",
    ),
    "RLE of another size": (
        lambda c: c["annotations"][1]["segmentation"].update(size=[20, 30]),
        "annotation 2's segmentation has an RLE of size [20, 30], not its image's [height, width] [16, 16]",
    ),
    "short RLE": (
        lambda c: c["annotations"][2]["segmentation"].update(counts=[100, 40]),
        "annotation 3's segmentation has RLE counts that cover 140 of the image's 600 pixels",
    ),
    "negative run": (
        lambda c: c["annotations"][2]["segmentation"].update(counts=[700, -100]),
        "has RLE counts that are neither a compressed string nor a list of run lengths",
    ),
    "garbage compressed RLE": (
        lambda c: c["annotations"][1]["segmentation"].update(counts="\u00ff\u00fe"),
        "annotation 2's segmentation has RLE counts that cover no valid runs of the image's 256 pixels",
    ),
    "up and out": (put("images", 0, "file_name", "../a.png"), "image 1 has file_name '../a.png', which leaves the"),
    "absolute": (put("images", 1, "file_name", "/etc/passwd"), "image 2 has file_name '/etc/passwd', which leaves"),
    "NUL in a name": (put("images", 1, "file_name", "b\0.png"), 'image 2 has file_name "b\\u0000.png"; it must be'),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_fault_in_the_file_is_one_line_naming_it(root: Path, name: str) -> None:
    edit, fragment = HOSTILE[name]
    refused(root, changed(edit), fragment)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "is empty; it must be a COCO instances JSON"),
        ("  \n", "is empty; it must be a COCO instances JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is not JSON ("),
        ('{"images": [{"id": 1, "file_na', "is not JSON (Unterminated string"),
        ("[" * 100_000, "is not JSON ("),
        ("[1, 2]", "holds an array, not a COCO instances object with images, annotations and categories"),
        ("7", "holds a number, not a COCO instances object"),
    ],
)
def test_a_file_that_is_not_a_coco_json_is_named(root: Path, text: str | bytes, fragment: str) -> None:
    refused(root, text, fragment)


def test_a_missing_image_file_is_named(root: Path) -> None:
    coco = changed(put("images", 1, "file_name", "sub/c.png"))
    message = refused(root, coco, "1 image file(s) listed in", "the first: sub/c.png")
    assert message.startswith("dataset.images: ")


def test_the_class_names_come_from_a_checked_file(root: Path) -> None:
    path = root / "annotations/instances_val.json"
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "dataset/deepforest_trees.yaml"), {"root": str(root), "build": None})
    assert CocoDataModule.read_class_names(cfg) == ["one", "two"]
    coco = tiny_coco()
    coco["categories"].append({"id": 2, "name": "again"})
    path.write_text(json.dumps(coco))
    with pytest.raises(ConfigError, match=r"^dataset.val_annotations: .*: duplicate category id\(s\) 2"):
        CocoDataModule.read_class_names(cfg)
    path.write_text(json.dumps({"categories": {"1": "one"}}))
    with pytest.raises(ConfigError, match='"categories" is an object; it must be a list'):
        CocoDataModule.read_class_names(cfg)


def test_an_image_of_another_size_than_its_json_is_skipped_and_named(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its boxes and masks were drawn for another picture: a counted skip (None), never a crash or a misfit."""
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(root / "images" / "b.png")
    data = CocoDetection(root / "images", root / "annotations/instances_val.json", masks=True)
    with caplog.at_level(logging.WARNING):
        assert data[1] is None and data[0] is not None
    assert f"skipping image {root}/images/b.png: it is 24x16 but its annotations are for 16x16" in caplog.text


def test_compressed_rle_runs_are_added_up_as_pycocotools_reads_them() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (4, 4), (37, 23), (64, 80)]:
        mask = np.asfortranarray((rng.random(shape) < 0.3).astype(np.uint8))
        counts = mask_utils.encode(mask)["counts"].decode()
        assert rle_total(counts) == mask.size
        assert rle_total(counts[:-1]) != mask.size  # a cut string never adds up
    assert rle_total("") == 0 and rle_total("P" * 8 + "1") is None and rle_total("\u00ff") is None


# ---- the built sets' manifest ----------------------------------------------------------------------------------
@pytest.mark.parametrize("manifest", ["[1, 2]", '{"builder": "fmnist_scenes", "params": [1]}', "[" * 100_000])
def test_a_manifest_that_is_not_an_object_is_refused(tmp_path: Path, manifest: str) -> None:
    root = tmp_path / "set"
    root.mkdir()
    (root / "manifest.json").write_text(manifest)
    with pytest.raises(ConfigError, match=r"dataset.root=.* (holds no readable manifest.json|other parameters)"):
        ensure_built({"build": "fmnist_scenes", "root": str(root), "build_args": {}})
