"""Start an encoder from any checkpoint this toolkit meets, and say exactly what was loaded.

Kinds (``init.kind``; ``auto`` tells them apart):
- ``lightning``: a pretraining (or fine-tuning) checkpoint of any objective; the encoder sits under
  ``encoder.`` and the objective's own parts (decoder, tokenizer head, teacher) are dropped. The encoder
  config recorded in its hyper-parameters is checked against ``encoder.arch``.
- ``export``: ``runs/<name>/export/encoder.safetensors`` (timm naming).
- ``official``: a released MAE / BEiT / DeiT file (``{"model": {...}}``, timm naming at the top level):
  MAE's decoder (``decoder_*``, its ``mask_token``), BEiT's ``lm_head`` and DeiT's ``head_dist`` are dropped.
- ``random``: no file; the encoder keeps its own init.

What no classifier takes from a checkpoint: classifier heads (re-initialised), mask tokens. What is
adapted, and reported: a DeiT distillation token for an encoder without one (its token and position
row are dropped), the final norm moved to ``fc_norm`` under global pooling, position embeddings
resampled to a new grid. Anything else that does not fit refuses to load unless ``init.strict=false``.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from timm.layers import resample_abs_pos_embed
from torch import nn

from src.checkpoint import load_state_dict_file
from src.config import ConfigError

KINDS = ("auto", "lightning", "export", "official", "random")
ENCODER_PREFIX = "encoder."
# Parts of a pretraining model that never belong to a classifier's encoder.
PRETRAINING_ONLY = ("decoder_", "mask_token", "lm_head.")
# Parts a classifier always initialises afresh (new classes).
HEADS = ("head.", "head_dist.")


@dataclass
class InitReport:
    """Which checkpoint tensors went where; saved as JSON next to the run so a result can be audited."""

    kind: str
    checkpoint: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors left at their fresh init
    unexpected: list[str] = field(default_factory=list)  # encoder tensors the model has no place for
    mismatched: list[str] = field(default_factory=list)  # same name, other shape (skipped; strict=false only)
    dropped: list[str] = field(default_factory=list)  # not encoder weights (decoder, heads, mask tokens, ...)
    remapped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.kind == "random":
            return ["init: random (no checkpoint)"]
        out = [
            f"init: {self.kind} checkpoint {self.checkpoint}",
            f"  loaded {len(self.loaded)}, missing {len(self.missing)}{_names(self.missing)}, "
            f"unexpected {len(self.unexpected)}{_names(self.unexpected)}, "
            f"shape-mismatched {len(self.mismatched)}{_names(self.mismatched)}, dropped {len(self.dropped)}",
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


def _names(keys: list[str], shown: int = 6) -> str:
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


def encoder_state(kind: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split a checkpoint into the encoder's tensors (timm naming) and the dropped rest."""
    dropped = []
    out = {}
    for key, value in state.items():
        if kind == "lightning":
            if not key.startswith(ENCODER_PREFIX):
                dropped.append(key)
                continue
            key = key[len(ENCODER_PREFIX) :]
        if key.startswith(PRETRAINING_ONLY + HEADS) or not torch.is_tensor(value):
            dropped.append(key)
            continue
        out[key] = value
    if not out:
        raise ConfigError(f"the init.checkpoint ({kind}) holds no encoder weights")
    return out, dropped


def adapt_to_model(
    state: dict[str, torch.Tensor], model: nn.Module, report: InitReport, norm_to_fc_norm: bool
) -> dict[str, torch.Tensor]:
    """Explicit, reported adaptations: distillation token, final norm -> fc_norm, position grid."""
    own = model.state_dict()
    state = dict(state)
    if "dist_token" in state and "dist_token" not in own:
        del state["dist_token"]
        report.dropped.append("dist_token")
        if "pos_embed" in state:  # DeiT order: cls, dist, patches
            state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
            report.notes.append("pos_embed: the distillation token's row removed (DeiT checkpoint, no dist_token here)")
    if "fc_norm.weight" in own and "norm.weight" not in own:  # global pooling: the norm moved after the pool
        for suffix in ("weight", "bias"):
            if f"norm.{suffix}" not in state:
                continue
            if norm_to_fc_norm:
                state[f"fc_norm.{suffix}"] = state.pop(f"norm.{suffix}")
                report.remapped[f"norm.{suffix}"] = f"fc_norm.{suffix}"
            else:  # the MAE code's choice: fc_norm starts at ones/zeros, the pretrained norm is unused
                del state[f"norm.{suffix}"]
                report.dropped.append(f"norm.{suffix}")
    if "pos_embed" in state and "pos_embed" in own:
        (_, old_tokens, old_dim), (_, new_tokens, new_dim) = state["pos_embed"].shape, own["pos_embed"].shape
        if old_dim == new_dim and old_tokens != new_tokens:  # another grid; another width is a plain mismatch
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], model, report)
    return state


def resample_pos_embed(pos_embed: torch.Tensor, model: nn.Module, report: InitReport) -> torch.Tensor:
    """Bicubic resampling of a square grid of position embeddings to the model's grid (timm's function)."""
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old_tokens = pos_embed.shape[1] - prefix
    side = math.isqrt(old_tokens)
    new_grid = tuple(model.patch_embed.grid_size)
    if side * side != old_tokens:
        raise ConfigError(
            f"pos_embed of shape {tuple(pos_embed.shape)} in init.checkpoint cannot be resampled to the model's "
            f"{tuple(model.pos_embed.shape)} ({prefix} prefix tokens, grid {new_grid})"
        )
    report.notes.append(
        f"pos_embed resampled from a {side}x{side} to a {new_grid[0]}x{new_grid[1]} grid "
        "(bicubic, timm.layers.resample_abs_pos_embed)"
    )
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=prefix)


def load_encoder_weights(model: nn.Module, init: DictConfig, encoder_cfg: DictConfig) -> InitReport:
    """Load ``init.checkpoint`` into ``model`` (a classifier or a bare encoder) and report every tensor.

    With ``init.strict`` (default) a checkpoint whose encoder does not match the config is refused:
    another arch recorded in it, a tensor of another shape, an encoder tensor the model lacks, or a
    model tensor (other than the classifier head and fc_norm) the checkpoint lacks.
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
    if recorded_arch == f"{encoder_cfg.arch}_distilled":  # a DeiT student: its plain arch once dist_token is dropped
        report.notes.append(f"{recorded_arch} student loaded into {encoder_cfg.arch}")
    elif recorded_arch is not None and recorded_arch != encoder_cfg.arch:
        problems.append(f"it was trained with encoder.arch={recorded_arch} but encoder.arch={encoder_cfg.arch}")

    state, report.dropped = encoder_state(kind, raw_state)
    state = adapt_to_model(state, model, report, bool(init.get("norm_to_fc_norm", True)))
    own = model.state_dict()
    fresh_by_design = HEADS + ("fc_norm.",)
    for key in sorted(state):
        if key not in own:
            report.unexpected.append(key)
        elif state[key].shape != own[key].shape:
            report.mismatched.append(key)
            problems.append(f"{key} has shape {tuple(state[key].shape)} there but {tuple(own[key].shape)} here")
        else:
            report.loaded.append(key)
    report.missing = sorted(set(own) - set(state))
    if report.unexpected:
        problems.append(f"encoder tensors this model lacks:{_names(report.unexpected)}")
    absent = [k for k in report.missing if not k.startswith(fresh_by_design)]
    if absent:
        problems.append(f"model tensors the checkpoint lacks:{_names(absent)}")
    if problems and strict:
        raise ConfigError(
            f"init.checkpoint={init.checkpoint} does not match encoder={encoder_cfg.get('name', encoder_cfg.arch)}: "
            + "; ".join(problems)
            + ". Fix the encoder config, or set init.strict=false to load only what fits."
        )
    report.notes += [f"not strict: {p}" for p in problems]
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
