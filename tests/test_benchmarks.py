"""The benchmark command: sections register and render, rounds alternate and pair, measurements run in fresh processes.

Nothing here asserts a speed: only that the machinery measures what it says and cannot rot.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

import src.benchmarks.core as benchmark
import src.benchmarks.data as bench_data
import src.benchmarks.detection as bench_detection
import src.benchmarks.pale as bench_pale
import src.benchmarks.pale_profile as pale_profile


def test_benchmark_sections_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every section is registered; ps_attention renders its table (measured in-process here)."""
    benchmark.discover_sections()
    sections = {"pale_vs_swin", "ps_attention", "pale_profile", "mae_token_drop", "data_views", "detection_ratios"}
    assert sections <= set(benchmark.SECTIONS)

    def in_process(setup: benchmark.StepSetup, args: Any) -> benchmark.Measurement:
        return benchmark.measure_in_process(setup, args.device, args.steps, args.warmup, args.threads)

    monkeypatch.setattr(benchmark, "measure", in_process)
    benchmark.main(["--sections", "ps_attention", "--attn-sizes", "32", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "| 32 | 8x8 | 32+32 | 64 |" in out and "memory naive/pale" in out

    benchmark.main(["--sections", "data_views", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4 |")]
    assert [row.split(" | ")[1] for row in rows] == [label for label, _, _ in bench_data.VIEWS]
    assert all(float(row.split(" | ")[3].replace(",", "")) > 0 for row in rows)

    monkeypatch.setattr(bench_detection, "ARCH", "mim_vit_tiny_patch16")  # the section's real step, ViT-Ti sized
    args = ["--sections", "detection_ratios", "--batch-size", "1", "--img-size", "64", "--steps", "1", "--warmup", "0"]
    benchmark.main([*args, "--repeats", "1"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    ratios = ["0.25", "0.5", "1 (full input)"]
    assert [(row[1], row[2]) for row in rows] == [(part, r) for part in ("detector", "backbone only") for r in ratios]
    assert all(float(row[3]) > 0 for row in rows)


def test_benchmark_alternates_order_and_pairs_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds take turns A B, B A, ...; the ratio is the median of per-round ratios, not of two medians."""
    calls: list[str] = []
    times = iter([1.0, 2.0, 3.0, 4.0, 1.0, 4.0])  # in call order: A B, B A, A B

    def fake(setup: Any, args: Any) -> benchmark.Measurement:
        calls.append(setup)
        return benchmark.Measurement(next(times), 1.0, 0.0, 0)

    monkeypatch.setattr(benchmark, "measure", fake)
    a_runs, b_runs = benchmark.measure_interleaved(["A", "B"], benchmark.parse_args(["--repeats", "3"]))
    assert calls == ["A", "B", "B", "A", "A", "B"]
    assert [r.seconds for r in a_runs] == [1.0, 4.0, 1.0] and [r.seconds for r in b_runs] == [2.0, 3.0, 4.0]
    assert benchmark.paired_ratio(b_runs, a_runs) == 2.0  # per round: 2, 0.75, 4
    assert benchmark.median(b_runs).seconds / benchmark.median(a_runs).seconds == 3.0  # what pairing avoids


@pytest.mark.slow
def test_profile_section_sorts_ops_into_kinds(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pale_profile's kinds catch the ops that matter, and the section renders a total (profiled in-process)."""
    assert pale_profile.op_kind("aten::addmm").startswith("matrix")
    assert pale_profile.op_kind("aten::_scaled_dot_product_flash_attention_for_cpu_backward").startswith("attention")
    assert pale_profile.op_kind("aten::convolution_backward") == "convolutions"
    assert pale_profile.op_kind("aten::native_layer_norm_backward") == "normalisation"
    assert pale_profile.op_kind("aten::gelu").startswith("elementwise")

    def in_process(setup: benchmark.StepSetup, args: Any, threads: int) -> dict[str, float]:
        return pale_profile.profile_in_process(setup, args.device, args.steps, args.warmup, threads)

    monkeypatch.setattr(pale_profile, "profile_step", in_process)
    argv = ["--sections", "pale_profile", "--img-size", "32", "--batch-size", "1", "--steps", "1", "--warmup", "0"]
    benchmark.main([*argv, "--threads", "1"])
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| **total**"))
    pale_ms, swin_ms = (float(v) for v in total.split("|")[2:4])
    assert pale_ms > 0 and swin_ms > 0


@pytest.mark.slow
def test_benchmark_measure_in_fresh_process() -> None:
    args = benchmark.parse_args(["--steps", "1", "--warmup", "0", "--device", "cpu"])
    result = benchmark.measure(partial(bench_pale.attention_step, "pale", 8, 1, 16, 2, 7), args)
    assert result.seconds > 0 and result.cpu_seconds > 0 and result.peak_bytes >= 0
