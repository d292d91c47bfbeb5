"""Checkpoint I/O for Lightning: atomic writes, weights-only reads, and clean-up of a killed save."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_SUFFIX = ".tmp"


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete temporary files that a killed save left behind (the checkpoints themselves are never partial)."""
    stale = sorted(folder.glob(f".*{PARTIAL_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)  # DDP ranks may race here at start-up
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Resuming reads our own checkpoints, which hold only tensors and plain values."""
        return torch.load(
            path, map_location=map_location or "cpu", weights_only=True if weights_only is None else weights_only
        )
