"""A plain MAE (He et al. 2021) written from the paper alone: the baseline the ``peers`` section times ours against.

It uses nothing of the toolkit, so the ratio says what the toolkit's MAE step costs or saves over the
straightforward one a reader of the paper would write: patches flattened by reshapes and embedded by a linear
layer, per-sample random masking (argsort of uniform noise, the first int(L (1 - r)) patches of the shuffle
kept), a ViT encoder on the visible patches only, a light decoder (8 blocks, 512 wide) over visible tokens and
mask tokens put back in place, fixed 2-D sine-cosine position embeddings, and the MSE of per-patch normalised
pixels on removed patches. Attention is written out, softmax(q k^T / sqrt(d)) v, with no fused kernel: the
attention matrices are materialised and kept for backward, as in the paper's era of code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from src.benchmarks.core import optimizer_step


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch * patch * C): patches in row-major order, each flattened (row, col, channel)."""
    b, c, h, w = images.shape
    grid = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return grid.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_masking(batch: int, length: int, ratio: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(kept indices (B, K), indices restoring grid order (B, L), mask (B, L) with 1 = removed); K = int(L (1 - r))."""
    kept = int(length * (1 - ratio))
    shuffle = torch.rand(batch, length, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :kept] = 0
    return shuffle[:, :kept], restore, mask.gather(1, restore)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dimensions, unfused."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v


def sincos_table(dim: int, side: int) -> torch.Tensor:
    """(side * side, dim) fixed embeddings: sin and cos of the column, then of the row, at dim / 4 frequencies each."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    angles = [axis.flatten()[:, None].float() * freqs for axis in (cols, rows)]
    return torch.cat([fn(a) for a in angles for fn in (torch.sin, torch.cos)], dim=1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


class PlainMAE(nn.Module):
    """Encoder (``dim`` wide, ``depth`` blocks) on visible patches, decoder on all; ``forward`` returns the loss."""

    def __init__(
        self,
        img_size: int,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.patch_size, self.mask_ratio = patch_size, mask_ratio
        side = img_size // patch_size
        self.patch_embed = nn.Linear(patch_size * patch_size * 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_table(dim, side)[None])
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_table(decoder_dim, side)[None])
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images, self.patch_size)
        b, length, _ = patches.shape
        kept, restore, mask = random_masking(b, length, self.mask_ratio, images.device)
        x = self.patch_embed(patches) + self.pos_embed
        x = x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
        x = self.norm(self.blocks(torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)))
        x = self.decoder_embed(x)
        visible = x[:, 1:]
        tokens = torch.cat([visible, self.mask_token.expand(b, length - visible.shape[1], -1)], dim=1)
        tokens = tokens.gather(1, restore[..., None].expand(-1, -1, tokens.shape[-1])) + self.decoder_pos_embed
        x = self.decoder_blocks(torch.cat([x[:, :1], tokens], dim=1))
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:].float()
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        per_patch = (pred - (patches - mean) / (var + 1e-6).sqrt()).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


def plain_mae_step(sizes: dict[str, int], batch: int, img_size: int, device: torch.device) -> Callable[[], None]:
    """Its training step on random images: loss, backward, AdamW (``sizes``: PlainMAE's encoder keyword arguments)."""
    model = PlainMAE(img_size, **sizes).to(device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    return optimizer_step(lambda: model(images), model.parameters(), mixed=True)
