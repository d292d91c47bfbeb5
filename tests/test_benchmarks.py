"""The benchmark command: sections register and render, rounds alternate and pair, measurements run in fresh processes.

Nothing here asserts a speed: only that the machinery measures what it says and cannot rot.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import src.benchmarks.core as benchmark
import src.benchmarks.data as bench_data
import src.benchmarks.detection as bench_detection
import src.benchmarks.layouts as bench_layouts
import src.benchmarks.objectives as bench_objectives
import src.benchmarks.pale as bench_pale
import src.benchmarks.pale_profile as pale_profile
import src.benchmarks.plain_mae as plain_mae
from src.methods.mae import patchify


def measure_in_this_process(setup: benchmark.StepSetup, args: Any) -> benchmark.Measurement:
    return benchmark.measure_in_process(setup, args.device, args.steps, args.warmup, args.threads)


def test_benchmark_sections_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every section is registered; ps_attention renders its table (measured in-process here)."""
    benchmark.discover_sections()
    sections = {"pale_vs_swin", "ps_attention", "pale_profile", "mae_token_drop", "data_views", "detection_ratios"}
    sections.update(["objectives", "peers", "layouts"])  # src/benchmarks/objectives.py, layouts.py
    assert sections <= set(benchmark.SECTIONS)

    monkeypatch.setattr(benchmark, "measure", measure_in_this_process)
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


def table_rows(out: str, batch: int) -> list[list[str]]:
    """The cells of a printed table's rows for ``batch``."""
    return [
        [c.strip() for c in line.strip("|").split(" | ")]
        for line in out.splitlines()
        if line.startswith(f"| {batch} |")
    ]


def test_objectives_and_peers_render(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sections' real steps (every method's compute_loss, the FLOP count, the plain MAE) on tiny models."""
    vit = OmegaConf.create({"arch": "mim_vit_tiny_patch16", "kwargs": {"depth": 2}})
    beit = OmegaConf.merge(benchmark.config("conf/encoder/beit_t.yaml"), {"kwargs": {"depth": 2}})
    pale = OmegaConf.create(
        {"arch": "pale_tiny_224", "kwargs": {"embed_dim": 16, "depths": [1] * 3, "num_heads": [2] * 3}}
    )
    deit = OmegaConf.merge(vit, {"kwargs": {"pos_embed_type": "learn", "weight_init_style": "timm"}})
    encoders = {"MAE": {"ViT-B/16": vit, "Pale-T": pale}, "BEiT": {"ViT-B/16": beit, "Pale-T": pale}}
    monkeypatch.setattr(bench_objectives, "ENCODERS", {**encoders, "DeiT": {"ViT-B/16": deit, "Pale-T": pale}})
    monkeypatch.setattr(bench_objectives, "TEACHER", "resnet10t")
    monkeypatch.setattr(bench_objectives, "TIMM_VIT", "vit_tiny_patch16_224")
    monkeypatch.setattr(bench_objectives, "PLAIN_VIT", {"patch_size": 16, "dim": 192, "depth": 2, "heads": 3})
    monkeypatch.setattr(benchmark, "measure", measure_in_this_process)
    argv = ["--img-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--repeats", "1"]

    benchmark.main(["--sections", "objectives", *argv])
    rows = table_rows(capsys.readouterr().out, 2)
    assert [(r[1], r[2]) for r in rows] == [(m, e) for m in ("MAE", "BEiT", "DeiT") for e in ("ViT-B/16", "Pale-T")]
    assert all(r[3] == "fp32" and float(r[4]) > 0 and float(r[6]) > 0 and r[8] == "-" for r in rows)

    benchmark.main(["--sections", "peers", *argv])
    rows = table_rows(capsys.readouterr().out, 2)
    assert [r[1] for r in rows if r[1].startswith("**")] == ["**ours / timm**", "**ours / plain**"]
    steps = [r for r in rows if not r[1].startswith("**")]
    assert len(steps) == 4 and all(float(r[4]) > 0 for r in steps)

    def profiled_here(setup: benchmark.StepSetup, args: Any, threads: int) -> dict[str, float]:
        return pale_profile.profile_in_process(setup, args.device, args.steps, args.warmup, threads)

    monkeypatch.setattr(pale_profile, "profile_step", profiled_here)
    benchmark.main(["--sections", "mae_profile", *argv, "--threads", "1"])
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("| **total**"))
    assert all(float(v) > 0 for v in total.split("|")[2:4]) and "ours, 1 thr | plain, 1 thr" in out


def test_plain_mae_attention_masking_and_patches() -> None:
    """The baseline computes what the paper says: exact attention, int(L (1 - r)) kept patches, MAE's patch order."""
    q, k, v = torch.randn(3, 2, 4, 7, 16).unbind(0)
    assert torch.allclose(plain_mae.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    for length, ratio in ((196, 0.75), (10, 0.75), (49, 0.6)):
        kept, restore, mask = plain_mae.random_masking(4, length, ratio, torch.device("cpu"))
        assert kept.shape == (4, int(length * (1 - ratio)))
        assert (mask.sum(1) == length - kept.shape[1]).all() and (mask.gather(1, kept) == 0).all()
        assert (restore.sort(dim=1).values == torch.arange(length)).all()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(plain_mae.patchify(images, 8), patchify(images, 8))
    model = plain_mae.PlainMAE(32, 8, dim=32, depth=1, heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    assert model(images).ndim == 0


def test_peak_table_matches_device_names() -> None:
    """Longer names win over the names they contain (H100 PCIe is not an SXM H100, L40S is not an L4)."""
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA L40S": 362, "NVIDIA L4": 121}
    assert {name: bench_objectives.known_peak(name) for name in names} == names
    assert bench_objectives.known_peak("NVIDIA H800") is None


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
    """One fresh process (its start is most of the time): a counted step is timed there and its numbers carried back.
    A step that is not counted reports no FLOPs (measured here, by the same function the fresh process runs)."""
    args = benchmark.parse_args(["--steps", "1", "--warmup", "0", "--device", "cpu"])
    step = partial(bench_pale.attention_step, "pale", 8, 1, 16, 2, 7)
    result = benchmark.measure(partial(benchmark.counted, step), args)
    assert result.seconds > 0 and result.cpu_seconds > 0 and result.peak_bytes >= 0 and result.flops > 0
    assert benchmark.measure_in_process(step, "cpu", 1, 0, None).flops == 0


@pytest.mark.slow
def test_layouts_section_runs_eager_and_fsdp2_in_fresh_processes(
    capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """FSDP2's units in a process group of one, measured in fresh processes as the GPU table measures them
    (compiled blocks in a real run: tests/test_cpu_paths.py)."""
    monkeypatch.setattr(
        bench_layouts, "ENCODER", OmegaConf.create({"arch": "mim_vit_tiny_patch16", "kwargs": {"depth": 2}})
    )
    argv = ["--img-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1"]
    argv += ["--repeats", "1", "--threads", "1"]
    benchmark.main(["--sections", "layouts", "--layouts", "eager,fsdp2", *argv])
    rows = table_rows(capsys.readouterr().out, 2)
    assert [r[1] for r in rows] == ["eager", "fsdp2"] and all(float(r[2]) > 0 for r in rows)  # images/s
    assert rows[0][4] == "1.00" and float(rows[1][4]) > 0  # speed against eager, paired
