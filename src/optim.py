"""Optimizer parameter groups, lr scaling by global batch, and the warm-up + cosine per-step schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """The linear scaling rule the papers use: lr = base_lr * global_batch / reference (256 for MAE)."""
    return base_lr * global_batch / reference_batch


def exempt_from_weight_decay(name: str, param: nn.Parameter, skip: Iterable[str] = ()) -> bool:
    """Biases, 1-D parameters (norms) and the named tokens/embeddings get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or any(name == s or name.endswith("." + s) for s in skip)


def weight_decay_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, skip: Iterable[str] = ()
) -> list[dict]:
    """Two groups: decayed and exempt. Frozen parameters are left out."""
    skip = tuple(skip)
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (no_decay if exempt_from_weight_decay(name, p, skip) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """lr multiplier: linear from 0 over the warm-up, then half-cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
