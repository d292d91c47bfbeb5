"""COCO-format instance data for the detector: dataset, the recipe's train augmentation, collate, datamodule.

Samples follow torchvision's detection format: an unnormalised float image (3, H, W) in [0, 1] at its own
size and a target dict (boxes xyxy float32, labels 1..K int64, masks (N, H, W) uint8 when the set has
masks, iscrowd, area, image_id). Only the first, size-changing part of the MIMDet/ViTDet "3x" recipe runs
here (flip; with probability 0.5 a shortest-edge resize and a random crop); the multi-scale resize, the
test resize and normalisation belong to the model's transform, which also batches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig, OmegaConf
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from src.config import ConfigError, Rule, check_rules
from src.data.datamodule import SkippingDataLoader
from src.data.distributed import SeededDataset, evaluation_sampler, training_sampler
from src.data.folder import decode_or_none
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
    An unreadable image gives None (the warning names it), which ``collate_detection`` counts as skipped.
    """

    def __init__(
        self,
        images: str | Path,
        annotations: str | Path | dict[str, Any],
        masks: bool = False,
        train: bool = False,
        transform: DetectionTrainTransform | None = None,
    ) -> None:
        coco = annotations if isinstance(annotations, dict) else json.loads(Path(annotations).read_text())
        self.folder, self.masks, self.train, self.transform = Path(images), masks, train, transform
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.class_names = [c["name"] for c in categories]
        self.label_of = {c["id"]: label for label, c in enumerate(categories, 1)}
        self.degenerate = 0
        by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in coco["images"]}
        for ann in coco.get("annotations", []):
            if train and ann.get("iscrowd", 0):
                continue
            if train and min(ann["bbox"][2:]) < 1:
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


# ---- config checks ------------------------------------------------------------------------------------------------
def _ints(n: int | None = None) -> Callable[[Any], bool]:
    """A rule: a non-empty list of positive integers (of length ``n`` if given)."""
    return lambda v: all(isinstance(x, int) and x > 0 for x in v) and len(v) > 0 and (n is None or len(v) == n)


REQUIRED_KEYS = ("root", "train_annotations", "val_annotations", "images", "masks", "num_classes", "crop")
DATASET_RULES: list[Rule] = [
    ("kind", lambda v: v == "coco", "must be coco for detection"),
    ("images", lambda v: isinstance(v, str) or set(v) == {"train", "val"}, "must be a folder or {train: .., val: ..}"),
    ("masks", lambda v: isinstance(v, bool), "must be true or false"),
    ("mean", lambda v: len(v) == 3, "needs 3 values (images are 3-channel)"),
    ("std", lambda v: len(v) == 3 and min(v) > 0, "needs 3 positive values"),
    ("num_classes", lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
    ("sizes.train", _ints(), "must be a non-empty list of positive integers (shortest-edge sizes)"),
    ("sizes.test", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
    ("sizes.max", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
    ("crop.prob", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("crop.sizes", _ints(), "must be a non-empty list of positive integers (shortest-edge sizes)"),
    ("crop.range", lambda v: _ints(2)(v) and v[0] <= v[1], "must be [min, max] positive integers, min <= max"),
]


def read_coco(path: Path, key: str, images: Path, images_key: str, masks: bool) -> dict[str, Any]:
    """Parse one instances JSON and check it references only files, images and categories that exist."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    try:
        coco = json.loads(path.read_text())
        image_ids = {image["id"] for image in coco["images"]}
        category_ids = {category["id"] for category in coco["categories"]}
        files = [image["file_name"] for image in coco["images"]]
        annotations = coco.get("annotations", [])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}: {path} is not a COCO instances JSON ({type(e).__name__}: {e})") from None
    if not category_ids:
        raise ConfigError(f"{key}: {path} lists no categories")
    if not images.is_dir():
        raise ConfigError(f"{images_key}: {images} is not a folder")
    missing = [name for name in files if not (images / name).is_file()]
    if missing:
        raise ConfigError(
            f"{images_key}: {len(missing)} image file(s) listed in {path} are missing from {images}, "
            f"the first: {missing[0]}"
        )
    for ann in annotations:
        for field, known in (("image_id", image_ids), ("category_id", category_ids)):
            if ann[field] not in known:
                raise ConfigError(f"{key}: annotation {ann['id']} in {path} refers to unknown {field} {ann[field]}")
        if masks and not ann.get("iscrowd", 0) and not ann.get("segmentation"):
            raise ConfigError(
                f"dataset.masks=true but annotation {ann['id']} in {path} has no segmentation: "
                "set dataset.masks=false to train boxes only"
            )
    return coco


def check_dataset_config(cfg: DictConfig) -> None:
    """The dataset keys alone (no file is read), so a typo fails before a set is built."""
    for key in REQUIRED_KEYS:
        if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] is None:
            raise ConfigError(f"dataset.{key} is required: set it, e.g. dataset.{key}=... (see conf/dataset/coco.yaml)")
    check_rules(cfg, "dataset", DATASET_RULES)


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
        sets[split] = read_coco(root / cfg[key], f"dataset.{key}", *image_folder(cfg, split), masks)
    train, val = ([(c["id"], c["name"]) for c in sorted(s["categories"], key=lambda c: c["id"])] for s in sets.values())
    if train != val:
        raise ConfigError(f"dataset.val_annotations: categories {val} differ from the training set's {train}")
    if cfg.num_classes != len(train):
        raise ConfigError(f"dataset.num_classes={cfg.num_classes} but the annotations have {len(train)} categories")
    return sets


class CocoDataModule(L.LightningDataModule):
    """Training and validation loaders of a COCO-format set, built first when ``dataset.build`` names a builder.

    Everything is checked at construction (before a model is built); errors name the ``dataset.*`` key.
    ``masks`` (default ``dataset.masks``) says whether batches carry masks.
    """

    def __init__(
        self, cfg: DictConfig, batch_size: int, num_workers: int, masks: bool | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        self.cfg, self.batch_size, self.num_workers, self.seed = cfg, batch_size, num_workers, seed
        self.masks = bool(cfg.get("masks")) if masks is None else masks
        check_dataset_config(cfg)
        ensure_built(cfg)
        self._json: dict[str, dict[str, Any]] | None = load_coco_set(cfg, self.masks)
        self.class_names = [c["name"] for c in sorted(self._json["train"]["categories"], key=lambda c: c["id"])]
        self._sets: dict[str, CocoDetection] = {}

    def setup(self, stage: str | None = None) -> None:
        """Index the parsed JSONs once (Lightning may call this per stage), then let them go."""
        if self._json is None:
            return
        crop = self.cfg.crop
        augment = DetectionTrainTransform(0.5, crop.prob, list(crop.sizes), list(crop.range))
        for split, coco in self._json.items():
            train = split == "train"
            folder = image_folder(self.cfg, split)[0]
            self._sets[split] = CocoDetection(
                folder, coco, self.masks, train=train, transform=augment if train else None
            )
        self._json = None

    def train_dataloader(self) -> DataLoader:
        """Global batches that hold the same images, drawn under the same seeds, at any world size."""
        self.setup()
        train = self._sets["train"]
        sampler = training_sampler(self.trainer, len(train), self.batch_size, self.seed)
        return self._loader(SeededDataset(train), batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """Each rank evaluates its share of the images; the AP metric gathers the predictions."""
        self.setup()
        val = self._sets["val"]
        sampler = evaluation_sampler(self.trainer, len(val))
        return self._loader(val, batch_size=self.batch_size, sampler=sampler)

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
        check_dataset_config(cfg)
        ensure_built(cfg)
        path = Path(cfg.root) / cfg.val_annotations
        try:
            categories = json.loads(path.read_text())["categories"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"dataset.val_annotations: cannot read the categories of {path}: {e}") from None
        return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        return self.masks
