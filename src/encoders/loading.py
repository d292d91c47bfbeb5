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
    mismatched: list[str] = field(default_factory=list)  # same name, other shape (skipped; strict=false only)

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
    if not path.is_file():
        raise ConfigError(f"init.checkpoint={path}: no such file")
    if path.suffix == ".safetensors":
        if kind not in ("auto", "export"):
            raise ConfigError(f"init.kind={kind} but {path} is a safetensors export: use init.kind=export or auto")
        return "export", load_state_dict_file(path), {}
    if kind == "export":
        raise ConfigError(f"init.kind=export expects a .safetensors file, got {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        hint = "" if allow_pickle else " (it was read with weights_only=True; init.allow_pickle=true for trusted files)"
        raise ConfigError(f"init.checkpoint={path} cannot be read{hint}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"init.checkpoint={path} holds a {type(raw).__name__}, not a state dict")
    is_lightning = "state_dict" in raw and "pytorch-lightning_version" in raw
    if kind == "auto":
        kind = "lightning" if is_lightning else "official"
    if kind == "lightning":
        if not is_lightning:
            raise ConfigError(f"init.kind=lightning but {path} is not a Lightning checkpoint (no state_dict)")
        return kind, raw["state_dict"], dict(raw.get("hyper_parameters") or {})
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(raw.get(wrapper), dict):
            return kind, raw[wrapper], {}
    return kind, raw, {}


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
        elif state[key].shape != own[key].shape:
            report.mismatched.append(key)
            problems.append(f"{key} has shape {tuple(state[key].shape)} there but {tuple(own[key].shape)} here")
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
