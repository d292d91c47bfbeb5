"""The benchmark machinery behind ``python -m src.benchmark``: side-by-side speed and memory tables in Markdown.

Sections are registered functions ``(args) -> Table``. To add one, put ``@section("name", "what it compares")``
on a function in any module of this package (``src/benchmarks/``): every module here is imported before the
sections run, so no edit here is needed. Library code never imports this package.

``measure`` runs a step in a fresh process and returns seconds per step and peak memory (and the step's FLOPs
when its setup is wrapped in ``counted``):
CUDA's ``max_memory_allocated`` on a GPU, the growth of the process's max RSS on CPU (a fresh process per
measurement, so one measurement's peak cannot hide the next one's). Comparisons go through ``measure_interleaved``:
the contenders take turns over several rounds and ratios are taken round by round, because a shared machine
drifts by more than the differences being measured (up to 25 % between back-to-back runs on the 2-core
development VM).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import src.encoders  # noqa: F401  (registers the encoder families with timm)

StepSetup = Callable[[torch.device], Callable[[], None]]
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Table:
    """One section's output: a Markdown table plus notes on what was measured."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes])


@dataclass
class Section:
    fn: Callable[[argparse.Namespace], Table]
    help: str


SECTIONS: dict[str, Section] = {}


def section(name: str, help: str) -> Callable[[Callable[[argparse.Namespace], Table]], Callable]:
    """Register a benchmark section under ``name`` (the ``--sections`` key)."""

    def register(fn: Callable[[argparse.Namespace], Table]) -> Callable[[argparse.Namespace], Table]:
        if name in SECTIONS:
            raise ValueError(f"benchmark section {name!r} is registered twice")
        SECTIONS[name] = Section(fn, help)
        return fn

    return register


def discover_sections() -> None:
    """Import every module of this package so that their ``@section`` registrations run."""
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if path.stem not in ("__init__", "core"):
            importlib.import_module(f"{__package__}.{path.stem}")


@dataclass
class Measurement:
    seconds: float  # wall clock per step
    cpu_seconds: float  # this process's CPU time per step: robust to other load on a shared CPU
    kernel_seconds: float  # the part of cpu_seconds spent in the kernel (page faults of fresh allocations)
    peak_bytes: int
    flops: float = 0.0  # one step's forward + backward FLOPs, counted once (``counted`` setups; else 0)


@dataclass
class CountedStep:
    """A step that carries its FLOP count, so that ``measure_in_process`` reports it beside the time."""

    step: Callable[[], None]
    flops: float

    def __call__(self) -> None:
        self.step()


def cpu_attention_flops(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    """FlopCounterMode passes the op's arguments as shapes; the count needs q, k and v only."""
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out: Any, query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the GPU attention kernels but not the CPU one (torch 2.14 counts it as 0): same formulas
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
}


def counted(setup: StepSetup, device: torch.device) -> CountedStep:
    """``setup``'s step, run once under FlopCounterMode before any warm-up or timing (the counter's dispatch
    overhead stays out of the times): matmuls, convolutions and attention kernels of forward and backward."""
    step = setup(device)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    return CountedStep(step, float(counter.get_total_flops()))


def measure_in_process(setup: StepSetup, device_name: str, steps: int, warmup: int, threads: int | None) -> Measurement:
    """The measurement itself; ``measure`` runs it in a fresh process so that peaks do not mix."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    step = setup(device)
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    kernel_start = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    kernel_seconds = resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel_start
    peak = (
        torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    flops = step.flops if isinstance(step, CountedStep) else 0.0
    return Measurement(seconds / steps, cpu_seconds / steps, kernel_seconds / steps, peak - base, flops)


def measure(setup: StepSetup, args: argparse.Namespace) -> Measurement:
    """Time ``args.steps`` calls of the step ``setup`` builds (after ``args.warmup``) in a fresh process.

    ``setup`` must be picklable (a module-level function or a ``functools.partial`` of one). Peak memory
    counts everything the setup and the steps allocate: model, optimizer state, inputs, activations.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure_in_process, setup, args.device, args.steps, args.warmup, args.threads).result()


def measure_interleaved(setups: Sequence[StepSetup], args: argparse.Namespace) -> list[list[Measurement]]:
    """``args.repeats`` rounds in which every setup is measured once: per setup, its measurement of each round.

    The order alternates (A B, B A, ...) so that slow drift of a shared machine (other tenants, clock
    changes) lands on every contender alike; compare contenders round by round (``paired_ratio``).
    """
    rounds = []
    for i in range(args.repeats):
        order = range(len(setups)) if i % 2 == 0 else reversed(range(len(setups)))
        results = {j: measure(setups[j], args) for j in order}
        rounds.append([results[j] for j in range(len(setups))])
    return [[results[j] for results in rounds] for j in range(len(setups))]


def median(runs: Sequence[Measurement]) -> Measurement:
    """Per-field median over rounds."""
    return Measurement(
        statistics.median(r.seconds for r in runs),
        statistics.median(r.cpu_seconds for r in runs),
        statistics.median(r.kernel_seconds for r in runs),
        int(statistics.median(r.peak_bytes for r in runs)),
        statistics.median(r.flops for r in runs),
    )


def paired_ratio(slow: Sequence[Measurement], fast: Sequence[Measurement], field: str = "seconds") -> float:
    """Median over rounds of slow / fast: neighbours in time share the machine's state, so their ratio is
    steadier than the ratio of two separate medians."""
    return statistics.median(getattr(s, field) / getattr(f, field) for s, f in zip(slow, fast, strict=True))


def round_ratios(slow: Sequence[Measurement], fast: Sequence[Measurement]) -> str:
    """The time ratio of each round, to show the spread behind a median."""
    return ", ".join(format_ratio(s.seconds, f.seconds) for s, f in zip(slow, fast, strict=True))


def timing_note(args: argparse.Namespace) -> str:
    return (
        f"{args.repeats} rounds taking turns (A B, B A, ...), each {args.steps} timed steps after {args.warmup} "
        "warm-up in a fresh process; rows: medians over rounds; ratios: median of the per-round ratios"
    )


def memory_kind(device: str) -> str:
    """Say in each table which memory figure it shows."""
    if torch.device(device).type == "cuda":
        return "peak memory = torch.cuda.max_memory_allocated minus what was allocated before the setup"
    return "peak memory = growth of the process's max RSS (fresh process per measurement)"


def format_mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def precision(device: str) -> str:
    """What ``mixed=True`` steps run in on ``device``: the toolkit's trainer precision ``auto``."""
    return "bf16 autocast" if torch.device(device).type == "cuda" else "fp32"


def config(path: str, **overrides: Any) -> DictConfig:
    """A YAML file of this repository (``conf/...``, ``recipes/...``) with ``overrides`` merged over it: steps are
    built from the settings a run of that file uses, not from copies of them."""
    return OmegaConf.merge(OmegaConf.load(REPO / path), overrides)


def train_step(arch: str, batch: int, img_size: int, device: torch.device, mixed: bool = False) -> Callable[[], None]:
    """Forward, cross-entropy, backward and AdamW step of a 1000-class timm model on random data."""
    model = timm.create_model(arch, num_classes=1000, img_size=img_size).to(device).train()
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    return optimizer_step(lambda: F.cross_entropy(model(images), labels), model.parameters(), mixed)


def optimizer_step(loss_fn: Callable[[], torch.Tensor], params, mixed: bool = False) -> Callable[[], None]:
    """A timed training step: the loss, zero_grad, backward and an AdamW update of ``params``.

    ``mixed``: the loss under bf16 autocast when the parameters are on a GPU, as the toolkit trains there
    (Lightning's bf16-mixed: autocast around the forward, backward outside it); fp32 on the CPU either way.
    """
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device_type = params[0].device.type
    autocast = mixed and device_type == "cuda"

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="python -m src.benchmark", description="Side-by-side speed and memory tables, printed as Markdown."
    )
    parser.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    parser.add_argument(
        "--batch-size",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[8],
        help="training-step batch, or a comma-separated sweep, e.g. 8,16,32 (default 8)",
    )
    parser.add_argument("--img-size", type=int, default=224, help="training-step resolution (default 224)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds in which the compared setups take turns; medians (default 3)"
    )
    parser.add_argument(
        "--attn-sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[224, 320, 384],
        help="input resolutions for ps_attention; the map is the stage-1 map, px / 4 (default 224,320,384)",
    )
    parser.add_argument("--attn-batch", type=int, default=1, help="ps_attention batch (default 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads in each measurement (default: torch's)"
    )
    parser.add_argument(
        "--data-workers", type=int, default=2, help="DataLoader workers of data_pipeline's loader rows (default 2)"
    )
    parser.add_argument(
        "--layouts",
        default="eager,compiled,fsdp2",
        help="layouts section: which, the first being the reference of the ratios (default eager,compiled,fsdp2)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak in TFLOP/s for MFU (default: the objectives section's table of known GPUs)",
    )
    parser.add_argument("--sections", default="all", help="comma-separated section names, or 'all'")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    discover_sections()
    args = parse_args(argv)
    if args.list:
        for name, entry in SECTIONS.items():
            print(f"{name}: {entry.help}")
        return
    names = list(SECTIONS) if args.sections == "all" else [s.strip() for s in args.sections.split(",")]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    threads = args.threads or torch.get_num_threads()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.device} ({where}), {threads} threads")
    print(f"{os.cpu_count()} CPUs, load average before the run: {load}")
    for name in names:
        start = time.perf_counter()
        table = SECTIONS[name].fn(args)
        print()
        print(table.markdown())
        print(f"- section {name!r} took {time.perf_counter() - start:.0f} s")
