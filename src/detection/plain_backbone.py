"""ViTDet's plain backbone for torchvision's Mask R-CNN: one encoder map, a simple feature pyramid, no decoder.

Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection" (arXiv 2203.16527): the last
map of a plain ViT (stride 16) becomes the pyramid by itself: stride 4 by two 2x deconvolutions (LayerNorm + GELU
between), stride 8 by one, stride 16 as it is, stride 32 by 2x2 max pooling; each level then a 1x1 and a 3x3
conv, each followed by a LayerNorm over channels; P6 by max-pooling P5. No FPN top-down path.

Why it is here beside MIMDet: MIMDet's backbone needs an MAE decoder to fill its token grid back in, so only an
MAE start meets it whole; this one needs nothing but the encoder, so MAE, BEiT, DeiT and random starts meet the
same detector on equal terms (docs/detection.md).

The encoder is reached through the flat-token contract only (``patch_embed``, ``patch_grid``, ``grid_size``,
``encode_tokens``, ``token_parameters``). It runs on one fixed square canvas, the size it was built at, as ViTDet
pads every image to 1024 x 1024: BEiT's relative position bias is defined on its built grid alone (its
``encode_tokens`` refuses any other), and one canvas for every family keeps the comparison equal. Each batch is
padded to the canvas at the bottom and right (where torchvision pads too), encoded whole with the prefix tokens
every encoder was pretrained with, and the patch-token map cropped back to the batch before the pyramid.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from src.encoders.base import PatchTokenEncoder

__all__ = ["PlainBackbone", "SimpleFeaturePyramid"]


def rescale_layers(channels: int, stride: int, target: int) -> tuple[list[nn.Module], int]:
    """The layers taking a ``stride`` map of ``channels`` to ``target`` stride, and the channels they leave.

    Finer: one 2x deconvolution per octave, each halving the channels, LayerNorm + GELU between them (ViTDet's
    4x: 768 -> 384 -> 192 on ViT-B); the same stride: nothing; coarser: one max pool over the whole factor.
    """
    factor = max(stride, target) // min(stride, target)
    if max(stride, target) % min(stride, target) or factor & (factor - 1):
        raise ValueError(f"a stride-{stride} map cannot become a stride-{target} level: the ratio is no power of 2")
    if target >= stride:
        return ([nn.MaxPool2d(factor)] if factor > 1 else []), channels
    octaves = int(math.log2(factor))
    if channels % 2**octaves:
        raise ValueError(f"{channels} channels cannot be halved {octaves} times for the stride-{target} level")
    layers: list[nn.Module] = []
    for octave in range(octaves):
        if octave:
            layers += [LayerNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
        channels //= 2
    return layers, channels


class SimpleFeaturePyramid(nn.Module):
    """One stride-``stride`` map of ``channels`` -> ``{"0": ..., "3": ..., "pool": ...}``, ``out_channels`` each.

    Level i is at ``strides[i]``; "pool" is the last level max-pooled with stride 2 (kernel 1, as torchvision's
    and detectron2's ``LastLevelMaxPool``), the P6 that only the RPN reads.
    """

    def __init__(self, channels: int, stride: int, strides: Sequence[int], out_channels: int) -> None:
        super().__init__()
        levels = []
        for target in strides:
            layers, width = rescale_layers(channels, stride, target)
            layers += [
                nn.Conv2d(width, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            levels.append(nn.Sequential(*layers))
        self.levels = nn.ModuleList(levels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # as the FPN's convs (detectron2's c2_xavier_fill, torchvision's)
                nn.init.kaiming_uniform_(module.weight, a=1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))
        maps["pool"] = F.max_pool2d(maps[str(len(self.levels) - 1)], kernel_size=1, stride=2)
        return maps


class PlainBackbone(nn.Module):
    """A flat token encoder on its fixed canvas -> its patch-token map -> ``SimpleFeaturePyramid`` (ViTDet).

    Submodules ``encoder`` and ``pyramid``: the detection method's lr groups are the encoder and everything else.
    What the encoding path does not run (mask token, classifier parts) is frozen, so DDP meets no trainable
    parameter without a gradient. The whole input is always encoded: ``ratio`` must be 1.0 (MIMDet's partial
    input needs its decoder to fill the dropped tokens back in; docs/detection.md).
    """

    def __init__(self, encoder: PatchTokenEncoder, strides: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        if not isinstance(encoder, PatchTokenEncoder):
            raise ValueError(
                f"PlainBackbone needs a flat token encoder (PatchTokenEncoder: ViT, BEiT); {type(encoder).__name__} "
                "is not one"
            )
        self.encoder = encoder
        self.pyramid = SimpleFeaturePyramid(encoder.num_features, encoder.patch_size, strides, out_channels)
        self.out_channels = out_channels
        self.canvas = tuple(cells * encoder.patch_size for cells in encoder.patch_grid)
        self.size_divisor = max(strides)  # the coarsest level must tile every input
        if any(side % self.size_divisor for side in self.canvas):
            raise ValueError(
                f"the encoder's {self.canvas[0]}x{self.canvas[1]} canvas is not a multiple of the coarsest "
                f"stride {self.size_divisor}"
            )
        used = {id(p) for p in (*encoder.patch_embed.parameters(), *encoder.token_parameters(prefix=True))}
        for param in encoder.parameters():
            if id(param) not in used:
                param.requires_grad_(False)

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        ratio: float = 1.0,
        generators: list[torch.Generator] | None = None,
    ) -> OrderedDict[str, torch.Tensor]:
        """images (B, 3, H, W), padded to a multiple of the coarsest stride and no larger than the canvas -> levels.

        ``image_sizes`` and ``generators`` are unused: every token is encoded, padding included (as ViTDet).
        """
        if ratio != 1.0:
            raise ValueError(f"PlainBackbone samples no tokens: the sample ratio must be 1.0, got {ratio}")
        height, width = images.shape[-2:]
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(
                f"PlainBackbone needs inputs padded to a multiple of {self.size_divisor}, got {height}x{width}"
            )
        if height > self.canvas[0] or width > self.canvas[1]:
            raise ValueError(
                f"a {height}x{width} batch does not fit the encoder's {self.canvas[0]}x{self.canvas[1]} canvas"
            )
        encoder = self.encoder
        canvas = F.pad(images, (0, self.canvas[1] - width, 0, self.canvas[0] - height))
        tokens = encoder.encode_tokens(encoder.patch_embed(canvas), encoder.patch_grid)[:, encoder.num_prefix_tokens :]
        rows, cols = encoder.patch_grid
        grid = tokens.transpose(1, 2).reshape(len(images), -1, rows, cols)
        kept_rows, kept_cols = encoder.grid_size((height, width))
        return self.pyramid(grid[:, :, :kept_rows, :kept_cols])
