"""Start an encoder from any checkpoint this toolkit meets, and say exactly what was loaded.

Kinds (``init.kind``; ``auto`` tells them apart):
- ``lightning``: a checkpoint of any training method; the encoder sits under ``encoder.`` and the method's
  own parts (decoder, tokenizer head, teacher) are dropped. It records the encoder config it was built
  with, which fine-tuning rebuilds (``recorded_encoder_config``).
- ``export``: ``runs/<name>/export/encoder.safetensors`` (timm naming).
- ``official``: a released MAE / BEiT / DeiT file (``{"model": {...}}``, timm naming at the top level);
  each method declares the keys of its own parts there (``TrainModule.pretraining_keys``), which are dropped.
- ``random``: no file; the encoder keeps its own init.

What no classifier takes from a checkpoint: classifier heads (re-initialised), mask tokens. Everything
else goes through the encoder family's checkpoint filter (``MaskedEncoder.filter_checkpoint``), whose
changes are reported; anything that still does not fit refuses to load unless ``init.strict=false``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from src.config import ConfigError
from src.encoders.base import EXPORT_DROPPED, HEADS, FilterReport, MaskedEncoder

KINDS = ("auto", "lightning", "export", "official", "random")
ENCODER_PREFIX = "encoder."


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Tensors as safetensors, readable as the user's umask allows (the library itself writes 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata or {"format": "pt"})
    follow_umask(path)
    return path


def follow_umask(path: str | Path) -> None:
    """Give a file the mode the user's umask allows (writers such as mkstemp and safetensors use 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


WEIGHT_FORMATS = "accepted: .safetensors, or a torch file (.ckpt/.pth/.pt, as torch.save writes it) of weights only"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")  # pickled first by the pre-zip format
REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")  # torch's weights-only refusal names it
WRAPPERS = ("model", "state_dict", "module")  # official releases, Lightning, DDP-era files


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


def read_weights(path: str | Path, key: str = "checkpoint", allow_pickle: bool = False) -> dict[str, Any]:
    """The top-level mapping of a weight file the user names; the one reader every loader goes through.

    The bytes of such a file are untrusted input: whatever is wrong with it (not a file, another format, a
    truncated or damaged archive, a broken safetensors header, a pickled payload, a top level that is no
    mapping) ends in one ConfigError line that names ``key=path``. torch files are read weights-only;
    ``allow_pickle`` is the opt-in of the person typing the command (then a pickled module gives its state dict).
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
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
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


def load_state_dict_file(
    path: str | Path, key: str = "checkpoint", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a weight file (a ``state_dict``/``model``/``module`` entry unwrapped), named by strings."""
    return tensors_only(unwrap(read_weights(path, key, allow_pickle)), key, path)


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


def tensor_problem(key: str, theirs: torch.Tensor, mine: torch.Tensor) -> str | None:
    """Why a checkpoint tensor cannot take the place of a model's, naming the key; None when it can.

    Another shape, or another kind of number (integers or bools where the model has floats, or back), which
    loading would otherwise cast without a word.
    """
    if theirs.shape != mine.shape:
        return f"{key} has shape {tuple(theirs.shape)} there but {tuple(mine.shape)} here"
    if (theirs.is_floating_point(), theirs.is_complex()) != (mine.is_floating_point(), mine.is_complex()):
        return f"{key} holds {theirs.dtype} there but {mine.dtype} here"
    return None


def check_fit(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], refusal: str) -> None:
    """Refuse ``state`` unless it loads strictly into a model whose state dict is ``own``: one line, ``refusal``
    (which names the file) and then each key that does not fit."""
    problems = [p for key in sorted(own.keys() & state.keys()) if (p := tensor_problem(key, state[key], own[key]))]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing:
        problems.append(f"missing {len(missing)}{preview_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}{preview_names(unexpected)}")
    if problems:
        raise ConfigError(f"{refusal}: " + "; ".join(problems))


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], refusal: str) -> None:
    """Load every tensor of ``state`` into ``model`` after ``check_fit``."""
    check_fit(model.state_dict(), state, refusal)
    model.load_state_dict(state, strict=True)


@dataclass
class InitReport(FilterReport):
    """Which checkpoint tensors went where; saved as JSON next to the run so a result can be audited.

    ``dropped`` lists what is not encoder weights (decoder, heads, mask tokens, ...); ``remapped`` and
    ``notes`` what the family's checkpoint filter changed.
    """

    kind: str = "random"
    checkpoint: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors left at their fresh init
    unexpected: list[str] = field(default_factory=list)  # encoder tensors the model has no place for
    mismatched: list[str] = field(default_factory=list)  # same name, other shape or kind (skipped; strict=false only)

    def lines(self) -> list[str]:
        if self.kind == "random":
            return ["init: random (no checkpoint)"]
        out = [
            f"init: {self.kind} checkpoint {self.checkpoint}",
            f"  loaded {len(self.loaded)}, missing {len(self.missing)}{preview_names(self.missing)}, "
            f"unexpected {len(self.unexpected)}{preview_names(self.unexpected)}, "
            f"shape-mismatched {len(self.mismatched)}{preview_names(self.mismatched)}, dropped {len(self.dropped)}",
        ]
        out += [f"  remapped {src} -> {dst}" for src, dst in self.remapped.items()]
        out += [f"  {note}" for note in self.notes]
        return out

    @rank_zero_only
    def publish(self, run_dir: Path) -> None:
        """Print the counts and save the full lists as ``run_dir/init_report.json``."""
        path = Path(run_dir) / "init_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        print("\n".join([*self.lines(), f"  full report: {path}"]))


def preview_names(keys: list[str], shown: int = 6) -> str:
    if not keys:
        return ""
    more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
    return " (" + ", ".join(keys[:shown]) + more + ")"


def read_checkpoint(path: str | Path, kind: str, allow_pickle: bool = False) -> tuple[str, dict, dict]:
    """(resolved kind, candidate encoder state dict, hyper-parameters) from a file of ``kind`` or ``auto``.

    torch files are read with ``weights_only=True`` unless ``allow_pickle`` (the user's explicit opt-in).
    """
    path = Path(path)
    if path.suffix == ".safetensors" and kind not in ("auto", "export"):
        raise ConfigError(f"init.kind={kind} but {path} is a safetensors export: use init.kind=export or auto")
    if path.suffix != ".safetensors" and kind == "export":
        raise ConfigError(f"init.kind=export expects a .safetensors file, got {path}")
    raw = read_weights(path, "init.checkpoint", allow_pickle)
    if path.suffix == ".safetensors":
        return "export", raw, {}
    is_lightning = "state_dict" in raw and "pytorch-lightning_version" in raw
    if kind == "auto":
        kind = "lightning" if is_lightning else "official"
    if kind == "lightning" and not is_lightning:
        raise ConfigError(f"init.kind=lightning but {path} is not a Lightning checkpoint (no state_dict)")
    state = raw["state_dict"] if kind == "lightning" else unwrap(raw)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ConfigError(f"init.checkpoint={path} holds no state dict (a mapping of names to tensors)")
    hparams = (raw.get("hyper_parameters") if kind == "lightning" else None) or {}
    recorded = hparams.get("encoder_config") if isinstance(hparams, dict) else hparams
    if recorded is not None and not (isinstance(recorded, dict) and isinstance(recorded.get("arch"), str)):
        raise ConfigError(f"init.checkpoint={path}: its hyper_parameters record no encoder_config with an arch")
    return kind, state, dict(hparams)


def encoder_state(
    kind: str, state: dict[str, Any], pretraining_keys: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split a checkpoint into the encoder's tensors (timm naming) and the dropped rest.

    ``pretraining_keys``: the key prefixes every registered method declares for its own parts in a flat
    (official) checkpoint.
    """
    dropped = []
    out = {}
    for key, value in state.items():
        if kind == "lightning":
            if not key.startswith(ENCODER_PREFIX):
                dropped.append(key)
                continue
            key = key[len(ENCODER_PREFIX) :]
        if key.startswith(pretraining_keys + EXPORT_DROPPED + HEADS) or not torch.is_tensor(value):
            dropped.append(key)
            continue
        out[key] = value
    if not out:
        raise ConfigError(f"the init.checkpoint ({kind}) holds no encoder weights")
    return out, dropped


def recorded_encoder_config(init: DictConfig) -> dict[str, Any] | None:
    """The encoder config a Lightning ``init.checkpoint`` records (arch and kwargs), or None."""
    path = init.get("checkpoint")
    if path is None or init.get("kind", "auto") not in ("auto", "lightning") or Path(path).suffix == ".safetensors":
        return None
    _, _, hparams = read_checkpoint(path, "auto", bool(init.get("allow_pickle", False)))
    return hparams.get("encoder_config")


def load_encoder_weights(
    model: MaskedEncoder, init: DictConfig, encoder_cfg: DictConfig, pretraining_keys: tuple[str, ...] = ()
) -> InitReport:
    """Load ``init.checkpoint`` into ``model`` (a classifier or a bare encoder) and report every tensor.

    With ``init.strict`` (default) a checkpoint whose encoder does not match the config is refused:
    another arch recorded in it, a tensor of another shape, an encoder tensor the model lacks, or a
    model tensor (other than the classifier head, fc_norm and the mask token) the checkpoint lacks.
    """
    kind = init.get("kind", "auto")
    if kind not in KINDS:
        raise ConfigError(f"init.kind={kind!r} is not one of {KINDS}")
    if kind == "random" or (kind == "auto" and init.get("checkpoint") is None):
        return InitReport(kind="random")
    if init.get("checkpoint") is None:
        raise ConfigError(f"init.kind={kind} needs init.checkpoint=PATH")
    strict = bool(init.get("strict", True))
    kind, raw_state, hparams = read_checkpoint(init.checkpoint, kind, bool(init.get("allow_pickle", False)))
    report = InitReport(kind=kind, checkpoint=str(Path(init.checkpoint).resolve()))
    problems = []
    recorded_arch = (hparams.get("encoder_config") or {}).get("arch")
    if recorded_arch is not None and recorded_arch != encoder_cfg.arch:
        problems.append(f"it was trained with encoder.arch={recorded_arch} but encoder.arch={encoder_cfg.arch}")

    state, report.dropped = encoder_state(kind, raw_state, pretraining_keys)
    try:
        state = model.filter_checkpoint(state, report, bool(init.get("norm_to_fc_norm", True)))
    except ValueError as e:
        raise ConfigError(f"init.checkpoint={init.checkpoint}: {e}") from None
    own = model.state_dict()
    fresh_by_design = HEADS + EXPORT_DROPPED + ("fc_norm.",)
    for key in sorted(state):
        if key not in own:
            report.unexpected.append(key)
        elif problem := tensor_problem(key, state[key], own[key]):
            report.mismatched.append(key)
            problems.append(problem)
        else:
            report.loaded.append(key)
    report.missing = sorted(k for k in set(own) - set(state) if not k.startswith(EXPORT_DROPPED))
    if report.unexpected:
        problems.append(f"encoder tensors this model lacks:{preview_names(report.unexpected)}")
    absent = [k for k in report.missing if not k.startswith(fresh_by_design)]
    if absent:
        problems.append(f"model tensors the checkpoint lacks:{preview_names(absent)}")
    if problems and strict:
        raise ConfigError(
            f"init.checkpoint={init.checkpoint} does not match encoder={encoder_cfg.get('name', encoder_cfg.arch)}: "
            + "; ".join(problems)
            + ". Fix the encoder config, or set init.strict=false to load only what fits."
        )
    report.notes += [f"not strict: {p}" for p in problems]
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
