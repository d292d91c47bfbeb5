"""Benchmark section: a MIMDet training step with the encoder seeing 25 % or 50 % of its tokens vs all of them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import timm
import torch

from src.benchmarks.core import (
    Table,
    format_mib,
    format_ratio,
    measure_interleaved,
    median,
    memory_kind,
    optimizer_step,
    paired_ratio,
    round_ratios,
    section,
    timing_note,
)
from src.detection.backbone import MIMDetBackbone
from src.detection.detector import build_detector

RATIOS = (0.25, 0.5, 1.0)
ARCH = "mim_vit_base_patch16"
OBJECTS = 8  # ground-truth instances per image


def random_targets(batch: int, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``OBJECTS`` boxes of 1/16 to 1/2 of the image side per image, each with its filled box as the mask."""
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        wh = torch.randint(size // 16, size // 2, (OBJECTS, 2), generator=generator)
        xy = (torch.rand(OBJECTS, 2, generator=generator) * (size - wh)).floor()
        boxes = torch.cat([xy, xy + wh], dim=1).float()
        masks = torch.zeros(OBJECTS, size, size, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
            mask[y0:y1, x0:x1] = 1
        labels = torch.randint(1, 81, (OBJECTS,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return targets


def build_model(size: int, device: torch.device) -> torch.nn.Module:
    """MIMDet Mask R-CNN on ``ARCH`` (the paper's 4-block 512-wide decoder, 256-wide heads), 80 classes."""
    encoder = timm.create_model(ARCH, img_size=224, num_classes=0, drop_path_rate=0.1)
    backbone = MIMDetBackbone(encoder)
    return build_detector(backbone, 80, True, [size], size, size, [0.5] * 3, [0.25] * 3).to(device).train()


def detection_step(ratio: float, batch: int, size: int, device: torch.device) -> Callable[[], None]:
    """The whole detector: forward (RPN, box and mask losses), backward and an AdamW step."""
    model = build_model(size, device)
    images = [torch.rand(3, size, size, device=device) for _ in range(batch)]
    targets = random_targets(batch, size, device)
    return optimizer_step(lambda: sum(model(images, targets, ratio=ratio).values()), model.parameters())


def backbone_step(ratio: float, batch: int, size: int, device: torch.device) -> Callable[[], None]:
    """The backbone alone (ConvStem, sampled encoder, decoder, FPN), a sum of its maps as the loss: what the
    ratio acts on, without the heads' fixed cost."""
    backbone = build_model(size, device).backbone
    images = torch.rand(batch, 3, size, size, device=device)
    sizes = [(size, size)] * batch
    return optimizer_step(
        lambda: sum(m.float().mean() for m in backbone(images, sizes, ratio).values()), backbone.parameters()
    )


@section("detection_ratios", "MIMDet ViT-B Mask R-CNN training step: token sample ratio 0.25 / 0.5 vs the full input")
def detection_ratios(args: argparse.Namespace) -> Table:
    rows, notes = [], []
    for batch in args.batch_size:
        for part, step in (("detector", detection_step), ("backbone only", backbone_step)):
            runs = measure_interleaved([partial(step, r, batch, args.img_size) for r in RATIOS], args)
            full_runs = runs[-1]
            full = median(full_runs)
            for ratio, ratio_runs in zip(RATIOS, runs, strict=True):
                result = median(ratio_runs)
                rows.append(
                    [
                        str(batch),
                        part,
                        f"{ratio:g}" + (" (full input)" if ratio == 1.0 else ""),
                        f"{result.seconds:.2f}",
                        f"**{paired_ratio(full_runs, ratio_runs):.2f}**",
                        f"{paired_ratio(full_runs, ratio_runs, 'cpu_seconds'):.2f}",
                        format_mib(result.peak_bytes),
                        format_ratio(result.peak_bytes, full.peak_bytes),
                    ]
                )
                if ratio < 1.0:
                    spread = round_ratios(full_runs, ratio_runs)
                    notes.append(f"batch {batch}, {part}, ratio {ratio:g}: speed-up per round {spread}")
    return Table(
        f"MIMDet Mask R-CNN training step ({ARCH}), {args.img_size} px images, {args.device}",
        ["batch", "part", "sample ratio", "s/step", "speed-up (wall)", "speed-up (CPU)", "peak MiB", "memory vs full"],
        rows,
        [
            "detector: ConvStem + the encoder on the sampled stride-16 tokens + 4-block 512-wide decoder + FPN + "
            f"RPN + box and mask heads (512 RoIs per image), {OBJECTS} random boxes per image as targets, AdamW; "
            "backbone only: the same without RPN and heads; " + timing_note(args),
            memory_kind(args.device),
            *notes,
        ],
    )
