"""Start an encoder from any checkpoint this toolkit meets, and say exactly what was loaded.

Kinds (``init.kind``; ``auto`` tells them apart):
- ``lightning``: a checkpoint of any training method; the encoder sits under ``encoder.`` and the method's
  own parts (decoder, tokenizer head, teacher) are dropped. It records the encoder config it was built
  with, which fine-tuning rebuilds (``InitCheckpoint.encoder_config``).
- ``export``: ``runs/<name>/export/encoder.safetensors`` (timm naming).
- ``official``: a released MAE / BEiT / DeiT file (``{"model": {...}}``, timm naming at the top level);
  each method declares the keys of its own parts there (``TrainModule.pretraining_keys``), which are dropped.
- ``mimdet``: a released MIMDet detector (detectron2 names): the whole detector, which only detection reads
  (``src/detection/released.py``); never picked by ``auto``.
- ``random``: no file; the encoder keeps its own init.

What no classifier takes from a checkpoint: classifier heads (re-initialised), mask tokens. Everything
else goes through the encoder family's checkpoint filter (``MaskedEncoder.filter_checkpoint``), whose
changes are reported; anything that still does not fit refuses to load unless ``init.strict=false``.

A run reads its ``init`` file once (``InitCheckpoint.read``, memory-mapped): the method settles its config from
it and builds from it, so every reader (the recorded encoder config, the weights, detection's MAE decoder)
shares one read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from src.config import ConfigError
from src.encoders.base import EXPORT_DROPPED, HEADS, FilterReport, MaskedEncoder
from src.files import read_weights, unwrap
from src.shards import is_sharded, read_sharded_checkpoint

ENCODER_PREFIX = "encoder."


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

    torch files are read with ``weights_only=True`` unless ``allow_pickle`` (the user's explicit opt-in), and
    memory-mapped: a run keeps the state dict for its whole start without a copy of the file in memory.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and kind not in ("auto", "export"):
        raise ConfigError(f"init.kind={kind} but {path} is a safetensors export: use init.kind=export or auto")
    if path.suffix != ".safetensors" and kind == "export":
        raise ConfigError(f"init.kind=export expects a .safetensors file, got {path}")
    if is_sharded(path):  # a trainer=fsdp checkpoint: its shards gathered here
        raw = read_sharded_checkpoint(path, "init.checkpoint")
    else:
        raw = read_weights(path, "init.checkpoint", allow_pickle, mmap=True)
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
    kind: str, state: Mapping[str, Any], pretraining_keys: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split a checkpoint into the encoder's tensors (timm naming) and the dropped rest.

    ``pretraining_keys``: the key prefixes every registered method declares for its own parts in a flat
    (official) checkpoint.
    """
    if kind == "mimdet":
        raise ConfigError(
            "init.kind=mimdet is a whole detector (a released MIMDet checkpoint): objective=detect or "
            "objective=detect_eval starts from it, not an encoder alone"
        )
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


@dataclass(frozen=True)
class InitCheckpoint:
    """The run's ``init`` section with its file read once: what every reader of the init checkpoint shares.

    The pipeline reads it before the method settles the config (``TrainingMethod.settle_config``: the encoder
    the file records, detection's decoder sizes) and hands the same object to ``from_config`` (the weights).
    ``state`` is the file's state dict (a Lightning checkpoint's holds the whole module, under its own names);
    ``strict`` and ``norm_to_fc_norm`` say how its encoder loads (``load_encoder_weights``).
    """

    kind: str = "random"  # resolved: lightning, export, official, or random (no file)
    path: Path | None = None
    state: Mapping[str, Any] = field(default_factory=dict)
    hparams: Mapping[str, Any] = field(default_factory=dict)
    strict: bool = True
    norm_to_fc_norm: bool = True

    @classmethod
    def read(cls, init: DictConfig | None) -> InitCheckpoint:
        """The file ``init.checkpoint`` names, read (weights only, memory-mapped) as ``init.kind`` says; a run
        without an ``init`` section, or with none to read, starts at random."""
        if init is None:
            return cls()
        kind = init.get("kind", "auto")
        how = {"strict": bool(init.get("strict", True)), "norm_to_fc_norm": bool(init.get("norm_to_fc_norm", True))}
        if kind == "random" or (kind == "auto" and init.get("checkpoint") is None):
            return cls(**how)
        if init.get("checkpoint") is None:
            raise ConfigError(f"init.kind={kind} needs init.checkpoint=PATH")
        path = Path(init.checkpoint)
        kind, state, hparams = read_checkpoint(path, kind, bool(init.get("allow_pickle", False)))
        return cls(kind, path, state, hparams, **how)

    @property
    def encoder_config(self) -> dict[str, Any] | None:
        """The encoder config (arch and kwargs) a Lightning checkpoint records, which fine-tuning rebuilds; or None."""
        return self.hparams.get("encoder_config")


def load_encoder_weights(
    model: MaskedEncoder, init: InitCheckpoint, encoder_cfg: DictConfig, pretraining_keys: tuple[str, ...] = ()
) -> InitReport:
    """Load the init checkpoint into ``model`` (a classifier or a bare encoder) and report every tensor.

    With ``init.strict`` (default) a checkpoint whose encoder does not match the config is refused:
    another arch recorded in it, a tensor of another shape, an encoder tensor the model lacks, or a
    model tensor (other than the classifier head, fc_norm and the mask token) the checkpoint lacks.
    """
    if init.path is None:
        return InitReport(kind="random")
    report = InitReport(kind=init.kind, checkpoint=str(init.path.resolve()))
    problems = []
    recorded_arch = (init.encoder_config or {}).get("arch")
    if recorded_arch is not None and recorded_arch != encoder_cfg.arch:
        problems.append(f"it was trained with encoder.arch={recorded_arch} but encoder.arch={encoder_cfg.arch}")

    state, report.dropped = encoder_state(init.kind, init.state, pretraining_keys)
    try:
        state = model.filter_checkpoint(state, report, init.norm_to_fc_norm)
    except ValueError as e:
        raise ConfigError(f"init.checkpoint={init.path}: {e}") from None
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
    if problems and init.strict:
        raise ConfigError(
            f"init.checkpoint={init.path} does not match encoder={encoder_cfg.get('name', encoder_cfg.arch)}: "
            + "; ".join(problems)
            + ". Fix the encoder config, or set init.strict=false to load only what fits."
        )
    report.notes += [f"not strict: {p}" for p in problems]
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
