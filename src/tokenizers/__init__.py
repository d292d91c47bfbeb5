"""BEiT's visual tokenizers behind one interface (images in [0, 1] -> token ids on a grid).

- ``vq``: a VQ-VAE trained on your own images with ``python -m src.train_tokenizer``; its
  checkpoint is ``tokenizer.safetensors`` plus ``tokenizer.json`` (hyper-parameters) beside it.
- ``dalle``: the DALL-E dVAE encoder from a local file (state dict; a pickled module only on opt-in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from src.config import ConfigError
from src.encoders.loading import save_weights
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

KINDS = ("vq", "dalle")
TRAIN_HINT = (
    "train one on your images first with `python -m src.train_tokenizer` (it writes "
    "runs/tokenizer-vq-<dataset>/export/tokenizer.safetensors, the default path), or point the key at yours"
)
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
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind={kind!r} must be one of {KINDS}")
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
    except json.JSONDecodeError as e:
        raise ConfigError(f"{spec_path} (beside {key}.path) is not valid JSON: {e}") from None
    if spec.get("kind") != "vq" or not {"vocab_size", "downsample", "img_size"} <= spec.keys():
        raise ConfigError(f"{spec_path} (beside {key}.path) is not a VQ tokenizer spec: {spec}")
    return spec


def load_tokenizer(cfg: Any, key: str = "objective.tokenizer") -> VisualTokenizer:
    """The frozen tokenizer ``cfg`` (kind, path, allow_pickle) names, in eval mode."""
    spec = tokenizer_spec(cfg, key)
    if spec["kind"] == "dalle":
        try:
            return DalleEncoder.from_file(cfg.path, allow_pickle=bool(cfg.get("allow_pickle", False)), key=key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    params = {k: v for k, v in spec.items() if k != "kind"}
    tokenizer = VQTokenizer(**params)
    tokenizer.load_state_dict(load_file(str(cfg.path)), strict=True)
    return tokenizer.eval().requires_grad_(False)
