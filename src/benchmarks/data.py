"""Benchmark section on the data path: one training batch of the built-in set, per-image PIL views against
``dataset.tensor_transforms`` (the same views on whole batches with tensor ops)."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from src.benchmarks.core import Table, measure_interleaved, median, paired_ratio, round_ratios, section, timing_note
from src.data.builtin import TensorImageDataset, load_fashion_mnist
from src.data.datamodule import collate_skipping
from src.data.transforms import PretrainTransform

DATASET_CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset" / "fashion_mnist.yaml"
# (label, img_size, crop_scale): the views the small MAE recipes use
VIEWS = [("28 px, flips", 28, None), ("32 px, flips", 32, None), ("32 px, crops 0.2-1 + flips", 32, (0.2, 1.0))]


def view_step(batched: bool, img_size: int, crop_scale, batch: int, device: torch.device) -> Callable[[], None]:
    """Fetch and collate one shuffled training batch as the DataLoader does (``__getitems__``), on the CPU."""
    cfg = OmegaConf.load(DATASET_CONF)
    images, labels = load_fashion_mnist(cfg.root, "train")
    transform = PretrainTransform(img_size, cfg.mean, cfg.std, crop_scale=crop_scale)
    dataset = TensorImageDataset(images, labels, transform, batched=batched)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    starts = itertools.cycle(range(0, len(order) - batch + 1, batch))

    def step() -> None:
        start = next(starts)
        collate_skipping(dataset.__getitems__(order[start : start + batch]))

    return step


@section("data_views", "Fashion-MNIST training batches: per-image PIL views vs dataset.tensor_transforms")
def data_views(args: argparse.Namespace) -> Table:
    rows, notes = [], []
    for batch in args.batch_size:
        for label, size, crop in VIEWS:
            per_image, batched = measure_interleaved(
                [partial(view_step, flag, size, crop, batch) for flag in (False, True)], args
            )
            slow, fast = median(per_image), median(batched)
            rows.append(
                [
                    str(batch),
                    label,
                    f"{batch / slow.seconds:,.0f}",
                    f"{batch / fast.seconds:,.0f}",
                    f"**{paired_ratio(per_image, batched):.1f}**",
                    f"{paired_ratio(per_image, batched, 'cpu_seconds'):.1f}",
                ]
            )
            notes.append(f"batch {batch}, {label}: ratio per round {round_ratios(per_image, batched)}")
    return Table(
        "Data path: one training batch of the built-in Fashion-MNIST, fetched and collated (CPU)",
        ["batch", "view", "images/s, per image", "images/s, batched", "speed-up (wall)", "speed-up (CPU)"],
        rows,
        [
            "per image: uint8 -> PIL -> torchvision v2 (resize or crop, flip, RGB, float, normalise), as the "
            "default path; batched: PretrainTransform.batch on all the batch's images (dataset.tensor_transforms)",
            f"the model is not involved; {timing_note(args)}",
            *notes,
        ],
    )
