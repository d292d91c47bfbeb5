"""Target grids finer than the encoder's output grid, shared by the objectives.

An objective predicts one target (pixels, a visual token) per ``target_patch`` cell. When the
encoder's output stride is a multiple r of it (Pale: stride 32, targets of 16 px, r = 2), each
output token predicts the r x r targets it covers: its head emits r * r * C values, unfolded
here into row-major target order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from src.config import ConfigError
from src.encoders.base import MaskedEncoder
from src.methods.base import encoder_from_config


@dataclass(frozen=True)
class TargetLayout:
    target_patch: int  # pixels per target cell side
    sub: int  # target cells per output token side
    out_grid: tuple[int, int]  # encoder output tokens (rows, cols)
    target_grid: tuple[int, int]  # target cells (rows, cols)

    @property
    def num_targets(self) -> int:
        return self.target_grid[0] * self.target_grid[1]


def target_layout(encoder: MaskedEncoder, img_size: int, target_patch: int | None) -> TargetLayout:
    """Layout of ``target_patch`` cells (None = the encoder's patch) over the encoder's output grid."""
    target_patch = target_patch or encoder.patch_size
    if encoder.patch_size % target_patch:
        raise ValueError(
            f"objective.target_patch={target_patch} must divide the encoder's patch size {encoder.patch_size}"
        )
    sub = encoder.patch_size // target_patch
    out_grid = encoder.grid_size(img_size)
    return TargetLayout(target_patch, sub, out_grid, (out_grid[0] * sub, out_grid[1] * sub))


def tokens_to_target_grid(pred: torch.Tensor, out_grid: tuple[int, int], sub: int) -> torch.Tensor:
    """(B, out_h*out_w, r*r*C) -> (B, (out_h*r)*(out_w*r), C) in row-major target order."""
    if sub == 1:
        return pred
    b, (h, w) = pred.shape[0], out_grid
    pred = pred.reshape(b, h, w, sub, sub, -1).permute(0, 1, 3, 2, 4, 5)
    return pred.reshape(b, h * sub * w * sub, -1)


def check_target_grid(cfg: DictConfig) -> TargetLayout:
    """The run's target layout, or a ConfigError naming ``dataset.img_size`` or ``objective.target_patch``.

    The encoder is built on the meta device: its grids are known without allocating its weights.
    """
    img = cfg.dataset.img_size
    with torch.device("meta"):
        encoder = encoder_from_config(cfg)
    try:
        return target_layout(encoder, img, cfg.objective.get("target_patch"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
