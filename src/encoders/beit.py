"""BEiT's ViT (Bao et al. 2021) on timm's ``Beit``, with the masked-input contract.

What the paper's pretraining model has over a plain ViT, all set by the registered constructors and
overridable from ``conf/encoder/beit_*.yaml``: no absolute position embedding; one relative position
bias table shared by all layers ((2h-1)(2w-1) + 3 entries per head, zero init); layer scale (0.1 for
B, 1e-5 for L); q and v biases without a k bias; trunc-normal(0.02) init, then attn.proj and
mlp.fc2 of block l divided by sqrt(2l). The official pretraining code truncates that normal at
+-std (not timm's +-2), and initialises the patch projection the same way; ``weight_init_style="beit"``
follows it.

Names are timm's, which are the official checkpoints' (cls_token, mask_token, patch_embed.proj,
rel_pos_bias.relative_position_bias_table, blocks.N.{gamma_1, attn.q_bias, ...}, norm): official
pretraining checkpoints load with ``load_beit_checkpoint``; built with ``use_rel_pos_bias=True,
use_shared_rel_pos_bias=False, global_pool="avg"`` the model has exactly the fine-tuned layout of
``timm.create_model("beit_base_patch16_224")``. ``shared_to_per_layer_rel_pos_bias`` is the remap
fine-tuning needs (the shared table copied into every block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from timm.layers import trunc_normal_
from timm.models import register_model
from timm.models._manipulate import checkpoint
from timm.models.beit import Beit
from timm.models.beit import checkpoint_filter_fn as timm_beit_filter
from torch import nn

from src.checkpoint import load_state_dict_file
from src.encoders.base import MaskedEncoder

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
INIT_STD = 0.02


class MaskableBeit(Beit, MaskedEncoder):
    """timm Beit that can replace masked patches by a learned token (BEiT's pretraining input)."""

    supports_token_drop = False  # the relative position bias is defined on the full grid

    def __init__(
        self,
        mask_token: bool = False,
        weight_init_style: Literal["beit", "timm"] = "beit",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size = self.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if mask_token else None
        if weight_init_style == "beit":
            self._init_beit_pretraining()
        elif self.mask_token is not None:
            trunc_normal_(self.mask_token, std=INIT_STD)

    def _init_beit_pretraining(self) -> None:
        """The official pretraining init: N(0, 0.02) truncated at +-0.02 for linears, patch conv and tokens."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for token in (self.cls_token, self.mask_token, self.pos_embed):
            if token is not None:
                trunc_normal_(token, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
        self.fix_init_weight()  # attn.proj and mlp.fc2 of block l divided by sqrt(2l)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def _encode(self, patches: torch.Tensor) -> torch.Tensor:
        """cls + patch tokens -> blocks (with the shared bias when there is one) -> final norm."""
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, shared_rel_pos_bias=shared_bias)
            else:
                x = block(x, shared_rel_pos_bias=shared_bias)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(self.patch_embed(x))

    def forward_mask_token(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mask_token is None:
            raise RuntimeError("this encoder was built without a mask token (mask_token=True)")
        grid = self.patch_embed.grid_size
        if tuple(mask.shape[1:]) != tuple(grid):
            raise ValueError(f"BEiT masks must lie on its {grid} patch grid, got {tuple(mask.shape[1:])}")
        patches = self.patch_embed(x)
        patches = torch.where(mask.flatten(1).unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        return self._encode(patches)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens after the final norm (fine-tune layout: mean, then fc_norm, as timm)."""
        return self.fc_norm(self.forward_features(x)[:, self.num_prefix_tokens :].mean(dim=1))


def shared_to_per_layer_rel_pos_bias(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Copy the pretraining's shared relative position table into every block (what fine-tuning loads)."""
    if SHARED_TABLE not in state:
        raise KeyError(f"no shared relative position bias ({SHARED_TABLE}) in this state dict")
    out = {k: v for k, v in state.items() if not k.startswith("rel_pos_bias.")}
    for i in range(depth):
        out[f"blocks.{i}.attn.relative_position_bias_table"] = state[SHARED_TABLE].clone()
    return out


def filter_beit_state(state: dict[str, torch.Tensor], model: Beit) -> dict[str, torch.Tensor]:
    """Fit a BEiT checkpoint (official or ours) to ``model``.

    Drops the index buffers and parts the model lacks (mask token, MIM head, classifier when the
    model has none), remaps a shared table to per-layer tables when the model has those, then lets
    timm resize tables, position and patch embeddings to the model's grid.
    """
    own = model.state_dict()
    per_layer = "blocks.0.attn.relative_position_bias_table" in own
    if per_layer and SHARED_TABLE in state:
        state = shared_to_per_layer_rel_pos_bias(state, len(model.blocks))
    optional = ("mask_token", "lm_head.", "head.", "fc_norm.")
    state = {k: v for k, v in state.items() if k in own or not k.startswith(optional)}
    return timm_beit_filter(state, model)


def load_beit_checkpoint(
    model: Beit, path: str | Path, allow_pickle: bool = False, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load an official BEiT (pretraining or fine-tuned) or exported checkpoint; returns (missing, unexpected)."""
    state = load_state_dict_file(path, allow_pickle=allow_pickle)
    return model.load_state_dict(filter_beit_state(state, model), strict=strict)


def _create(variant_kwargs: dict, **kwargs) -> MaskableBeit:
    """Constructors set sizes and the pretraining layout; the config can override any of it."""
    for timm_only in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)  # nothing is downloaded: weights come from local files only
    pretraining = dict(
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        global_pool="",  # final norm on the tokens (the pretraining layout), no fc_norm
        qkv_bias=True,
        mlp_ratio=4.0,
    )
    return MaskableBeit(**{**pretraining, **variant_kwargs, **kwargs})


@register_model
def mim_beit_tiny_patch16(**kwargs) -> MaskableBeit:
    return _create(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, init_values=0.1), **kwargs)


@register_model
def mim_beit_base_patch16(**kwargs) -> MaskableBeit:
    return _create(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=0.1), **kwargs)


@register_model
def mim_beit_large_patch16(**kwargs) -> MaskableBeit:
    return _create(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5), **kwargs)
