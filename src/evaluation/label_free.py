"""Label-free statistics of an encoder's embeddings: what a user without labels can watch while pretraining.

RankMe (Garrido et al., 2023): the effective rank of the (N, D) embedding matrix, exp of the entropy of its
normalised singular values; a collapsed encoder scores near 1, one that spreads its images over every
direction near min(N, D). alpha-ReQ (Agrawal et al., 2022): the power-law exponent of the eigenvalue decay of the
embeddings' covariance, fitted on a log-log scale; a small alpha means a flat spectrum (many directions used).
Both are read from the same fixed bank of images, so their curves are comparable across steps and runs.
"""

from __future__ import annotations

import torch


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``features`` (N, D), between 1 and min(N, D)."""
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum_decay(features: torch.Tensor, top: int | None = None) -> float:
    """alpha of eigenvalue_i ~ i^-alpha over the ``top`` largest eigenvalues of the covariance (all by default)."""
    centred = features.double() - features.double().mean(0)
    eigen = torch.linalg.svdvals(centred).square() / max(features.shape[0] - 1, 1)
    eigen = eigen[: top or eigen.numel()]
    eigen = eigen[eigen > eigen[0] * 1e-12]  # numerically zero directions say nothing about the decay
    if eigen.numel() < 2:
        return float("inf")  # one direction: the steepest decay there is
    log_i = torch.arange(1, eigen.numel() + 1, dtype=torch.float64).log()
    slope = torch.linalg.lstsq(torch.stack([log_i, torch.ones_like(log_i)], 1), eigen.log()[:, None]).solution[0]
    return float(-slope)
