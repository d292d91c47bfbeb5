"""A light transformer decoder over a token grid: MAE's decoder stack, shared by MAE and MIMDet's detection decoder.

The stack is an embedding to the decoder width, a fixed 2-D sin-cos table (a zero cls row first, as MAE's),
timm blocks and a final norm. ``TokenGridDecoder`` registers these parts on the module that uses it, under the
official MAE names (``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``), so MAE's
Lightning checkpoints, the official full MAE checkpoint and MIMDet's decoder all share one layout. Each user
initialises the parts itself, in its own (the official code's) order of random draws.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from src.encoders.pos_embed import interpolate_pos_embed, resize_table, sincos_2d


def decoder_block(dim: int, heads: int) -> Block:
    """One MAE decoder block: timm's ``Block`` with MLP ratio 4 and qkv bias."""
    return Block(dim, heads, mlp_ratio=4.0, qkv_bias=True)


class TokenGridDecoder(nn.Module):
    """Mixin of a module with MAE's decoder stack as its own attributes (their names are checkpoint keys)."""

    decoder_grid: tuple[int, int]
    decoder_embed: nn.Linear
    decoder_pos_embed: nn.Parameter
    decoder_blocks: nn.ModuleList
    decoder_norm: nn.LayerNorm
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass (MIMDet's switch)

    def build_decoder(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        heads: int,
        grid: tuple[int, int],
        fill: tuple[str, nn.Module | nn.Parameter],
    ) -> None:
        """Register the stack, its sin-cos table on ``grid``, in the official order.

        ``fill`` (name, part) stands in for the tokens the encoder did not see (MAE's mask token, MIMDet's
        projection of the stem tokens); it is registered right after the embedding, where both codes have it.
        """
        self.decoder_grid = tuple(grid)
        self.decoder_embed = nn.Linear(in_dim, dim)
        setattr(self, *fill)
        table = sincos_2d(dim, self.decoder_grid, num_prefix_tokens=1)
        self.decoder_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([decoder_block(dim, heads) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)

    def decode(self, x: torch.Tensor, grid: tuple[int, int], prefix: int = 0) -> torch.Tensor:
        """(B, prefix + h*w, dim) embedded tokens in grid order -> positions added, blocks, final norm.

        ``prefix`` (0 or 1: MAE's cls slot) tokens take the table's zero row, on the table's own grid; without
        one, the patch rows are resized to ``grid`` (bicubic; the table itself on its own grid).
        """
        if prefix:
            if prefix != 1 or tuple(grid) != self.decoder_grid:
                raise ValueError(
                    f"the decoder's table holds one prefix row on its {self.decoder_grid} grid: "
                    f"cannot place {prefix} prefix tokens on a {tuple(grid)} grid"
                )
            pos = self.decoder_pos_embed
        else:
            pos = interpolate_pos_embed(self.decoder_pos_embed[:, 1:], self.decoder_grid, grid)
        x = x + pos.to(x.dtype)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.decoder_blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.decoder_norm(x)

    def resize_table(self, grid: tuple[int, int]) -> None:
        """Resample ``decoder_pos_embed`` once to ``grid`` (bicubic, prefix row kept); ``decode`` resizes from there.

        MIMDet builds its decoder for an 800 px image: the MAE table is resized to that 50x50 grid at load, then
        to each batch's grid on every forward. Two bicubic steps do not equal one, and released MIMDet weights
        hold the 50x50 table.
        """
        table = resize_table(self.decoder_pos_embed.detach(), self.decoder_grid, grid, prefix=1)
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
        self.decoder_grid = tuple(grid)
