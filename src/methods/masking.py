"""Mask generators shared by the objectives: MAE's per-sample random masking, BEiT's blockwise masking."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from src.data.distributed import current_sample_seed, derived_generator, mix_seed


@dataclass
class RandomMask:
    """Result of MAE masking for a batch of B samples over L patches."""

    ids_keep: torch.Tensor  # (B, K) indices of kept patches, in shuffled order
    ids_restore: torch.Tensor  # (B, L) argsort of the shuffle: puts [kept, removed] back in grid order
    mask: torch.Tensor  # (B, L) float, 1 = removed, in grid order


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """MAE keeps int(L * (1 - r)) patches (49 of 196 at r = 0.75)."""
    return int(num_patches * (1 - mask_ratio))


MASK_NOISE_TAG = 0x4D41  # the masks' own streams in a sample's seed, apart from its augmentation draws
BLOCK_MASK_TAG = 0x424D


def mask_noise(seed: int, num_patches: int) -> dict[str, torch.Tensor]:
    """A sample's MAE noise (L,) from its seed (``SampleExtras``): the batch's ``mask_noise`` for ``random_masking``."""
    return {"mask_noise": torch.rand(num_patches, generator=derived_generator(seed, MASK_NOISE_TAG))}


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


# ---- BEiT blockwise masking -------------------------------------------------------------------
# The paper's setting on its 14 x 14 grid; other grids scale the counts by their area.
BEIT_GRID_PATCHES = 196
BEIT_MASKED_PATCHES = 75
BEIT_MIN_BLOCK = 16


def beit_mask_counts(num_patches: int) -> tuple[int, int]:
    """(target masked count, smallest block area) for a grid of ``num_patches``: 75 and 16 on 14 x 14."""
    target = round(num_patches * BEIT_MASKED_PATCHES / BEIT_GRID_PATCHES)
    min_block = round(num_patches * BEIT_MIN_BLOCK / BEIT_GRID_PATCHES)
    return max(1, target), max(1, min_block)


@dataclass(frozen=True)
class Block:
    """One accepted rectangle of a blockwise mask, in grid cells."""

    top: int
    left: int
    height: int
    width: int
    new: int  # cells it masked that were not masked before


class BlockwiseMaskGenerator:
    """BEiT's blockwise masking on a ``grid`` of patches; True = masked.

    While fewer than ``num_masked`` cells are masked, with ``budget`` = what is left: up to
    ``max_tries`` rectangles are drawn with area ~ U(min_block, budget) and aspect log-uniform in
    [min_aspect, 1 / min_aspect] (h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)),
    h and w strictly smaller than the grid, top/left uniform); the first whose newly masked count
    lies in [1, budget] is kept. If every try fails, masking stops, so the count never exceeds
    ``num_masked``. A budget below ``min_block`` draws areas between the two, as the original does.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        num_masked: int,
        min_block: int = BEIT_MIN_BLOCK,
        min_aspect: float = 0.3,
        max_tries: int = 10,
    ) -> None:
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if not 1 <= num_masked <= self.height * self.width:
            raise ValueError(f"num_masked must be in [1, {self.height * self.width}], got {num_masked}")
        if not 1 <= min_block <= num_masked:
            raise ValueError(f"min_block must be in [1, num_masked={num_masked}], got {min_block}")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.num_masked = num_masked
        self.min_block = min_block
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))
        self.max_tries = max_tries

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> Block | None:
        for _ in range(self.max_tries):
            area = self.min_block + (budget - self.min_block) * rng.random()  # U(min_block, budget), either order
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if h >= self.height or w >= self.width:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            region = mask[top : top + h, left : left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region[...] = True
                return Block(top, left, h, w, new)
        return None

    def sample_blocks(self, rng: np.random.Generator) -> tuple[np.ndarray, list[Block]]:
        """A (height, width) bool mask and the rectangles accepted, in order."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masked:
            block = self._place_block(mask, self.num_masked - count, rng)
            if block is None:
                break
            blocks.append(block)
            count += block.new
        return mask, blocks

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return self.sample_blocks(rng)[0]


class WorkerGenerator:
    """A numpy Generator per sample, or per DataLoader worker (and per rank), deterministic under a seed.

    A sample drawn by ``SeededDataset`` gets a generator from its own seed (the training sampler's samples:
    the mask then depends on the sample alone, not on the world size). Otherwise (streamed shards), in a
    worker it is seeded from torch's per-worker seed: the DataLoader's base seed + worker id
    (the base seed comes from the main process's torch RNG, so ``seed_everything`` fixes it), which
    Lightning's ``seed_everything(workers=True)`` also mixes with the rank. In the main process
    (``num_workers=0``) it is seeded from torch's RNG and the rank on first use. The owner is
    re-checked on every call: a forked worker inherits the parent's object and must not continue
    its stream.
    """

    def __init__(self) -> None:
        self._owner: tuple[int, int | None] | None = None
        self._rng: np.random.Generator | None = None

    def get(self) -> np.random.Generator:
        seed = current_sample_seed()
        if seed is not None:  # drawn by a SeededDataset: the sample's own stream, whatever the world size
            return np.random.default_rng(mix_seed(seed, BLOCK_MASK_TAG))
        info = get_worker_info()
        owner = (os.getpid(), info.seed if info is not None else None)
        if self._rng is None or owner != self._owner:
            if info is not None:
                entropy = [torch.initial_seed()]
            else:
                distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
                rank = torch.distributed.get_rank() if distributed else 0
                entropy = [int(torch.randint(2**63 - 1, ()).item()), rank]
            self._rng = np.random.default_rng(entropy)
            self._owner = owner
        return self._rng
