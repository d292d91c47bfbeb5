"""A VQ-VAE tokenizer users train on their own images (``python -m src.train_tokenizer``).

Patch encoder (residual conv blocks on the token grid) -> nearest codebook vector -> decoder. The
codebook is learnt by exponential moving averages of the vectors assigned to each code (no
gradient), initialised from the first batch, and codes unused for a while are restarted from
random encoder outputs: both keep the codebook in use. The encoder gets the straight-through
gradient plus a commitment term. Images are [0, 1]; the loss is the pixel MSE in that range.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.tokenizers.base import VisualTokenizer


def _all_reduce(*tensors: torch.Tensor) -> None:
    """Sum codebook statistics over data-parallel ranks, so every rank keeps the same codebook."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t)


def _broadcast(*tensors: torch.Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.broadcast(t, src=0)


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VQTokenizer(VisualTokenizer):
    def __init__(
        self,
        vocab_size: int = 512,
        downsample: int = 8,
        img_size: int = 32,
        hidden: int = 128,
        code_dim: int = 32,
        res_blocks: int = 2,
        commitment: float = 0.25,
        ema_decay: float = 0.99,
        restart_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.check_sizes(vocab_size, downsample, img_size)
        self.vocab_size, self.downsample, self.img_size = vocab_size, downsample, img_size
        self.arch = dict(hidden=hidden, code_dim=code_dim, res_blocks=res_blocks)
        self.commitment, self.ema_decay, self.restart_threshold = commitment, ema_decay, restart_threshold

        # Patches in and out (a kernel = stride = downsample convolution each way), residual blocks on
        # the token grid: matmul-shaped work, which CPUs do far faster than full-resolution convs.
        self.encoder = nn.Sequential(
            nn.Conv2d(3, hidden, downsample, stride=downsample),
            *[ResBlock(hidden) for _ in range(res_blocks)],
            nn.ReLU(),
            nn.Conv2d(hidden, code_dim, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, hidden, 3, padding=1),
            *[ResBlock(hidden) for _ in range(res_blocks)],
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, 3, downsample, stride=downsample),
        )

        self.register_buffer("codebook", torch.randn(vocab_size, code_dim))
        self.register_buffer("ema_count", torch.ones(vocab_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def check_sizes(vocab_size: int, downsample: int, img_size: int) -> None:
        """The sizes a tokenizer must have, checked before one is built (also for a spec read from disk)."""
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if img_size % downsample:
            raise ValueError(f"img_size={img_size} must be a multiple of downsample={downsample}")

    def spec(self) -> dict[str, Any]:
        return {
            **super().spec(),
            **self.arch,
            "commitment": self.commitment,
            "ema_decay": self.ema_decay,
            "restart_threshold": self.restart_threshold,
        }

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, code_dim, H/d, W/d) continuous codes."""
        return self.encoder(images * 2 - 1)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) codes -> (B, vocab, h, w) squared distances to every codebook vector."""
        flat = z.permute(0, 2, 3, 1)
        d = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(-1)
        return d.permute(0, 3, 1, 2)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return -self.distances(self.encode(images).float())

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> (B, code_dim, h, w) codebook vectors."""
        return F.embedding(tokens, self.codebook).permute(0, 3, 1, 2)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.decoder(self.lookup(tokens)) + 1) / 2

    # ---- training ------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction through the quantiser with a straight-through gradient (no codebook update)."""
        z = self.encode(images).float()
        tokens = self.distances(z.detach()).argmin(dim=1)
        quantized = self.lookup(tokens)
        commit = F.mse_loss(z, quantized)
        recon = (self.decoder(z + (quantized - z).detach()) + 1) / 2
        rec_loss = F.mse_loss(recon, images)
        return {
            "loss": rec_loss + self.commitment * commit,
            "recon_loss": rec_loss,
            "commit_loss": commit,
            "recon": recon,
            "tokens": tokens,
            "z": z,
        }

    @torch.no_grad()
    def update_codebook(self, z: torch.Tensor, tokens: torch.Tensor) -> int:
        """One EMA step towards the mean of the vectors assigned to each code; returns codes restarted."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        ids = tokens.reshape(-1)
        if not bool(self.initialized):  # every code from this batch, counted as a uniform share of it
            vectors = torch.tensor(float(flat.shape[0]), device=flat.device)
            _all_reduce(vectors)
            self._restart(
                torch.arange(self.vocab_size, device=flat.device), flat, count=float(vectors) / self.vocab_size
            )
            self.initialized.fill_(True)
            return self.vocab_size
        counts = torch.bincount(ids, minlength=self.vocab_size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, flat)
        _all_reduce(counts, sums)
        self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + self.vocab_size * 1e-5) * total  # Laplace: no division by 0
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        uniform = total / self.vocab_size
        dead = (self.ema_count < self.restart_threshold * uniform).nonzero().flatten()
        if dead.numel():
            self._restart(dead, flat, count=float(uniform))
        return int(dead.numel())

    def _restart(self, codes: torch.Tensor, flat: torch.Tensor, count: float) -> None:
        """Set ``codes`` to random encoder outputs of this batch (rank 0's, on every rank)."""
        picks = torch.randint(flat.shape[0], (codes.numel(),), device=flat.device)
        self.codebook[codes] = flat[picks]
        self.ema_count[codes] = count
        self.ema_sum[codes] = flat[picks] * count
        _broadcast(self.codebook, self.ema_count, self.ema_sum)
