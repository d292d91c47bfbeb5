"""BEiT's visual tokenizers behind one interface (images in [0, 1] -> token ids on a grid).

- ``vq``: a VQ-VAE trained on your own images with ``python -m src.train_tokenizer``; its
  checkpoint is ``tokenizer.safetensors`` plus ``tokenizer.json`` (hyper-parameters) beside it.
- ``dalle``: the DALL-E dVAE encoder from a local file (state dict; a pickled module only on opt-in).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, get_type_hints

import torch

from src.config import ConfigError
from src.encoders.loading import check_fit, load_strict
from src.files import first_line, load_state_dict_file, save_weights
from src.tokenizers.base import VisualTokenizer, codebook_usage
from src.tokenizers.dalle import DalleEncoder
from src.tokenizers.vq import VQTokenizer

__all__ = [
    "DalleEncoder",
    "VQTokenizer",
    "VisualTokenizer",
    "codebook_usage",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_spec",
]

TRAIN_HINT = (
    "train one on your images first with `python -m src.train_tokenizer` (it writes "
    "runs/tokenizer-vq-<dataset>/export/tokenizer.safetensors, the default path), or point the key at yours"
)
SPEC_KEYS = {"vocab_size", "downsample", "img_size"}  # what BEiT reads before any weights
DALLE_HINT = "download DALL-E's encoder yourself and give its local path (a state dict; see src/tokenizers/dalle.py)"


def spec_file(weights: Path) -> Path:
    """The JSON of hyper-parameters that sits beside a tokenizer's weights."""
    return weights.with_suffix(".json")


def save_tokenizer(tokenizer: VQTokenizer, out_dir: Path) -> dict[str, Path]:
    """Weights as safetensors plus their hyper-parameters as JSON: never a pickled module."""
    weights = save_weights(tokenizer.state_dict(), out_dir / "tokenizer.safetensors")
    spec_file(weights).write_text(json.dumps({"kind": "vq", **tokenizer.spec()}, indent=2) + "\n")
    return {"tokenizer": weights, "tokenizer_spec": spec_file(weights)}


def tokenizer_spec(cfg: Any, key: str = "objective.tokenizer") -> dict[str, Any]:
    """vocab_size / downsample / img_size of the configured tokenizer, read without loading weights.

    This is where a missing or unknown tokenizer fails, before any data or model is built.
    """
    kind = cfg.get("kind")
    path = Path(cfg.path) if cfg.get("path") else None
    if path is None or not path.is_file():
        raise ConfigError(f"{key}.path={path}: no tokenizer file there. {TRAIN_HINT if kind == 'vq' else DALLE_HINT}")
    if kind == "dalle":
        return {"kind": kind, "vocab_size": 8192, "downsample": 8, "img_size": 112}
    spec_path = spec_file(path)
    if not spec_path.is_file():
        raise ConfigError(f"{key}.path={path}: its hyper-parameters {spec_path} are missing (written by the trainer)")
    try:
        spec = json.loads(spec_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{spec_path} (beside {key}.path) is not valid JSON: {e}") from None
    check_vq_spec(spec, spec_path)
    return spec


def check_vq_spec(spec: Any, spec_path: Path) -> None:
    """A VQ spec holds ``kind: vq`` and VQTokenizer's arguments, each of its type; it is read from disk, so a
    wrong value is named here rather than failing deep in the model (or building a model of any size)."""
    types = get_type_hints(VQTokenizer.__init__)
    if not isinstance(spec, dict) or spec.get("kind") != "vq" or not spec.keys() >= SPEC_KEYS:
        raise ConfigError(f"{spec_path} is not a VQ tokenizer spec (kind: vq, {', '.join(sorted(SPEC_KEYS))})")
    for name, value in spec.items():
        wanted = types.get(name)
        if name != "kind" and (wanted is None or not valid_number(value, wanted)):
            expected = f"a {wanted.__name__}" if wanted else f"one of {sorted(types.keys() - {'return'})}"
            raise ConfigError(f"{spec_path}: {name}={value!r} is not {expected}")
    try:
        VQTokenizer.check_sizes(spec["vocab_size"], spec["downsample"], spec["img_size"])
    except ValueError as e:
        raise ConfigError(f"{spec_path}: {e}") from None


def valid_number(value: Any, wanted: type) -> bool:
    """An int >= 0 (never a bool) where an int is wanted; a finite number where a float is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) and value >= 0 if wanted is int else math.isfinite(value)


def load_tokenizer(cfg: Any, key: str = "objective.tokenizer") -> VisualTokenizer:
    """The frozen tokenizer ``cfg`` (kind, path, allow_pickle) names, in eval mode.

    The VQ model is first laid out without memory and compared with the weights' shapes, so that the sizes
    its JSON declares cannot make it allocate more than the weights file holds.
    """
    spec = tokenizer_spec(cfg, key)
    if spec["kind"] == "dalle":
        return DalleEncoder.from_file(cfg.path, allow_pickle=bool(cfg.get("allow_pickle", False)), key=key)
    params = {k: v for k, v in spec.items() if k != "kind"}
    state = load_state_dict_file(cfg.path, f"{key}.path")
    refusal = f"{key}.path={cfg.path} does not hold the VQ tokenizer its {spec_file(Path(cfg.path)).name} describes"
    if params.get("res_blocks", 0) > len(state):  # each block has weights in the file: more cannot fit
        raise ConfigError(f"{refusal}: res_blocks={params['res_blocks']} but the file holds {len(state)} tensors")
    try:
        with torch.device("meta"):  # shapes only: a size the JSON declares allocates nothing
            layout = VQTokenizer(**params).state_dict()
    except (ValueError, RuntimeError) as e:  # sizes torch cannot build a model of
        raise ConfigError(f"{refusal}: {first_line(e)}") from None
    check_fit(layout, state, refusal)
    tokenizer = VQTokenizer(**params)
    load_strict(tokenizer, state, refusal)
    return tokenizer.eval().requires_grad_(False)
