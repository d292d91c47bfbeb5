"""Benchmark section: where a Pale-T and a Swin-T training step spend their time, by kind of op.

The throughput table says which model is faster; this one says why. torch.profiler's self time of each op
(what the op itself ran, children excluded, so the parts add up to the step) is summed into a few kinds,
at one thread and at the benchmark's thread count, so ops that do not gain from more threads show up.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context

import torch
from torch.profiler import profile

from src.benchmarks.core import StepSetup, Table, section, train_step

# (kind, substrings of profiler op names); the first match wins, everything else is "other".
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("matrix multiplies (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention kernels (SDPA, softmax)", ("scaled_dot_product", "softmax")),
    ("convolutions", ("convolution",)),
    ("normalisation", ("norm",)),
    ("elementwise, copies, optimizer, other", ("",)),
]


def op_kind(name: str) -> str:
    return next(kind for kind, keys in KINDS if any(key in name for key in keys))


def profile_in_process(setup: StepSetup, device_name: str, steps: int, warmup: int, threads: int) -> dict[str, float]:
    """Milliseconds per step of each kind, from the profiler's self CPU time (run in a fresh process)."""
    torch.set_num_threads(threads)
    step = setup(torch.device(device_name))
    for _ in range(warmup):
        step()
    with profile() as prof:
        for _ in range(steps):
            step()
    totals = dict.fromkeys((kind for kind, _ in KINDS), 0.0)
    for event in prof.key_averages():
        totals[op_kind(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return totals


def profile_step(setup: StepSetup, args: argparse.Namespace, threads: int) -> dict[str, float]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(profile_in_process, setup, args.device, args.steps, args.warmup, threads).result()


def kinds_table(title: str, contenders: dict[str, StepSetup], args: argparse.Namespace, note: str) -> Table:
    """Milliseconds per step by kind of op for two contenders, at one thread and at the benchmark's count."""
    if torch.device(args.device).type != "cpu":
        raise SystemExit("the profile sections read CPU op times; run them with --device cpu")
    threads = sorted({1, args.threads or torch.get_num_threads()})
    times = {(label, n): profile_step(setup, args, n) for n in threads for label, setup in contenders.items()}
    (first, second), kinds = list(contenders), [kind for kind, _ in KINDS]
    rows = []
    for kind in [*kinds, "total"]:
        row = [kind if kind != "total" else "**total**"]
        for n in threads:
            parts = [times[(label, n)] for label in contenders]
            a, b = (sum(p.values()) if kind == "total" else p[kind] for p in parts)
            row += [f"{a:.0f}", f"{b:.0f}", f"{a - b:+.0f}"]
        rows.append(row)
    columns = ["part of the step (ms)"]
    for n in threads:
        columns += [f"{first}, {n} thr", f"{second}, {n} thr", f"{first} - {second}, {n} thr"]
    return Table(
        title,
        columns,
        rows,
        [
            f"{note}; self CPU time of the calling thread per op, mean of {args.steps} profiled steps after "
            f"{args.warmup} warm-up, fresh process each",
            "the profiler adds overhead per op, so totals exceed the unprofiled step times",
        ],
    )


@section("pale_profile", "where Pale-T and Swin-T training steps spend their time (profiler, CPU), 1 vs N threads")
def pale_profile(args: argparse.Namespace) -> Table:
    batch = args.batch_size[0]
    archs = {"Pale-T": "pale_tiny_224", "Swin-T": "swin_tiny_patch4_window7_224"}
    return kinds_table(
        f"Time per training step by kind of op, batch {batch}, {args.img_size} px, cpu (torch.profiler self time)",
        {label: partial(train_step, arch, batch, args.img_size) for label, arch in archs.items()},
        args,
        "step = forward, cross-entropy, backward, AdamW (as in pale_vs_swin)",
    )
