"""Benchmark sections on the Pale Transformer: a training step against Swin-T, PS-Attention against its naive form."""

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
    paired_ratio,
    precision,
    round_ratios,
    section,
    timing_note,
    train_step,
)
from src.encoders.pale import (
    masked_global_attention,
    pale_column_attention,
    pale_groups,
    pale_row_attention,
    pale_rule_mask,
)


@section("pale_vs_swin", "training step: Pale-T vs timm's Swin-T, same batch and resolution")
def pale_vs_swin(args: argparse.Namespace) -> Table:
    models = [("Pale-T", "pale_tiny_224"), ("Swin-T", "swin_tiny_patch4_window7_224")]
    params = {}
    for _, arch in models:
        with torch.device("meta"):
            params[arch] = sum(p.numel() for p in timm.create_model(arch, img_size=args.img_size).parameters())
    rows, notes = [], []
    for batch in args.batch_size:
        steps = [partial(train_step, arch, batch, args.img_size, mixed=True) for _, arch in models]
        runs = measure_interleaved(steps, args)
        pale_runs, swin_runs = runs
        pale, swin = median(pale_runs), median(swin_runs)
        for (label, arch), result in zip(models, (pale, swin), strict=True):
            rows.append(
                [
                    str(batch),
                    label,
                    f"{params[arch] / 1e6:.1f}",
                    f"{batch / result.seconds:.2f}",
                    f"{batch / result.cpu_seconds:.2f}",
                    f"{100 * result.kernel_seconds / result.cpu_seconds:.0f} %",
                    format_mib(result.peak_bytes),
                ]
            )
        rows.append(
            [
                str(batch),
                "**Pale-T / Swin-T**",
                format_ratio(params[models[0][1]], params[models[1][1]]),
                f"**{paired_ratio(swin_runs, pale_runs):.2f}**",
                f"{paired_ratio(swin_runs, pale_runs, 'cpu_seconds'):.2f}",
                "",
                format_ratio(pale.peak_bytes, swin.peak_bytes),
            ]
        )
        notes.append(f"batch {batch}: images/s ratio per round {round_ratios(swin_runs, pale_runs)}")
    return Table(
        f"Training step, {args.img_size} px, {args.device}: pale_tiny_224 vs swin_tiny_patch4_window7_224",
        ["batch", "model", "params (M)", "images/s (wall)", "images per CPU-s", "kernel share of CPU", "peak MiB"],
        rows,
        [
            f"step = forward, cross-entropy, backward, AdamW; {precision(args.device)}, timm defaults of each model; "
            + timing_note(args),
            memory_kind(args.device),
            "ratio rows: Pale-T divided by Swin-T (above 1: Pale-T has more params, is faster, needs more memory)",
            "kernel share: CPU time in the kernel, mostly page faults of large fresh allocations (grows with batch)",
            *notes,
        ],
    )


def attention_step(
    impl: str, size: int, batch: int, dim: int, num_heads: int, pale_size: int, device: torch.device
) -> Callable[[], None]:
    """Forward and backward of both PS-Attention branches on a ``size`` x ``size`` map (no projections)."""
    q, k, v = (torch.randn(batch, size, size, dim, device=device, requires_grad=True) for _ in range(3))
    upstream = torch.randn(batch, size, size, dim, device=device)
    half, heads = dim // 2, num_heads // 2
    if impl == "pale":
        row_fn = partial(pale_row_attention, num_heads=heads, pale_size=pale_size)
        col_fn = partial(pale_column_attention, num_heads=heads, pale_size=pale_size)
    else:
        row_mask = pale_rule_mask(size, size, pale_size, "row", device)
        col_mask = pale_rule_mask(size, size, pale_size, "column", device)
        row_fn = partial(masked_global_attention, num_heads=heads, mask=row_mask)
        col_fn = partial(masked_global_attention, num_heads=heads, mask=col_mask)

    def step() -> None:
        rows = row_fn(q[..., :half], k[..., :half], v[..., :half])
        cols = col_fn(q[..., half:], k[..., half:], v[..., half:])
        torch.cat([rows, cols], dim=-1).backward(upstream)
        q.grad = k.grad = v.grad = None

    return step


ATTENTION_IMPLS = ("pale", "naive")


@section("ps_attention", "PS-Attention (grouped) vs naive masked global attention, Pale-T stage 1")
def ps_attention(args: argparse.Namespace) -> Table:
    dim, num_heads, pale_size = 64, 2, 7  # Pale-T stage 1
    rows = []
    for img in args.attn_sizes:
        size = img // 4
        setups = [
            partial(attention_step, impl, size, args.attn_batch, dim, num_heads, pale_size) for impl in ATTENTION_IMPLS
        ]
        pale_runs, naive_runs = measure_interleaved(setups, args)
        pale, naive = median(pale_runs), median(naive_runs)
        _, lines = pale_groups(size, pale_size)
        rows.append(
            [
                str(img),
                f"{size}x{size}",
                f"{lines * size}+{size * lines}",
                str(size * size),
                f"{pale.seconds * 1e3:.1f}",
                f"{naive.seconds * 1e3:.1f}",
                f"{paired_ratio(naive_runs, pale_runs):.2f}",
                f"{paired_ratio(naive_runs, pale_runs, 'cpu_seconds'):.2f}",
                format_mib(pale.peak_bytes),
                format_mib(naive.peak_bytes),
                format_ratio(naive.peak_bytes, pale.peak_bytes),
            ]
        )
    return Table(
        f"PS-Attention vs masked global attention, batch {args.attn_batch}, C={dim}, {num_heads} heads, "
        f"pale {pale_size}, {args.device}",
        [
            "input px",
            "stage-1 map",
            "keys/query pale (row+col)",
            "keys/query global",
            "pale ms",
            "naive ms",
            "time naive/pale",
            "CPU time naive/pale",
            "pale MiB",
            "naive MiB",
            "memory naive/pale",
        ],
        rows,
        [
            "step = both branches forward + backward on the same random q/k/v (no q/k/v convs, no projection); "
            "the naive form runs SDPA over all tokens with the pale rule as a boolean attn_mask (built in setup)",
            f"{timing_note(args)}; ms are wall clock; {memory_kind(args.device)}",
            "ratios above 1 mean PS-Attention is faster / smaller",
        ],
    )
