"""Weighted kNN classification on frozen features: the protocol of docs/protocols.md and the online monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from src.config import ConfigError


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module, loader: DataLoader, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) L2-normalised pooled features and (N,) labels, in loader order."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in loader:
        feats.append(F.normalize(encoder.forward_pooled(batch["image"].to(device)).float(), dim=1).cpu())
        labels.append(batch["label"].cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, num_classes): the k most cosine-similar bank items vote with exp(sim / T).

    Features must be L2-normalised already, so a dot product is the cosine similarity. Each query's votes are
    scaled by exp(-max sim / T), which ranks its classes alike and keeps a small T finite: exp(1 / 0.01)
    overflows float32, and votes that are all inf tie every class. The bank must hold at least k items
    (``check_bank``).
    """
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(top_idx.shape[0], num_classes, dtype=sim.dtype)
        weights = ((top_sim - top_sim[:, :1]).double() / temperature).exp()  # float64: T below float32's range
        votes.scatter_add_(1, bank_labels[top_idx], weights.to(votes.dtype))
        scores.append(votes)
    return torch.cat(scores)


def check_bank(k: int, bank_size: int, key: str) -> None:
    """A vote of k neighbours needs k of them: a smaller bank would quietly let fewer vote than the config says."""
    if k > bank_size:
        raise ConfigError(
            f"{key}={k} is more neighbours than the kNN bank holds ({bank_size} images): use {key}<={bank_size} "
            "or a larger dataset.knn_bank"
        )


def check_configured_bank(k: int, dataset: DictConfig, key: str) -> None:
    """``check_bank`` before any work, where ``dataset.knn_bank`` gives a count (null: all, counted once read)."""
    bank = dataset.get("knn_bank")
    if isinstance(bank, int):
        check_bank(k, bank, key)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> int:
    """Rows whose true label is among the k best-scored classes: a count, so that ranks can add theirs up."""
    k = min(k, scores.shape[1])
    return int((scores.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1).sum())


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose true label is among the k best-scored classes."""
    return topk_hits(scores, labels, k) / len(labels)


class RawPixels(nn.Module):
    """The normalised pixels as features: the baseline an encoder's kNN is read against."""

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def knn_accuracy(
    encoder: nn.Module, loaders: tuple[DataLoader, DataLoader], num_classes: int, k: int, temperature: float, device
) -> tuple[float, float]:
    """(top-1, top-5) of weighted kNN with the bank loader's features voting for the query loader's images."""
    bank, bank_labels = extract_features(encoder, loaders[0], device)
    queries, query_labels = extract_features(encoder, loaders[1], device)
    scores = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return topk_accuracy(scores, query_labels, 1), topk_accuracy(scores, query_labels, 5)
