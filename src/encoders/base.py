"""The masked-input contract every encoder implements so objectives never name a concrete class.

Grids: an encoder's output tokens sit on a grid of ``patch_size`` pixels. Objectives define
masks on their own target grid (``target_patch``); it must tile the encoder's output grid, i.e.
``patch_size % target_patch == 0``. For plain ViT both are 16; for Pale the output stride is 32
and a 16 px target grid is predicted as 2x2 sub-patches per output token.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn


class MaskedEncoder(nn.Module):
    """Interface objectives rely on (in the spirit of lightly's MaskedVisionTransformer)."""

    patch_size: int  # pixels per output token side
    num_features: int  # channels of the output tokens
    num_prefix_tokens: int = 0  # class/distillation tokens before the patch tokens
    supports_token_drop: bool = False  # True only when forward_visible is implemented

    def grid_size(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """Output token grid (rows, cols) for an input of ``img_size`` pixels."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the encoder's patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def forward_visible(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Encode only the patches at ``keep_idx`` (B, K) -> (B, prefix + K, D), final-normed."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop tokens; use forward_mask_token")

    @abstractmethod
    def forward_mask_token(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace masked patches by a learned token and encode the full grid.

        ``mask`` is (B, h, w) bool, True = masked, on any grid whose cells tile the encoder's
        input unit (ViT: exactly its patch grid; Pale: any multiple of its 4 px stem).
        Returns (B, prefix + L, D) final-normed tokens on the output grid (row-major).
        """

    @abstractmethod
    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features for kNN/linear probes: final-normed patch tokens, mean-pooled."""
