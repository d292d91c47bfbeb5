"""Weighted kNN (docs/protocols.md protocol) against an explicit per-query computation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from src.evaluation.knn import knn_predict, topk_accuracy


def test_knn_votes_match_an_explicit_loop():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(50, 8), dim=1)
    bank_labels = torch.randint(0, 4, (50,))
    queries = F.normalize(torch.randn(7, 8), dim=1)
    scores = knn_predict(bank, bank_labels, queries, num_classes=4, k=5, temperature=0.07, chunk=3)
    for q in range(7):
        sims = [(float(queries[q] @ bank[i]), int(bank_labels[i])) for i in range(50)]
        expected = [0.0] * 4
        top = max(sims)[0]  # every vote scaled by exp(-top / T): the same ranking, and finite for a small T
        for sim, label in sorted(sims, reverse=True)[:5]:
            expected[label] += math.exp((sim - top) / 0.07)
        torch.testing.assert_close(scores[q], torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4]])
    labels = torch.tensor([1, 2, 0])
    assert abs(topk_accuracy(scores, labels, 1) - 1 / 3) < 1e-6
    assert topk_accuracy(scores, labels, 2) == 1.0
