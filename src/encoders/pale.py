"""Pale Transformer (Wu et al., AAAI 2022, arXiv 2112.14000): the project's reference implementation.

No official code exists; docs/models.md lists the facts it follows. Layout: every block works on NHWC
tensors (B, H, W, C) so LayerNorm, Linear and the pale grouping act on the last dim; convolutions see
the same memory through a free ``permute`` to NCHW (channels-last strides).

Pale-shaped attention (PS-Attention), parallel form: q/k/v channels are split in two halves, each with
half of the heads. The row half groups row ``h`` into group ``h mod G_r`` and attends within the group
(all columns of ``s_r`` rows); the column half does the same on columns. Grouping is a view/permute,
attention is one ``scaled_dot_product_attention`` call per branch.

Sizes that are not multiples of the pale size: ``G = ceil(n / s)`` groups of ``ceil(n / G) <= s`` lines
each; missing lines are zero-padded and masked out as keys, the output is cropped. Only ``G`` decides
which tokens meet, so this gives exactly the pale rule on the real tokens with the least padding. A map
smaller than the pale size gets ``G = 1``: full attention along that axis (the pale size is clamped to
the map), e.g. the 7x7 stage 4 at 224 px, or a 2x2 stage 4 at 64 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from src.encoders.base import FilterReport, MaskedEncoder, keeping_own_mask_token, pretrained_cfg, side_stream

__all__ = [
    "PaleTransformer",
    "masked_global_attention",
    "pale_column_attention",
    "pale_row_attention",
    "pale_rule_mask",
]

# q/k/v norm after the depthwise conv. The paper's BatchNorm mixes mask-token statistics across the batch
# under masked image modelling and is noisy with tiny per-device batches; the channel LayerNorm is per token.
QKV_NORMS: dict[str, type[nn.Module]] = {"layernorm": LayerNorm2d, "batchnorm": nn.BatchNorm2d}


def pale_groups(size: int, pale_size: int) -> tuple[int, int]:
    """(groups, lines per group) for one axis of ``size`` lines; ``groups * lines >= size`` (padding)."""
    groups = math.ceil(size / pale_size)
    return groups, math.ceil(size / groups)


def pale_row_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, pale_size: int
) -> torch.Tensor:
    """Row branch on (B, H, W, C) q/k/v: token (h, w) attends to every (h', w') with h' = h (mod G_r).

    Row ``h = i * G + g`` (line ``i`` of group ``g``): a view to (B, lines, G, W, ...) and a permute bring
    each group's tokens together; no gather, no loop over groups. SDPA's default scale is head_dim ** -0.5
    with head_dim = C / num_heads here, i.e. the model's C / total heads. Returns (B, H, W, C).
    """
    batch, height, width, chans = q.shape
    head_dim = chans // num_heads
    groups, lines = pale_groups(height, pale_size)
    pad = groups * lines - height
    mask = None
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        # keys on padded rows are masked out; the row numbers are only compared, never used to index
        valid = torch.arange(groups * lines, device=q.device).view(lines, groups).t() < height  # (G, lines)
        mask = valid[:, None, None, :, None].expand(groups, 1, 1, lines, width).reshape(groups, 1, 1, -1)
        mask = mask.repeat(batch, 1, 1, 1)  # batch index b * G + g

    def to_groups(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(batch, lines, groups, width, num_heads, head_dim).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(batch * groups, num_heads, lines * width, head_dim)

    out = F.scaled_dot_product_attention(to_groups(q), to_groups(k), to_groups(v), attn_mask=mask)
    out = out.view(batch, groups, num_heads, lines, width, head_dim).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(batch, lines * groups, width, chans)[:, :height]


def pale_column_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, pale_size: int
) -> torch.Tensor:
    """Column branch: the row branch on the transposed map (views only), w' = w (mod G_c)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return pale_row_attention(q, k, v, num_heads, pale_size).transpose(1, 2)


# ---- the reference form: the pale rule as a mask over global attention (tests and benchmarks compare to it) ----
def pale_rule_mask(height: int, width: int, pale_size: int, axis: str, device: torch.device) -> torch.Tensor:
    """(HW, HW) bool: (h, w) may attend (h', w') iff they share a row group (axis 'row') or column group."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    coord = (rows if axis == "row" else cols).flatten()
    groups, _ = pale_groups(height if axis == "row" else width, pale_size)
    return coord[:, None] % groups == coord[None, :] % groups


def masked_global_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, mask: torch.Tensor
) -> torch.Tensor:
    """The naive form: attention over all H*W tokens of (B, H, W, C) q/k/v, restricted by ``mask``."""
    batch, height, width, chans = q.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, height * width, num_heads, chans // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, height, width, chans)


class SepConvProj(nn.Module):
    """CvT-style projection: depthwise 3x3 -> norm -> pointwise C -> C (a Linear on NHWC)."""

    def __init__(self, dim: int, norm: str, bias: bool) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)  # bias is absorbed by the norm
        self.norm = QKV_NORMS[norm](dim)
        self.pw = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H, W, C)."""
        return self.pw(self.norm(self.dw(x)).permute(0, 2, 3, 1))


class PaleAttention(nn.Module):
    """PS-Attention: half the channels and heads per branch, concatenated, then a C -> C projection."""

    def __init__(self, dim: int, num_heads: int, pale_size: int, qkv_norm: str, qkv_bias: bool) -> None:
        super().__init__()
        if num_heads % 2 or dim % num_heads:
            raise ValueError(f"need an even head count dividing dim, got dim={dim}, heads={num_heads}")
        self.branch_heads = num_heads // 2
        self.pale_size = pale_size
        self.q = SepConvProj(dim, qkv_norm, qkv_bias)
        self.k = SepConvProj(dim, qkv_norm, qkv_bias)
        self.v = SepConvProj(dim, qkv_norm, qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        xc = x.permute(0, 3, 1, 2)
        q, k, v = self.q(xc), self.k(xc), self.v(xc)
        half = x.shape[-1] // 2
        rows = pale_row_attention(q[..., :half], k[..., :half], v[..., :half], self.branch_heads, self.pale_size)
        cols = pale_column_attention(q[..., half:], k[..., half:], v[..., half:], self.branch_heads, self.pale_size)
        return self.proj(torch.cat([rows, cols], dim=-1))


class PaleBlock(nn.Module):
    """CPE (x + dw3x3(x)), then pre-norm PS-Attention and MLP with residuals and drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        pale_size: int,
        mlp_ratio: float,
        qkv_norm: str,
        qkv_bias: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PaleAttention(dim, num_heads, pale_size, qkv_norm, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.cpe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """3x3 stride-2 conv C -> C_out, then LayerNorm; padding 1 gives ceil(H / 2) for odd maps."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PaleStage(nn.Module):
    """Optional downsampling, then blocks; NHWC in and out."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        pale_size: int,
        mlp_ratio: float,
        qkv_norm: str,
        qkv_bias: bool,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                PaleBlock(out_dim, num_heads, pale_size, mlp_ratio, qkv_norm, qkv_bias, drop_path[i])
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class PaleTransformer(MaskedEncoder):
    """Hierarchical Pale Transformer: stem (stride 4), four stages (strides 4/8/16/32), final norm, head.

    ``forward_features`` returns final-normed NHWC features (B, H/32, W/32, 8C), as timm's Swin does;
    ``forward_intermediates`` returns NCHW (default) or NHWC stage maps. Any input size works: convs use
    padding k // 2 (maps shrink as ceil(H / stride)) and attention pads non-divisible maps.
    """

    num_prefix_tokens = 0
    supports_token_drop = False

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (2, 2, 16, 2),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        pale_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_norm: str = "layernorm",
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        """``img_size`` is accepted for timm's API only: nothing depends on the input size."""
        super().__init__()
        if qkv_norm not in QKV_NORMS:
            raise ValueError(f"qkv_norm must be one of {sorted(QKV_NORMS)}, got {qkv_norm!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError("depths and num_heads need one entry per stage")
        pale_sizes = [pale_size] * num_stages if isinstance(pale_size, int) else list(pale_size)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.patch_size = 4 * 2 ** (num_stages - 1)
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(num_stages)]

        self.stem = nn.Conv2d(in_chans, embed_dim, 7, stride=4, padding=3)
        self.stem_norm = nn.LayerNorm(embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        num_blocks = sum(depths)
        rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]  # linear schedule
        self.stages = nn.Sequential(
            *[
                PaleStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    pale_sizes[i],
                    mlp_ratio,
                    qkv_norm,
                    qkv_bias,
                    rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i > 0,
                )
                for i in range(num_stages)
            ]
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        with side_stream():
            trunc_normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Truncated-normal Linear weights as in ViT/CvT; convs keep PyTorch's fan-in init."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """The mask token is an embedding; norms and biases are excluded by timm's optimizer factory."""
        return {"mask_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stage-wise (coarse) or block-wise."""
        return dict(
            stem=r"^stem|^mask_token",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward; with qkv_norm='batchnorm' running stats then update twice."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for ``num_classes`` (0: Identity); ``global_pool`` 'avg' or '' (none), None keeps it."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normed stem tokens (B, ceil(H/4), ceil(W/4), C)."""
        return self.stem_norm(self.stem(x).permute(0, 2, 3, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed NHWC features (B, H/32, W/32, 8C)."""
        return self.norm(self.stages(self.forward_stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool of the (already final-normed) features, dropout, linear; no softmax."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4/8/16/32) as in timm's hierarchical models.

        ``indices``: last n stages (int), all (None) or the listed ones; ``norm`` applies the final norm to
        the last stage's map only (it is sized for it). Returns the intermediates, or (final NHWC features,
        intermediates); the final features are normed only when the last stage ran.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.forward_stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last wanted one (timm's features_only path)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_mask_token(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SimMIM-style masking: masked stem tokens (4 px cells) become the learned mask token.

        ``mask`` (B, h, w) bool, True = masked, on a grid whose cell size divides the image and is a
        multiple of the 4 px stem stride; it is upsampled to the stem grid. Returns (B, L, 8C)
        final-normed stride-32 tokens in row-major order.
        """
        batch, _, height, width = x.shape
        if mask.dtype != torch.bool or mask.ndim != 3 or mask.shape[0] != batch:
            raise ValueError(f"mask must be a (B={batch}, h, w) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        mask_h, mask_w = mask.shape[1:]
        if height % mask_h or width % mask_w or (height // mask_h) % 4 or (width // mask_w) % 4:
            raise ValueError(
                f"mask grid {mask_h}x{mask_w} must tile the {height}x{width} image in cells of a multiple of 4 px"
            )
        tokens = self.forward_stem(x)
        cell_h, cell_w = height // mask_h // 4, width // mask_w // 4
        stem_mask = mask.repeat_interleave(cell_h, dim=1).repeat_interleave(cell_w, dim=2).unsqueeze(-1)
        tokens = torch.where(stem_mask, self.mask_token.to(tokens.dtype), tokens)
        return self.norm(self.stages(tokens)).flatten(1, 2)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the final-normed stride-32 tokens, (B, 8C)."""
        return self.forward_features(x).mean(dim=(1, 2))

    def filter_checkpoint(
        self, state: dict[str, torch.Tensor], report: FilterReport, norm_to_fc_norm: bool = True
    ) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state, self, report)


def checkpoint_filter_fn(
    state: dict[str, torch.Tensor], model: PaleTransformer, report: FilterReport | None = None
) -> dict[str, torch.Tensor]:
    """Pale checkpoints need no remapping: a BatchNorm q/k/v norm's step counters are dropped when absent here.

    Nothing depends on the input size (no position tables), so any checkpoint of the same config fits.
    """
    report = report if report is not None else FilterReport()
    own = model.state_dict()
    counters = sorted(k for k in state if k.endswith("num_batches_tracked") and k not in own)
    report.dropped += counters
    return {k: v for k, v in state.items() if k not in counters}


def _create_pale(variant: str, pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    return build_model_with_cfg(
        PaleTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=keeping_own_mask_token(checkpoint_filter_fn),
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        name: pretrained_cfg("stem", pool_size=(7, 7), crop_pct=0.9, paper_ids="arXiv:2112.14000")
        for name in ("pale_tiny_224", "pale_small_224", "pale_base_224")
    }
)


@register_model
def pale_tiny_224(pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    """Pale-T: C=64, heads 2/4/8/16, depths 2/2/16/2 (21.8M params, 4.20 GMACs at 224)."""
    args = dict(embed_dim=64, depths=(2, 2, 16, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.2)
    return _create_pale("pale_tiny_224", pretrained, **dict(args, **kwargs))


@register_model
def pale_small_224(pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    """Pale-S: C=96, heads 4/8/16/32, depths 2/2/16/2 (48.3M params, 8.98 GMACs at 224)."""
    args = dict(embed_dim=96, depths=(2, 2, 16, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.4)
    return _create_pale("pale_small_224", pretrained, **dict(args, **kwargs))


@register_model
def pale_base_224(pretrained: bool = False, **kwargs: Any) -> PaleTransformer:
    """Pale-B: C=128, heads 4/8/16/32, depths 2/2/16/2 (85.4M params, 15.53 GMACs at 224)."""
    args = dict(embed_dim=128, depths=(2, 2, 16, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
    return _create_pale("pale_base_224", pretrained, **dict(args, **kwargs))
