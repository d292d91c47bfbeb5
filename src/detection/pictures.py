"""Pictures of detections: prediction beside ground truth as PNG, W&B's interactive overlays, per-class AP table.

The PNG is for reading a run from disk; the W&B image carries the boxes and masks as overlays rather than burnt
into pixels, so the dashboard can toggle classes and move a score threshold over the predictions.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, save_image

if TYPE_CHECKING:
    import wandb

MASK_THRESHOLD = 0.5  # mask probability -> pixel in the mask
WANDB_MIN_SCORE = 0.05  # W&B gets nearly every prediction: its dashboard slider then picks the threshold


def class_color(label: int) -> tuple[int, int, int]:
    """A bright colour per class, the same on both sides of a picture and across steps (golden-ratio hues)."""
    red, green, blue = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


def _caption(class_names: Sequence[str], label: int) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"


def _binary_masks(masks: Tensor) -> Tensor:
    """Prediction masks (M, 1, H, W) probabilities or target masks (N, H, W) uint8 -> (K, H, W) bool."""
    if masks.ndim == 4:
        return masks[:, 0] > MASK_THRESHOLD
    return masks.bool()


def _overlay(canvas: Tensor, boxes: Tensor, labels: list[int], captions: list[str], masks: Tensor | None) -> Tensor:
    if not labels:
        return canvas
    colors = [class_color(label) for label in labels]
    if masks is not None:
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colors)
    width = max(1, round(max(canvas.shape[-2:]) / 250))
    return draw_bounding_boxes(canvas, boxes, labels=captions, colors=colors, width=width)


def draw_detections(
    image: Tensor,
    prediction: dict[str, Tensor],
    target: dict[str, Tensor],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
) -> Tensor:
    """(3, H, 2W) uint8: the predictions scoring at least ``score_threshold`` (left) beside the ground truth (right).

    ``image`` is float (3, H, W) in [0, 1], unnormalised; boxes and masks in torchvision's detection formats.
    """
    canvas = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    keep = prediction["scores"].detach().cpu() >= score_threshold
    labels = prediction["labels"].cpu()[keep].tolist()
    scores = prediction["scores"].detach().cpu()[keep].tolist()
    masks = _binary_masks(prediction["masks"].detach().cpu()[keep]) if "masks" in prediction else None
    left = _overlay(
        canvas,
        prediction["boxes"].detach().cpu()[keep],
        labels,
        [f"{_caption(class_names, label)} {score:.2f}" for label, score in zip(labels, scores, strict=True)],
        masks,
    )
    labels = target["labels"].cpu().tolist()
    crowd = target.get("iscrowd", torch.zeros(len(labels), dtype=torch.long)).cpu().tolist()
    right = _overlay(
        canvas,
        target["boxes"].cpu(),
        labels,
        [
            _caption(class_names, label) + (" (crowd)" if is_crowd else "")
            for label, is_crowd in zip(labels, crowd, strict=True)
        ],
        _binary_masks(target["masks"].cpu()) if "masks" in target else None,
    )
    return torch.cat([left, right], dim=2)


def _box_data(boxes: Tensor, labels: list[int], class_names: Sequence[str], scores: list[float] | None) -> list[dict]:
    rows = []
    for i, (box, label) in enumerate(zip(boxes.tolist(), labels, strict=True)):
        row: dict[str, Any] = {
            "position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]},
            "domain": "pixel",
            "class_id": label,
            "box_caption": _caption(class_names, label),
        }
        if scores is not None:
            row["box_caption"] += f" {scores[i]:.2f}"
            row["scores"] = {"score": scores[i]}
        rows.append(row)
    return rows


def _label_map(masks: Tensor, labels: list[int], size: tuple[int, int]) -> np.ndarray:
    """(H, W) class ids, 0 where no instance; later instances are painted over earlier ones."""
    label_map = np.zeros(size, dtype=np.uint8)  # W&B stores the map as an 8-bit PNG
    for mask, label in zip(masks.numpy(), labels, strict=True):
        label_map[mask] = label
    return label_map


def wandb_detection_image(
    image: Tensor,
    prediction: dict[str, Tensor],
    target: dict[str, Tensor],
    class_names: Sequence[str],
    min_score: float = WANDB_MIN_SCORE,
) -> wandb.Image:
    """A ``wandb.Image`` with "predictions" and "ground_truth" box (and mask) overlays the dashboard can filter.

    Predictions scoring below ``min_score`` are left out; prediction masks are painted from the least to the
    most confident, so the most confident instance shows where masks overlap.
    """
    import wandb

    class_labels = {label: name for label, name in enumerate(class_names, start=1)}
    size = tuple(image.shape[-2:])
    scores = prediction["scores"].detach().cpu()
    order = torch.argsort(scores, stable=True)
    order = order[scores[order] >= min_score]
    pred_labels = prediction["labels"].cpu()[order].tolist()
    gt_labels = target["labels"].cpu().tolist()
    boxes = {
        "predictions": {
            "box_data": _box_data(
                prediction["boxes"].detach().cpu()[order], pred_labels, class_names, scores[order].tolist()
            ),
            "class_labels": class_labels,
        },
        "ground_truth": {
            "box_data": _box_data(target["boxes"].cpu(), gt_labels, class_names, None),
            "class_labels": class_labels,
        },
    }
    masks = {}
    mask_labels = {0: "background", **class_labels}
    if "masks" in prediction:
        pred_masks = _binary_masks(prediction["masks"].detach().cpu()[order])
        masks["predictions"] = {"mask_data": _label_map(pred_masks, pred_labels, size), "class_labels": mask_labels}
    if "masks" in target:
        gt_masks = _binary_masks(target["masks"].cpu())
        masks["ground_truth"] = {"mask_data": _label_map(gt_masks, gt_labels, size), "class_labels": mask_labels}
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return wandb.Image(pixels, boxes=boxes, masks=masks or None)


def per_class_table(rows: Sequence[dict[str, Any]]) -> wandb.Table:
    """The evaluator's per-class rows as a W&B table (mask AP empty for a boxes-only set)."""
    import wandb

    return wandb.Table(
        columns=["class", "box AP", "mask AP"], data=[[row["class"], row["box_ap"], row["mask_ap"]] for row in rows]
    )


class DetectionPictures(L.Callback):
    """After each validation (not the sanity check), pictures of ``pl_module.detection_samples``.

    Reads ``pl_module.detection_samples`` (CPU ``(image, prediction, target)`` tuples), ``pl_module.class_names``
    and ``pl_module.last_per_class`` (the evaluator's rows). It runs at ``on_validation_end``: Lightning calls the
    callbacks' ``on_validation_epoch_end`` before the module's, which is where the module computes its AP.
    Writes ``detections_step{N:06d}.png`` and logs "val/detections" and "val/per_class_ap" to W&B.
    """

    def __init__(self, out_dir: Path, num_images: int = 8, score_threshold: float = 0.5) -> None:
        self.out_dir = Path(out_dir)
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.saved: list[Path] = []

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples = list(getattr(pl_module, "detection_samples", None) or [])[: self.num_images]
        if trainer.sanity_checking or not samples:
            return
        class_names = pl_module.class_names
        pictures = [draw_detections(*sample, class_names, self.score_threshold) for sample in samples]
        height = max(p.shape[1] for p in pictures)
        width = max(p.shape[2] for p in pictures)  # images keep their own sizes: pad to the largest
        grid = torch.stack([F.pad(p, (0, width - p.shape[2], 0, height - p.shape[1])) for p in pictures])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"detections_step{trainer.global_step:06d}.png"
        save_image(grid.float() / 255, path, nrow=2, padding=2)
        if path not in self.saved:
            self.saved.append(path)
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers:
            return
        payload: dict[str, Any] = {"val/detections": [wandb_detection_image(*s, class_names) for s in samples]}
        rows = getattr(pl_module, "last_per_class", None)
        if rows:
            payload["val/per_class_ap"] = per_class_table(rows)
        for logger in wandb_loggers:
            logger.log_metrics(payload, step=trainer.global_step)
