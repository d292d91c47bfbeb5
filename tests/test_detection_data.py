"""Detection data on real sets (Fashion-MNIST scenes, deepforest trees, stardist nuclei) and tiny JSONs made here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from src.config import ConfigError, validate
from src.data.datamodule import SkippingDataLoader
from src.detection.build_sets import build_set, main, package_data
from src.detection.data import (
    CocoDataModule,
    CocoDetection,
    DetectionTrainTransform,
    collate_detection,
    tight_boxes,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
SMALL = {"train_images": 20, "val_images": 8}


def dataset_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def load(root: Path, split: str) -> dict:
    return json.loads((root / f"annotations/instances_{split}.json").read_text())


def decoded(ann: dict) -> np.ndarray:
    return mask_utils.decode(ann["segmentation"]).astype(bool)


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fmnist") / "set"
    build_set("fmnist_scenes", root, **SMALL)
    return root


# ---- builders -----------------------------------------------------------------------------------------------------
def test_fmnist_scenes_are_deterministic_from_the_seed(fmnist: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_set("fmnist_scenes", again, **SMALL)
    other = tmp_path / "other"
    build_set("fmnist_scenes", other, **SMALL, seed=1)
    for split in ("train", "val"):
        assert load(again, split) == load(fmnist, split)
        assert load(other, split)["annotations"] != load(fmnist, split)["annotations"]
    for name in ("train_000000.png", "val_000007.png"):
        assert (again / "images" / name).read_bytes() == (fmnist / "images" / name).read_bytes()
    manifest = json.loads((fmnist / "manifest.json").read_text())
    assert manifest["builder"] == "fmnist_scenes" and manifest["params"]["seed"] == 0
    assert manifest["counts"]["train"]["images"] == 20 and manifest["counts"]["val"]["images"] == 8


def test_fmnist_scene_masks_are_the_visible_garment_pixels(fmnist: Path) -> None:
    coco = load(fmnist, "train")
    assert [c["name"] for c in coco["categories"]][:3] == ["T-shirt/top", "Trouser", "Pullover"]
    assert len(coco["categories"]) == 10
    for image in coco["images"]:
        pixels = np.asarray(Image.open(fmnist / "images" / image["file_name"]))
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert 1 <= len(anns) <= 5
        union = np.zeros(pixels.shape, int)
        for ann in anns:
            mask = decoded(ann)
            assert mask.any() and 1 <= ann["category_id"] <= 10
            x1, y1, x2, y2 = tight_box(mask)
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1] and ann["area"] == mask.sum()
            assert pixels[mask].min() > 16  # every mask pixel is garment (above the threshold)
            union += mask
        assert union.max() == 1  # occlusion removed hidden pixels from the earlier garments' masks
        assert pixels[union == 0].max() < 80  # the rest is the dark, mildly noisy canvas


def test_deepforest_tiles(tmp_path: Path) -> None:
    manifest = build_set("deepforest", tmp_path / "trees")
    assert manifest["counts"]["train"] == {"images": 43, "instances": 719, "classes": 1}
    assert manifest["counts"]["val"] == {"images": 13, "instances": 475, "classes": 1}
    assert manifest["params"]["val_sources"] == ["2019_YELL_2_541000_4977000_image_crop", "OSBS_029"]
    val = load(tmp_path / "trees", "val")
    assert {i["file_name"].rsplit("_y", 1)[0] for i in val["images"]} == set(manifest["params"]["val_sources"])
    assert val["categories"] == [{"id": 1, "name": "Tree"}]
    for ann in val["annotations"]:
        image = val["images"][ann["image_id"] - 1]
        x, y, w, h = ann["bbox"]
        assert "segmentation" not in ann and w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]


def test_stardist_tiles_keep_the_real_nuclei(tmp_path: Path) -> None:
    manifest = build_set("stardist", tmp_path / "nuclei")
    assert manifest["counts"]["train"] == {"images": 12, "instances": 118, "classes": 1}
    assert manifest["counts"]["val"] == {"images": 4, "instances": 36, "classes": 1}
    assert len(manifest["tiles"]["val"]) == 4
    labels = tifffile.imread(package_data("stardist", "data", "images", "mask2d.tif"))
    assert len(np.unique(labels[labels > 0])) == 125
    area = 0
    for split in ("train", "val"):
        for ann in load(tmp_path / "nuclei", split)["annotations"]:
            mask = decoded(ann)
            x1, y1, x2, y2 = tight_box(mask)
            assert mask.sum() >= 16 and ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            area += mask.sum()
    assert 0.99 * (labels > 0).sum() <= area <= (labels > 0).sum()  # only small edge fragments are dropped


def test_cli_prints_one_line_per_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["fmnist_scenes", "--out", str(tmp_path / "cli"), "--train-images", "3", "--val-images", "2", "--seed", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fmnist_scenes train: 3 images,") and lines[1].startswith("fmnist_scenes val: 2 images,")
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["params"]["seed"] == 4


# ---- dataset ------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """One 20x30 grey image; one shape as a polygon, an uncompressed RLE and a compressed RLE; a crowd; a sliver."""
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(root / "images" / "a.png")
    polygon = [[4.0, 3.0, 18.0, 3.0, 18.0, 12.0, 9.0, 15.0, 4.0, 12.0]]
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 20, 30)))
    flat = mask.flatten(order="F")  # COCO RLE runs go down the columns, starting with a run of zeros
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    compressed = mask_utils.encode(np.asfortranarray(mask))
    compressed["counts"] = compressed["counts"].decode()
    box = [4.0, 3.0, 14.0, 12.0]
    segmentations = [polygon, {"size": [20, 30], "counts": counts}, compressed]
    anns = [{"segmentation": s, "iscrowd": 0} for s in segmentations]
    anns.append({"segmentation": {"size": [20, 30], "counts": counts}, "iscrowd": 1})
    anns.append({"segmentation": [[20.0, 5.0, 20.5, 5.0, 20.5, 9.0]], "iscrowd": 0, "bbox": [20.0, 5.0, 0.5, 4.0]})
    for i, ann in enumerate(anns, 1):
        ann.update(id=i, image_id=7, category_id=[3, 9][i % 2], area=float(mask.sum()))
        ann.setdefault("bbox", box)
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 30}],
        "annotations": anns,
        "categories": [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}],
    }
    for split in ("train", "val"):
        (root / f"annotations/instances_{split}.json").write_text(json.dumps(coco))
    return root


def tiny_cfg(root: Path, **overrides):
    return dataset_cfg("fmnist_scenes", **{"root": str(root), "build": None, "num_classes": 2, **overrides})


def test_dataset_decodes_every_segmentation_format_alike(tiny: Path) -> None:
    data = CocoDetection(tiny / "images", tiny / "annotations/instances_val.json", masks=True)
    assert data.class_names == ["three", "nine"]  # labels follow the category ids, not their order in the JSON
    image, target = data[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32 and image.max() <= 1
    masks = target["masks"]
    assert masks.shape == (5, 20, 30) and masks.dtype == torch.uint8
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2]) and masks[0].sum() > 100
    assert target["iscrowd"].tolist() == [0, 0, 0, 1, 0] and target["image_id"] == 7
    assert target["labels"].tolist() == [2, 1, 2, 1, 2]
    assert target["boxes"][0].tolist() == [4.0, 3.0, 18.0, 15.0]  # xywh -> xyxy


def test_training_drops_crowds_and_slivers(tiny: Path) -> None:
    data = CocoDetection(tiny / "images", tiny / "annotations/instances_train.json", masks=True, train=True)
    _, target = data[0]
    assert target["iscrowd"].tolist() == [0, 0, 0] and len(target["masks"]) == 3
    assert data.degenerate == 1


def test_flip_and_crop_keep_boxes_tight_on_masks(fmnist: Path) -> None:
    data = CocoDetection(fmnist / "images", fmnist / "annotations/instances_train.json", masks=True, train=True)
    flip = DetectionTrainTransform(flip_prob=1.0, crop_prob=0.0)
    crop = DetectionTrainTransform(flip_prob=0.0, crop_prob=1.0, crop_sizes=(96, 120, 144), crop_range=(92, 144))
    for index in range(10):
        image, target = data[index]
        assert torch.equal(target["boxes"], tight_boxes(target["masks"]))  # the builder's boxes are tight
        flipped, after = flip(image, target)
        assert torch.equal(flipped, image.flip(-1)) and torch.equal(after["boxes"], tight_boxes(after["masks"]))
        torch.manual_seed(index)
        cropped, after = crop(image, target)
        h, w = cropped.shape[-2:]
        assert min(h, w) >= 92 and max(h, w) <= 144 and after["masks"].shape[-2:] == (h, w)
        assert after["masks"].flatten(1).any(1).all() and len(after["labels"]) == len(after["masks"])
        assert torch.equal(after["boxes"], tight_boxes(after["masks"]))


def test_crop_clips_boxes_without_masks(fmnist: Path) -> None:
    data = CocoDetection(fmnist / "images", fmnist / "annotations/instances_train.json", train=True)
    crop = DetectionTrainTransform(flip_prob=0.0, crop_prob=1.0, crop_sizes=(96,), crop_range=(40, 60))
    torch.manual_seed(0)
    for index in range(10):
        image, target = crop(*data[index])
        h, w = image.shape[-2:]
        boxes = target["boxes"]
        assert "masks" not in target and len(target["labels"]) == len(boxes) == len(target["area"])
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_collate_keeps_each_size_and_counts_corrupt() -> None:
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 1}
    batch = collate_detection([(torch.rand(3, 20, 30), target), None, (torch.rand(3, 40, 10), target)])
    assert [tuple(i.shape) for i in batch["images"]] == [(3, 20, 30), (3, 40, 10)]
    assert len(batch["targets"]) == 2 and batch["skipped"].item() == 1


def test_corrupt_image_is_skipped_and_counted(tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tiny / "images" / "b.png").write_bytes(b"not a png")
    data = CocoDetection(tiny / "images", tiny / "annotations/instances_val.json")
    good, anns = data.images[0], data.annotations[0]
    bad = dict(good, file_name="b.png")
    with caplog.at_level(logging.WARNING):
        for order, skipped in (([good, bad, good], [1, 0]), ([bad, bad, good], [2])):  # an all-corrupt batch: carried
            data.images, data.annotations = order, [anns] * 3
            batches = list(SkippingDataLoader(data, batch_size=2, collate_fn=collate_detection))
            assert [b["skipped"].item() for b in batches] == skipped
            assert sum(len(b["images"]) for b in batches) == order.count(good)
        data.images = [bad]
        with pytest.raises(RuntimeError, match="every sample of this pass over the data was corrupt"):
            list(SkippingDataLoader(data, batch_size=2, collate_fn=collate_detection))
    assert "b.png" in caplog.text


# ---- datamodule ---------------------------------------------------------------------------------------------------
def test_datamodule_builds_once_then_checks_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "data" / "scenes"
    cfg = dataset_cfg("fmnist_scenes", root=str(root), build_args={**SMALL, "seed": 3})
    dm = CocoDataModule(cfg, batch_size=4, num_workers=0)
    assert dm.num_classes == 10 and dm.class_names[-1] == "Ankle boot" and dm.has_masks
    assert CocoDataModule.read_class_names(cfg) == dm.class_names
    assert json.loads((root / "manifest.json").read_text())["params"]["seed"] == 3
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["images"]) == 4 and batch["skipped"].item() == 0 and "masks" in batch["targets"][0]
    assert sum(len(b["images"]) for b in dm.val_dataloader()) == 8
    stamp = (root / "manifest.json").stat().st_mtime_ns
    CocoDataModule(cfg, batch_size=4, num_workers=0, masks=False)  # reuses the set
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    cfg.build_args.seed = 4
    with pytest.raises(ConfigError, match=r"other parameters \(seed: 3 -> 4\).*delete"):
        CocoDataModule(cfg, batch_size=4, num_workers=0)


def test_config_errors_name_the_key_or_file(tiny: Path) -> None:
    CocoDataModule(tiny_cfg(tiny), batch_size=1, num_workers=0)
    with pytest.raises(ConfigError, match="dataset.num_classes=10"):
        CocoDataModule(tiny_cfg(tiny, num_classes=10), batch_size=1, num_workers=0)
    detect = ["objective=detect", "runs_dir=/nonexistent"]  # one key alone is the schema's, checked by validate
    with pytest.raises(ConfigError, match=r"^dataset.crop.range=\[200, 100\] must be \[min, max\]"):
        validate(compose_config([*detect, "dataset=fmnist_scenes", "dataset.crop.range=[200,100]"], "finetune"))
    with pytest.raises(ConfigError, match="dataset.build_args: fmnist_scenes has no parameter"):
        CocoDataModule(tiny_cfg(tiny, build="fmnist_scenes", build_args={"seeds": 1}), batch_size=1, num_workers=0)
    coco = load(tiny, "val")
    del coco["annotations"][1]["segmentation"]
    (tiny / "annotations/instances_val.json").write_text(json.dumps(coco))
    with pytest.raises(ConfigError, match="annotation 2 .* has no segmentation"):
        CocoDataModule(tiny_cfg(tiny), batch_size=1, num_workers=0)
    CocoDataModule(tiny_cfg(tiny, masks=False), batch_size=1, num_workers=0)  # boxes only: no segmentation needed
    coco["images"].append({"id": 8, "file_name": "b.png", "height": 20, "width": 30})
    (tiny / "annotations/instances_val.json").write_text(json.dumps(coco))
    with pytest.raises(ConfigError, match="dataset.images: 1 image file.* the first: b.png"):
        CocoDataModule(tiny_cfg(tiny, masks=False), batch_size=1, num_workers=0)
    with pytest.raises(ConfigError, match="^missing value for 'dataset.root'"):
        validate(compose_config([*detect, "dataset=coco"], "finetune"))
