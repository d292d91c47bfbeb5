"""Detection backbones for torchvision's Mask R-CNN: MIMDet's partial-input ViT and a hierarchical (Pale) one here,
ViTDet's plain one in ``plain_backbone.py``; ``build_backbone`` picks by ``objective.backbone`` and the encoder.

MIMDet (Fang et al. 2022, arXiv 2204.02964) feeds a plain MAE-pretrained ViT with only a random part of the
tokens of a convolutional stem while training, which is what the ViT saw in pretraining and makes global
attention affordable at detection sizes; at evaluation it sees all tokens. The stem also gives the stride-4
and stride-8 maps, a few MAE decoder blocks turn the encoded tokens back into a full stride-16 map (C4), and
C5 is its 2x max-pool. Both backbones end in the same torchvision FPN, so the detector does not care which
encoder it got: ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``, what torchvision's anchor generator and
``MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"])`` expect.

The ViT is reached only through the encoder contract (``encode_tokens``, ``token_parameters``) and the decoder
is MAE's own stack (``src/encoders/decoder.py``).

Layout, as timm's model files: building blocks (stem, token sampling, decoder keys), modules, builders.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from src.detection.plain_backbone import PlainBackbone
from src.encoders.base import PatchTokenEncoder
from src.encoders.decoder import TokenGridDecoder, decoder_block
from src.encoders.pos_embed import resize_table
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
    "sample_tokens",
    "valid_token_mask",
]

STRIDE = 16  # the ViT token stride the ConvStem produces
SIZE_DIVISOR = 32  # C5 halves the stride-16 grid, so inputs are padded to a multiple of 32
PYRAMID_STRIDES = [4, 8, 16, 32]  # the stage strides a hierarchical encoder must have to feed the FPN
FPN_NORM_LAYERS = {"": None, "syncbn": nn.BatchNorm2d}  # objective.fpn_norm (src/schema.py FPN_NORMS)
PerImage = list[torch.Generator] | None  # one generator per image (its draws follow its own seed); None: the global one


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
        self.grad_checkpointing = False  # MIMDetBackbone.set_grad_checkpointing

    def _stage(self, part: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one stage; under gradient checkpointing its activations are recomputed in the backward pass
        (the stride-4 maps of an 800 px image are the largest activations of the model)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(part, x, use_reentrant=False)
        return part(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (C2 stride 4 D/4 ch, C3 stride 8 D/2 ch, tokens stride 16 D ch), all NCHW."""
        x = self._stage(self.stages[0], x)
        c2 = self._stage(self.stages[1], x)
        c3 = self._stage(self.stages[2], c2)
        return c2, c3, self._stage(self.proj, self._stage(self.stages[3], c3))


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
    """Parameter names of one MAE decoder block (from a throwaway tiny one)."""
    return tuple(decoder_block(4, 1).state_dict())


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
    """The ViT over a random subset of ConvStem tokens, through the encoder contract's ``encode_tokens``.

    It owns the ViT (``encoder``, timm names) and asks it to encode the sampled stem tokens on their grid, with
    no prefix token and the position table resized to that grid; drop path is the one built into the blocks.
    What ``encode_tokens`` does not run (``token_parameters``: patch embedding, cls and mask tokens, heads) is
    frozen here, so DDP meets no trainable parameter without a gradient.
    """

    def __init__(self, encoder: PatchTokenEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        used = {id(p) for p in encoder.token_parameters(prefix=False)}
        for param in encoder.parameters():
            if id(param) not in used:
                param.requires_grad_(False)

    def unused_parameters(self) -> list[str]:
        """Names (under ``encoder.``) of the ViT parameters detection never runs: frozen here, absent from MIMDet's
        checkpoints (the ViT's own patch embedding, cls and mask tokens)."""
        used = {id(p) for p in self.encoder.token_parameters(prefix=False)}
        return [f"encoder.{name}" for name, p in self.encoder.named_parameters() if id(p) not in used]

    def resize_table(self, grid: tuple[int, int]) -> None:
        """Resample the ViT's position table once to ``grid`` (bicubic, prefix rows kept); ``encode_tokens`` resizes
        it from there to each batch's grid, as MIMDet's encoder does from its 50x50 table (``TokenGridDecoder``'s
        ``resize_table`` says why). timm's own ``set_input_size`` resamples with antialiasing, another kernel."""
        vit = self.encoder
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        table = resize_table(vit.pos_embed.detach(), vit.patch_grid, grid, prefix)
        vit.patch_embed.set_input_size(img_size=(grid[0] * vit.patch_size, grid[1] * vit.patch_size))
        vit.pos_embed = nn.Parameter(table, requires_grad=vit.pos_embed.requires_grad)

    def forward(
        self, tokens: torch.Tensor, valid: torch.Tensor, ratio: float = 1.0, generators: PerImage = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, D, h, w), valid (B, h, w) -> (latent (B, K, D) final-normed, ids_keep (B, K) ascending).

        ``ratio`` of the tokens are kept (``sample_tokens``), drawn from ``generators`` (one per image) if given.
        """
        h, w = tokens.shape[-2:]
        ids_keep = sample_tokens(valid.flatten(1), ratio, generators)
        keep = ids_keep if ids_keep.shape[1] < h * w else None  # every token: no gather
        latent = self.encoder.encode_tokens(tokens.flatten(2).transpose(1, 2), (h, w), keep, prefix=False)
        return latent, ids_keep


class MIMDetDecoder(TokenGridDecoder):
    """MAE's decoder stack (``src/encoders/decoder.py``) rebuilding the full stride-16 map (C4) from the tokens.

    Names are MAE's, so the first ``depth`` blocks of an MAE checkpoint load directly (``decoder_state_from_mae``).
    ``pos_grid`` is the pretraining grid (MAE's), so the fixed sin-cos ``decoder_pos_embed`` has the checkpoint's
    shape; it is resized online. ``fill_proj`` (new in MIMDet) projects the stem features where nothing was sampled.
    """

    def __init__(self, embed_dim: int, decoder_dim: int, depth: int, num_heads: int, pos_grid: tuple[int, int]) -> None:
        super().__init__()
        self.decoder_dim = decoder_dim
        fill = ("fill_proj", nn.Linear(embed_dim, decoder_dim))
        self.build_decoder(embed_dim, decoder_dim, depth, num_heads, pos_grid, fill)
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
        x = self.decode(self.assemble(latent, ids_keep, stem_tokens), (h, w))
        return x.transpose(1, 2).reshape(b, self.decoder_dim, h, w)


def _fpn(in_channels: list[int], out_channels: int, norm: str = "") -> FeaturePyramidNetwork:
    """torchvision's FPN on C2..C5 with the max-pool P6, the five levels of Mask R-CNN's anchors.

    ``norm`` (``FPN_NORM_LAYERS``): "" convs with biases (torchvision's), "syncbn" convs without biases, each
    followed by a BatchNorm (MIMDet's released config); with several processes every BatchNorm of a run sees the
    global batch (``TrainingMethod.on_fit_start``), which is detectron2's SyncBN.
    """
    if norm not in FPN_NORM_LAYERS:
        raise ValueError(f"FPN norm must be one of {sorted(FPN_NORM_LAYERS)}, got {norm!r}")
    return FeaturePyramidNetwork(in_channels, out_channels, LastLevelMaxPool(), norm_layer=FPN_NORM_LAYERS[norm])


class MIMDetBackbone(nn.Module):
    """ConvStem -> partial-input ViT -> MAE decoder -> C4, C5 = max-pool(C4) -> FPN (MIMDet).

    Submodules ``stem``, ``encoder_input`` (which owns the ViT; ``encoder`` is the ViT itself), ``decoder``,
    ``fpn``: the recipe's three lr groups are the stem, the ViT and everything else. Padding tokens (from the
    real ``image_sizes``) are dropped first. Defaults are the original's: every LayerNorm of the ViT and the
    decoder at eps ``layer_norm_eps`` 1e-5 (MAE and timm use 1e-6), and BatchNorm in the FPN.
    """

    def __init__(
        self,
        encoder: PatchTokenEncoder,
        decoder_dim: int = 512,
        decoder_depth: int = 4,
        decoder_heads: int = 16,
        out_channels: int = 256,
        fpn_norm: str = "syncbn",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if backbone_kind(encoder) != "mimdet":
            raise ValueError(
                f"MIMDetBackbone needs a flat token encoder that encodes a sample of its tokens "
                f"(PatchTokenEncoder with supports_token_drop); {type(encoder).__name__} is not one"
            )
        dim = encoder.num_features
        self.stem = ConvStem(dim)
        self.encoder_input = PartialInputEncoder(encoder)
        self.decoder = MIMDetDecoder(dim, decoder_dim, decoder_depth, decoder_heads, encoder.patch_grid)
        self.fpn = _fpn([dim // 4, dim // 2, decoder_dim, decoder_dim], out_channels, fpn_norm)
        self.out_channels = out_channels
        for part in (encoder, self.decoder):
            for module in part.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = layer_norm_eps

    @property
    def encoder(self) -> nn.Module:
        """The ViT (registered once, under ``encoder_input``): what exports and checkpoint loading see."""
        return self.encoder_input.encoder

    def resize_tables(self, grid: tuple[int, int]) -> None:
        """Resample the encoder's and the decoder's position tables once to ``grid``, after the pretrained ones
        loaded: MIMDet's tables are on the grid of its 800 px image (50x50), each batch's grid resized from there."""
        self.encoder_input.resize_table(grid)
        self.decoder.resize_table(grid)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of the ConvStem stages, the ViT blocks and the decoder blocks in the backward
        pass instead of keeping them (the original's memory saving; the same numbers, more compute)."""
        self.stem.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def forward(
        self, images: torch.Tensor, image_sizes: list[tuple[int, int]], ratio: float = 1.0, generators: PerImage = None
    ) -> OrderedDict[str, torch.Tensor]:
        """images (B, 3, H, W) padded to a multiple of 32, image_sizes the real (h, w) -> FPN levels.

        The encoder sees ``ratio`` of the stride-16 tokens (1.0: all, as MIMDet evaluates), each image's sample
        drawn from its own generator when ``generators`` are given (else from the global one).
        """
        height, width = images.shape[-2:]
        if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
            raise ValueError(
                f"MIMDetBackbone needs inputs padded to a multiple of {SIZE_DIVISOR}, got {height}x{width}"
            )
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {images.shape[0]} images")
        c2, c3, tokens = self.stem(images)
        valid = valid_token_mask(image_sizes, tuple(tokens.shape[-2:]), images.device)
        latent, ids_keep = self.encoder_input(tokens, valid, ratio, generators)
        c4 = self.decoder(latent, ids_keep, tokens)
        c5 = F.max_pool2d(c4, 2)  # MIMDet's parameter-free C5; the grid is even, so no rounding choice arises
        return self.fpn(OrderedDict([("0", c2), ("1", c3), ("2", c4), ("3", c5)]))


class HierarchicalBackbone(nn.Module):
    """A pyramid encoder's four stage maps (strides 4..32) -> the same FPN, as the Pale paper's Mask R-CNN.

    Such encoders (Pale) cannot drop tokens, so every image is seen whole (``ratio`` 1.0); ``image_sizes`` and
    ``generators`` are unused.
    The encoder's final norm and classifier are pruned (timm's ``features_only`` way) and its mask token
    frozen: detection never uses them, and DDP must not meet parameters without gradients.
    """

    def __init__(self, encoder: nn.Module, out_channels: int = 256, fpn_norm: str = "") -> None:
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
        self.fpn = _fpn([level["num_chs"] for level in info], out_channels, fpn_norm)
        self.out_channels = out_channels

    def forward(
        self, images: torch.Tensor, image_sizes: list[tuple[int, int]], ratio: float = 1.0, generators: PerImage = None
    ) -> OrderedDict[str, torch.Tensor]:
        if ratio != 1.0:
            raise ValueError(
                f"{type(self.encoder).__name__} samples no tokens: the sample ratio must be 1.0, got {ratio}"
            )
        maps = self.encoder.forward_intermediates(images, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), level) for i, level in enumerate(maps)))


# ---- builders --------------------------------------------------------------------------------------------------
def backbone_kind(encoder: nn.Module, backbone: str = "mimdet") -> str | None:
    """The backbone ``encoder`` feeds when ``backbone`` (``objective.backbone``) is asked; None: it cannot.

    ``"pyramid"`` for four-stage encoders (Pale) under ``"mimdet"``, the default, which they answer with their own
    stages; ``"mimdet"`` for token encoders that can drop tokens (plain ViT); ``"plain"`` (ViTDet) for any flat
    token encoder (ViT, BEiT).
    """
    if backbone == "plain":
        return "plain" if isinstance(encoder, PatchTokenEncoder) else None
    if isinstance(encoder, PatchTokenEncoder) and encoder.supports_token_drop:
        return "mimdet"
    strides = [level.get("reduction") for level in getattr(encoder, "feature_info", [])]
    if hasattr(encoder, "forward_intermediates") and strides == PYRAMID_STRIDES:
        return "pyramid"
    return None


def build_backbone(
    encoder: nn.Module, backbone: str = "mimdet", **kwargs: Any
) -> MIMDetBackbone | HierarchicalBackbone | PlainBackbone:
    """MIMDet for encoders that can drop tokens (plain ViT), the hierarchical FPN for pyramid encoders (Pale);
    ViTDet's simple feature pyramid for any flat token encoder when ``backbone="plain"``.

    ``kwargs`` go to the chosen backbone (MIMDet's decoder settings, ``out_channels``).
    """
    if backbone == "plain":
        return PlainBackbone(encoder, PYRAMID_STRIDES, **kwargs)  # it refuses what is no flat token encoder
    kind = backbone_kind(encoder)
    if kind is None:
        raise ValueError(
            f"{type(encoder).__name__} can be a detection backbone neither by token drop (supports_token_drop) "
            f"nor as a pyramid (forward_intermediates with stages at strides {PYRAMID_STRIDES})"
        )
    return MIMDetBackbone(encoder, **kwargs) if kind == "mimdet" else HierarchicalBackbone(encoder, **kwargs)
