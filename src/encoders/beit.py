"""BEiT's ViT (Bao et al. 2021) on timm's ``Beit``, with the masked-input contract.

What the paper's pretraining model has over a plain ViT, all set by the registered constructors and
overridable from ``conf/encoder/beit_*.yaml``: no absolute position embedding; one relative position
bias table shared by all layers ((2h-1)(2w-1) + 3 entries per head, zero init); layer scale (0.1 for
B, 1e-5 for L); q and v biases without a k bias; trunc-normal(0.02) init, then attn.proj and
mlp.fc2 of block l divided by sqrt(2l). The official pretraining code truncates that normal at
+-std (not timm's +-2), and initialises the patch projection the same way; ``weight_init_style="beit"``
follows it.

Names are timm's, which are the official checkpoints' (cls_token, mask_token, patch_embed.proj,
rel_pos_bias.relative_position_bias_table, blocks.N.{gamma_1, attn.q_bias, ...}, norm). Built with
``use_rel_pos_bias=True, use_shared_rel_pos_bias=False, global_pool="avg"`` the model has exactly the
fine-tuned layout of ``timm.create_model("beit_base_patch16_224")``; ``checkpoint_filter_fn`` copies a
pretraining checkpoint's shared table into every block for it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from timm.models.beit import Beit
from timm.models.beit import checkpoint_filter_fn as timm_beit_filter
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

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
INIT_STD = 0.02


class MaskableBeit(Beit, PatchTokenEncoder):
    """timm Beit that can replace masked patches by a learned token (BEiT's pretraining input)."""

    supports_token_drop = False  # the relative position bias is defined on the full grid

    def __init__(self, weight_init_style: Literal["beit", "timm"] = "beit", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.patch_size = self.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        if weight_init_style == "beit":
            self._init_beit_pretraining()
        with side_stream():
            trunc_normal_(self.mask_token, std=INIT_STD, a=-INIT_STD, b=INIT_STD)

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
        for token in (self.cls_token, self.pos_embed):
            if token is not None:
                trunc_normal_(token, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
        self.fix_init_weight()  # attn.proj and mlp.fc2 of block l divided by sqrt(2l)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return mask_token_in_stem(super().group_matcher(coarse))

    def _refuse_partial_input(self, grid: tuple[int, int], keep_idx: torch.Tensor | None, prefix: bool) -> None:
        """The relative position bias is defined on the full training grid with the cls token: nothing else runs."""
        if keep_idx is not None:
            raise NotImplementedError(
                f"{type(self).__name__} cannot drop tokens: its relative position bias needs the full grid"
            )
        if tuple(grid) != self.patch_grid or not prefix:
            raise ValueError(
                f"{type(self).__name__} encodes only its {self.patch_grid} patch grid with its cls token (the relative "
                f"position bias is defined there), not a {tuple(grid)} grid{'' if prefix else ' without prefix tokens'}"
            )

    def encode_tokens(
        self, tokens: torch.Tensor, grid: tuple[int, int], keep_idx: torch.Tensor | None = None, prefix: bool = True
    ) -> torch.Tensor:
        """cls + patch tokens -> blocks (with the shared bias when there is one) -> final norm; the full grid only."""
        self._refuse_partial_input(grid, keep_idx, prefix)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
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

    def token_parameters(self, prefix: bool = True) -> list[nn.Parameter]:
        """The cls token, the position table if any, the shared bias if any, the blocks and the final norm."""
        self._refuse_partial_input(self.patch_grid, None, prefix)
        tokens = [t for t in (self.cls_token, self.pos_embed) if t is not None]
        parts = [part for part in (self.rel_pos_bias, self.blocks, self.norm) if part is not None]
        return tokens + [p for part in parts for p in part.parameters()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(self.patch_embed(x), self.patch_grid)

    def filter_checkpoint(
        self, state: dict[str, torch.Tensor], report: FilterReport, norm_to_fc_norm: bool = True
    ) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state, self, report, norm_to_fc_norm)


def shared_to_per_layer_rel_pos_bias(
    state: dict[str, torch.Tensor], depth: int | None = None
) -> dict[str, torch.Tensor]:
    """Copy the pretraining's shared relative position table into every block (what fine-tuning loads).

    ``depth`` defaults to the number of blocks the state dict holds.
    """
    if SHARED_TABLE not in state:
        raise KeyError(f"no shared relative position bias ({SHARED_TABLE}) in this state dict")
    if depth is None:
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    out = {k: v for k, v in state.items() if not k.startswith("rel_pos_bias.")}
    for i in range(depth):
        out[f"blocks.{i}.attn.relative_position_bias_table"] = state[SHARED_TABLE].clone()
    return out


def checkpoint_filter_fn(
    state: dict[str, torch.Tensor], model: Beit, report: FilterReport | None = None, norm_to_fc_norm: bool = True
) -> dict[str, torch.Tensor]:
    """Fit a BEiT checkpoint (official or ours) to ``model``, recording every change in ``report``.

    Drops the index buffers and parts the model lacks (MIM head, classifier when the model has none), copies
    a shared table into per-layer tables when the model has those, moves the final norm to ``fc_norm`` under
    global pooling, then lets timm resize tables, position and patch embeddings to the model's grid.
    """
    report = report if report is not None else FilterReport()
    own = model.state_dict()
    if "blocks.0.attn.relative_position_bias_table" in own and SHARED_TABLE in state:
        state = shared_to_per_layer_rel_pos_bias(state, len(model.blocks))
        report.notes.append(f"{SHARED_TABLE}: the shared table copied into each of the {len(model.blocks)} blocks")
    optional = ("lm_head.", "head.", "fc_norm.")
    kept = {k: v for k, v in state.items() if k in own or not k.startswith(optional)}
    report.dropped += sorted(set(state) - set(kept))
    move_final_norm(kept, model, report, norm_to_fc_norm)
    return timm_beit_filter(kept, model)


SIZES: dict[str, dict[str, Any]] = {
    "mim_beit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, init_values=0.1),
    "mim_beit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=0.1),
    "mim_beit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MaskableBeit:
    """Constructors set sizes and the pretraining layout; the config can override any of it."""
    pretraining = dict(
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        global_pool="",  # final norm on the tokens (the pretraining layout), no fc_norm
        qkv_bias=True,
        mlp_ratio=4.0,
    )
    return build_model_with_cfg(
        MaskableBeit,
        variant,
        pretrained,
        pretrained_filter_fn=keeping_own_mask_token(checkpoint_filter_fn),
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"),
        **{**pretraining, **SIZES[variant], **kwargs},
    )


default_cfgs = generate_default_cfgs({name: pretrained_cfg("patch_embed.proj") for name in SIZES})


@register_model
def mim_beit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> MaskableBeit:
    return _create("mim_beit_tiny_patch16", pretrained, **kwargs)


@register_model
def mim_beit_base_patch16(pretrained: bool = False, **kwargs: Any) -> MaskableBeit:
    return _create("mim_beit_base_patch16", pretrained, **kwargs)


@register_model
def mim_beit_large_patch16(pretrained: bool = False, **kwargs: Any) -> MaskableBeit:
    return _create("mim_beit_large_patch16", pretrained, **kwargs)
