"""A run folder is one run's: identity checks, two checkpoints with fallback, one CSV history, one process,
and values that cannot work refused before any model is built."""

from __future__ import annotations

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
from src.config import ConfigError
from src.methods.base import encoder_export_state
from src.pipeline.fit import prepare, run
from src.pipeline.run_folder import LOCK_FILE, PREVIOUS

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
    overrides = [*TINY, *FAST, "epochs=1", "task=linear", "task.pool=avg", f"init.checkpoint={checkpoint}"]
    overrides.append(f"runs_dir={tmp_path}")
    return compose_config([*overrides, *extra], config_name="finetune")


# ---- run identity ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_checkpoint_in_the_same_folder_is_refused_not_silently_resumed(tmp_path: Path) -> None:
    a, b = encoder_file(tmp_path / "a.safetensors", 0), encoder_file(tmp_path / "b.safetensors", 1)
    first = run(linear(tmp_path, a))
    metrics = (first.run_dir / "metrics.json").read_text()
    with pytest.raises(ConfigError, match=r"holds another run: init\.checkpoint: .*a\.safetensors.*b\.safetensors"):
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
    assert "last.ckpt cannot be read" in caplog.text and "resuming from the older" in caplog.text

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
