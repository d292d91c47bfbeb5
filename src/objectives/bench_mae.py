"""Benchmark section: MAE's token dropping against encoding the full input with mask tokens."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import timm
import torch

from src.benchmark import Table, format_mib, format_ratio, measure, memory_kind, optimizer_step, section
from src.objectives.mae import MAE

OPTIM = {"base_lr": 1.5e-4, "reference_batch": 256, "betas": [0.9, 0.95], "weight_decay": 0.05}


def mae_step(arch: str, token_drop: bool, batch: int, img_size: int, device: torch.device) -> Callable[[], None]:
    """One MAE pretraining step (mask 75 %, 8-block decoder, norm_pix loss, AdamW) on random images."""
    encoder = timm.create_model(arch, img_size=img_size, num_classes=0, mask_token=not token_drop)
    model = MAE(encoder, img_size, OPTIM, batch_size=batch, warmup_epochs=1, token_drop=token_drop).to(device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    return optimizer_step(lambda: model.compute_loss({"image": images})[0], model.parameters())


@section("mae_token_drop", "MAE training step on ViT-B/16: encode visible patches only vs the full input")
def mae_token_drop(args: argparse.Namespace) -> Table:
    arch = "mim_vit_base_patch16"
    results = {
        drop: measure(partial(mae_step, arch, drop, args.batch_size, args.img_size), args) for drop in (True, False)
    }
    rows = [
        [
            "visible only (token dropping)" if drop else "full input (mask tokens)",
            f"{args.batch_size / r.seconds:.2f}",
            f"{args.batch_size / r.cpu_seconds:.2f}",
            format_mib(r.peak_bytes),
        ]
        for drop, r in results.items()
    ]
    dropped, full = results[True], results[False]
    rows.append(
        [
            "speed-up / memory ratio",
            format_ratio(full.seconds, dropped.seconds),
            format_ratio(full.cpu_seconds, dropped.cpu_seconds),
            format_ratio(dropped.peak_bytes, full.peak_bytes),
        ]
    )
    return Table(
        f"MAE ViT-B/16 training step, batch {args.batch_size}, {args.img_size} px, {args.device}",
        ["encoder input", "images/s (wall)", "images per CPU-s", "peak MiB"],
        rows,
        [
            "same model and 8-block 512-wide decoder; mask ratio 0.75; the paper reports 2.8x-4.1x for dropping",
            memory_kind(args.device),
        ],
    )
