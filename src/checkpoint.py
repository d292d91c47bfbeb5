"""Checkpoint I/O: atomic writes for Lightning, and safe loading of foreign weight files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file

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


def load_state_dict_file(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load weights from .safetensors or a torch file (``model``/``state_dict`` entries unwrapped).

    torch files are read with ``weights_only=True``; ``allow_pickle=True`` is the user's explicit
    opt-in for files that carry arbitrary Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return obj
