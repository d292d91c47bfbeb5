"""Benchmark section: the MAE step in the layouts a cluster runs it in, on one device.

Eager; ``trainer.compile=true`` (each block compiled in place, as ``maybe_compile`` does); and ``trainer=fsdp``'s
FSDP2 units (one per block, with its activation checkpoint, as ``shard_blocks`` makes them) in a process group of
one. On one device FSDP2 shards nothing: what it costs there is its bookkeeping and the recomputation of every
block in backward, and what it saves is the activations' memory, which is what lets ViT-L/H fit. The warm-up steps
absorb compilation; its time is not in the table.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import register_fsdp_forward_method

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
    section,
    timing_note,
)
from src.benchmarks.mae import OPTIM
from src.encoders import create_encoder
from src.methods.mae import MAE
from src.pipeline.strategy import maybe_compile, shard_blocks

ENCODER = config("conf/encoder/vit_b.yaml")
FSDP = config("conf/trainer/fsdp.yaml").fsdp  # the options trainer=fsdp shards with


def layout_step(
    layout: str, encoder: DictConfig, batch: int, img_size: int, device: torch.device
) -> Callable[[], None]:
    """One MAE step (mask 75 %, 8-block decoder, AdamW) with its model laid out as ``layout`` says."""
    model = MAE(create_encoder(encoder, img_size), img_size, OPTIM, batch, warmup_epochs=1).to(device)
    if layout == "compiled":
        maybe_compile(model, True)
    elif layout == "fsdp2":
        if not dist.is_initialized():  # this measuring process alone: a group of one
            backend = "nccl" if device.type == "cuda" else "gloo"
            store = f"file://{tempfile.mkdtemp()}/store"
            dist.init_process_group(backend, init_method=store, rank=0, world_size=1)
        shard_blocks(model, init_device_mesh(device.type, (1,)), FSDP, bf16=device.type == "cuda")
        register_fsdp_forward_method(model, "compute_loss")  # what this step calls (a run calls training_step)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    return optimizer_step(lambda: model.compute_loss({"image": images})[0], model.parameters(), mixed=True)


@section("layouts", "MAE ViT-B/16 step: eager vs compiled blocks vs FSDP2 units (one device): images/s, memory")
def layouts(args: argparse.Namespace) -> Table:
    chosen = [layout for layout in args.layouts.split(",") if layout]
    rows, notes = [], []
    for batch in args.batch_size:
        runs = measure_interleaved(
            [partial(layout_step, layout, ENCODER, batch, args.img_size) for layout in chosen], args
        )
        eager = runs[0]
        for layout, measured in zip(chosen, runs, strict=True):
            result = median(measured)
            rows.append(
                [
                    str(batch),
                    layout,
                    f"{batch / result.seconds:.2f}",
                    format_mib(result.peak_bytes),
                    f"{paired_ratio(eager, measured):.2f}",
                    format_ratio(result.peak_bytes, median(eager).peak_bytes),
                ]
            )
        notes.append(f"batch {batch}: ratios are against {chosen[0]}, paired round by round")
    return Table(
        f"MAE ViT-B/16 training step by layout, {args.img_size} px, {args.device}",
        ["batch", "layout", "images/s (wall)", "peak MiB", "speed vs first", "memory vs first"],
        rows,
        [
            "compiled: torch.compile of each transformer block in place (trainer.compile=true); fsdp2: fully_shard "
            "units per block with activation checkpointing, bf16 parameters on a GPU (trainer=fsdp's defaults), in a "
            "process group of one; the warm-up steps absorb compilation",
            f"{precision(args.device)}; {timing_note(args)}",
            memory_kind(args.device),
            *notes,
        ],
    )
