"""The label-free statistics on embeddings whose answer is known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from src.evaluation.label_free import rankme, spectrum_decay


def test_rankme_counts_the_directions_the_embeddings_use() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g)).Q
    equal = torch.eye(16) @ basis[:16] * 3.0  # 16 orthogonal rows of equal length: rank 16 exactly
    assert rankme(equal) == pytest.approx(16.0, rel=1e-5)
    collapsed = torch.randn(200, 1, generator=g) @ torch.randn(1, 64, generator=g)  # every image on one line
    assert rankme(collapsed) == pytest.approx(1.0, abs=1e-3)
    spread = torch.randn(2000, 64, generator=g)
    assert 55 < rankme(spread) <= 64


def test_spectrum_decay_recovers_the_exponent_of_a_power_law() -> None:
    g = torch.Generator().manual_seed(1)
    dims = 32
    for alpha in (0.5, 1.0, 2.0):
        scales = torch.arange(1, dims + 1, dtype=torch.float64).pow(-alpha / 2)  # variance i^-alpha
        rotation = torch.linalg.qr(torch.randn(dims, dims, generator=g, dtype=torch.float64)).Q
        features = torch.randn(20000, dims, generator=g, dtype=torch.float64) * scales @ rotation
        assert spectrum_decay(features) == pytest.approx(alpha, abs=0.05)
    assert math.isinf(spectrum_decay(torch.randn(100, 1, generator=g) @ torch.randn(1, 8, generator=g)))
