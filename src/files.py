"""Shared file I/O, on the ground floor so that every layer may use it.

- Writes: a file is replaced in one step (``atomic_file``, ``write_atomically``) and gets the mode the user's umask
  allows (``follow_umask``); weights are written as safetensors (``save_weights``).
- Reads: ``read_weights`` is the one reader of a weight file a user names. Its bytes are untrusted input: torch
  files are read weights-only, and whatever is wrong with a file ends in one ConfigError line naming it.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from src.config import ConfigError

PARTIAL_SUFFIX = ".tmp"  # a file being written; ``partial_name`` says by whom
WEIGHT_FORMATS = "accepted: .safetensors, or a torch file (.ckpt/.pth/.pt, as torch.save writes it) of weights only"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")  # pickled first by the pre-zip format
REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")  # torch's weights-only refusal names it
WRAPPERS = ("model", "state_dict", "module")  # official releases, Lightning, DDP-era files


# ---- writing -------------------------------------------------------------------------------------------------
def follow_umask(path: str | Path) -> None:
    """Give a file the mode the user's umask allows (writers such as mkstemp and safetensors use 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def partial_name(path: Path) -> str:
    """Prefix of a temporary file while ``path`` is being written: names its writer (host, pid)."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


@contextmanager
def atomic_file(path: Path, keep_previous: Path | None = None) -> Iterator[BinaryIO]:
    """A binary file for ``path``'s new content, which replaces ``path`` in one step when the block ends.

    The content goes to a temporary file beside ``path``, is fsynced, gets the umask's mode (mkstemp makes 0600,
    which would hide the file in a shared folder) and is renamed: a kill leaves the old file or the new one, never
    half of one. ``keep_previous``: where the old file moves first, so that an older copy always stays.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=partial_name(path), suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
        if keep_previous is not None and path.is_file():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    with atomic_file(path) as f:
        f.write(text.encode())


def save_png(picture: Image.Image, path: Path) -> Path:
    """A picture replaced in one step: a run killed while drawing leaves the previous picture, never a truncated
    PNG that its resumed run would fail to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        picture.save(f, format="PNG")
    return path


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Tensors as safetensors, readable as the user's umask allows (the library itself writes 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata or {"format": "pt"})
    follow_umask(path)
    return path


# ---- reading -------------------------------------------------------------------------------------------------
class PickleRefused(ConfigError):
    """A weight file that pickles Python objects, read without the user's opt-in; ``python -m src.export``
    names its own switch for it."""

    def __init__(self, message: str, key: str, path: Path) -> None:
        super().__init__(message)
        self.key, self.path = key, path


def first_line(error: BaseException) -> str:
    """``Type: first line`` of an error, short enough for a one-line message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def read_weights(
    path: str | Path, key: str = "checkpoint", allow_pickle: bool = False, mmap: bool = False
) -> dict[str, Any]:
    """The top-level mapping of a weight file the user names; the one reader every loader goes through.

    The bytes of such a file are untrusted input: whatever is wrong with it (not a file, another format, a
    truncated or damaged archive, a broken safetensors header, a pickled payload, a top level that is no
    mapping) ends in one ConfigError line that names ``key=path``. torch files are read weights-only;
    ``allow_pickle`` is the opt-in of the person typing the command (then a pickled module gives its state dict).
    ``mmap``: a torch zip file's tensors stay on disk, mapped, until read (the pre-zip format cannot be mapped).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}={path}: no such file")
    if not path.is_file():  # a directory, or a pipe or device that reading could wait on forever
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise ConfigError(f"{key}={path} is {kind}, not a weight file ({WEIGHT_FORMATS})")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # any failure of the parser is the file's: name it
            raise ConfigError(f"{key}={path} is not a readable safetensors file ({first_line(e)})") from None
    with path.open("rb") as f:
        head = f.read(64)
    if not head.startswith(ZIP_MAGIC) and LEGACY_MAGIC not in head:
        seen = "it is empty" if not head else f"it starts with {head[:12]!r}"
        raise ConfigError(
            f"{key}={path} is not a weight file: neither safetensors nor a torch file ({seen}); {WEIGHT_FORMATS}"
        )
    try:
        mapped = mmap and head.startswith(ZIP_MAGIC)
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=mapped)
    except pickle.UnpicklingError as e:
        refused = REFUSED_GLOBAL.search(str(e))
        if refused is None or allow_pickle:
            raise ConfigError(f"{key}={path} cannot be read as a torch file ({first_line(e)})") from None
        section = key.rpartition(".")[0]
        option = f"{section}.allow_pickle=true" if section else "allow_pickle=True"
        raise PickleRefused(
            f"{key}={path} is not weights only: it pickles {refused[1]}, and unpickling runs code from the file. "
            f"If you trust the file, pass {option} on the command line, or convert it once to safetensors",
            key,
            path,
        ) from None
    except ModuleNotFoundError as e:  # only with allow_pickle: the pickled objects' classes are imported
        raise ConfigError(
            f"{key}={path}: unpickling it needs the module that defined it ({e.name}); install that module, "
            "or convert the file once to safetensors"
        ) from None
    except Exception as e:  # any failure of the parser is the file's: name it
        raise ConfigError(f"{key}={path} cannot be read as a torch file ({first_line(e)})") from None
    if allow_pickle and isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise ConfigError(f"{key}={path} holds a {type(obj).__name__}, not a mapping of weights")
    return obj


def unwrap(raw: dict[str, Any]) -> dict[str, Any]:
    """The state dict inside a checkpoint's ``model``/``state_dict``/``module`` entry, else the mapping itself."""
    return next((raw[w] for w in WRAPPERS if isinstance(raw.get(w), dict)), raw)


def tensors_only(state: Any, key: str, path: str | Path) -> dict[str, torch.Tensor]:
    """``state`` if it maps names (strings) to tensors; else one line naming the first entry that does not."""
    if not isinstance(state, dict):
        raise ConfigError(f"{key}={path} holds no state dict (a mapping of names to tensors)")
    for name, value in state.items():
        if not isinstance(name, str) or not torch.is_tensor(value):
            raise ConfigError(
                f"{key}={path} is not a state dict: {name!r} holds a {type(value).__name__}, not a tensor under a name"
            )
    return state


def load_state_dict_file(
    path: str | Path, key: str = "checkpoint", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a weight file (a ``state_dict``/``model``/``module`` entry unwrapped), named by strings."""
    return tensors_only(unwrap(read_weights(path, key, allow_pickle)), key, path)
