"""Loggers: a local CSV log always, plus those ``logger=[...]`` chooses: W&B (offline by itself, never waiting on
a network), TensorBoard and MLflow (a file store in the run folder unless told otherwise). A resumed run continues
each one's record: the same W&B run, TensorBoard folder and MLflow run."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import netrc
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from src.config import ConfigError
from src.files import write_atomically
from src.pipeline.run_folder import load_recorded

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"
# What the loggers of the `loggers` extra import (either name will do), found without importing it.
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}
MLFLOW_RUN_FILE = "mlflow_run.json"  # the MLflow run a run folder writes to, so that a resume continues it


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(requested: str) -> str:
    """auto: online only with an API key and a reachable server (2 s check), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if _has_wandb_key() and _reachable(WANDB_HOST):
        return "online"
    return "offline"


def check_logger(cfg: Any) -> None:
    """A logger that needs a server (forced-online W&B, an MLflow server) is refused in seconds, before any work,
    rather than timing out later."""
    wb, mlflow = cfg.logger.wandb, cfg.logger.mlflow
    for name, packages in LOGGER_PACKAGES.items():
        if cfg.logger[name] is not None and not any(importlib.util.find_spec(p) for p in packages):
            raise ConfigError(
                f"logger={name} needs the {packages[0]} package, which is not installed here: "
                "pip install -e '.[loggers]' (or choose another logger)"
            )
    if wb is not None and resolve_wandb_mode(wb.mode) == "online" and not _reachable(WANDB_HOST):
        raise ConfigError(
            f"logger.wandb.mode=online but {WANDB_HOST} does not answer within 2 s: use logger.wandb.mode=auto "
            "(offline when the server is out of reach; `wandb sync` uploads later) or logger=csv"
        )
    server = urlparse(mlflow.tracking_uri) if mlflow is not None and mlflow.tracking_uri else None
    if server is not None and server.scheme in ("http", "https"):
        port = server.port or (443 if server.scheme == "https" else 80)
        if not server.hostname or not _reachable(server.hostname, port):
            raise ConfigError(
                f"logger.mlflow.tracking_uri={mlflow.tracking_uri} does not answer within 2 s: start the server, or "
                "use logger.mlflow.tracking_uri=null (a file store in the run folder, no server needed)"
            )


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a resumed run appends to its history instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            try:
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
            except (UnicodeDecodeError, csv.Error) as e:
                raise ConfigError(
                    f"{self.metrics_file_path} cannot be read ({type(e).__name__}): its history would be lost; "
                    "move the file away to continue this run with a new history, or restore it"
                ) from None


class AppendingCSVLogger(CSVLogger):
    """The local CSV log of a run folder: ``csv/metrics.csv``, one history across resumes."""

    @property
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_run_id(run_name: str) -> str:
    """A deterministic id per run name, so a resumed run continues the same W&B run."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


class QuietWandbLogger(WandbLogger):
    """Lightning hands wandb its deprecated ``anonymous`` setting on every run, and wandb warns about it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous")


class ResumedMLFlowLogger(MLFlowLogger):
    """MLflow keeps a param's first value and refuses another: a resumed run (``resume_changes=[epochs]``) logs
    only the params its MLflow run does not hold yet."""

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        held = self.experiment.get_run(self.run_id).data.params
        flat = _flatten_dict(_convert_params(params))
        super().log_hyperparams({k: v for k, v in flat.items() if k not in held})


def mlflow_run_id(run_dir: Path, tracking_uri: str) -> str | None:
    """The MLflow run this run folder wrote to before, if it is still in the same store (a resume continues it)."""
    record_file = run_dir / MLFLOW_RUN_FILE
    if not record_file.exists():
        return None
    record = load_recorded(record_file)
    if record.get("tracking_uri") != tracking_uri:
        log.info("MLflow: %s is another store than this run's earlier %s: a new MLflow run", tracking_uri, record_file)
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(record["run_id"]).info.run_id
    except MlflowException:
        log.warning(
            "MLflow: run %s (%s) is gone from %s: a new MLflow run", record["run_id"], record_file, tracking_uri
        )
        return None


def mlflow_logger(section: Any, run_name: str, run_dir: Path) -> MLFlowLogger:
    """The run's MLflow logger; the default store is files in the run folder, which MLflow 3 serves only when
    ``MLFLOW_ALLOW_FILE_STORE`` is set (its database store needs the full ``mlflow`` package)."""
    uri = section.tracking_uri or f"file:{(run_dir / 'mlruns').resolve()}"
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    run_id = mlflow_run_id(run_dir, uri) if rank_zero_only.rank == 0 else None
    logger = ResumedMLFlowLogger(experiment_name=section.experiment, run_name=run_name, tracking_uri=uri, run_id=run_id)
    if rank_zero_only.rank == 0:
        write_atomically(run_dir / MLFLOW_RUN_FILE, json.dumps({"tracking_uri": uri, "run_id": logger.run_id}) + "\n")
        log.info("MLflow: run %s in %s", logger.run_id, uri)
    return logger


def tensorboard_logger(section: Any, run_name: str, run_dir: Path, resume_step: int | None) -> TensorBoardLogger:
    """Event files in ``run_dir/tensorboard`` (or ``save_dir/<run_name>``). A resume writes to the same folder and
    hides what an interrupted command logged after the step of its checkpoint (``purge_step``), since it is logged
    again; the kNN score and picture at that step came before the checkpoint and stay."""
    save_dir, name = (section.save_dir, run_name) if section.save_dir else (str(run_dir), "tensorboard")
    purge_step = None if resume_step is None else resume_step + 1
    logger = TensorBoardLogger(save_dir, name=name, version="", default_hp_metric=False, purge_step=purge_step)
    if rank_zero_only.rank == 0:
        log.info("TensorBoard: %s (tensorboard --logdir %s)", logger.log_dir, logger.log_dir)
    return logger


def build_loggers(cfg: Any, run_dir: Path, resume_step: int | None = None) -> list[Logger]:
    """The CSV log (always: the run's own record), then each logger ``cfg.logger`` holds a section for;
    ``resume_step``: the step of the checkpoint this command resumes from."""
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")]
    wb, tensorboard, mlflow = cfg.logger.wandb, cfg.logger.tensorboard, cfg.logger.mlflow
    if wb is not None:
        mode = resolve_wandb_mode(wb.mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            QuietWandbLogger(
                project=wb.project,
                entity=wb.entity,
                name=cfg.run_name,
                id=wandb_run_id(cfg.run_name),
                save_dir=str(run_dir),
                offline=mode == "offline",
                mode=mode,
                resume="allow",
                settings={"init_timeout": 60, "x_disable_stats": True},
            )
        )
    if tensorboard is not None:
        loggers.append(tensorboard_logger(tensorboard, cfg.run_name, run_dir, resume_step))
    if mlflow is not None:
        loggers.append(mlflow_logger(mlflow, cfg.run_name, run_dir))
    return loggers


def wandb_run_dir(loggers: list[Logger]) -> str | None:
    """Where the W&B run lives on disk (for the summary and `wandb sync`)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment.dir.removesuffix("/files")
    return None
