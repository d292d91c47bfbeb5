"""Benchmark section: MAE's token dropping against encoding the full input with mask tokens."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from omegaconf import DictConfig

from src.benchmarks.core import (
    Table,
    config,
    format_mib,
    format_ratio,
    measure_interleaved,
    median,
    memory_kind,
    optimizer_step,
    paired_ratio,
    precision,
    round_ratios,
    section,
    timing_note,
)
from src.encoders import create_encoder
from src.methods.mae import MAE

OPTIM = {"base_lr": 1.5e-4, "reference_batch": 256, "betas": [0.9, 0.95], "weight_decay": 0.05}


def mae_step(
    encoder: DictConfig, token_drop: bool, batch: int, img_size: int, device: torch.device
) -> Callable[[], None]:
    """One MAE pretraining step (mask 75 %, 8-block decoder, norm_pix loss, AdamW) on random images.

    ``encoder`` is an encoder config (``conf/encoder/*.yaml``): the encoder ``MAE.from_config`` would build.
    """
    model = MAE(create_encoder(encoder, img_size), img_size, OPTIM, batch, warmup_epochs=1, token_drop=token_drop)
    model = model.to(device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    return optimizer_step(lambda: model.compute_loss({"image": images})[0], model.parameters(), mixed=True)


@section("mae_token_drop", "MAE training step on ViT-B/16: encode visible patches only vs the full input")
def mae_token_drop(args: argparse.Namespace) -> Table:
    encoder = config("conf/encoder/vit_b.yaml")
    rows, notes = [], []
    for batch in args.batch_size:
        setups = [partial(mae_step, encoder, drop, batch, args.img_size) for drop in (True, False)]
        runs = measure_interleaved(setups, args)
        dropped_runs, full_runs = runs
        dropped, full = median(dropped_runs), median(full_runs)
        for label, result in (("visible only (token dropping)", dropped), ("full input (mask tokens)", full)):
            rows.append(
                [
                    str(batch),
                    label,
                    f"{batch / result.seconds:.2f}",
                    f"{batch / result.cpu_seconds:.2f}",
                    format_mib(result.peak_bytes),
                ]
            )
        rows.append(
            [
                str(batch),
                "**speed-up / memory ratio**",
                f"**{paired_ratio(full_runs, dropped_runs):.2f}**",
                f"{paired_ratio(full_runs, dropped_runs, 'cpu_seconds'):.2f}",
                format_ratio(dropped.peak_bytes, full.peak_bytes),
            ]
        )
        notes.append(f"batch {batch}: speed-up per round {round_ratios(full_runs, dropped_runs)}")
    return Table(
        f"MAE ViT-B/16 training step, {args.img_size} px, {args.device}",
        ["batch", "encoder input", "images/s (wall)", "images per CPU-s", "peak MiB"],
        rows,
        [
            "same model and 8-block 512-wide decoder; mask ratio 0.75; the paper reports 2.8x-4.1x for dropping; "
            f"{precision(args.device)}; {timing_note(args)}",
            memory_kind(args.device),
            *notes,
        ],
    )
