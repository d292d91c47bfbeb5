"""The paths a GPU cluster runs, run for real on the CPU: the fused AdamW step and its device-side skip of a
non-finite step, LARS's skip, bf16-mixed training, and ``trainer.compile=true`` (docs/gpu_paths.md lists every
branch that differs on a GPU and the test here that runs it)."""

from __future__ import annotations

import copy
import csv
import os
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY, compose_config
from omegaconf import DictConfig
from safetensors.torch import load_file

from src.methods.optim import LARS, skips_on_found_inf
from src.pipeline.callbacks import NonFiniteGuard
from src.pipeline.fit import run
from src.pipeline.summary import RunResult

MAE_LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2", "knn=null"]
SHORT = ["dataset.train_limit=32", "warmup_epochs=0", "epochs=50", "pictures.every_n_steps=1000"]
SHORT += ["trainer.log_every_n_steps=1", "checkpoint_every_n_steps=1000"]
LEARNS = ["objective.optim.base_lr=1e-2"]  # lr 6e-4: the tiny MAE's loss falls by a third in 12 steps
LINEAR_LARS = ["objective=linear", "objective.pool=avg", "objective.optim.name=lars", "objective.optim.base_lr=1"]
# inductor's C++ for one run's blocks takes 20-50 s here on a cold cache; aot_eager traces the same graphs (dynamo,
# forward and backward through AOTAutograd) in 2 s. `CPU_PATHS_COMPILE_BACKEND=inductor` compiles them for real.
COMPILE_BACKEND = os.environ.get("CPU_PATHS_COMPILE_BACKEND", "aot_eager")
POISONED_STEP = 4


def config(front_door: str, tmp_path: Path, run_name: str, steps: int, *extra: str) -> DictConfig:
    """A tiny run of ``front_door`` (pretrain: MAE; finetune: the objective ``extra`` names), one CSV row a step."""
    method = MAE_LIGHT if front_door == "pretrain" else []
    overrides = [*TINY, *method, *SHORT, f"runs_dir={tmp_path}", f"run_name={run_name}", f"trainer.max_steps={steps}"]
    return compose_config([*overrides, *extra], config_name=front_door)


def resumed(front_door: str, tmp_path: Path, run_name: str, steps: int, *extra: str) -> DictConfig:
    """The same run's command again, longer: it resumes from its last checkpoint."""
    return config(front_door, tmp_path, run_name, steps, *extra, "resume=true", "resume_changes=[trainer.max_steps]")


def losses(result: RunResult) -> list[float]:
    """``train/loss`` at each step, from the run's CSV history."""
    with open(result.run_dir / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def falls(curve: list[float]) -> bool:
    """The mean of the last three losses is at least 10% below the mean of the first three."""
    return sum(curve[-3:]) < 0.9 * sum(curve[:3])


class StepWatch:
    """What each optimizer step of a run starts from (weights, optimizer state), and one step's gradient poisoned.

    It wraps ``NonFiniteGuard.on_before_optimizer_step``: after backward, before the step, so the record of
    step k + 1 is what step k left.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, poison_at: int | None = None) -> None:
        self.poison_at = poison_at
        self.before: dict[int, tuple[dict[str, torch.Tensor], dict]] = {}
        self.flag: dict[int, float] = {}  # optimizer.found_inf as the guard left it
        self.optimizer: torch.optim.Optimizer | None = None
        self.precision = ""
        guard_step = NonFiniteGuard.on_before_optimizer_step

        def watched(guard: NonFiniteGuard, trainer, pl_module, optimizer) -> None:
            step = trainer.global_step
            weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
            self.before[step] = (weights, copy.deepcopy(optimizer.state_dict()["state"]))
            self.optimizer, self.precision = optimizer, trainer.precision
            if step == self.poison_at:  # one element of one gradient: the whole step must go
                grad = next(p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
                grad.view(-1)[0] = float("nan")
            guard_step(guard, trainer, pl_module, optimizer)
            self.flag[step] = float(getattr(optimizer, "found_inf", -1.0))

        monkeypatch.setattr(NonFiniteGuard, "on_before_optimizer_step", watched)


def same_state(a: dict, b: dict) -> bool:
    """Two optimizer ``state`` dicts hold the same tensors (moments, step counts), exactly."""
    if a.keys() != b.keys():
        return False
    return all(
        a[i].keys() == b[i].keys()
        and all(torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k])) for k in a[i])
        for i in a
    )


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the fused step and its device-side skip, in a real run --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("front_door", "extra", "optimizer_type"),
    [("pretrain", [*LEARNS, "objective.optim.fused=true"], torch.optim.AdamW), ("finetune", LINEAR_LARS, LARS)],
    ids=["mae-fused-adamw", "linear-probe-lars"],
)
def test_a_poisoned_step_is_skipped_on_the_device_counted_and_the_count_survives_a_resume(
    front_door: str, extra: list[str], optimizer_type: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = StepWatch(monkeypatch, poison_at=POISONED_STEP)
    result = run(config(front_door, tmp_path, "skip", 12, *extra))

    assert isinstance(watch.optimizer, optimizer_type) and skips_on_found_inf(watch.optimizer)
    if optimizer_type is torch.optim.AdamW:
        assert watch.optimizer.defaults["fused"] is True  # the kernel a GPU steps with, here on the CPU (asked)
    assert watch.flag == {step: float(step == POISONED_STEP) for step in range(12)}  # decided in the step
    for step in range(1, 12):
        (before, state_before), (after, state_after) = watch.before[step - 1], watch.before[step]
        skipped = step - 1 == POISONED_STEP
        assert same_weights(before, after) == skipped, step
        assert same_state(state_before, state_after) == skipped, step  # moments and step count as they were
    assert result.metrics["train/nonfinite_steps"] == 1.0
    if front_door == "pretrain":
        assert falls(losses(result)), losses(result)

    longer = run(resumed(front_door, tmp_path, "skip", 14, *extra))
    assert longer.global_step == 14 and longer.metrics["train/nonfinite_steps"] == 1.0
    saved = torch.load(longer.checkpoint, map_location="cpu", weights_only=True)
    assert {k: int(v) for k, v in saved["callbacks"]["NonFiniteGuard"].items()} == {"total": 1, "in_a_row": 0}


# ---- bf16 mixed precision on the CPU --------------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_mixed_on_the_cpu_learns_keeps_fp32_weights_and_resumes_from_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = StepWatch(monkeypatch)
    result = run(config("pretrain", tmp_path, "bf16", 10, *LEARNS, "trainer.precision=bf16-mixed"))
    assert watch.precision == "bf16-mixed" and falls(losses(result)), losses(result)

    saved = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    moments = [t for state in saved["optimizer_states"][0]["state"].values() for t in state.values()]
    floats = [t for t in [*saved["state_dict"].values(), *moments] if t.is_floating_point() and t.ndim]
    assert floats and {t.dtype for t in floats} == {torch.float32}  # autocast computes in bf16, keeps fp32 weights
    exported = load_file(str(result.exports["encoder"]))
    assert same_weights(exported, {name: saved["state_dict"][f"encoder.{name}"] for name in exported})
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2)
    vit.load_state_dict(exported, strict=True)  # the export loads into timm's own ViT, every tensor fp32

    watch.before.clear()
    longer = run(resumed("pretrain", tmp_path, "bf16", 12, *LEARNS, "trainer.precision=bf16-mixed"))
    assert longer.global_step == 12 and sorted(watch.before) == [10, 11]
    weights, state = watch.before[10]  # what the resumed run's first step started from: the checkpoint, exactly
    assert same_weights(weights, {name: saved["state_dict"][name] for name in weights})
    assert same_state(state, saved["optimizer_states"][0]["state"])


# ---- torch.compile in a real run ------------------------------------------------------------------------------------
def export_names(path: Path) -> list[str]:
    """The tensor names an export file holds (safetensors, or an official-layout .pth), or its text."""
    if path.suffix == ".safetensors":
        return sorted(load_file(str(path)))
    if path.suffix == ".pth":
        return sorted(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return [path.read_text()]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("front_door", "extra"), [("pretrain", []), ("finetune", ["objective=classify"])], ids=["mae", "classify"]
)
def test_a_compiled_run_logs_eager_losses_and_writes_the_same_names(
    front_door: str, extra: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend=COMPILE_BACKEND))
    torch._dynamo.reset()
    eager = run(config(front_door, tmp_path, "eager", 4, *extra))
    torch._dynamo.utils.counters.clear()
    compiled = run(config(front_door, tmp_path, "compiled", 4, *extra, "trainer.compile=true"))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2, graphs  # the blocks ran as dynamo graphs (the eager run made none)

    # the largest relative difference measured over 12 steps: 0 with aot_eager, 8e-8 with inductor
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-5, atol=0.0)
    first, second = (torch.load(r.checkpoint, map_location="cpu", weights_only=True) for r in (eager, compiled))
    assert list(first["state_dict"]) == list(second["state_dict"])  # no _orig_mod. in a compiled run's names
    assert first["optimizer_states"][0]["state"].keys() == second["optimizer_states"][0]["state"].keys()
    assert eager.exports.keys() == compiled.exports.keys()
    for name, path in eager.exports.items():
        assert export_names(path) == export_names(compiled.exports[name]), name
