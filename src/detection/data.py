"""COCO-format instance data for the detector: dataset, the recipe's train augmentation, collate, its data kind
(``CocoKind``, registered in src/data/kinds.py's ``DATA_KINDS`` when this module is imported), datamodule.

Samples follow torchvision's detection format: an unnormalised float image (3, H, W) in [0, 1] at its own
size and a target dict (boxes xyxy float32, labels 1..K int64, masks (N, H, W) uint8 when the set has
masks, iscrowd, area, image_id). Only the first, size-changing part of the MIMDet/ViTDet "3x" recipe runs
here (flip; with probability 0.5 a shortest-edge resize and a random crop); the multi-scale resize, the
test resize and normalisation belong to the model's transform, which also batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from src.config import ConfigError
from src.data.datamodule import SkippingDataLoader
from src.data.distributed import SeededDataset, evaluation_split, training_sampler
from src.data.folder import decode_or_none
from src.data.kinds import DataKind, kind_class, register_kind
from src.detection.build_sets import ensure_built

log = logging.getLogger(__name__)

Target = dict[str, Any]
Sample = tuple[torch.Tensor, Target]
INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area")  # the per-instance entries of a target


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an (H, W) uint8 mask."""
    if isinstance(segmentation, list) or isinstance(segmentation["counts"], list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        segmentation = mask_utils.merge(rles) if isinstance(rles, list) else rles
    return mask_utils.decode(segmentation)


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of (N, H, W) masks on pixel edges (a 1-pixel mask is 1x1, as in COCO); empty -> zeros."""
    masks = masks.bool()
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)

    def span(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = hit.byte().argmax(1)
        last = hit.shape[1] - hit.flip(1).byte().argmax(1)
        return first, last

    (y1, y2), (x1, x2) = span(rows), span(cols)
    return torch.stack([x1, y1, x2, y2], 1).float() * rows.any(1, keepdim=True)


def select(target: Target, keep: torch.Tensor) -> Target:
    """The target restricted to the instances where ``keep`` is true."""
    return {k: v[keep] if k in INSTANCE_KEYS else v for k, v in target.items()}


class DetectionTrainTransform:
    """The recipe's in-worker augmentation on image, boxes and masks together (torch RNG, seeded per worker).

    Horizontal flip with probability ``flip_prob``; with probability ``crop_prob``, resize the shortest edge to
    one of ``crop_sizes`` and cut a random crop whose height and width are each uniform in ``crop_range`` (clipped
    to the image). After a crop, boxes of instances with masks are the tight boxes of the cropped masks (as
    detectron2 recomputes them), others are clipped; instances left with no area are dropped.
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        crop_prob: float = 0.5,
        crop_sizes: Sequence[int] = (400, 500, 600),
        crop_range: Sequence[int] = (384, 600),
    ) -> None:
        self.flip_prob, self.crop_prob = flip_prob, crop_prob
        self.crop_sizes, self.crop_range = list(crop_sizes), tuple(crop_range)

    def __call__(self, image: torch.Tensor, target: Target) -> Sample:
        if torch.rand(()) < self.flip_prob:
            image, target = self.flip(image, target)
        if torch.rand(()) < self.crop_prob:
            size = self.crop_sizes[int(torch.randint(len(self.crop_sizes), ()))]
            image, target = self.resize(image, target, size)
            height, width = image.shape[-2:]
            lo, hi = self.crop_range
            h = int(torch.randint(min(lo, height), min(hi, height) + 1, ()))
            w = int(torch.randint(min(lo, width), min(hi, width) + 1, ()))
            top, left = int(torch.randint(height - h + 1, ())), int(torch.randint(width - w + 1, ()))
            image, target = self.crop(image, target, top, left, h, w)
        return image, target

    @staticmethod
    def flip(image: torch.Tensor, target: Target) -> Sample:
        width = image.shape[-1]
        x1, y1, x2, y2 = target["boxes"].unbind(1)
        target = dict(target, boxes=torch.stack([width - x2, y1, width - x1, y2], 1))
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    @staticmethod
    def resize(image: torch.Tensor, target: Target, shortest: int) -> Sample:
        height, width = image.shape[-2:]
        scale = shortest / min(height, width)
        size = [round(height * scale), round(width * scale)]
        target = dict(target, boxes=target["boxes"] * torch.tensor([size[1] / width, size[0] / height] * 2))
        if "masks" in target:
            target["masks"] = TF.resize(target["masks"], size, InterpolationMode.NEAREST_EXACT)
        target["area"] = target["area"] * (size[0] * size[1] / (height * width))
        return TF.resize(image, size, antialias=True), target

    @staticmethod
    def crop(image: torch.Tensor, target: Target, top: int, left: int, height: int, width: int) -> Sample:
        boxes = target["boxes"] - torch.tensor([left, top, left, top])
        target = dict(target, boxes=boxes.clamp(min=0).minimum(torch.tensor([width, height] * 2)))
        if "masks" in target:
            masks = target["masks"][:, top : top + height, left : left + width]
            target.update(masks=masks, boxes=tight_boxes(masks), area=masks.sum((1, 2)).float())
            keep = masks.flatten(1).amax(1) > 0
        else:
            sides = target["boxes"][:, 2:] - target["boxes"][:, :2]
            target["area"] = sides.prod(1)
            keep = (sides > 0).all(1)
        return image[:, top : top + height, left : left + width], select(target, keep)


class CocoDetection(Dataset):
    """Images of a folder with their COCO instances (boxes, and masks when ``masks``) as torchvision targets.

    Category ids become contiguous labels 1..K in id order (``class_names[label - 1]``). In training mode
    crowd instances (torchvision's losses cannot ignore them) and boxes under 1 px (counted in ``degenerate``)
    are dropped, as are the images left without instances (detectron2's default); evaluation keeps everything.
    ``annotations`` is an instances JSON, read and checked by ``read_coco``, or what ``read_coco`` returned.
    An unreadable image, or one whose size is not the JSON's, gives None (a warning names it), which
    ``collate_detection`` counts as skipped.
    """

    def __init__(
        self,
        images: str | Path,
        annotations: str | Path | dict[str, Any],
        masks: bool = False,
        train: bool = False,
        transform: DetectionTrainTransform | None = None,
    ) -> None:
        self.folder, self.masks, self.train, self.transform = Path(images), masks, train, transform
        coco = (
            annotations
            if isinstance(annotations, dict)
            else read_coco(Path(annotations), "annotations", self.folder, "images", masks, train)
        )
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.class_names = [c["name"] for c in categories]
        self.label_of = {c["id"]: label for label, c in enumerate(categories, 1)}
        self.degenerate = 0
        by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in coco["images"]}
        for ann in coco["annotations"]:
            if train and is_crowd(ann):
                continue
            if train and is_sliver(ann):
                self.degenerate += 1
                continue
            by_image[ann["image_id"]].append(ann)
        self.images = [image for image in coco["images"] if by_image[image["id"]] or not train]
        self.annotations = [by_image[image["id"]] for image in self.images]
        if train and (self.degenerate or len(self.images) < len(coco["images"])):
            log.info(
                "training set %s: dropped %d boxes under 1 px and %d images without instances",
                self.folder,
                self.degenerate,
                len(coco["images"]) - len(self.images),
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample | None:
        info, anns = self.images[index], self.annotations[index]
        path = self.folder / info["file_name"]
        decoded = decode_or_none(path, str(path))
        if decoded is None:
            return None
        if decoded.size != (info["width"], info["height"]):  # its boxes and masks would not fit it
            log.warning(
                "skipping image %s: it is %dx%d but its annotations are for %dx%d (width x height)",
                path,
                *decoded.size,
                info["width"],
                info["height"],
            )
            return None
        image = TF.pil_to_tensor(decoded.convert("RGB"))  # grey -> 3 channels
        height, width = image.shape[-2:]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target: Target = {
            "boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
            "area": torch.tensor([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=torch.float32),
            "image_id": int(info["id"]),
        }
        if self.masks:
            masks = [decode_segmentation(a["segmentation"], height, width) for a in anns]
            empty = np.zeros((0, height, width), np.uint8)
            target["masks"] = torch.from_numpy(np.stack(masks) if masks else empty)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image.float().div(255), target


def collate_detection(samples: list[Sample | None]) -> dict[str, Any]:
    """Lists of images and targets (each at its own size); None marks a corrupt sample, counted in "skipped".

    If every image is None the batch is just ``{"skipped": n}``, which ``SkippingDataLoader`` drops.
    """
    kept = [s for s in samples if s is not None]
    skipped = torch.tensor(len(samples) - len(kept), dtype=torch.long)
    if not kept:
        return {"skipped": skipped}
    return {"images": [image for image, _ in kept], "targets": [target for _, target in kept], "skipped": skipped}


# ---- the COCO file: read and checked once, before any work --------------------------------------------------------
NAMED = 3  # how many annotation ids a warning names
MIN_SIDE = 1.0  # training drops boxes with a side under this many pixels
MAX_SIDE = 2**31 - 1  # the widest or highest image a COCO file may describe (sizes must convert to floats)
MAX_RUN_CHARS = 7  # a compressed RLE run is at most 7 characters (32 bits plus sign, 5 bits each)
JSON_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
NOUNS = {"images": "image", "annotations": "annotation", "categories": "category"}


def is_crowd(ann: dict[str, Any]) -> bool:
    """A crowd region: evaluation ignores detections on it; training drops it (torchvision's losses cannot)."""
    return bool(ann.get("iscrowd", 0))


def is_sliver(ann: dict[str, Any]) -> bool:
    """A box with a side under ``MIN_SIDE`` px, which training drops (as detectron2 does) and counts."""
    return min(ann["bbox"][2:]) < MIN_SIDE


def _shown(value: Any) -> str:
    """``value`` as JSON text, cut short so that a message stays one line."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _preview(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:NAMED])) + (", ..." if len(ids) > NAMED else "")


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite JSON number (not true/false, not a string), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return number if math.isfinite(number) else None


def rle_total(counts: str) -> int | None:
    """The summed run lengths of a compressed COCO RLE string, None when it is not one.

    pycocotools decodes without checking that the runs fill the mask exactly: short runs leave uninitialised
    memory in the mask and long ones write past it, so the runs are added up here first. Each run is 5 bits per
    character (offset 48), 0x20 marking that more follow, 0x10 in the last one the sign; from the fourth run on,
    each is stored as the difference to the run two before it.
    """
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64 or shift >= 5 * MAX_RUN_CHARS:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value = shift = 0
    return sum(runs) if shift == 0 else None


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """What makes ``segmentation`` unfit for an (H, W) mask, or None.

    pycocotools does not ask: it hangs on polygons far outside the image and leaves short RLEs' pixels uninitialised.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            return "is an empty polygon list"
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2 or None in map(_finite, polygon):
                return f"has polygon {_shown(polygon)}: a polygon is a flat list of at least 3 finite x, y pairs"
            xs, ys = polygon[0::2], polygon[1::2]
            if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                return (
                    f"has a polygon reaching further outside its image (width {width}, height {height}) than its size"
                )
        return None
    if not isinstance(segmentation, dict):
        return f"is {_shown(segmentation)}: it must be a polygon list or an RLE object"
    size = segmentation.get("size")
    if not (isinstance(size, list) and all(type(v) is int for v in size) and size == [height, width]):
        return f"has an RLE of size {_shown(size)}, not its image's [height, width] {_shown([height, width])}"
    counts, area = segmentation.get("counts"), height * width
    if isinstance(counts, str):
        total = rle_total(counts)
    elif isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        total = sum(counts)
    else:
        return "has RLE counts that are neither a compressed string nor a list of run lengths"
    if total != area:
        return f"has RLE counts that cover {'no valid runs' if total is None else total} of the image's {area} pixels"
    return None


def load_json(path: Path, key: str) -> Any:
    """The parsed JSON of ``path``; an unreadable, empty or non-JSON file fails naming ``key`` and the file."""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise ConfigError(f"{key}: {path} is empty; it must be a COCO instances JSON")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = str(e).partition("\n")[0] or type(e).__name__
        raise ConfigError(f"{key}: {path} is not JSON ({reason})") from None


class CocoCheck:
    """The checks of one parsed instances JSON, which is data from anywhere: nothing in it is trusted.

    Each failure is a one-line ConfigError naming ``key``, the file, the record and what is wrong with it.
    """

    def __init__(self, coco: Any, path: Path, key: str) -> None:
        self.where = f"{key}: {path}"
        if not isinstance(coco, dict):
            self.fail(f"holds {self.kind(coco)}, not a COCO instances object with images, annotations and categories")
        self.coco = coco

    def fail(self, problem: str) -> NoReturn:
        raise ConfigError(f"{self.where}: {problem}")

    @staticmethod
    def kind(value: Any) -> str:
        return JSON_KINDS.get(type(value), "a number")

    def records(self, section: str) -> list[dict[str, Any]]:
        """The list ``section`` of objects, with unique integer ids."""
        if section not in self.coco:
            self.fail(f'has no "{section}" list (a COCO instances JSON has "images", "annotations" and "categories")')
        records = self.coco[section]
        if not isinstance(records, list):
            self.fail(f'"{section}" is {self.kind(records)}; it must be a list')
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                self.fail(f'"{section}"[{index}] is {self.kind(record)}; it must be an object')
            self.integer(record, "id", f'"{section}"[{index}]')
        repeated = [i for i, n in Counter(r["id"] for r in records).items() if n > 1]
        if repeated:
            noun = NOUNS[section]
            self.fail(f"duplicate {noun} id(s) {_preview(repeated)}: each {noun} needs an id of its own")
        return records

    def value(self, record: dict[str, Any], field: str, label: str) -> Any:
        if field not in record:
            self.fail(f'{label} has no "{field}"')
        return record[field]

    def integer(self, record: dict[str, Any], field: str, label: str, bounds: tuple[int, int] | None = None) -> int:
        value = self.value(record, field, label)
        if isinstance(value, bool) or not isinstance(value, int) or (bounds and not bounds[0] <= value <= bounds[1]):
            within = f" in [{bounds[0]}, {bounds[1]}]" if bounds else ""
            self.fail(f'{label} has "{field}": {_shown(value)}; it must be an integer{within}')
        return value

    def categories(self) -> list[dict[str, Any]]:
        """The categories in id order, each with a name; there must be at least one."""
        categories = self.records("categories")
        if not categories:
            self.fail("lists no categories")
        for category in categories:
            if not isinstance(self.value(category, "name", f"category {category['id']}"), str):
                self.fail(f"category {category['id']} has a name that is not a string: {_shown(category['name'])}")
        return sorted(categories, key=lambda c: c["id"])

    def images(self) -> list[dict[str, Any]]:
        """The images, each with a positive size and a file name that stays inside the image folder."""
        images = self.records("images")
        if not images:
            self.fail("lists no images")
        owner: dict[str, int] = {}
        for image in images:
            label = f"image {image['id']}"
            self.integer(image, "width", label, (1, MAX_SIDE))
            self.integer(image, "height", label, (1, MAX_SIDE))
            name = self.value(image, "file_name", label)
            if not isinstance(name, str) or not name or "\0" in name:
                self.fail(f"{label} has file_name {_shown(name)}; it must be a path relative to the image folder")
            if Path(name).is_absolute() or ".." in Path(name).parts:
                self.fail(f"{label} has file_name {name!r}, which leaves the image folder: name a file inside it")
            if owner.setdefault(name, image["id"]) != image["id"]:
                self.fail(f"images {owner[name]} and {image['id']} are both {name!r}: list each image file once")
        return images

    def annotation(
        self, ann: dict[str, Any], images: dict[int, dict[str, Any]], categories: set[int], masks: bool
    ) -> dict[str, Any] | None:
        """Check one annotation; returns it, or a copy with box and area clipped to its image (None if empty)."""
        label = f"annotation {ann['id']}"
        image_id = self.integer(ann, "image_id", label)
        if image_id not in images:
            self.fail(f"{label} refers to image_id {image_id}, which no image has")
        category_id = self.integer(ann, "category_id", label)
        if category_id not in categories:
            self.fail(f"{label} refers to category_id {category_id}, which no category has")
        if ann.get("iscrowd", 0) not in (0, 1):
            self.fail(f"{label} has iscrowd {_shown(ann['iscrowd'])}; it must be 0 or 1")
        if "area" in ann and (_finite(ann["area"]) is None or ann["area"] < 0):
            self.fail(f"{label} has area {_shown(ann['area'])}; it must be a finite number >= 0")
        box = self.value(ann, "bbox", label)
        xywh = [_finite(v) for v in box] if isinstance(box, list) else []
        if len(xywh) != 4 or None in xywh:
            self.fail(f"{label} has bbox {_shown(box)}; it must be 4 finite numbers [x, y, width, height]")
        x, y, w, h = xywh
        if w < 0 or h < 0:
            self.fail(f"{label} has bbox {_shown(box)} with a negative side: a bbox is [x, y, width, height]")
        image = images[image_id]
        if masks and not ann.get("segmentation"):
            self.fail(
                f"{label} (image {image_id}) has no segmentation, which dataset.masks=true needs: "
                "set dataset.masks=false to train boxes only"
            )
        problem = segmentation_problem(ann["segmentation"], image["height"], image["width"]) if masks else None
        if problem:
            self.fail(f"{label}'s segmentation {problem}")
        width, height = float(image["width"]), float(image["height"])
        x1, y1, x2, y2 = min(max(x, 0.0), width), min(max(y, 0.0), height), min(x + w, width), min(y + h, height)
        if not (x2 > x1 and y2 > y1):
            return None
        clipped = {"bbox": [x1, y1, x2 - x1, y2 - y1]} if [x1, y1, x2, y2] != [x, y, x + w, y + h] else {}
        if ann.get("area", 0) > width * height:
            clipped["area"] = width * height
        return dict(ann, **clipped) if clipped else ann


def read_coco(path: Path, key: str, images: Path, images_key: str, masks: bool, train: bool = False) -> dict[str, Any]:
    """Parse and check one instances JSON and the files it names, before any work.

    Returns it with every box (and area) clipped to its image; boxes left empty are dropped. A warning names the
    first few of each and counts them. A training file must leave something to train on once crowds and slivers
    are dropped.
    """
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    check = CocoCheck(load_json(path, key), path, key)
    categories = check.categories()
    by_id = {image["id"]: image for image in check.images()}
    annotations = check.records("annotations")
    kept, clipped, dropped = [], [], []
    for ann in annotations:
        fitted = check.annotation(ann, by_id, {c["id"] for c in categories}, masks)
        if fitted is None:
            dropped.append(ann["id"])
        else:
            kept.append(fitted)
            if fitted is not ann:
                clipped.append(ann["id"])
    if clipped or dropped:
        log.warning(
            "%s: %d annotation(s) reaching outside their image were clipped to it (annotations %s); %d with nothing "
            "inside it were dropped (annotations %s)",
            check.where,
            len(clipped),
            _preview(clipped) or "-",
            len(dropped),
            _preview(dropped) or "-",
        )
    if train and all(is_crowd(ann) or is_sliver(ann) for ann in kept):
        crowds = sum(map(is_crowd, kept))
        check.fail(
            f"nothing to train on: training drops crowd regions (iscrowd=1: {crowds} here) and boxes under "
            f"{MIN_SIDE:g} px or outside their image ({len(annotations) - crowds} here), which leaves none of its "
            f"{len(annotations)} annotations; use a training file with regular instances (iscrowd=0)"
        )
    if not images.is_dir():
        raise ConfigError(f"{images_key}: {images} is not a folder")
    missing = [image["file_name"] for image in by_id.values() if not os.path.isfile(images / image["file_name"])]
    if missing:
        raise ConfigError(
            f"{images_key}: {len(missing)} image file(s) listed in {path} are missing from {images}, "
            f"the first: {missing[0]}"
        )
    return {"images": list(by_id.values()), "annotations": kept, "categories": categories}


def image_folder(cfg: DictConfig, split: str) -> tuple[Path, str]:
    """``dataset.images`` (one folder) or ``dataset.images.<split>`` (COCO's train2017/val2017), under the root."""
    if isinstance(cfg.images, str):
        return Path(cfg.root) / cfg.images, "dataset.images"
    return Path(cfg.root) / cfg.images[split], f"dataset.images.{split}"


def load_coco_set(cfg: DictConfig, masks: bool) -> dict[str, dict[str, Any]]:
    """Check both JSONs and the files they name before any work; returns the parsed JSONs by split."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"dataset.root: {root} is not a folder")
    sets = {}
    for split in ("train", "val"):
        key = f"{split}_annotations"
        sets[split] = read_coco(root / cfg[key], f"dataset.{key}", *image_folder(cfg, split), masks, split == "train")
    train, val = ([(c["id"], c["name"]) for c in sorted(s["categories"], key=lambda c: c["id"])] for s in sets.values())
    if train != val:
        raise ConfigError(f"dataset.val_annotations: categories {val} differ from the training set's {train}")
    if cfg.num_classes != len(train):
        raise ConfigError(f"dataset.num_classes={cfg.num_classes} but the annotations have {len(train)} categories")
    return sets


@register_kind
class CocoKind(DataKind):
    """COCO-format instances, read by ``CocoDataModule``: "train" (augmented; crowds and slivers dropped) and "val".

    ``check`` builds the set first when ``dataset.build`` names a builder, then reads and checks both JSONs and the
    files they name; ``masks`` says whether the sets decode masks.
    """

    name = "coco"
    reader = "the detection data module (objective=detect)"

    def __init__(self, cfg: DictConfig, masks: bool) -> None:
        super().__init__(cfg)
        self.masks = masks
        self._json: dict[str, dict[str, Any]] | None = None
        self.class_names: list[str] = []  # class_names[label - 1], once checked

    def check(self) -> None:
        ensure_built(self.cfg)
        self._json = load_coco_set(self.cfg, self.masks)
        self.class_names = [c["name"] for c in sorted(self._json["train"]["categories"], key=lambda c: c["id"])]

    def build(self) -> dict[str, Dataset]:
        """Index the parsed JSONs, then let them go."""
        assert self._json is not None, "check() first"
        crop = self.cfg.crop
        augment = DetectionTrainTransform(0.5, crop.prob, list(crop.sizes), list(crop.range))
        sets: dict[str, Dataset] = {}
        for split, coco in self._json.items():
            train = split == "train"
            folder = image_folder(self.cfg, split)[0]
            sets[split] = CocoDetection(folder, coco, self.masks, train=train, transform=augment if train else None)
        self._json = None
        return sets


class CocoDataModule(L.LightningDataModule):
    """Training and validation loaders over the sets of ``kind`` (the class ``dataset.kind`` names).

    Everything is checked at construction (before a model is built); errors name the ``dataset.*`` key.
    ``masks`` (default ``dataset.masks``) says whether batches carry masks.
    """

    def __init__(
        self, cfg: DictConfig, batch_size: int, num_workers: int, masks: bool | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        self.cfg, self.batch_size, self.num_workers, self.seed = cfg, batch_size, num_workers, seed
        self.masks = bool(cfg.get("masks")) if masks is None else masks
        self.kind = kind_class(cfg, CocoKind)(cfg, self.masks)
        self.kind.check()
        self.class_names = self.kind.class_names
        self._sets: dict[str, Dataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the kind's sets once (Lightning may call this per stage)."""
        if self._sets is None:
            self._sets = self.kind.build()

    def train_dataloader(self) -> DataLoader:
        """Global batches that hold the same images, drawn under the same seeds, at any world size."""
        self.setup()
        assert self._sets is not None
        train = self._sets["train"]
        sampler = training_sampler(self.trainer, len(train), self.batch_size, self.seed)
        return self._loader(SeededDataset(train), batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """Each rank evaluates its share of the images; the AP metric gathers the predictions."""
        self.setup()
        assert self._sets is not None
        val = self._sets["val"]
        sampler, batch_size = evaluation_split(self.trainer, len(val), self.batch_size)
        return self._loader(val, batch_size=batch_size, sampler=sampler)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return SkippingDataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_detection,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    @staticmethod
    def read_class_names(cfg: DictConfig) -> list[str]:
        """The class names (``class_names[label - 1]``) without loading the set: from the val JSON, the smaller one.

        Builds the set first if ``dataset.build`` asks for one, so a model can be made before the datamodule.
        """
        kind_class(cfg, CocoKind)
        ensure_built(cfg)
        path, key = Path(cfg.root) / cfg.val_annotations, "dataset.val_annotations"
        return [c["name"] for c in CocoCheck(load_json(path, key), path, key).categories()]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        return self.masks
