"""The one interface BEiT uses: images in [0, 1] -> token ids on a grid ``downsample`` times coarser."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn


class VisualTokenizer(nn.Module):
    """A frozen image -> discrete token map. Subclasses set ``vocab_size``, ``downsample``, ``img_size``.

    ``img_size`` is the resolution it was trained at; any multiple of ``downsample`` works, and BEiT
    feeds it the crop resized to (its target grid) x ``downsample`` so tokens align with patches.
    """

    vocab_size: int
    downsample: int  # pixels per token side
    img_size: int

    @abstractmethod
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, vocab, H/d, W/d) scores (higher = more likely)."""

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, H/d, W/d) long token ids: the argmax of the scores."""
        return self.logits(images).argmax(dim=1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, h, w) ids -> (B, 3, h*d, w*d) images in [0, 1]; None for a tokenizer without a decoder."""
        return None

    def spec(self) -> dict[str, Any]:
        """What ``load_tokenizer`` needs besides the weights (written beside them as JSON)."""
        return {"vocab_size": self.vocab_size, "downsample": self.downsample, "img_size": self.img_size}


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Perplexity (exp of the code entropy; = vocab size when uniform), dead and used codes from counts."""
    total = counts.sum()
    p = counts.double() / total.clamp(min=1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum()
    dead = int((counts == 0).sum())
    return {
        "perplexity": float(entropy.exp()),
        "dead_codes": float(dead),
        "used_fraction": float(1 - dead / counts.numel()),
    }
