"""Checkpoint I/O for Lightning: atomic writes that keep the previous checkpoint, and weights-only reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.files import atomic_file
from src.pipeline.run_folder import LAST, PREVIOUS


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file.

    Before a new ``last.ckpt`` replaces the old one, the old one becomes ``last-previous.ckpt``, so a
    checkpoint that turns out unreadable always has an older one beside it. Files get the user's umask.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, keep_previous=path.with_name(PREVIOUS) if path.name == LAST else None) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Resuming reads our own checkpoints, which hold only tensors and plain values."""
        return torch.load(
            path, map_location=map_location or "cpu", weights_only=True if weights_only is None else weights_only
        )
