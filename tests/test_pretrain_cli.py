"""The front door end to end: config errors (in-process, and one through the command), a run with its outputs,
rerun reproducibility, kill-and-resume and DDP in real processes."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY, CommandRun, command, commands, compose_config, in_process, start_pretraining
from hydra.errors import HydraException
from safetensors.torch import load_file

from src.config import ConfigError
from src.pipeline.export import export_run
from src.pipeline.fit import run
from src.pipeline.output import HARMLESS_LOG_LINES, HARMLESS_WARNINGS

MAE_LIGHT = ["objective.decoder_dim=64", "objective.decoder_depth=1", "objective.decoder_heads=4"]


def last_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (["objective.mask_ratio=1.5"], "objective.mask_ratio"),
        (["encoder=vit_x"], "vit_x"),
        (["dataset.img_size=30"], "dataset.img_size"),
        (["dataset=image_folder", "dataset.root=/nonexistent/photos"], "/nonexistent/photos"),
        (["dataset=image_folder"], "dataset.root"),
        (["objective.mask_ratoi=0.5"], "mask_ratoi"),
    ],
)
def test_bad_config_fails_before_training_naming_the_key(tmp_path, override, named):
    """Composed by Hydra as the command composes it, then run through the pipeline the command runs."""
    with pytest.raises((ConfigError, HydraException), match=re.escape(named)):
        run(compose_config([*TINY, f"runs_dir={tmp_path}", *override]))
    assert not list(tmp_path.glob("*/checkpoints"))  # nothing trained


@pytest.mark.slow
def test_the_command_says_a_bad_config_in_one_line_and_exits_1(tmp_path):
    """The command-line cases of the errors above, one found by the pipeline and one by Hydra's composition:
    status 1, one line naming the key, no traceback."""
    results = commands(
        ("src.pretrain", [*TINY, f"runs_dir={tmp_path}", "dataset=image_folder", "dataset.root=/nonexistent/photos"]),
        ("src.pretrain", [*TINY, f"runs_dir={tmp_path}", "batch_size=abc"]),
    )
    said = (
        "dataset.root: image folder /nonexistent/photos does not exist",
        "Error merging override batch_size=abc: Value 'abc'",
    )
    for result, named in zip(results, said, strict=True):
        assert result.returncode == 1, result.stderr[-3000:]
        assert result.stderr.strip().startswith(f"config error: {named}"), result.stderr[-3000:]
        assert "\n" not in result.stderr.strip() and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*/checkpoints"))  # nothing trained


def test_cfg_job_prints_the_composed_config(capsys, monkeypatch):
    result = in_process("src.pretrain", ["objective=mae", "encoder=vit_l", "--cfg", "job"], capsys, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert "arch: mim_vit_large_patch16" in result.stdout and "mask_ratio: 0.75" in result.stdout


@pytest.mark.slow
def test_run_writes_checkpoint_exports_pictures_and_offline_wandb(pretrain_command_run: CommandRun, tmp_path):
    run_dir, result = pretrain_command_run.run_dir, pretrain_command_run.done
    assert "run finished at step 4" in result.stdout
    assert last_step(run_dir / "checkpoints" / "last.ckpt") == 4
    assert list((run_dir / "pictures").glob("step*.png"))
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0
    assert "kNN top-1  :" in result.stdout
    output = result.stdout + result.stderr
    assert "kNN at step 0:" in output and "kNN at step 4:" in output  # before training and after it
    # the exported encoder loads strictly into timm's own ViT (same sizes as the run)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=4,
        depth=2,
        checkpoint_path=str(run_dir / "export" / "encoder.safetensors"),
    )
    exported = load_file(str(run_dir / "export" / "encoder.safetensors"))
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, exported["blocks.1.mlp.fc2.weight"])
    official = torch.load(run_dir / "export" / "mae_full_official.pth", weights_only=True)["model"]
    assert "decoder_pred.weight" in official and "blocks.0.attn.qkv.weight" in official
    # the export command rebuilds the run from its saved config and writes the same weights
    again = load_file(str(export_run(run_dir, out_dir=tmp_path / "again")["encoder"]))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_a_run_prints_each_line_once_and_no_known_harmless_warning(pretrain_command_run: CommandRun) -> None:
    """What the shared front-door run (W&B offline, pictures, kNN) printed, and its own log."""
    done = pretrain_command_run.done
    printed = done.stdout + done.stderr
    assert "\r" not in printed and "it/s" not in printed  # a pipe: no bar repainted, but a line per logging window
    assert re.findall(r"^step (\d+)/4  epoch 1/1  loss ", done.stdout, flags=re.M) == ["1", "2", "3", "4"]
    lines = [line for line in printed.splitlines() if line.strip("-| ")]
    assert not [line for line, n in Counter(lines).items() if n > 1], printed
    for message in (*HARMLESS_WARNINGS, *HARMLESS_LOG_LINES, "anonymous setting has no effect"):
        assert not re.search(message, printed), message
    assert "skipped    : 0 corrupt samples (named in the warnings), 0 steps with NaN/inf gradients" in done.stdout
    assert re.search(r"W&B run    : .*offline-run-.*wandb sync", done.stdout)
    run_log = (pretrain_command_run.run_dir / "pretrain.log").read_text()  # Lightning's lines reach the run's own log
    assert "GPU available" in run_log and "lr " in run_log and "step 4/4  epoch 1/1" in run_log


@pytest.mark.slow
def test_a_rerun_with_the_same_seed_reproduces_the_weights_and_the_loss(pretrain_command_run: CommandRun, tmp_path):
    """The shared run again, and with another seed: both commands at once, in processes of their own."""

    def history(run_dir: Path) -> list[dict[str, str]]:
        with open(run_dir / "csv" / "metrics.csv") as f:
            # losses, lr and kNN scores step by step; throughput is the one logged column that may differ
            rows = [{k: v for k, v in row.items() if k != "train/images_per_sec"} for row in csv.DictReader(f)]
        assert any(row.get("train/loss") for row in rows)
        return rows

    def encoder(run_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run_dir / "export" / "encoder.safetensors"))

    first, args = pretrain_command_run.run_dir, [*pretrain_command_run.args, f"runs_dir={tmp_path}"]
    again = ("src.pretrain", [*args, "run_name=again"])
    for done in commands(again, ("src.pretrain", [*args, "run_name=other_seed", "seed=1"])):
        assert done.returncode == 0, done.stderr[-3000:]
    weights, same = encoder(first), encoder(tmp_path / "again")
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    assert history(first) == history(tmp_path / "again")
    other = encoder(tmp_path / "other_seed")
    assert not torch.equal(weights["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


def test_export_of_vit_b_loads_into_timm_vit_base_patch16_224(tmp_path):
    from src.methods.mae import MAE

    encoder = timm.create_model("mim_vit_base_patch16", img_size=224, num_classes=0)
    module = MAE(
        encoder,
        224,
        {"base_lr": 1e-4, "reference_batch": 256, "betas": [0.9, 0.95], "weight_decay": 0.05},
        batch_size=2,
        warmup_epochs=1,
        decoder_depth=1,
    )
    paths = module.export(tmp_path)
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, checkpoint_path=str(paths["encoder"])
    )
    assert torch.equal(vit.pos_embed, encoder.pos_embed)


@pytest.mark.slow
def test_killed_run_resumes_at_the_same_step(tmp_path):
    args = [*TINY, *MAE_LIGHT, f"runs_dir={tmp_path}", "run_name=killed", "epochs=50", "checkpoint_every_n_steps=2"]
    args.append("knn=null")  # no kNN pass at each epoch's end: the kill comes sooner
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = start_pretraining(args, env)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (ckpt.is_file() and last_step(ckpt) >= 6):
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = last_step(ckpt)  # loads completely: a kill mid-save can only leave a temporary file
    assert killed_at >= 6 and killed_at % 2 == 0

    resumed = [*args, "resume=true", f"trainer.max_steps={killed_at + 3}", "resume_changes=[trainer.max_steps]"]
    result = command("src.pretrain", resumed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states from the checkpoint" in result.stdout + result.stderr
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == killed_at + 3
    # the lr schedule continued rather than restarting: it has stepped once per optimizer step in total
    assert state["lr_schedulers"][0]["last_epoch"] == killed_at + 3
    assert not list(ckpt.parent.glob(".*.tmp"))  # whatever the kill left half-written is gone after resume


@pytest.mark.slow  # a process that has exited names a dead writer
def test_partial_writes_of_a_killed_save_are_removed(tmp_path):
    from src.pipeline.checkpoint import AtomicCheckpointIO
    from src.pipeline.run_folder import remove_dead_partial_writes

    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, tmp_path / "last.ckpt")
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.{host}.{int(dead.stdout)}.abc123.tmp"  # its writer has exited
    live = tmp_path / f".last.ckpt.{host}.{os.getpid()}.def456.tmp"  # a writer that is still running
    for path in (stale, live):
        path.write_bytes(b"half a checkpoint")
    assert remove_dead_partial_writes(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == 3


@pytest.mark.slow
def test_resume_false_refuses_to_overwrite(pretrain_command_run: CommandRun, tmp_path):
    """A copy of the shared run's folder, so that the refusal cannot touch what other tests read."""
    shutil.copytree(pretrain_command_run.run_dir, tmp_path / "first")
    cfg = compose_config([*pretrain_command_run.args, f"runs_dir={tmp_path}", "run_name=first", "resume=false"])
    with pytest.raises(ConfigError, match=r"already holds .*last\.ckpt: pass resume=auto"):
        run(cfg)


@pytest.mark.slow
def test_two_process_ddp_run_on_cpu(tmp_path):
    args = [
        *TINY,
        *MAE_LIGHT,
        f"runs_dir={tmp_path}",
        "run_name=ddp",
        "trainer=cpu_ddp",
        "trainer.devices=2",
        "dataset.train_limit=128",
    ]
    result = command("src.pretrain", args)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    # 128 images over 2 ranks at 16 per device: 4 optimizer steps, one shared run folder
    assert last_step(tmp_path / "ddp" / "checkpoints" / "last.ckpt") == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert result.stdout.count("run finished at step 4") == 1  # the summary once, from rank zero


@pytest.mark.slow
def test_warmup_counts_real_batches_per_epoch_when_max_steps_stops_early(tmp_path, caplog):
    # 64 images / 16 per batch = 4 steps per epoch: warm-up 1 epoch = 4 steps, whatever epochs/max_steps say
    cfg = compose_config(
        [
            *TINY,
            *MAE_LIGHT,
            f"runs_dir={tmp_path}",
            "epochs=50",
            "trainer.max_steps=6",
            "warmup_epochs=1",
            "knn=null",
            "export=false",
        ]
    )
    with caplog.at_level("INFO"):
        assert run(cfg).global_step == 6
    assert "warm-up 4 of 6 steps" in caplog.text
