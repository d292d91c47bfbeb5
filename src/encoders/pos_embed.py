"""Fixed 2-D sine-cosine position embeddings, laid out as the official MAE code lays them out, and their resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim): [sin | cos] with omega_i = 1 / 10000^(i / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """(prefix + h*w, dim) table; the first dim/2 channels encode the column index.

    The official MAE code builds its grid from meshgrid(w, h) and feeds the first plane (the
    column index) to the first half; keeping that order keeps official checkpoints compatible.
    Prefix (cls) rows are zero.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def interpolate_pos_embed(table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """(1, h0*w0, C) patch rows -> (1, h*w, C), bicubic (align_corners=False), as MIMDet resizes online.

    Detection grids follow each batch's padded size and are rarely square, so a table is resampled per
    forward. The same grid returns ``table`` itself (no op at all).
    """
    (h0, w0), (h, w) = tuple(src_grid), tuple(dst_grid)
    if table.shape[1] != h0 * w0:
        raise ValueError(f"position table of shape {tuple(table.shape)} does not hold a {h0}x{w0} grid")
    if (h0, w0) == (h, w):
        return table
    grid = table.float().reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(table.dtype)


def resize_table(
    table: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], prefix: int
) -> torch.Tensor:
    """(1, prefix + h0*w0, C) whole table -> (1, prefix + h*w, C): the patch rows resized as ``interpolate_pos_embed``
    does, the ``prefix`` (cls) rows kept as they are. MIMDet resizes MAE's tables this way once, at load."""
    rows = interpolate_pos_embed(table[:, prefix:], src_grid, dst_grid)
    return torch.cat([table[:, :prefix], rows], dim=1)
