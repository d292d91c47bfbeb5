"""Detection backbones for torchvision's Mask R-CNN: MIMDet's partial-input ViT and a hierarchical (Pale) one.

MIMDet (Fang et al. 2022, arXiv 2204.02964) feeds a plain MAE-pretrained ViT with only a random part of the
tokens of a convolutional stem while training, which is what the ViT saw in pretraining and makes global
attention affordable at detection sizes; at evaluation it sees all tokens. The stem also gives the stride-4
and stride-8 maps, a few MAE decoder blocks turn the encoded tokens back into a full stride-16 map (C4), and
C5 is its 2x max-pool. Both backbones end in the same torchvision FPN, so the detector does not care which
encoder it got: ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``, what torchvision's anchor generator and
``MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"])`` expect.

Layout, as timm's model files: building blocks (stem, position tables, token sampling), modules, builders.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from src.encoders.pos_embed import sincos_2d
from src.encoders.vit import init_linear_and_norm

__all__ = [
    "STRIDE",
    "ConvStem",
    "HierarchicalBackbone",
    "MIMDetBackbone",
    "MIMDetDecoder",
    "PartialInputEncoder",
    "backbone_kind",
    "build_backbone",
    "decoder_state_from_mae",
    "interpolate_pos_embed",
    "sample_tokens",
    "valid_token_mask",
]

STRIDE = 16  # the ViT token stride the ConvStem produces
SIZE_DIVISOR = 32  # C5 halves the stride-16 grid, so inputs are padded to a multiple of 32
PYRAMID_STRIDES = [4, 8, 16, 32]  # the stage strides a hierarchical encoder must have to feed the FPN


# ---- building blocks -----------------------------------------------------------------------------------------
class ConvStem(nn.Module):
    """Four 3x3 stride-2 convs (GroupNorm(1) + GELU each) and a 1x1 projection, in place of the patch embedding.

    Randomly initialised in MIMDet; besides the stride-16 ViT tokens it yields the stride-4 and stride-8
    maps the FPN needs, which a plain ViT does not have.
    """

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"ConvStem needs an embedding width divisible by 8, got {embed_dim}")
        widths = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        stages, prev = [], in_chans
        for width in widths:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(prev, width, 3, stride=2, padding=1, bias=False),
                    nn.GroupNorm(1, width, eps=1e-6),
                    nn.GELU(),
                )
            )
            prev = width
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Conv2d(embed_dim, embed_dim, 1)
        self.out_channels = (embed_dim // 4, embed_dim // 2, embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (C2 stride 4 D/4 ch, C3 stride 8 D/2 ch, tokens stride 16 D ch), all NCHW."""
        x = self.stages[0](x)
        c2 = self.stages[1](x)
        c3 = self.stages[2](c2)
        return c2, c3, self.proj(self.stages[3](c3))


def interpolate_pos_embed(table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """(1, h0*w0, C) patch rows -> (1, h*w, C), bicubic (align_corners=False) as MIMDet resizes online.

    Detection grids follow each batch's padded size and are rarely square; the pretraining table is
    resampled per forward. The same grid returns ``table`` itself.
    """
    (h0, w0), (h, w) = tuple(src_grid), tuple(dst_grid)
    if table.shape[1] != h0 * w0:
        raise ValueError(f"position table of shape {tuple(table.shape)} does not hold a {h0}x{w0} grid")
    if (h0, w0) == (h, w):
        return table
    grid = table.float().reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(table.dtype)


def sample_tokens(
    valid: torch.Tensor, ratio: float, generator: torch.Generator | list[torch.Generator] | None = None
) -> torch.Tensor:
    """Indices (B, K) of the tokens each image keeps, K = int(L * ratio) (at least 1), sorted ascending.

    Per image, uniform noise ranks the tokens and the K lowest are kept; padding tokens (``valid`` False)
    get noise + 1, so every real token outranks every padding token and padding is dropped first. An image
    with fewer than K real tokens keeps some padding: the batch needs one K. Ascending order keeps tokens in
    grid order (ratio 1.0 is exactly ``arange(L)``) and lets the decoder scatter them straight back.
    ``generator`` may be one per image (CPU): each image's sample then depends on its own seed alone.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"token sample ratio must be in (0, 1], got {ratio}")
    b, length = valid.shape
    keep = max(1, int(length * ratio))
    if keep == length:
        return torch.arange(length, device=valid.device).expand(b, -1)
    if isinstance(generator, list):
        noise = torch.stack([torch.rand(length, generator=g) for g in generator]).to(valid.device)
    else:
        device = generator.device if generator is not None else valid.device
        noise = torch.rand(b, length, generator=generator, device=device).to(valid.device)
    noise = noise + (~valid).to(noise.dtype)
    ids = torch.argsort(noise, dim=1)[:, :keep]
    return ids.sort(dim=1).values


def valid_token_mask(
    image_sizes: list[tuple[int, int]], grid: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """(B, h, w) bool: a stride-16 token is real when its top-left pixel lies inside its image.

    torchvision pads every image at the bottom/right to the batch size; this is MIMDet's
    ``ceil(size / 16)`` rows and columns per image.
    """
    h, w = grid
    sizes = torch.tensor(image_sizes, device=device, dtype=torch.long).reshape(-1, 2)
    rows = torch.arange(h, device=device) * STRIDE
    cols = torch.arange(w, device=device) * STRIDE
    row_ok = rows[None, :] < sizes[:, :1]  # (B, h)
    col_ok = cols[None, :] < sizes[:, 1:]  # (B, w)
    return row_ok[:, :, None] & col_ok[:, None, :]


@cache
def _block_keys() -> tuple[str, ...]:
    """Parameter names of one timm ``Block`` as MAE's decoder builds it (from a throwaway tiny one)."""
    return tuple(Block(4, 1, mlp_ratio=4.0, qkv_bias=True).state_dict())


def decoder_state_from_mae(
    state: dict[str, torch.Tensor], depth: int
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Pick the MIMDet decoder's tensors from a flat MAE state dict: (state, loaded names, names not found).

    The layout is the official MAE full checkpoint's, which is also the top level of our MAE module's
    state dict: ``decoder_embed.*``, ``decoder_pos_embed``, ``decoder_blocks.{i < depth}.*``,
    ``decoder_norm.*``. ``fill_proj`` is new in MIMDet and never in it. Meant for
    ``MIMDetDecoder.load_state_dict(state, strict=False)``; the name lists let the caller report (or refuse)
    a checkpoint without the decoder instead of silently keeping a random one.
    """
    wanted = ["decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed"]
    wanted += [f"decoder_blocks.{i}.{key}" for i in range(depth) for key in _block_keys()]
    wanted += ["decoder_norm.weight", "decoder_norm.bias"]
    picked = {name: state[name] for name in wanted if name in state}
    return picked, list(picked), [name for name in wanted if name not in state]


# ---- modules ---------------------------------------------------------------------------------------------------
class PartialInputEncoder(nn.Module):
    """The ViT's blocks and final norm over a random subset of ConvStem tokens; no cls token.

    It owns the ViT (``encoder``, timm names) and runs only its ``norm_pre``, ``blocks``, ``norm`` and the
    patch rows of ``pos_embed`` (resized to the grid); drop path is the one built into the blocks. The rest
    (patch embedding, cls/register/distillation and mask tokens, heads) never runs in detection and is frozen
    here, so DDP meets no trainable parameter without a gradient. The sample ratio follows the mode:
    ``train_ratio`` in training, ``eval_ratio`` (1.0: every token, as MIMDet evaluates) in eval.
    """

    def __init__(self, encoder: nn.Module, train_ratio: float = 0.5, eval_ratio: float = 1.0) -> None:
        super().__init__()
        for ratio in (train_ratio, eval_ratio):
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"token sample ratios must be in (0, 1], got {ratio}")
        self.train_ratio, self.eval_ratio = train_ratio, eval_ratio
        self.generators: list[torch.Generator] | None = None  # one per image, set by the detector per batch
        self.encoder = encoder
        self.num_pos_prefix = 0 if getattr(encoder, "no_embed_class", False) else encoder.num_prefix_tokens
        self.pos_grid = tuple(encoder.patch_embed.grid_size)
        used = {id(p) for part in (encoder.norm_pre, encoder.blocks, encoder.norm) for p in part.parameters()}
        used.add(id(encoder.pos_embed))  # fixed sin-cos stays frozen; a learned table keeps training
        for param in encoder.parameters():
            if id(param) not in used:
                param.requires_grad_(False)

    @property
    def ratio(self) -> float:
        return self.train_ratio if self.training else self.eval_ratio

    def forward(
        self, tokens: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, D, h, w), valid (B, h, w) -> (latent (B, K, D) final-normed, ids_keep (B, K) ascending)."""
        vit = self.encoder
        h, w = tokens.shape[-2:]
        x = tokens.flatten(2).transpose(1, 2)
        pos = interpolate_pos_embed(vit.pos_embed[:, self.num_pos_prefix :], self.pos_grid, (h, w))
        x = x + pos.to(x.dtype)
        ids_keep = sample_tokens(valid.flatten(1), self.ratio, self.generators if generator is None else generator)
        if ids_keep.shape[1] < x.shape[1]:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = vit.norm_pre(x)
        if getattr(vit, "grad_checkpointing", False) and not torch.jit.is_scripting():
            x = checkpoint_seq(vit.blocks, x)  # the ViT's own switch (set_grad_checkpointing)
        else:
            x = vit.blocks(x)
        return vit.norm(x), ids_keep


class MIMDetDecoder(nn.Module):
    """MAE decoder blocks that rebuild the full stride-16 map (C4) from the encoded tokens.

    Names mirror MAE's so the first ``depth`` blocks of an MAE checkpoint load directly
    (``decoder_state_from_mae``). ``pos_grid`` is the pretraining grid (MAE's), so the fixed sin-cos
    ``decoder_pos_embed`` (zero cls row first, as MAE's) has the checkpoint's shape; it is resized online.
    """

    def __init__(self, embed_dim: int, decoder_dim: int, depth: int, num_heads: int, pos_grid: tuple[int, int]) -> None:
        super().__init__()
        self.pos_grid = tuple(pos_grid)
        self.decoder_dim = decoder_dim
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.fill_proj = nn.Linear(embed_dim, decoder_dim)  # new in MIMDet: stem features where nothing was sampled
        table = sincos_2d(decoder_dim, self.pos_grid, num_prefix_tokens=1)
        self.decoder_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.apply(init_linear_and_norm)

    def assemble(self, latent: torch.Tensor, ids_keep: torch.Tensor, stem_tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w, dec) in grid order: ``decoder_embed(latent)`` at kept positions, ``fill_proj(stem)`` elsewhere.

        Every position starts from the fill projection and the visible ones are scattered over it, so
        ``fill_proj`` is in the graph even at ratio 1.0 (zero gradient then): DDP needs every parameter used.
        """
        fill = self.fill_proj(stem_tokens.flatten(2).transpose(1, 2))
        visible = self.decoder_embed(latent).to(fill.dtype)
        return fill.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, fill.shape[-1]), visible)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, stem_tokens: torch.Tensor) -> torch.Tensor:
        """latent (B, K, D), ids_keep (B, K), stem tokens (B, D, h, w) -> C4 (B, dec, h, w)."""
        b, _, h, w = stem_tokens.shape
        x = self.assemble(latent, ids_keep, stem_tokens)
        pos = interpolate_pos_embed(self.decoder_pos_embed[:, 1:], self.pos_grid, (h, w))
        x = x + pos.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return x.transpose(1, 2).reshape(b, self.decoder_dim, h, w)


def _fpn(in_channels: list[int], out_channels: int) -> FeaturePyramidNetwork:
    """torchvision's FPN on C2..C5 with the max-pool P6, the five levels of Mask R-CNN's anchors."""
    return FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())


class MIMDetBackbone(nn.Module):
    """ConvStem -> partial-input ViT -> MAE decoder -> C4, C5 = max-pool(C4) -> FPN (MIMDet).

    Submodules ``stem``, ``encoder_input`` (which owns the ViT; ``encoder`` is the ViT itself), ``decoder``,
    ``fpn``: the recipe's three lr groups are the stem, the ViT and everything else. Padding tokens (from the
    real ``image_sizes``) are dropped first.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 512,
        decoder_depth: int = 4,
        decoder_heads: int = 16,
        train_ratio: float = 0.5,
        eval_ratio: float = 1.0,
        out_channels: int = 256,
    ) -> None:
        super().__init__()
        missing = [
            name
            for name in ("blocks", "norm_pre", "norm", "pos_embed", "patch_embed", "embed_dim")
            if not hasattr(encoder, name)
        ]
        if missing:
            raise ValueError(f"MIMDetBackbone needs a plain ViT encoder; {type(encoder).__name__} lacks {missing}")
        dim = encoder.embed_dim
        self.stem = ConvStem(dim)
        self.encoder_input = PartialInputEncoder(encoder, train_ratio, eval_ratio)
        self.decoder = MIMDetDecoder(dim, decoder_dim, decoder_depth, decoder_heads, encoder.patch_embed.grid_size)
        self.fpn = _fpn([dim // 4, dim // 2, decoder_dim, decoder_dim], out_channels)
        self.out_channels = out_channels

    @property
    def encoder(self) -> nn.Module:
        """The ViT (registered once, under ``encoder_input``): what exports and checkpoint loading see."""
        return self.encoder_input.encoder

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]]) -> OrderedDict[str, torch.Tensor]:
        """images (B, 3, H, W) padded to a multiple of 32, image_sizes the real (h, w) -> FPN levels."""
        height, width = images.shape[-2:]
        if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
            raise ValueError(
                f"MIMDetBackbone needs inputs padded to a multiple of {SIZE_DIVISOR}, got {height}x{width}"
            )
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {images.shape[0]} images")
        c2, c3, tokens = self.stem(images)
        valid = valid_token_mask(image_sizes, tuple(tokens.shape[-2:]), images.device)
        latent, ids_keep = self.encoder_input(tokens, valid)
        c4 = self.decoder(latent, ids_keep, tokens)
        c5 = F.max_pool2d(c4, 2)  # MIMDet's parameter-free C5; the grid is even, so no rounding choice arises
        return self.fpn(OrderedDict([("0", c2), ("1", c3), ("2", c4), ("3", c5)]))


class HierarchicalBackbone(nn.Module):
    """A pyramid encoder's four stage maps (strides 4..32) -> the same FPN, as the Pale paper's Mask R-CNN.

    Such encoders (Pale) cannot drop tokens, so every image is seen whole and ``image_sizes`` is unused.
    The encoder's final norm and classifier are pruned (timm's ``features_only`` way) and its mask token
    frozen: detection never uses them, and DDP must not meet parameters without gradients.
    """

    def __init__(self, encoder: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        info = list(getattr(encoder, "feature_info", []))
        if [level.get("reduction") for level in info] != PYRAMID_STRIDES:
            raise ValueError(
                f"HierarchicalBackbone needs four stage maps at strides 4/8/16/32; {type(encoder).__name__} "
                f"reports {[level.get('reduction') for level in info]}"
            )
        encoder.prune_intermediate_layers(len(info), prune_norm=True, prune_head=True)
        if isinstance(getattr(encoder, "mask_token", None), nn.Parameter):
            encoder.mask_token.requires_grad_(False)
        self.encoder = encoder
        self.fpn = _fpn([level["num_chs"] for level in info], out_channels)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]]) -> OrderedDict[str, torch.Tensor]:
        maps = self.encoder.forward_intermediates(images, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), level) for i, level in enumerate(maps)))


# ---- builders --------------------------------------------------------------------------------------------------
def backbone_kind(encoder: nn.Module) -> str | None:
    """``"mimdet"`` for encoders that can drop tokens (plain ViT), ``"pyramid"`` for four-stage encoders (Pale)."""
    if getattr(encoder, "supports_token_drop", False):
        return "mimdet"
    strides = [level.get("reduction") for level in getattr(encoder, "feature_info", [])]
    if hasattr(encoder, "forward_intermediates") and strides == PYRAMID_STRIDES:
        return "pyramid"
    return None


def build_backbone(encoder: nn.Module, **kwargs: Any) -> MIMDetBackbone | HierarchicalBackbone:
    """MIMDet for encoders that can drop tokens (plain ViT), the hierarchical FPN for pyramid encoders (Pale).

    ``kwargs`` go to the chosen backbone (MIMDet's decoder and ratio settings, ``out_channels``).
    """
    kind = backbone_kind(encoder)
    if kind is None:
        raise ValueError(
            f"{type(encoder).__name__} can be a detection backbone neither by token drop (supports_token_drop) "
            f"nor as a pyramid (forward_intermediates with stages at strides {PYRAMID_STRIDES})"
        )
    return MIMDetBackbone(encoder, **kwargs) if kind == "mimdet" else HierarchicalBackbone(encoder, **kwargs)
