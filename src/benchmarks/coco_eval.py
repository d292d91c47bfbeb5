"""Benchmark section ``coco_eval``: COCO AP of a real validation set through pycocotools vs faster-coco-eval.

The sets are the project's own (``src/detection/build_sets.py``), with their full validation splits; the
detections are imitated from the ground truth (``imitated_detections``), so that both backends score the same
few thousand detections of every kind: found with an IoU between thresholds, missed, and false positives.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from src.benchmarks.core import Table, measure_interleaved, median, paired_ratio, round_ratios, section, timing_note
from src.detection.build_sets import annotation_file, build_set
from src.detection.data import CocoDetection
from src.detection.evaluation import DetectionEvaluator
from src.schema import COCO_PACKAGES

# name -> (builder, its parameters, masks): the largest sets the tests build, each at its full validation split
SETS = {
    "fmnist_scenes": ("fmnist_scenes", {"train_images": 1}, True),  # 200 scenes, 691 garments, boxes and masks
    "deepforest_trees": ("deepforest", {}, False),  # 13 tiles of 400 px, 475 trees, boxes only
}
DETECTIONS_PER_IMAGE = 20  # found instances first, then false positives up to this count
FOUND = 0.8  # the share of ground-truth instances detected
JITTER = 0.1  # box corner noise, as a share of the box's width / height: IoUs spread over COCO's thresholds


def imitated_detections(target: dict[str, Tensor], size: tuple[int, int], num_classes: int, seed: int) -> dict:
    """What a detector might return for one image, drawn from its ground truth under ``seed``: most instances found
    (corners jittered, the mask moved with the box), some missed, false positives scored lower filling up to
    ``DETECTIONS_PER_IMAGE``. Masks (M, 1, H, W) uint8, as DetectionEvaluator thresholds them."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    found = torch.rand(len(target["labels"]), generator=generator) < FOUND
    hits = target["boxes"][found]
    extent = (hits[:, 2:] - hits[:, :2]).repeat(1, 2)
    shifted = hits + torch.randn(hits.shape, generator=generator) * JITTER * extent
    false_count = max(DETECTIONS_PER_IMAGE - len(hits), 0)
    sides = torch.rand(false_count, 2, generator=generator) * torch.tensor([width, height]) / 3 + 4
    corners = torch.rand(false_count, 2, generator=generator) * (torch.tensor([width, height]) - sides)
    boxes = torch.cat([shifted, torch.cat([corners, corners + sides], dim=1)])
    boxes = torch.cat([boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:])], dim=1)
    boxes = boxes.clamp(min=0).minimum(torch.tensor([width, height, width, height]))
    false_scores = torch.rand(false_count, generator=generator) * 0.6
    false_labels = torch.randint(1, num_classes + 1, (false_count,), generator=generator)
    detections = {
        "boxes": boxes,
        "scores": torch.cat([0.5 + torch.rand(len(shifted), generator=generator) / 2, false_scores]),
        "labels": torch.cat([target["labels"][found], false_labels]),
    }
    if "masks" in target:
        moves = (shifted[:, :2] - hits[:, :2]).round().int().tolist()
        moved = [mask.roll((dy, dx), dims=(0, 1)) for mask, (dx, dy) in zip(target["masks"][found], moves, strict=True)]
        filled = torch.zeros(false_count, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(filled, boxes[len(shifted) :].int().tolist(), strict=True):
            mask[y1:y2, x1:x2] = 1
        detections["masks"] = torch.cat([torch.stack(moved) if moved else filled[:0], filled])[:, None]
    return detections


def imitated_evaluation(root: Path, masks: bool) -> tuple[list[str], list[dict], list[dict]]:
    """A built set's validation split: its class names, imitated detections and its targets, image by image."""
    data = CocoDetection(root / "images", root / annotation_file("val"), masks=masks)
    samples = [data[index] for index in range(len(data))]
    targets = [target for _, target in samples]
    detections = [
        imitated_detections(target, tuple(image.shape[-2:]), len(data.class_names), seed)
        for seed, (image, target) in enumerate(samples)
    ]
    return data.class_names, detections, targets


def evaluate(backend: str, class_names: list[str], masks: bool, detections: list[dict], targets: list[dict]) -> dict:
    """One COCO evaluation of the whole split, as a validation epoch runs it: update, then compute."""
    evaluator = DetectionEvaluator(class_names, masks, backend)
    evaluator.update(detections, targets)
    return evaluator.compute()


def evaluation_step(backend: str, root: Path, masks: bool, device: torch.device) -> Callable[[], None]:
    """The split's evaluation on the CPU, where COCOeval runs whatever the training device."""
    class_names, detections, targets = imitated_evaluation(root, masks)
    return partial(evaluate, backend, class_names, masks, detections, targets)


@section("coco_eval", "COCO box (and mask) AP of a validation set: pycocotools vs faster-coco-eval")
def coco_eval(args: argparse.Namespace) -> Table:
    rows, notes = [], []
    backends = list(COCO_PACKAGES)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (builder, params, masks) in SETS.items():
            root = Path(tmp) / name
            build_set(builder, root, **params)
            class_names, detections, targets = imitated_evaluation(root, masks)
            results = [evaluate(backend, class_names, masks, detections, targets) for backend in backends]
            numbers = [{k: v for k, v in result.items() if k != "per_class"} for result in results]
            gap = max(abs(numbers[0][key] - numbers[1][key]) for key in numbers[0])
            slow, fast = measure_interleaved([partial(evaluation_step, b, root, masks) for b in backends], args)
            instances, detected = (sum(len(item["labels"]) for item in items) for items in (targets, detections))
            rows.append(
                [
                    f"{name} val",
                    f"{len(targets)} / {instances} / {detected}",
                    "box and mask" if masks else "box",
                    f"{numbers[0]['box/ap']:.4f}",
                    f"{gap:.1e}",
                    f"{median(slow).seconds:.2f}",
                    f"{median(fast).seconds:.2f}",
                    f"**{paired_ratio(slow, fast):.1f}**",
                    f"{paired_ratio(slow, fast, 'cpu_seconds'):.1f}",
                ]
            )
            notes.append(f"{name}: speed-up per round {round_ratios(slow, fast)}")
    return Table(
        "COCO evaluation of a validation split (update + compute of DetectionEvaluator), CPU",
        [
            "set",
            "images / instances / detections",
            "scored",
            "box AP",
            "largest AP difference",
            "s, pycocotools",
            "s, faster-coco-eval",
            "speed-up (wall)",
            "speed-up (CPU)",
        ],
        rows,
        [
            f"detections imitated from the ground truth: {FOUND:.0%} of the instances found with corners jittered by "
            f"{JITTER:.0%} of the box (masks moved with it), false positives up to {DETECTIONS_PER_IMAGE} per image; "
            "largest AP difference: over every summary number (AP, AP50, AP75, small / medium / large, box and mask)",
            timing_note(args),
            *notes,
        ],
    )
