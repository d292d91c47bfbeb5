"""A run folder stays the run's: it cannot be placed outside runs_dir, a refused or repeated command changes
nothing in it, it can be moved and resumed, and its damaged files are named in one line."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config, in_process

from src.config import ConfigError
from src.pipeline.fit import run
from src.pipeline.run_folder import LOCK_FILE, check_same_run, check_writable, run_lock
from src.pipeline.summary import summary

LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2", "knn=null"]
SHORT = [*TINY, *LIGHT, "dataset.train_limit=32", "warmup_epochs=0", "pictures.every_n_steps=1000", "epochs=50"]
SHORT += ["trainer.log_every_n_steps=1", "export=false"]


def tiny(runs_dir: Path, *extra: str):
    return compose_config([*SHORT, f"runs_dir={runs_dir}", "run_name=run", *extra])


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (its content digest and its modification time) and every folder."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        if p.is_file()
        else ("folder", 0)
        for p in sorted(folder.rglob("*"))
    }


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """``key`` per step, from the run's CSV history."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


# ---- place ------------------------------------------------------------------------------------------------
def test_a_run_name_that_climbs_out_of_runs_dir_is_refused(tmp_path: Path) -> None:
    for name in ("../escaped", "../../escaped", "a/../../escaped"):
        with pytest.raises(
            ConfigError, match=rf"^run_name='{re.escape(name)}' puts .*outside runs_dir=.*set runs_dir="
        ):
            run(tiny(tmp_path / "runs", f"run_name={name}", "trainer.max_steps=1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even runs_dir
    assert not (tmp_path.parent / "escaped").exists()


@pytest.mark.slow
def test_refused_commands_write_nothing_anywhere(tmp_path: Path, capsys, monkeypatch) -> None:
    """Through the front door (Hydra included), a changed config leaves no trace: no .hydra folder, no log file.
    The pipeline's own refusals write nothing either (an escaping run_name: the test above, in-process)."""
    run(tiny(tmp_path / "runs", "trainer.max_steps=1"))
    before = snapshot(tmp_path)
    changed = [*SHORT, f"runs_dir={tmp_path / 'runs'}", "run_name=run", "objective.mask_ratio=0.5"]
    done = in_process("src.pretrain", changed, capsys, monkeypatch)
    assert done.returncode == 1 and "objective.mask_ratio: 0.75 -> 0.5" in done.stderr, done.stderr[-2000:]
    assert snapshot(tmp_path) == before


def test_a_read_only_place_is_named_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot write the run folder /sys/vitpretrain/run .*runs_dir="):
        run(tiny(Path("/sys/vitpretrain")))
    folder = tmp_path / "run"
    folder.mkdir()
    locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    assert locked.returncode == 0, f"chattr +i is needed to make a folder read-only for root: {locked.stderr}"
    try:
        with pytest.raises(ConfigError, match=rf"cannot write the run folder {folder} \(Operation not permitted"):
            check_writable(folder)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# ---- a finished run ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_finished_run_again_changes_nothing_and_a_longer_one_follows_the_new_schedule(tmp_path: Path) -> None:
    first = run(tiny(tmp_path, "trainer.max_steps=2"))
    before = snapshot(first.run_dir)
    again = run(tiny(tmp_path, "trainer.max_steps=2", "num_workers=1"))  # a harmless difference: still finished
    assert again.finished_before and again.global_step == 2 and again.metrics == first.metrics
    assert summary(again).startswith(f"run already finished at step 2: {first.run_dir} (nothing ran")
    assert snapshot(first.run_dir) == before  # metrics.json, last.ckpt (its sha256), the CSV: all as they were

    longer = run(tiny(tmp_path, "trainer.max_steps=4", "resume_changes=[trainer.max_steps]"))
    assert longer.global_step == 4 and not longer.finished_before
    straight = run(tiny(tmp_path, "trainer.max_steps=4", "run_name=straight"))
    resumed, uninterrupted = logged(longer.run_dir, "train/lr"), logged(straight.run_dir, "train/lr")
    assert resumed[2] > 0 and resumed[2] == pytest.approx(uninterrupted[2], rel=1e-6)  # not the old final lr 0.0
    assert resumed[3] == pytest.approx(uninterrupted[3], rel=1e-6)


@pytest.mark.slow
def test_a_moved_run_folder_resumes_into_last_ckpt(tmp_path: Path) -> None:
    first = run(tiny(tmp_path / "here", "trainer.max_steps=2", "checkpoint_every_n_steps=1"))
    shutil.copytree(first.run_dir, tmp_path / "there" / "run")
    moved = run(
        tiny(
            tmp_path / "there",
            "trainer.max_steps=4",
            "checkpoint_every_n_steps=1",
            "resume_changes=[trainer.max_steps]",
        )
    )
    folder = moved.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last-previous.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 4


# ---- damaged files of a run folder -------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", "{", "null", '{"host": 1, "pid": "x"}', '{"host": "h", "pid": -1}'])
def test_an_unreadable_lock_is_named_with_the_way_out(tmp_path: Path, content: str) -> None:
    (tmp_path / LOCK_FILE).write_text(content)
    unreadable = r"\.lock is unreadable .* pass takeover=true or delete the file"
    with pytest.raises(ConfigError, match=unreadable), run_lock(tmp_path):
        pass
    with run_lock(tmp_path, takeover=True):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("name", ["config.yaml", "run_identity.json"])
@pytest.mark.parametrize("content", ["", "- a list\n", "key: [unclosed\n", "\x00\xff garbage"])
def test_a_damaged_record_of_the_run_is_named(tmp_path: Path, name: str, content: str) -> None:
    cfg = tiny(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=rf"{name} (cannot be read|holds no mapping).*restore the file"):
        check_same_run(tmp_path, cfg)


# ---- permission to unpickle --------------------------------------------------------------------------------
def test_only_the_command_line_may_allow_unpickling() -> None:
    """A recipe or config file that sets allow_pickle is refused; the same key typed on the command line is not."""
    from hydra.core.hydra_config import HydraConfig

    from src.pipeline.fit import check_pickle_permission

    typed = compose_config([*TINY, "init.allow_pickle=true"], config_name="finetune", hydra=True)
    from_a_file = compose_config(TINY, config_name="finetune", hydra=True)
    from_a_file.init.allow_pickle = True  # as a recipe or an edited config file would set it
    try:
        HydraConfig.instance().set_config(typed)
        check_pickle_permission(typed)
        HydraConfig.instance().set_config(from_a_file)
        with pytest.raises(ConfigError, match=r"^init\.allow_pickle=true comes from a config or recipe file.*type "):
            check_pickle_permission(from_a_file)
    finally:
        HydraConfig.instance().cfg = None
