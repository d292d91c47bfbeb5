"""COCO box and mask AP through torchmetrics' MeanAveragePrecision, so DDP ranks gather their images like any Metric.

The numbers are COCOeval's own, on COCO's [0, 1] scale: a size range without ground truth keeps COCO's -1 rather
than a made-up 0. Ground-truth ``area`` is passed through so that small / medium / large follow the annotations
(as on COCO, where the area is the mask's), and ``iscrowd`` regions are matched by COCO's rule: a detection on a
crowd region is neither a hit nor a miss.

Either COCOeval computes them, pycocotools' or faster-coco-eval's: the same AP, the latter several times faster on
a large set (``python -m src.benchmark --sections coco_eval``). ``auto`` takes faster-coco-eval where it is
installed, and the evaluator logs which one runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from src.schema import COCO_PACKAGES, EVAL_BACKENDS, installed_eval_backends

log = logging.getLogger(__name__)
PREFERRED_BACKENDS = ("faster_coco_eval", "pycocotools")  # what ``auto`` takes: the first one installed
# our names -> torchmetrics' (COCOeval's stats[0:6])
SUMMARY = {
    "ap": "map",
    "ap50": "map_50",
    "ap75": "map_75",
    "ap_small": "map_small",
    "ap_medium": "map_medium",
    "ap_large": "map_large",
}
KINDS = {"bbox": "box", "segm": "mask"}  # COCOeval's iou types -> our metric prefixes
MASK_THRESHOLD = 0.5  # torchvision's mask probabilities -> binary masks, as its COCO reference evaluation does


def resolve_backend(backend: str) -> str:
    """The COCO backend that will run for ``backend`` (``auto`` or a name), checked at construction rather than
    after the first validation epoch. The config check refuses a missing one before any work; this is the same
    refusal for code that builds an evaluator itself."""
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}: one of {EVAL_BACKENDS}")
    installed = installed_eval_backends()
    if backend == "auto":
        return next(name for name in PREFERRED_BACKENDS if name in installed)  # pycocotools is a dependency
    if backend not in installed:
        raise ImportError(
            f"the COCO evaluation backend {backend!r} is not installed: `pip install {COCO_PACKAGES[backend]}` "
            f"(or choose another, one of {EVAL_BACKENDS})"
        )
    return backend


class DetectionEvaluator(nn.Module):
    """Box AP (and mask AP when ``masks``) over torchvision detection outputs, with a per-class breakdown.

    ``update`` takes torchvision's formats (predictions: boxes, scores, labels, masks (M, 1, H, W) probabilities;
    targets: boxes, labels, masks (N, H, W) uint8, iscrowd, area). ``compute`` returns ``box/ap``, ``box/ap50``,
    ``box/ap75``, ``box/ap_small``, ``box/ap_medium``, ``box/ap_large`` (and ``mask/...`` alike) as floats, plus
    ``per_class``: rows ``{"class": name, "box_ap": float, "mask_ap": float | None}`` for every class, -1 where
    the class had no ground truth. ``backend`` is the COCOeval that runs (``auto`` resolved), said in the log.
    """

    def __init__(self, class_names: Sequence[str], masks: bool, backend: str = "auto") -> None:
        super().__init__()
        self.backend = resolve_backend(backend)
        self.class_names = list(class_names)
        self.masks = masks
        self.iou_types = ("bbox", "segm") if masks else ("bbox",)
        self.metric = MeanAveragePrecision(
            iou_type=self.iou_types if masks else "bbox", class_metrics=True, backend=self.backend
        )
        picked = f" (eval_backend={backend})" if backend != self.backend else ""
        log.info("COCO %s AP through %s%s", " and ".join(KINDS[t] for t in self.iou_types), self.backend, picked)

    @torch.no_grad()
    def update(self, predictions: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        preds, gts = [], []
        for prediction in predictions:
            item = {k: prediction[k].detach() for k in ("boxes", "scores", "labels")}
            if self.masks:
                item["masks"] = prediction["masks"].detach()[:, 0] > MASK_THRESHOLD
            preds.append(item)
        for target in targets:
            item = {
                "boxes": target["boxes"],
                "labels": target["labels"],
                "iscrowd": target.get("iscrowd", torch.zeros_like(target["labels"])),
            }
            if "area" in target:
                item["area"] = target["area"]
            if self.masks:
                if "masks" not in target:
                    raise ValueError(
                        "the evaluator scores masks but a target has none: evaluate boxes only (masks=False) "
                        "for a dataset without masks"
                    )
                item["masks"] = target["masks"].bool()
            gts.append(item)
        self.metric.update(preds, gts)

    @torch.no_grad()
    def compute(self) -> dict[str, float | list[dict[str, str | float | None]]]:
        raw = self.metric.compute()
        results: dict[str, float | list[dict[str, str | float | None]]] = {}
        per_class: dict[str, dict[int, float]] = {}
        classes = raw["classes"].reshape(-1).tolist()
        for iou_type in self.iou_types:
            short = KINDS[iou_type]
            prefix = f"{iou_type}_" if len(self.iou_types) > 1 else ""
            for name, key in SUMMARY.items():
                results[f"{short}/{name}"] = float(raw[prefix + key])
            # torchmetrics leaves map_per_class out when nothing was updated
            values = raw.get(prefix + "map_per_class", torch.empty(0)).reshape(-1).tolist()
            per_class[short] = dict(zip(classes, values, strict=True))
        results["per_class"] = [
            {
                "class": name,
                "box_ap": per_class["box"].get(label, -1.0),
                "mask_ap": per_class["mask"].get(label, -1.0) if self.masks else None,
            }
            for label, name in enumerate(self.class_names, start=1)
        ]
        return results

    def reset(self) -> None:
        self.metric.reset()
