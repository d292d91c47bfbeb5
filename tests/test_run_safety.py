"""A run folder is one run's: identity checks, two checkpoints with fallback, one CSV history, one process,
and values that cannot work refused before any model is built."""

from __future__ import annotations

import copy
import csv
import json
import os
import socket
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY, compose_config
from PIL import Image
from safetensors.torch import save_file

import src.encoders  # noqa: F401  (registers the encoder families)
from src.config import ConfigError, RunStopped, exit_on_user_error
from src.methods.base import encoder_export_state
from src.methods.mae import MAE
from src.methods.optim import create_optimizer
from src.pipeline.callbacks import NonFiniteGuard
from src.pipeline.fit import prepare, run
from src.pipeline.run_folder import LOCK_FILE, PREVIOUS
from src.pipeline.summary import RunResult, summary

MAE_COMPUTE_LOSS = MAE.compute_loss
MAE_LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2", "knn=null"]
FAST = ["dataset.train_limit=32", "warmup_epochs=0", "pictures.every_n_steps=1000", "epochs=50"]


def mae(tmp_path: Path, *extra: str):
    return compose_config([*TINY, *MAE_LIGHT, *FAST, f"runs_dir={tmp_path}", "run_name=mae", *extra])


def encoder_file(path: Path, seed: int) -> Path:
    """An exported tiny encoder (what `init.checkpoint` may name), different for each seed."""
    torch.manual_seed(seed)
    model = timm.create_model("mim_vit_tiny_patch16", img_size=32, patch_size=4, depth=2, num_classes=0)
    save_file({k: v.contiguous() for k, v in encoder_export_state(model).items()}, str(path))
    return path


def linear(tmp_path: Path, checkpoint: Path, *extra: str):
    overrides = [*TINY, *FAST, "epochs=1", "objective=linear", "objective.pool=avg", f"init.checkpoint={checkpoint}"]
    overrides.append(f"runs_dir={tmp_path}")
    return compose_config([*overrides, *extra], config_name="finetune")


# ---- run identity ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_checkpoint_in_the_same_folder_is_refused_not_silently_resumed(tmp_path: Path) -> None:
    a, b = encoder_file(tmp_path / "a.safetensors", 0), encoder_file(tmp_path / "b.safetensors", 1)
    first = run(linear(tmp_path, a))
    metrics = (first.run_dir / "metrics.json").read_text()
    with pytest.raises(
        ConfigError,
        match=r"holds another run: init\.checkpoint \(file content, sha256\): .*a\.safetensors.*b\.safetensors",
    ):
        run(linear(tmp_path, b))
    assert (first.run_dir / "metrics.json").read_text() == metrics  # nothing of the first run was touched
    assert json.loads((first.run_dir / "init_report.json").read_text())["checkpoint"].endswith("a.safetensors")

    encoder_file(a, 2)  # the same name, other weights
    with pytest.raises(ConfigError, match=r"init\.checkpoint \(file content, sha256\)"):
        run(linear(tmp_path, a))
    assert run(linear(tmp_path, b, "run_name=with_b")).run_dir.name == "with_b"  # the way out it names


@pytest.mark.slow
def test_changed_hyper_parameters_stop_unless_they_may_change_on_resume(tmp_path: Path) -> None:
    run(mae(tmp_path, "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match=r"objective\.optim\.base_lr: 0\.00015 -> 0\.001.*new run_name") as refused:
        run(mae(tmp_path, "trainer.max_steps=1", "objective.optim.base_lr=1e-3"))
    assert "resume_changes" not in str(refused.value)  # the lr can never change within one run
    with pytest.raises(ConfigError, match=r"trainer\.max_steps: 1 -> 3.*resume_changes=\[trainer\.max_steps\]"):
        run(mae(tmp_path, "trainer.max_steps=3"))
    resumed = run(mae(tmp_path, "trainer.max_steps=3", "resume_changes=[trainer.max_steps]", "num_workers=0"))
    assert resumed.global_step == 3  # continued from step 1; a harmless key (num_workers) may differ freely
    with pytest.raises(
        ConfigError, match=r"epochs: 50 -> 60; trainer\.max_epochs: 50 -> 60.*resume_changes=\[epochs\] "
    ):
        run(mae(tmp_path, "trainer.max_steps=3", "epochs=60"))
    assert run(mae(tmp_path, "trainer.max_steps=3", "epochs=60", "resume_changes=[epochs]")).global_step == 3
    with pytest.raises(ConfigError, match=r"resume_changes=\['seed'\]: only"):
        run(mae(tmp_path, "resume_changes=[seed]"))


@pytest.mark.slow
def test_resume_appends_to_the_csv_history(tmp_path: Path) -> None:
    run(mae(tmp_path, "trainer.max_steps=2", "trainer.log_every_n_steps=1"))
    run(mae(tmp_path, "trainer.max_steps=4", "trainer.log_every_n_steps=1", "resume_changes=[trainer.max_steps]"))
    with (tmp_path / "mae" / "csv" / "metrics.csv").open() as f:
        steps = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})
    assert steps == [0, 1, 2, 3]  # both commands' rows, in one file


# ---- checkpoints -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_previous_checkpoint_resumes_when_the_newest_cannot_be_read(tmp_path: Path, caplog) -> None:
    run(mae(tmp_path, "trainer.max_steps=2", "checkpoint_every_n_steps=1"))
    folder = tmp_path / "mae" / "checkpoints"
    assert (folder / "last.ckpt").is_file() and (folder / PREVIOUS).is_file()  # the last two are kept
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    resume = ["trainer.max_steps=3", "resume_changes=[trainer.max_steps]"]
    with caplog.at_level("WARNING"):
        assert run(mae(tmp_path, *resume)).global_step == 3
    assert "last.ckpt cannot be read" in caplog.text and "using the older" in caplog.text

    for name in ("last.ckpt", PREVIOUS):  # a pickle payload is refused, never run
        torch.save({"payload": Path("x")}, folder / name)
    with pytest.raises(ConfigError, match=r"cannot be read \(UnpicklingError.*No readable checkpoint is left"):
        run(mae(tmp_path, "trainer.max_steps=4", "resume_changes=[trainer.max_steps]"))


@pytest.mark.slow
def test_checkpoints_and_exports_follow_the_umask(tmp_path: Path) -> None:
    result = run(mae(tmp_path, "trainer.max_steps=1"))
    mask = os.umask(0)
    os.umask(mask)
    for path in (result.checkpoint, result.exports["encoder"]):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


# ---- one process per folder -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_live_holder_refuses_a_second_process_and_a_dead_one_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "mae" / LOCK_FILE
    lock.parent.mkdir(parents=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%H:%M:%S")}
    lock.write_text(json.dumps(holder))  # this very process: alive
    with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}.*takeover=true"):
        run(mae(tmp_path, "trainer.max_steps=1"))
    assert not (tmp_path / "mae" / "checkpoints").exists()  # refused before any work

    lock.write_text(json.dumps({**holder, "host": "another-node"}))  # a requeued job's old node
    assert run(mae(tmp_path, "trainer.max_steps=1", "takeover=true")).global_step == 1
    assert not lock.exists()  # released at the end

    lock.write_text(json.dumps({**holder, "pid": 2**22 + 12345}))  # no such process here: stale
    assert run(mae(tmp_path, "trainer.max_steps=1")).global_step == 1


# ---- values that cannot work, refused before any model is built -------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective.mask_ratio=0", "keeps 64 of the 64 patches"),
        ("objective.mask_ratio=0.99", "keeps 0 of the 64 patches"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("trainer.precision=bogus", "trainer.precision='bogus' must be one of"),
        ("objective.crop_scale=[0.5,0.2]", "objective.crop_scale=[0.5, 0.2] must be null"),
        ("trainer.accelerator=gpus", "trainer.accelerator='gpus' must be one of ('auto', 'gpu', 'cpu'"),
        ("trainer.strategy=dpp", "trainer.strategy='dpp' must be one of ('auto', 'ddp'"),
        ("logger=wandb", "logger.wandb.mode=online but api.wandb.ai does not answer"),
    ],
)
def test_values_that_cannot_work_fail_before_work(tmp_path: Path, override: str, message: str) -> None:
    extra = [override, "logger.wandb.mode=online"] if override == "logger=wandb" else [override]
    started = time.monotonic()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        prepare(mae(tmp_path, *extra))
    assert time.monotonic() - started < 10
    assert not list(tmp_path.iterdir())


def test_an_empty_class_folder_fails_before_the_model_is_built(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.new("RGB", (32, 32), "white").save(root / "cats" / "a.png")
    cfg = compose_config(
        [*TINY, *MAE_LIGHT, "dataset=image_folder", f"dataset.root={root}", "dataset.img_size=32"]
        + ["dataset.train_limit=null", f"runs_dir={tmp_path / 'runs'}"]
    )
    with pytest.raises(ConfigError, match=r"dataset\.root: class folders \['dogs'\] .* hold no image files"):
        run(cfg)
    assert not (tmp_path / "runs" / "mae-vit_t-image_folder" / "checkpoints").exists()


# ---- non-finite steps -------------------------------------------------------------------------------------
def optimizer_for(which: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    groups = [{"params": params, "weight_decay": 0.05}]
    if which == "fused adamw":  # what create_optimizer builds on a GPU
        return torch.optim.AdamW(groups, lr=1e-2, fused=True)
    return create_optimizer(groups, 1e-2, {"name": which, "betas": (0.9, 0.95)})  # adamw: torch's default (CPU)


@pytest.mark.parametrize("which", ["adamw", "fused adamw", "lars"])
def test_a_non_finite_step_leaves_weights_and_optimizer_state_as_they_were(which: str) -> None:
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    optimizer = optimizer_for(which, params)
    guard = NonFiniteGuard(max_in_a_row=3)

    def step(poison: bool) -> None:
        for p in params:
            p.grad = torch.full_like(p, float("nan")) if poison and p.ndim == 1 else torch.ones_like(p)
        guard.on_before_optimizer_step(None, None, optimizer)
        optimizer.step()

    step(poison=False)
    weights, state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()["state"])
    step(poison=True)  # one NaN tensor: the whole step is skipped
    assert all(torch.equal(a, b) for a, b in zip(weights, params, strict=True))
    assert str(optimizer.state_dict()["state"]) == str(state)
    assert (int(guard.total), int(guard.in_a_row)) == (1, 1)
    step(poison=False)
    assert not torch.equal(weights[0], params[0]) and (int(guard.total), int(guard.in_a_row)) == (1, 0)


def test_the_fused_skip_never_reads_a_tensor_on_the_host(monkeypatch) -> None:
    params = [torch.nn.Parameter(torch.randn(8, 8))]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)  # what a GPU run steps with
    guard = NonFiniteGuard(max_in_a_row=3)
    params[0].grad = torch.full_like(params[0], float("inf"))

    def host_read(*args):
        raise AssertionError("a tensor was read on the host: on a GPU, a device sync every step")

    for name in ("__bool__", "item", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    guard.on_before_optimizer_step(None, None, optimizer)
    optimizer.step()
    monkeypatch.undo()
    assert int(guard.total) == 1 and torch.isfinite(params[0]).all()


@pytest.mark.slow
def test_a_run_that_keeps_diverging_stops_and_keeps_its_last_good_weights(tmp_path: Path, monkeypatch) -> None:
    nan_from_step = 2

    def diverging(self, batch):
        loss, extras = MAE_COMPUTE_LOSS(self, batch)
        return (loss * float("nan") if self.global_step >= nan_from_step else loss), extras

    monkeypatch.setattr(MAE, "compute_loss", diverging)
    cfg = mae(tmp_path, "trainer.max_steps=8", "checkpoint_every_n_steps=1", "max_nonfinite_steps=3")
    with pytest.raises(RunStopped, match=r"NaN or inf in the last 3 steps in a row \(step 5; 3 skipped in all\)"):
        run(cfg)
    folder = tmp_path / "mae" / "checkpoints"
    good, later = (torch.load(folder / name, weights_only=True) for name in (PREVIOUS, "last.ckpt"))
    assert (good["global_step"], later["global_step"]) == (3, 4)  # step 4 was a skipped one
    assert all(torch.equal(good["state_dict"][k], v) for k, v in later["state_dict"].items() if "total" not in k)
    assert all(torch.isfinite(v).all() for v in later["state_dict"].values() if v.is_floating_point())
    with pytest.raises(SystemExit, match="run stopped: the gradients were NaN"), exit_on_user_error():
        run(cfg)  # the front door, resuming: still diverging, one line instead of a traceback


def test_the_summary_says_when_wandb_was_off(tmp_path: Path) -> None:
    text = summary(RunResult(run_dir=tmp_path, checkpoint=None, metrics={"data/skipped": 3.0}))
    assert "W&B run    : off (logger=[...] does not choose wandb)" in text
    assert "skipped    : 3 corrupt samples" in text


# ---- a run that shows its work -----------------------------------------------------------------------------
def test_the_demo_is_vit_b_sized_for_a_few_cpu_minutes() -> None:
    cfg = compose_config(["objective=mae", "encoder=vit_b"])  # what `make demo` runs
    assert cfg.encoder.arch == "mim_vit_base_patch16" and "depth" not in cfg.encoder.kwargs  # ViT-B itself
    grid = cfg.dataset.img_size // cfg.encoder.kwargs.patch_size
    visible = round(grid * grid * (1 - cfg.objective.mask_ratio))
    steps = cfg.dataset.train_limit // cfg.batch_size * cfg.epochs
    assert (grid, visible, steps) == (4, 4, 80) and cfg.knn is not None
    assert compose_config(["objective=mae", "encoder=vit_b", "dataset=image_folder"]).encoder.kwargs.patch_size == 16


@pytest.mark.slow
def test_a_run_ends_with_its_loss_curve_first_and_last_pictures_and_knn_baselines(tmp_path: Path) -> None:
    light = [o for o in MAE_LIGHT if o != "knn=null"]  # with the kNN monitor this time
    overrides = [*TINY, *light, *FAST, "trainer.max_steps=3", "pictures.every_n_steps=2", "trainer.log_every_n_steps=1"]
    result = run(compose_config([*overrides, f"runs_dir={tmp_path}", "run_name=shows"]))
    assert result.loss_curve.is_file() and result.first_and_last.is_file()
    steps = sorted(p.name for p in result.pictures.glob("step*.png"))
    assert steps[0] == "step0000000.png" and steps[-1] == "step0000003.png"  # before any update, and the last
    first, last = (Image.open(result.pictures / name) for name in (steps[0], steps[-1]))
    assert Image.open(result.first_and_last).width == first.width + last.width + 16
    assert {"knn/top1", "knn/start_top1", "knn/pixels_top1"} <= set(result.metrics)
    assert 0.5 < result.metrics["knn/pixels_top1"] <= 1.0  # raw Fashion-MNIST pixels: far above chance
    assert "kNN top-1  :" in summary(result) and "on the raw pixels" in summary(result)


@pytest.mark.parametrize(
    ("now", "verdict"),
    [
        (0.66, "the encoder learned: 4.0 points above its untrained self; raw pixels are still ahead"),
        (0.60, "no gain over the untrained encoder yet (-2.0 points)"),
        (0.80, "the encoder learned: 18.0 points above its untrained self"),
    ],
)
def test_the_summary_says_what_the_knn_numbers_mean(tmp_path: Path, now: float, verdict: str) -> None:
    metrics = {"knn/top1": now, "knn/start_top1": 0.62, "knn/pixels_top1": 0.77}
    text = summary(RunResult(run_dir=tmp_path, checkpoint=None, metrics=metrics, global_step=160))
    assert f"kNN top-1  : {100 * now:.1f} at step 160; 62.0 at step 0 (the untrained encoder); 77.0 on the raw" in text
    assert verdict in text and (("still ahead" in text) == (now < 0.77))
