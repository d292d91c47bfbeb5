"""Plain ViT (Tiny/S/B/L/H) and DeiT's distilled ViT on timm's classes, with the masked-input contract.

State-dict names are timm's, which are also the official MAE encoder's (patch_embed.proj, cls_token,
pos_embed, blocks.N.*, norm) and the official DeiT distilled models' (dist_token, head_dist), so exports
load into ``timm.create_model("vit_base_patch16_224")`` and official checkpoints load here strictly.

The distilled ViT (Touvron et al. 2020) adds a distillation token beside the cls token, with its own
position embedding row and head; every ``mim_vit_*`` arch has a ``mim_vit_*_distilled`` twin, which the DeiT
method picks for a ViT encoder config.

Layout, as timm's model files: blocks (timm's), model classes, init, checkpoint filter, registered
constructors built with ``build_model_with_cfg`` (so ``features_only=True`` works).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from src.encoders.base import (
    FilterReport,
    PatchTokenEncoder,
    keeping_own_mask_token,
    mask_token_in_stem,
    move_final_norm,
    pretrained_cfg,
    side_stream,
)
from src.encoders.pos_embed import interpolate_pos_embed, sincos_2d

# width / depth / heads / patch of every size: the one table both the plain and the distilled archs use
SIZES: dict[str, dict[str, int]] = {
    "mim_vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "mim_vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "mim_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mim_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mim_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
DISTILLED_SUFFIX = "_distilled"


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE's init of one module: xavier-uniform linears with zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskableViT(VisionTransformer, PatchTokenEncoder):
    """timm ViT that can also encode only kept patches (MAE) or mask-token-replaced patches (SimMIM, BEiT)."""

    supports_token_drop = True

    def __init__(
        self,
        pos_embed_type: Literal["sincos", "learn"] = "sincos",
        weight_init_style: Literal["mae", "timm"] = "mae",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # timm's ViT norms are LayerNorm(eps=1e-6), as in MAE
        self.patch_size = self.patch_embed.patch_size[0]
        self.num_features = self.embed_dim
        self.pos_embed_type = pos_embed_type
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        if pos_embed_type == "sincos":
            table = sincos_2d(self.embed_dim, self.patch_embed.grid_size, self.num_prefix_tokens)
            self.pos_embed.data.copy_(table.unsqueeze(0))
            self.pos_embed.requires_grad_(False)
        if weight_init_style == "mae":
            self._init_mae()
        with side_stream():
            nn.init.normal_(self.mask_token, std=0.02)

    def _init_mae(self) -> None:
        """Official MAE init: xavier on the flattened patch projection and all linears, tokens N(0, 0.02)."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():  # this order: the draws match the official code's
            init_linear_and_norm(m)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return mask_token_in_stem(super().group_matcher(coarse))

    def _prefix_tokens(self, batch: int) -> torch.Tensor:
        """cls (and register) tokens with their own position embeddings added."""
        tokens = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if not tokens:
            return self.pos_embed.new_zeros(batch, 0, self.embed_dim)
        prefix = torch.cat(tokens, dim=1)
        return prefix + self.pos_embed[:, : self.num_prefix_tokens]

    def encode_tokens(
        self, tokens: torch.Tensor, grid: tuple[int, int], keep_idx: torch.Tensor | None = None, prefix: bool = True
    ) -> torch.Tensor:
        pos_rows = 0 if self.no_embed_class else self.num_prefix_tokens  # timm's table may hold no prefix rows
        x = tokens + interpolate_pos_embed(self.pos_embed[:, pos_rows:], self.patch_grid, grid)
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if prefix:
            x = torch.cat([self._prefix_tokens(x.shape[0]), x], dim=1)
        x = self.norm_pre(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def token_parameters(self, prefix: bool = True) -> list[nn.Parameter]:
        """The position table, ``norm_pre``, the blocks and the final norm; the prefix tokens when ``prefix``."""
        params = [self.pos_embed, *(p for part in (self.norm_pre, self.blocks, self.norm) for p in part.parameters())]
        names = ("cls_token", "reg_token", "dist_token") if prefix else ()
        return params + [token for token in (getattr(self, name, None) for name in names) if token is not None]

    def filter_checkpoint(
        self, state: dict[str, torch.Tensor], report: FilterReport, norm_to_fc_norm: bool = True
    ) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state, self, report, norm_to_fc_norm)


class DistilledMaskableViT(MaskableViT, VisionTransformerDistilled):
    """cls + distillation tokens, two heads (timm's ``VisionTransformerDistilled`` with the masked contract).

    In eval mode (and in training with ``distilled_training`` off, timm's default) ``forward`` returns the
    average of the two heads' logits, which is how the DeiT code evaluates a distilled model.
    """

    def _prefix_tokens(self, batch: int) -> torch.Tensor:
        """cls and distillation tokens, each with its own position embedding (rows 0 and 1)."""
        prefix = torch.cat([self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1)], dim=1)
        return prefix + self.pos_embed[:, : self.num_prefix_tokens]

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls-head logits, distillation-head logits) whatever the mode; DeiT scores each head."""
        prefix = self.forward_prefix(x)
        return self.head(self.head_drop(prefix[:, 0])), self.head_dist(self.head_drop(prefix[:, 1]))


# ---- checkpoint filter ---------------------------------------------------------------------------------------
def checkpoint_filter_fn(
    state: dict[str, torch.Tensor], model: MaskableViT, report: FilterReport | None = None, norm_to_fc_norm: bool = True
) -> dict[str, torch.Tensor]:
    """Fit a ViT checkpoint (official MAE/DeiT or ours) to ``model``, recording every change in ``report``.

    A distillation token the model lacks is dropped with its position row; the final norm moves to
    ``fc_norm`` under global pooling; position embeddings of another square grid are resampled (bicubic).
    """
    report = report if report is not None else FilterReport()
    own = model.state_dict()
    state = dict(state)
    if "dist_token" in state and "dist_token" not in own:
        del state["dist_token"]
        report.dropped.append("dist_token")
        if "pos_embed" in state:  # DeiT order: cls, dist, patches
            state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
            report.notes.append("pos_embed: the distillation token's row removed (DeiT checkpoint, no dist_token here)")
    move_final_norm(state, model, report, norm_to_fc_norm)
    if "pos_embed" in state and "pos_embed" in own:
        (_, old_tokens, old_dim), (_, new_tokens, new_dim) = state["pos_embed"].shape, own["pos_embed"].shape
        if old_dim == new_dim and old_tokens != new_tokens:  # another grid; another width is a plain mismatch
            state["pos_embed"] = _resample_pos_embed(state["pos_embed"], model, report)
    return state


def _resample_pos_embed(pos_embed: torch.Tensor, model: MaskableViT, report: FilterReport) -> torch.Tensor:
    """Bicubic resampling of a square grid of position embeddings to the model's grid (timm's function)."""
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    old_tokens = pos_embed.shape[1] - prefix
    side = int(old_tokens**0.5)
    new_grid = tuple(model.patch_embed.grid_size)
    if side * side != old_tokens:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} cannot be resampled to the model's "
            f"{tuple(model.pos_embed.shape)} ({prefix} prefix tokens, grid {new_grid})"
        )
    report.notes.append(
        f"pos_embed resampled from a {side}x{side} to a {new_grid[0]}x{new_grid[1]} grid "
        "(bicubic, timm.layers.resample_abs_pos_embed)"
    )
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=prefix)


# ---- registered constructors -------------------------------------------------------------------------------
def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MaskableViT:
    """Sizes from ``SIZES``; everything else from the caller (config). Nothing is downloaded."""
    base = variant.removesuffix(DISTILLED_SUFFIX)
    model_cls = DistilledMaskableViT if variant.endswith(DISTILLED_SUFFIX) else MaskableViT
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=keeping_own_mask_token(checkpoint_filter_fn),
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"),
        **{**SIZES[base], **kwargs},
    )


default_cfgs = generate_default_cfgs(
    {name: pretrained_cfg("patch_embed.proj") for name in SIZES}
    | {
        f"{name}{DISTILLED_SUFFIX}": pretrained_cfg("patch_embed.proj", classifier=("head", "head_dist"))
        for name in SIZES
    }
)


@register_model
def mim_vit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> MaskableViT:
    return _create("mim_vit_tiny_patch16", pretrained, **kwargs)


@register_model
def mim_vit_small_patch16(pretrained: bool = False, **kwargs: Any) -> MaskableViT:
    return _create("mim_vit_small_patch16", pretrained, **kwargs)


@register_model
def mim_vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> MaskableViT:
    return _create("mim_vit_base_patch16", pretrained, **kwargs)


@register_model
def mim_vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> MaskableViT:
    return _create("mim_vit_large_patch16", pretrained, **kwargs)


@register_model
def mim_vit_huge_patch14(pretrained: bool = False, **kwargs: Any) -> MaskableViT:
    return _create("mim_vit_huge_patch14", pretrained, **kwargs)


@register_model
def mim_vit_tiny_patch16_distilled(pretrained: bool = False, **kwargs: Any) -> DistilledMaskableViT:
    return _create("mim_vit_tiny_patch16_distilled", pretrained, **kwargs)


@register_model
def mim_vit_small_patch16_distilled(pretrained: bool = False, **kwargs: Any) -> DistilledMaskableViT:
    return _create("mim_vit_small_patch16_distilled", pretrained, **kwargs)


@register_model
def mim_vit_base_patch16_distilled(pretrained: bool = False, **kwargs: Any) -> DistilledMaskableViT:
    return _create("mim_vit_base_patch16_distilled", pretrained, **kwargs)


@register_model
def mim_vit_large_patch16_distilled(pretrained: bool = False, **kwargs: Any) -> DistilledMaskableViT:
    return _create("mim_vit_large_patch16_distilled", pretrained, **kwargs)


@register_model
def mim_vit_huge_patch14_distilled(pretrained: bool = False, **kwargs: Any) -> DistilledMaskableViT:
    return _create("mim_vit_huge_patch14_distilled", pretrained, **kwargs)
