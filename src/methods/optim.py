"""Parameter groups (weight decay, layer-wise lr decay), lr scaling, optimizers (AdamW, LARS), warm-up + cosine."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.models import group_parameters
from torch import nn

from src.schema import OPTIMIZERS


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


def warmup_step_decay(
    step: int, warmup_steps: int, milestones: Iterable[int], gamma: float = 0.1, warmup_factor: float = 0.001
) -> float:
    """lr multiplier of the detection recipes: linear from ``warmup_factor`` over the warm-up, then x ``gamma``
    at each milestone step passed."""
    decay = gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        alpha = step / warmup_steps
        return decay * (warmup_factor * (1 - alpha) + alpha)
    return decay


def _without_final_norm(spec: str | list | tuple | None) -> str | list | tuple | None:
    """Drop timm's ``(r"^norm", (99999,))`` entry, which would give the final norm a layer of its own."""
    if isinstance(spec, (list, tuple)):
        return [entry for entry in spec if tuple(entry[1] or ()) != (99999,)]
    return spec


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Layer of every parameter for layer-wise lr decay, from the model's timm ``group_matcher``.

    MAE's numbering: embeddings (the matcher's stem group) are layer 0, block i is layer i + 1, and
    everything after the blocks (final norm, fc_norm, head) shares the last layer, depth + 1. timm
    places the final norm in a layer between the blocks and the head; MAE does not, so that matcher
    entry is dropped and the norm falls into the unmatched (head) group.
    """
    if not hasattr(model, "group_matcher"):
        raise TypeError(f"{type(model).__name__} has no group_matcher(); layer-wise lr decay needs one")
    matcher = {name: _without_final_norm(spec) for name, spec in model.group_matcher(coarse=False).items()}
    return group_parameters(model, matcher, reverse=True)


def layer_decay_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, skip: Iterable[str] = ()
) -> list[dict]:
    """Weight-decay groups split by layer, each with ``lr_scale = layer_decay ** (last_layer - layer)``.

    Frozen parameters are left out. Groups come highest scale first, so ``param_groups[0]`` carries
    the peak lr (what the training loop logs).
    """
    layers = layer_ids(model)
    last = max(layers.values())
    skip = tuple(skip)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, exempt = layers[name], exempt_from_weight_decay(name, p, skip)
        group = groups.setdefault(
            (layer, exempt),
            {
                "params": [],
                "weight_decay": 0.0 if exempt else weight_decay,
                "lr_scale": layer_decay ** (last - layer),
                "layer": layer,
            },
        )
        group["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], key[1]))]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-tensor trust ratio (You et al. 2017): MAE's linear-probe optimizer.

    Matrices get weight decay and have their update rescaled to ``trust_coefficient * |w| / |update|``;
    1-D parameters (biases, norms) get neither, as in the MAE code. Like fused AdamW, it skips its step when
    ``found_inf`` (a device tensor, set by ``NonFiniteGuard`` or a GradScaler) is non-zero.
    """

    def __init__(
        self, params, lr: float = 0.0, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient=0.001
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf > 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * w_norm / u_norm
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                if skip is None:
                    buffer.mul_(group["momentum"]).add_(update)
                    p.add_(buffer, alpha=-group["lr"])
                else:  # decided on the device: a skipped step leaves the buffer and the weights as they were
                    buffer.copy_(torch.where(skip, buffer, buffer * group["momentum"] + update))
                    p.add_(torch.where(skip, torch.zeros_like(buffer), buffer), alpha=-group["lr"])
        return loss


def create_optimizer(groups: list[dict], lr: float, optim: dict) -> torch.optim.Optimizer:
    """``optim["name"]``: adamw (default; ``betas``) or lars (``momentum``). Groups may carry their own lr.

    AdamW is torch's fused kernel where ``optim["fused"]`` says so (null: on a GPU only): one kernel per step,
    which skips itself on a device-side flag (``found_inf``). It runs on the CPU too (``fused=true``: about 3x
    faster a step there, docs/gpu_paths.md), but its arithmetic matches the loop form the reference codes use
    only to float rounding (1 ulp), so the CPU keeps the loop form unless asked, and its seeded results with it.
    """
    name = optim.get("name", "adamw")
    if name == "adamw":
        fused = optim.get("fused")
        if fused is None:
            fused = any(p.is_cuda for group in groups for p in group["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim["betas"]), fused=fused or None)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=optim.get("momentum", 0.9))
    raise ValueError(f"optim.name={name!r} is not one of {OPTIMIZERS}")


def skips_on_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` reads a device-side ``found_inf`` flag and skips itself (no host sync)."""
    return isinstance(optimizer, LARS) or bool(optimizer.defaults.get("fused"))
