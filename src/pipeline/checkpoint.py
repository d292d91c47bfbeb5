"""Checkpoint I/O for Lightning: atomic writes that keep the previous checkpoint, and weights-only reads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.encoders.loading import follow_umask
from src.pipeline.run_folder import LAST, PARTIAL_SUFFIX, PREVIOUS, partial_name


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file.

    Before a new ``last.ckpt`` replaces the old one, the old one becomes ``last-previous.ckpt``, so a
    checkpoint that turns out unreadable always has an older one beside it. Files get the user's umask.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=partial_name(path), suffix=PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            follow_umask(tmp)  # mkstemp makes 0600, which hides checkpoints in shared folders
            if path.name == LAST and path.is_file():
                os.replace(path, path.with_name(PREVIOUS))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Resuming reads our own checkpoints, which hold only tensors and plain values."""
        return torch.load(
            path, map_location=map_location or "cpu", weights_only=True if weights_only is None else weights_only
        )
