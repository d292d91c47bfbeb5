"""Sharded checkpoints (``trainer=fsdp``): one folder per checkpoint, each rank's shard a file of it.

``torch.distributed.checkpoint`` (DCP) writes the shards and an index of them (``.metadata``); Lightning adds the
rest of its checkpoint (step, loops, callbacks) as ``meta.pt`` from rank zero. A resume at another world size
re-shards from the index. Such a folder is untrusted input like any weight file: DCP keeps its index as a pickle,
which is read here by an unpickler that knows only the classes an index holds, never by ``pickle.load``. A
finished folder replaces the previous one only once every shard is written (``replace_folder``).
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from src.config import ConfigError

SHARD_META = "meta.pt"  # Lightning's name for the non-tensor part, written by rank zero
INDEX = ".metadata"  # DCP's index of the shards
INDEX_CLASSES = {
    ("pathlib", "PosixPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


class IndexUnpickler(pickle.Unpickler):
    """Reads DCP's index, refusing any global that is not one of the classes (or dtypes) an index is made of."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in INDEX_CLASSES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's index, and is never loaded")


class ShardReader(FileSystemReader):
    """DCP's file reader, with the index read by ``IndexUnpickler`` (the shards' own bytes are read weights-only
    by DCP itself)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / INDEX, "rb") as f:
            metadata = IndexUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{Path(self.path) / INDEX} holds a {type(metadata).__name__}, not an index")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / INDEX).is_file()


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's step, loops and callback states without its weights: a file memory-mapped, or the
    ``meta.pt`` of a folder of shards (both read weights-only)."""
    if path.is_dir():
        return torch.load(path / SHARD_META, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_sharded(path: Path, section: str = "state_dict") -> dict[str, torch.Tensor]:
    """The whole tensors of one section of a sharded checkpoint, gathered in this process (no process group):
    how an export consolidates the weights that no single rank held."""
    index = ShardReader(path).read_metadata()
    prefix = f"{section}."
    state = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in index.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # DCP warns that it loads in one process: here that is the intent
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=ShardReader(path), no_dist=True)
    return {key.removeprefix(prefix): tensor for key, tensor in state.items()}


def read_sharded_checkpoint(path: Path, key: str) -> dict[str, Any]:
    """A whole Lightning checkpoint from its folder of shards, as ``torch.load`` gives one from a file; whatever
    is wrong with the folder ends in one ConfigError line naming ``key=path``."""
    try:
        state = read_sharded(path)  # the index first: it is what a hostile folder would carry code in
        return {**checkpoint_meta(path), "state_dict": state}
    except Exception as e:  # a damaged folder fails in many ways: each is named in one line
        said = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ConfigError(
            f"{key}={path} is a folder of shards that cannot be read ({type(e).__name__}: {said})"
        ) from None


def remove(path: Path) -> None:
    """A checkpoint, whether a file or a folder of shards."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_folder(finished: Path, path: Path, keep_previous: Path | None = None) -> None:
    """Put the finished folder at ``path``. The checkpoint there moves to ``keep_previous`` first (or goes), so
    that a kill between the two renames leaves the previous checkpoint, and the finished one beside it."""
    if path.exists() or path.is_symlink():
        if keep_previous is None:
            remove(path)
        else:
            remove(keep_previous)
            os.replace(path, keep_previous)
    os.replace(finished, path)
