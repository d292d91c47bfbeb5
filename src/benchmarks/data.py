"""Benchmark sections on the data path, the model left out.

- ``data_views``: one training batch of the built-in set, per-image PIL views against ``dataset.tensor_transforms``
  (the same views on whole batches with tensor ops).
- ``data_pipeline``: the training loader of each source (an image folder, webdataset shards, the built-in set in
  memory) in one process, which is what one DataLoader worker does, and with ``--data-workers`` workers.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf
from PIL import Image

from src.benchmarks.core import Table, measure_interleaved, median, paired_ratio, round_ratios, section, timing_note
from src.data.builtin import TensorImageDataset, load_fashion_mnist
from src.data.datamodule import build_datamodule, collate_skipping
from src.data.transforms import EvalTransform, PretrainTransform
from src.data.write_shards import write_shards
from src.methods.masking import mask_noise

DATASET_CONFS = Path(__file__).resolve().parents[2] / "conf" / "dataset"
DATASET_CONF = DATASET_CONFS / "fashion_mnist.yaml"
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


PIPELINE_IMAGES = 2000  # Fashion-MNIST test images written as files, and as shards of those files
PIPELINE_SHARDS = 16  # shards are read whole by one worker each: enough for 16 workers
MASK_PATCH = 16  # the mask noise each sample carries is ViT-B/16's, as MAE's loader draws it
# (row label, dataset config, its overrides beside the written data's): every source a training loader reads
SOURCES = [
    ("image folder, PNG + JPEG files", "image_folder", {}),
    ("webdataset shards of those files", "shards", {}),
    ("built-in in memory, per image (PIL)", "fashion_mnist", {}),
    ("built-in in memory, batched (tensor_transforms)", "fashion_mnist", {"tensor_transforms": True}),
    (
        "built-in, views on the device (device_transforms)",
        "fashion_mnist",
        {"tensor_transforms": True, "device_transforms": True},
    ),
]


def write_sources(folder: Path, count: int) -> dict[str, dict[str, Any]]:
    """The first ``count`` Fashion-MNIST test images, at their own 28 px, as files in ``folder/images/<label>/``
    (even ones PNG, odd ones JPEG) and as shards of those files: each dataset config's overrides to read them."""
    root = folder / "images"
    images, labels = load_fashion_mnist(OmegaConf.load(DATASET_CONF).root, "test")
    for i in range(count):
        path = root / str(int(labels[i])) / f"{i:05d}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].numpy()).save(path)
    maxcount = -(-count // PIPELINE_SHARDS)
    pattern = write_shards("folder", str(root), "test", folder / "shards", "pipeline", maxcount=maxcount)
    return {
        "image_folder": {"root": str(root)},
        "shards": {"train_urls": pattern, "samples_per_epoch": None},
        "fashion_mnist": {"train_limit": count},
    }


def loader_step(
    kind: str, overrides: dict[str, Any], batch: int, img_size: int, workers: int, device: torch.device
) -> Callable[[], None]:
    """The next batch of the data module's own training loader, epoch after epoch, as ``trainer.fit`` takes them.

    ``workers=0`` reads in this process with one torch thread, as each DataLoader worker runs. Under
    ``device_transforms`` the batch is moved to ``device`` and its views made there, as the data module's
    ``transfer_batch_to_device`` does in training.
    """
    if workers == 0:
        torch.set_num_threads(1)
    else:  # measured in a spawned process, whose children would be spawned too: start workers as training does
        multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    cfg = OmegaConf.merge(OmegaConf.load(DATASET_CONFS / f"{kind}.yaml"), {"img_size": img_size, **overrides})
    data = build_datamodule(
        cfg,
        PretrainTransform(img_size, cfg.mean, cfg.std),  # MAE's views: crops 0.2-1 (bicubic) + flips
        EvalTransform(img_size, cfg.mean, cfg.std),
        batch,
        workers,
        sample_extras=partial(mask_noise, num_patches=(img_size // MASK_PATCH) ** 2),
    )
    loader = data.train_dataloader()
    batches = (b for _ in itertools.count() for b in loader)

    def step() -> None:
        taken = next(batches)
        if data.device_transforms:
            data.device_views(move_data_to_device(taken, device), taken["sample_seed"].tolist())

    return step


@section("data_pipeline", "training loaders (folder, shards, built-in): images/s per DataLoader worker and pooled")
def data_pipeline(args: argparse.Namespace) -> Table:
    rows, notes = [], []
    workers = args.data_workers
    with tempfile.TemporaryDirectory(prefix="data_pipeline-") as folder:
        written = write_sources(Path(folder), PIPELINE_IMAGES)
        for batch in args.batch_size:
            for label, kind, extra in SOURCES:
                setups = [
                    partial(loader_step, kind, written[kind] | extra, batch, args.img_size, n) for n in (0, workers)
                ]
                alone, pooled = measure_interleaved(setups, args)
                one, many = median(alone), median(pooled)
                rows.append(
                    [
                        str(batch),
                        label,
                        f"{batch / one.seconds:,.0f}",
                        f"{batch / one.cpu_seconds:,.0f}",
                        f"{batch / many.seconds:,.0f}",
                        f"**{paired_ratio(alone, pooled):.2f}**",
                    ]
                )
                notes.append(
                    f"batch {batch}, {label}: {workers} workers / 1 process per round {round_ratios(alone, pooled)}"
                )
    return Table(
        f"Data pipeline: training batches of 28 px Fashion-MNIST at {args.img_size} px, decoded and augmented "
        f"({args.device})",
        [
            "batch",
            "source",
            "images/s, 1 process (= per worker)",
            "images per CPU-s, 1 process",
            f"images/s, num_workers={workers}",
            f"num_workers={workers} / 1 process",
        ],
        rows,
        [
            "each row takes batches from the data module's own training loader: SeededDataset + GlobalBatchSampler "
            "(webdataset's shard split and shuffle buffer for the shards), collate_skipping, pinned memory on CUDA; "
            f"MAE's PretrainTransform (crops 0.2-1 + flips, bicubic) to {args.img_size} px, and each sample's "
            f"ViT-B/{MASK_PATCH} mask noise",
            f"sources: the first {PIPELINE_IMAGES} Fashion-MNIST test images as files (even ones PNG, odd ones JPEG), "
            f"the same files in {PIPELINE_SHARDS} shards (src.data.write_shards), the first {PIPELINE_IMAGES} "
            "training images held in memory as uint8",
            "1 process: num_workers=0 with one torch thread, what each DataLoader worker does (its CPU-s count that "
            f"process only); {workers} workers: num_workers={workers}, the main process only receives the batches",
            f"device_transforms: the loader hands uint8 images; each batch is moved to {args.device} and its views are "
            "made there (ImageDataModule.device_views); the other rows end with the collated batch on the host",
            f"the model is not involved; {timing_note(args)}",
            *notes,
        ],
    )
