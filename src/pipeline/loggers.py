"""Loggers: a local CSV log always, plus W&B that goes offline by itself and never waits on a network."""

from __future__ import annotations

import netrc
import os
import re
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

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


def wandb_run_id(run_name: str) -> str:
    """A deterministic id per run name, so a resumed run continues the same W&B run."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


def build_loggers(cfg: Any, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    wb = cfg.logger.wandb
    if wb.enabled:
        mode = resolve_wandb_mode(wb.mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
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
