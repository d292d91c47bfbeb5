"""Plain ViT (S/B/L/H and a Tiny for small data) on timm's VisionTransformer, with the masked-input contract.

State-dict names are timm's, which are also the official MAE encoder's (patch_embed.proj, cls_token,
pos_embed, blocks.N.*, norm), so exports load into ``timm.create_model("vit_base_patch16_224")`` and
official MAE encoders load here strictly.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.models import register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from src.encoders.base import MaskedEncoder
from src.pos_embed import sincos_2d


class MaskableViT(VisionTransformer, MaskedEncoder):
    """timm ViT that can also encode only kept patches (MAE) or mask-token-replaced patches."""

    supports_token_drop = True

    def __init__(
        self,
        pos_embed_type: Literal["sincos", "learn"] = "sincos",
        mask_token: bool = False,
        weight_init_style: Literal["mae", "timm"] = "mae",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)  # timm's ViT norms are LayerNorm(eps=1e-6), as in MAE
        self.patch_size = self.patch_embed.patch_size[0]
        self.num_features = self.embed_dim
        self.pos_embed_type = pos_embed_type
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if mask_token else None
        if pos_embed_type == "sincos":
            table = sincos_2d(self.embed_dim, self.patch_embed.grid_size, self.num_prefix_tokens)
            self.pos_embed.data.copy_(table.unsqueeze(0))
            self.pos_embed.requires_grad_(False)
        if weight_init_style == "mae":
            self._init_mae()

    def _init_mae(self) -> None:
        """Official MAE init: xavier on the flattened patch projection and all linears, tokens N(0, 0.02)."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for token in (self.cls_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def _prefix_tokens(self, batch: int) -> torch.Tensor:
        """cls (and register) tokens with their own position embeddings added."""
        tokens = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if not tokens:
            return self.pos_embed.new_zeros(batch, 0, self.embed_dim)
        prefix = torch.cat(tokens, dim=1)
        return prefix + self.pos_embed[:, : self.num_prefix_tokens]

    def _encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Prefix tokens + already position-embedded patches -> blocks -> final norm."""
        x = torch.cat([self._prefix_tokens(patches.shape[0]), patches], dim=1)
        x = self.norm_pre(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def _embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, D) patch embeddings with their position embeddings."""
        patches = self.patch_embed(x)
        return patches + self.pos_embed[:, self.num_prefix_tokens :]

    def forward_visible(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        patches = self._embed_patches(x)
        kept = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return self._encode(kept)

    def forward_mask_token(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mask_token is None:
            raise RuntimeError("this encoder was built without a mask token (mask_token=True)")
        grid = self.patch_embed.grid_size
        if tuple(mask.shape[1:]) != tuple(grid):
            raise ValueError(f"ViT masks must lie on its {grid} patch grid, got {tuple(mask.shape[1:])}")
        patches = self.patch_embed(x)
        patches = torch.where(mask.flatten(1).unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        return self._encode(patches + self.pos_embed[:, self.num_prefix_tokens :])

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, self.num_prefix_tokens :].mean(dim=1)


def _create(variant_kwargs: dict, **kwargs) -> MaskableViT:
    """Constructors only set sizes; everything else comes from the caller (config)."""
    for timm_only in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)  # nothing is downloaded: weights come from local files only
    return MaskableViT(**{**variant_kwargs, **kwargs})


@register_model
def mim_vit_tiny_patch16(**kwargs) -> MaskableViT:
    return _create(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def mim_vit_small_patch16(**kwargs) -> MaskableViT:
    return _create(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def mim_vit_base_patch16(**kwargs) -> MaskableViT:
    return _create(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def mim_vit_large_patch16(**kwargs) -> MaskableViT:
    return _create(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs)


@register_model
def mim_vit_huge_patch14(**kwargs) -> MaskableViT:
    return _create(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), **kwargs)
