"""TensorBoard and MLflow beside the CSV log, chosen alone or together, continued by a resume; and the progress a
run shows in a file or a pipe: one line per logging window, no bar repaints."""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, compose_config, free_port, in_process
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.config import ConfigError
from src.pipeline.fit import prepare, run
from src.pipeline.loggers import MLFLOW_RUN_FILE, ResumedMLFlowLogger
from src.pipeline.progress import progress_mode
from src.pipeline.run_folder import load_recorded

# 4 steps of 16 images, a line and a CSV row every 2 steps, a picture at steps 0, 2 and 4, kNN at steps 0 and 4.
LOGGED = [o for o in TINY if not o.startswith("logger=")] + ["logger=[tensorboard,mlflow]", "export=false"]
LOGGED += ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"]
LOGGED += ["trainer.log_every_n_steps=2", "pictures.every_n_steps=2", "run_name=logged"]
PROGRESS_LINE = re.compile(
    r"^step (\d+)/(\d+)  epoch (\d+)/(\d+)  loss \d+\.\d{4}  lr [\d.e-]+  \d+\.\d img/s(  ETA \d+:\d\d:\d\d)?$"
)


@dataclass(frozen=True)
class LoggedRun:
    """One command's output and what its loggers held right after it (a later resume adds to the same stores)."""

    run_dir: Path
    printed: str  # what the command wrote to stdout and stderr (neither a terminal)
    progress: list[str]  # the progress lines it logged
    csv_loss: dict[int, float]
    events: EventAccumulator  # TensorBoard, read once the command ended
    mlflow: Run
    mlflow_history: dict[str, dict[int, float]]  # MLflow's train/loss and knn/top1, step -> value
    mlflow_pictures: list[int]  # the steps of the PNG pictures among the MLflow run's image artifacts


def run_capturing(overrides: list[str]) -> LoggedRun:
    """``run`` with stdout and stderr redirected to memory (not a terminal, as in a SLURM job or `> log`)."""
    cfg = compose_config(overrides)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    progress_log = logging.getLogger("src.pipeline.progress")
    progress_log.addHandler(handler)
    level = progress_log.level
    progress_log.setLevel(logging.INFO)
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            run(cfg)
    finally:
        progress_log.removeHandler(handler)
        progress_log.setLevel(level)
    run_dir = Path(cfg.run_dir)
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        csv_loss = {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]}
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    record = load_recorded(run_dir / MLFLOW_RUN_FILE)
    client = MlflowClient(record["tracking_uri"])
    history = {
        key: {m.step: m.value for m in client.get_metric_history(record["run_id"], key)}
        for key in ("train/loss", "knn/top1")
    }
    images = [a.path for a in client.list_artifacts(record["run_id"], "images") if a.path.endswith(".png")]
    pictures = sorted(int(re.search(r"\+step\+(\d+)\+", p)[1]) for p in images if "pictures.objective" in p)
    return LoggedRun(
        run_dir,
        out.getvalue() + err.getvalue(),
        lines,
        csv_loss,
        events,
        client.get_run(record["run_id"]),
        history,
        pictures,
    )


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> LoggedRun:
    return run_capturing([*LOGGED, f"runs_dir={tmp_path_factory.mktemp('loggers')}"])


@pytest.fixture(scope="module")
def resumed(logged: LoggedRun) -> LoggedRun:
    """The same run made two epochs long: a second command in the same folder, resuming at step 4."""
    return run_capturing([*LOGGED, f"runs_dir={logged.run_dir.parent}", "epochs=2", "resume_changes=[epochs]"])


@pytest.mark.slow
def test_tensorboard_holds_the_scalars_of_the_csv_log_and_the_pictures(logged: LoggedRun) -> None:
    scalars = set(logged.events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_sec", "knn/top1", "knn/pixels_top1"} <= scalars
    loss = {e.step: e.value for e in logged.events.Scalars("train/loss")}
    assert loss == pytest.approx(logged.csv_loss, rel=1e-6)  # float32 in the event file
    assert [e.step for e in logged.events.Scalars("knn/top1")] == [0, 4]
    pictures = logged.events.Images("pictures/objective")
    assert [p.step for p in pictures] == [0, 2, 4]  # the last step once, though training ends there too
    shown = np.asarray(Image.open(io.BytesIO(pictures[1].encoded_image_string)).convert("RGB"), dtype=int)
    saved = np.asarray(Image.open(logged.run_dir / "pictures" / "step0000002.png").convert("RGB"), dtype=int)
    assert shown.shape == saved.shape and np.abs(shown - saved).max() <= 1  # the same grid, rounded alike


@pytest.mark.slow
def test_mlflow_holds_the_scalars_of_the_csv_log_and_the_pictures_in_a_file_store_in_the_run_folder(
    logged: LoggedRun,
) -> None:
    assert load_recorded(logged.run_dir / MLFLOW_RUN_FILE)["tracking_uri"] == f"file:{logged.run_dir / 'mlruns'}"
    assert logged.mlflow.info.run_name == "logged" and logged.mlflow.info.status == "FINISHED"
    assert logged.mlflow.data.params["mask_ratio"] == "0.75"  # the method's hyperparameters
    assert logged.mlflow_history["train/loss"] == pytest.approx(logged.csv_loss, rel=1e-12)
    assert list(logged.mlflow_history["knn/top1"]) == [0, 4]
    assert logged.mlflow_pictures == [0, 2, 4]


@pytest.mark.slow
def test_a_run_in_a_file_or_a_pipe_shows_one_line_per_logging_window_and_no_bar(logged: LoggedRun) -> None:
    assert "\r" not in logged.printed and "it/s" not in logged.printed, logged.printed  # no bar repainted
    parsed = [PROGRESS_LINE.match(line) for line in logged.progress]
    assert all(parsed), logged.progress
    # steps 2 and 4 of 4 in epoch 1 of 1: one line per trainer.log_every_n_steps, with the time left
    assert [m.group(1, 2, 3, 4) for m in parsed] == [("2", "4", "1", "1"), ("4", "4", "1", "1")]
    assert parsed[0][5] is not None and parsed[1][5] == "  ETA 0:00:00"
    assert f"loss {logged.csv_loss[1]:.4f}" in logged.progress[0]  # the loss of the step the line closes


@pytest.mark.slow
def test_a_resume_continues_the_same_tensorboard_folder_and_mlflow_run(logged: LoggedRun, resumed: LoggedRun) -> None:
    assert resumed.run_dir == logged.run_dir and resumed.mlflow.info.run_id == logged.mlflow.info.run_id
    client = MlflowClient(load_recorded(resumed.run_dir / MLFLOW_RUN_FILE)["tracking_uri"])
    assert len(client.search_runs([resumed.mlflow.info.experiment_id])) == 1  # no second MLflow run
    assert list(resumed.mlflow_history["knn/top1"]) == [0, 4, 8]
    assert resumed.mlflow_history["train/loss"] == pytest.approx(resumed.csv_loss, rel=1e-12)
    assert resumed.mlflow_pictures == [0, 2, 4, 6, 8]
    assert len(list((resumed.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, both commands
    assert [e.step for e in resumed.events.Scalars("train/loss")] == sorted(resumed.csv_loss) == [1, 3, 5, 7]
    assert [p.step for p in resumed.events.Images("pictures/objective")] == [0, 2, 4, 6, 8]
    assert [int(line.split()[1].split("/")[0]) for line in resumed.progress] == [6, 8]


def test_mlflow_keeps_a_params_first_value_when_a_resume_logs_another(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as mlflow_logger sets it for a file store
    uri = f"file:{tmp_path / 'mlruns'}"
    first = ResumedMLFlowLogger(experiment_name="e", run_name="r", tracking_uri=uri)
    first.log_hyperparams({"batch_size": 16})
    resumed = ResumedMLFlowLogger(experiment_name="e", tracking_uri=uri, run_id=first.run_id)
    resumed.log_hyperparams({"batch_size": 8, "optim": {"lr": 0.1}})  # MLflow alone would refuse the new value
    assert resumed.experiment.get_run(first.run_id).data.params == {"batch_size": "16", "optim/lr": "0.1"}


@pytest.mark.parametrize("door", ["pretrain", "finetune", "tokenizer", "supervised"])
def test_every_front_door_takes_one_logger_or_several(door: str) -> None:
    assert compose_config(["logger=csv"], door).logger == {"wandb": None, "tensorboard": None, "mlflow": None}
    chosen = compose_config(["logger=[wandb,tensorboard,mlflow]"], door).logger
    assert chosen.wandb.mode == "auto" and chosen.tensorboard.save_dir is None and chosen.mlflow.tracking_uri is None
    alone = compose_config(["logger=mlflow"], door).logger
    assert alone.wandb is None and alone.tensorboard is None and alone.mlflow.experiment == "vitpretrain"


@pytest.mark.parametrize(
    ("choice", "said"),
    [
        (
            "logger=tensorbord",
            "Could not find 'logger/tensorbord': Available options in 'logger': csv, mlflow, tensorboard, wandb",
        ),
        ("logger=[wandb,mlfow]", "Could not load 'logger/mlfow'"),  # Hydra lists no options for a list's member
    ],
    ids=["alone", "in a list"],
)
def test_an_unknown_logger_is_one_config_error_naming_it(choice: str, said: str, capsys, monkeypatch) -> None:
    refused = in_process("src.pretrain", [choice], capsys, monkeypatch)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [f"config error: In 'pretrain': {said}"], refused.stderr


def test_an_mlflow_server_that_does_not_answer_is_refused_before_work(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = compose_config([*LOGGED, f"runs_dir={tmp_path}", f"logger.mlflow.tracking_uri={uri}"])
    with pytest.raises(ConfigError, match=rf"logger.mlflow.tracking_uri={uri} does not answer within 2 s"):
        prepare(cfg)
    assert not list(tmp_path.iterdir())


def test_a_logger_whose_package_is_missing_is_refused_before_work(tmp_path: Path, monkeypatch) -> None:
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlflow" else found(name))
    cfg = compose_config([*LOGGED, f"runs_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"logger=mlflow needs the mlflow package, .*: pip install -e '.\[loggers\]'"):
        prepare(cfg)
    assert not list(tmp_path.iterdir())


def test_progress_auto_is_a_bar_only_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for stream in (sys.stdout, sys.stderr):
        monkeypatch.setattr(stream, "isatty", lambda: True)
    assert progress_mode("auto") == "bar" and progress_mode("lines") == "lines"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # `> log`, a pipe, a SLURM output file
    assert progress_mode("auto") == "lines" and progress_mode("bar") == "bar"


def test_progress_takes_only_its_three_choices() -> None:
    cfg = compose_config([*TINY, "trainer.progress=tqdm"])
    with pytest.raises(ConfigError, match=r"trainer.progress='tqdm' must be one of \('auto', 'bar', 'lines'\)"):
        prepare(cfg)
