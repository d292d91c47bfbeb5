"""Encoder families, registered with timm on import; ``create_encoder`` builds one from its config."""

from __future__ import annotations

from typing import Any

import timm

from src.encoders import beit, pale, vit  # noqa: F401  (registers every family with timm)
from src.encoders.base import MaskedEncoder


def create_encoder(cfg: Any, img_size: int, **overrides: Any) -> MaskedEncoder:
    """Build ``cfg.arch`` through timm's registry with the config's kwargs (``conf/encoder/*.yaml``)."""
    kwargs = {**dict(cfg.get("kwargs") or {}), **overrides}
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(cfg.arch, pretrained=False, img_size=img_size, **kwargs)
    if not isinstance(model, MaskedEncoder):
        raise TypeError(f"encoder.arch={cfg.arch} is not a MaskedEncoder; methods need the masked-input contract")
    return model
