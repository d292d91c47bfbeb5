"""Pictures of detections: prediction beside ground truth as a figure, W&B's interactive overlays, per-class AP table.

The figure (a PNG, and an image for every logger) is for reading a run from disk or any dashboard; the W&B image
also carries the boxes and masks as overlays rather than burnt into pixels, so the dashboard can toggle classes and
move a score threshold over the predictions.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from src.figures import figure_pixels, log_picture, new_figure, save_picture

if TYPE_CHECKING:
    import wandb

MASK_THRESHOLD = 0.5  # mask probability -> pixel in the mask
WANDB_MIN_SCORE = 0.05  # W&B gets nearly every prediction: its dashboard slider then picks the threshold
MASK_ALPHA = 0.45  # how strongly a mask tints the pixels it covers
CELL = 320  # pixels: the long side of every image in the figure


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


def _draw_instances(
    axes: Axes, pixels: np.ndarray, boxes: Tensor, labels: list[int], captions: list[str], masks: Tensor | None
) -> None:
    """``pixels`` (H, W, 3) in [0, 1] with each instance's mask tinted, its box outlined and its caption on top, in
    its class's colour."""
    colors = [np.array(class_color(label)) / 255 for label in labels]
    pixels = pixels.copy()
    if masks is not None:
        for mask, color in zip(masks.numpy(), colors, strict=True):
            pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * color
    axes.imshow(pixels, interpolation="nearest")
    for (x1, y1, x2, y2), caption, color in zip(boxes.tolist(), captions, colors, strict=True):
        axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5))
        axes.text(x1, y1, caption, fontsize=7, va="bottom", clip_on=True, bbox={"facecolor": color, "pad": 1, "lw": 0})
    axes.set_xticks([])
    axes.set_yticks([])


def detection_figure(
    samples: Sequence[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    step: int | None = None,
) -> Figure:
    """Each ``(image, prediction, target)``: the predictions scoring at least ``score_threshold`` beside the
    ground truth, two images to a row, boxes and masks in a colour per class, captioned with class names.

    ``image`` is float (3, H, W) in [0, 1], unnormalised; boxes and masks in torchvision's detection formats. Every
    image is shown ``CELL`` pixels on its long side, whatever its size: a COCO photo and a 96 px scene alike.
    """
    per_row = min(len(samples), 2)
    rows = math.ceil(len(samples) / per_row)
    tallest = max(image.shape[-2] / max(image.shape[-2:]) for image, _, _ in samples)  # height / long side
    figure = new_figure(2 * per_row * CELL, round(rows * (tallest * CELL + 40) + 40), layout="constrained")
    grid = figure.subplots(rows, 2 * per_row, squeeze=False)
    for axes in grid.flat[2 * len(samples) :]:
        axes.set_axis_off()
    for (image, prediction, target), left, right in zip(samples, grid.flat[::2], grid.flat[1::2], strict=False):
        pixels = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
        keep = prediction["scores"].detach().cpu() >= score_threshold
        labels = prediction["labels"].cpu()[keep].tolist()
        scores = prediction["scores"].detach().cpu()[keep].tolist()
        masks = _binary_masks(prediction["masks"].detach().cpu()[keep]) if "masks" in prediction else None
        captions = [f"{_caption(class_names, label)} {score:.2f}" for label, score in zip(labels, scores, strict=True)]
        _draw_instances(left, pixels, prediction["boxes"].detach().cpu()[keep], labels, captions, masks)
        left.set_title(f"prediction (score ≥ {score_threshold:g})", fontsize=9)
        labels = target["labels"].cpu().tolist()
        crowd = target.get("iscrowd", torch.zeros(len(labels), dtype=torch.long)).cpu().tolist()
        captions = [
            _caption(class_names, label) + (" (crowd)" if is_crowd else "")
            for label, is_crowd in zip(labels, crowd, strict=True)
        ]
        masks = _binary_masks(target["masks"].cpu()) if "masks" in target else None
        _draw_instances(right, pixels, target["boxes"].cpu(), labels, captions, masks)
        right.set_title("ground truth", fontsize=9)
    if step is not None:
        figure.suptitle(f"detections at step {step}")
    return figure


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
    Writes ``detections_step{N:06d}.png``, hands it to every logger as "pictures/detections" (``log_picture``),
    and logs W&B's overlays "val/detections" and the table "val/per_class_ap".
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
        picture = figure_pixels(detection_figure(samples, class_names, self.score_threshold, trainer.global_step))
        path = save_picture(picture, self.out_dir / f"detections_step{trainer.global_step:06d}.png")
        if path not in self.saved:
            self.saved.append(path)
        log_picture(trainer, "pictures/detections", picture)
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers:
            return
        payload: dict[str, Any] = {"val/detections": [wandb_detection_image(*s, class_names) for s in samples]}
        rows = getattr(pl_module, "last_per_class", None)
        if rows:
            payload["val/per_class_ap"] = per_class_table(rows)
        for logger in wandb_loggers:
            logger.log_metrics(payload, step=trainer.global_step)
