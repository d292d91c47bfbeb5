"""Elastic resume: a run checkpointed at one world size goes on at another with the same global batch.

Every checkpoint records its data layout (``LAYOUT_KEY``: per-device batch, world size, accumulation, global
batch). On resume the trainer's accumulation is set so that ``batch_size x world x accumulation`` is the
recorded global batch again; the optimizer step, the schedule and the sampler's position (a number of global
batches, ``GlobalBatchSampler``) carry over unchanged. Lightning counts micro-batches within the epoch, so
those counters are rescaled to the new accumulation. ``ElasticLayout``, a callback the pipeline gives every
run, writes the layout and adjusts the counters of the checkpoint it resumes from.

A run stopped by ``trainer.max_steps`` in the middle of an epoch is checkpointed by Lightning as if the epoch
were over; ``reopen_cut_epoch`` reopens it, so that a longer run goes on with the epoch's next global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from src.config import ConfigError
from src.data.distributed import global_batch
from src.shards import checkpoint_meta

LAYOUT_KEY = "data_layout"
PROGRESS_KEY = "epoch_loop.batch_progress"


def data_layout(batch_size: int, world_size: int, accumulate: int) -> dict[str, int]:
    """What a checkpoint records of how its global batch was made."""
    return {
        "batch_size": batch_size,
        "world_size": world_size,
        "accumulate": accumulate,
        "global_batch": global_batch(batch_size, world_size, accumulate),
    }


def recorded_layout(checkpoint: Path) -> dict[str, int] | None:
    """The layout a checkpoint was written with (the weights are not loaded)."""
    return checkpoint_meta(checkpoint).get(LAYOUT_KEY)


def keep_global_batch(trainer: L.Trainer, checkpoint: Path, batch_size: int) -> str | None:
    """Set the trainer's accumulation so the resumed run keeps the checkpoint's global batch; say what changed.

    Raises a ConfigError (before any work) when the global batch cannot be kept at this world size.
    """
    before = recorded_layout(checkpoint)
    if before is None:
        return None
    world = trainer.world_size
    accumulate, rest = divmod(before["global_batch"], batch_size * world)
    if accumulate < 1 or rest:
        raise ConfigError(
            f"resume from {checkpoint} at {world} processes: its global batch {before['global_batch']} "
            f"({before['batch_size']} x {before['world_size']} processes x {before['accumulate']} accumulated) "
            f"is not a multiple of batch_size={batch_size} x {world} processes; choose batch_size so that it is"
        )
    if (batch_size, world, accumulate) == (before["batch_size"], before["world_size"], before["accumulate"]):
        return None
    trainer.accumulate_grad_batches = accumulate
    return (
        f"elastic resume: {before['world_size']} -> {world} processes, batch_size {before['batch_size']} -> "
        f"{batch_size}, accumulation {before['accumulate']} -> {accumulate}: the global batch stays "
        f"{before['global_batch']}, and the schedule goes on from the checkpoint's step"
    )


def rescale_batch_progress(checkpoint: dict[str, Any], accumulate: int) -> None:
    """Lightning's micro-batch counters, in the new accumulation's units (in place, before the loops restore).

    The counters of the epoch in progress become ``finished global batches x accumulate``: a checkpoint
    written at a step boundary has finished every micro-batch of its last global batch.
    """
    before = checkpoint.get(LAYOUT_KEY)
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = loops.get(PROGRESS_KEY)
    if before is None or progress is None or before["accumulate"] == accumulate:
        return
    for scope in ("total", "current"):
        finished = progress[scope]["processed"] // before["accumulate"]
        for counter in ("ready", "started", "processed", "completed"):
            progress[scope][counter] = finished * accumulate


def reopen_cut_epoch(checkpoint: dict[str, Any]) -> None:
    """Mark an epoch that ``max_steps`` cut short as still running (in place, before the loops restore)."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    batches, epochs = loops.get(PROGRESS_KEY), loops.get("epoch_progress")
    if batches is None or epochs is None or batches["is_last_batch"] or batches["current"]["processed"] == 0:
        return
    if epochs["current"]["completed"] < epochs["current"]["ready"]:  # a checkpoint from inside the epoch
        return
    for scope in ("total", "current"):
        for counter in ("processed", "completed"):
            epochs[scope][counter] -= 1


class ElasticLayout(L.Callback):
    """Records the data layout in every checkpoint; on resume, before the loops restore, reopens an epoch cut by
    ``max_steps`` and puts Lightning's micro-batch counters in the accumulation ``keep_global_batch`` chose."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[LAYOUT_KEY] = data_layout(self.batch_size, trainer.world_size, trainer.accumulate_grad_batches)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        reopen_cut_epoch(checkpoint)
        rescale_batch_progress(checkpoint, trainer.accumulate_grad_batches)
