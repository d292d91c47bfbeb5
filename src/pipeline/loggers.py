"""Loggers: a local CSV log always, plus W&B that goes offline by itself and never waits on a network."""

from __future__ import annotations

import csv
import netrc
import os
import re
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from src.config import ConfigError

WANDB_HOST = "api.wandb.ai"


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
    """Forced-online W&B needs its server: refuse in seconds, before any work, rather than time out later."""
    wb = cfg.logger.wandb
    if wb.enabled and resolve_wandb_mode(wb.mode) == "online" and not _reachable(WANDB_HOST):
        raise ConfigError(
            f"logger.wandb.mode=online but {WANDB_HOST} does not answer within 2 s: use logger.wandb.mode=auto "
            "(offline when the server is out of reach; `wandb sync` uploads later) or logger=csv"
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


def build_loggers(cfg: Any, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")]
    wb = cfg.logger.wandb
    if wb.enabled:
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
    return loggers


def wandb_run_dir(loggers: list[Logger]) -> str | None:
    """Where the W&B run lives on disk (for the summary and `wandb sync`)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment.dir.removesuffix("/files")
    return None
