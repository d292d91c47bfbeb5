"""Progress a run shows: Lightning's bar in a terminal; in a file or a pipe (SLURM output, ``make demo > log``), one
line per logging window, because a bar written to a file is hundreds of carriage-return repaints."""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress import ProgressBar

log = logging.getLogger(__name__)

# What a progress line shows of the logged values, and how.
SHOWN = (("train/loss", "loss {:.4f}"), ("train/lr", "lr {:.3g}"))


def progress_mode(requested: str) -> str:
    """``auto``: a bar only when both output streams are a terminal (Lightning's bars write to either)."""
    if requested != "auto":
        return requested
    return "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"


def progress_callbacks(requested: str) -> list[Callback]:
    """The callbacks that show progress: none for a bar (Lightning adds its own), ``LineProgress`` for lines."""
    return [LineProgress()] if progress_mode(requested) == "lines" else []


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class LineProgress(ProgressBar):
    """One log line per ``trainer.log_every_n_steps`` optimizer steps (and at the last step): step/total, epoch,
    loss, lr, images/s over the window and the time left; one line per validation, none per batch.

    Images/s counts the images of every rank since the last line, training batches only: the window restarts
    with each epoch, so the kNN monitor and validation between epochs are not in it. The time left is the mean
    time per step since this command's first step (those pauses included, as they will come again) times the
    steps left.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self._first: tuple[float, int] | None = None  # (time, step) at this command's first training batch
        self._window: tuple[float, int] = (0.0, 0)  # (start, images) since the last line
        self._shown_step = -1
        self._validation_start = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window = (time.perf_counter(), 0)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._first is None:
            self._first = (time.perf_counter(), trainer.global_step)
            self._window = (self._first[0], 0)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        start, images = self._window
        self._window = (start, images + pl_module.batch_len(batch) * trainer.world_size)
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        if not self.enabled or step == self._shown_step or (step % trainer.log_every_n_steps and step != total):
            return  # a micro-batch that did not step, or a step inside the window
        self._shown_step = step
        now = time.perf_counter()
        log.info(self.line(trainer, now))
        self._window = (now, 0)

    def line(self, trainer: L.Trainer, now: float) -> str:
        """``step 40/80  epoch 1/1  loss 0.9321  lr 0.000375  212.4 img/s  ETA 0:01:10``, with what is known."""
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        known = math.isfinite(total) and total > 0  # a stream of shards without a length: -1 or inf
        parts = [f"step {step}/{int(total)}" if known else f"step {step}"]
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        parts.append(f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs else ""))
        metrics = trainer.callback_metrics
        parts += [shown.format(float(metrics[key])) for key, shown in SHOWN if key in metrics]
        start, images = self._window
        if now > start:
            parts.append(f"{images / (now - start):.1f} img/s")
        first_time, first_step = self._first or (now, step)
        if known and step > first_step:
            parts.append(f"ETA {_duration((now - first_time) / (step - first_step) * (total - step))}")
        return "  ".join(parts)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.progress_bar_metrics.items() if k.startswith("val")}
        said = "".join(f", {k} {v:.4f}" for k, v in sorted(shown.items()))
        took = _duration(time.perf_counter() - self._validation_start)
        log.info(f"validated at step {trainer.global_step} in {took}{said}")
