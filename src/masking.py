"""Mask generators shared by the objectives: MAE's per-sample random masking lives here."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RandomMask:
    """Result of MAE masking for a batch of B samples over L patches."""

    ids_keep: torch.Tensor  # (B, K) indices of kept patches, in shuffled order
    ids_restore: torch.Tensor  # (B, L) argsort of the shuffle: puts [kept, removed] back in grid order
    mask: torch.Tensor  # (B, L) float, 1 = removed, in grid order


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """MAE keeps int(L * (1 - r)) patches (49 of 196 at r = 0.75)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
) -> RandomMask:
    """MAE masking: argsort uniform noise per sample; the smallest ``keep`` are kept.

    ``noise`` (B, L) may be given to fix the mask (tests, paired comparisons).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    elif noise.shape != (batch, num_patches):
        raise ValueError(f"noise must have shape {(batch, num_patches)}, got {tuple(noise.shape)}")
    keep = num_kept(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return RandomMask(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)
