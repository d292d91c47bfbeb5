"""kNN evaluation of a frozen encoder, as a method that trains nothing: the pipeline validates it once.

The two loaders are the labelled split's bank (training images) and queries (test images), both with the
eval transform. Features are the encoder's ``forward_pooled`` output, L2-normalised; the scores are
``src/evaluation/knn.py``'s weighted vote. With ``task.pixels`` the normalised pixels themselves are scored
beside the encoder, the baseline every kNN result sits beside (docs/protocols.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from src.config import ConfigError, check_rules
from src.data.datamodule import ImageDataModule
from src.evaluation.knn import knn_predict, topk_accuracy
from src.methods.base import TrainingMethod, encoder_from_config
from src.methods.classify import resolve_encoder_from_init, start_encoder

BANK, QUERIES = 0, 1  # validation dataloader indices


class KNNEvaluation(TrainingMethod):
    """Collects pooled features of the bank and the queries, then scores the queries once both are seen."""

    config_section = "task"
    fits = False

    def __init__(self, encoder: torch.nn.Module, num_classes: int, k: int, temperature: float, pixels: bool) -> None:
        super().__init__(encoder, {"base_lr": 0.0, "reference_batch": 1, "weight_decay": 0.0}, 1, 0.0)
        self.encoder.requires_grad_(False)
        self.num_classes, self.k, self.temperature, self.pixels = num_classes, k, temperature, pixels
        self.features: dict[str, list[list[torch.Tensor]]] = {}

    @classmethod
    def resolve_config(cls, cfg: DictConfig) -> None:
        resolve_encoder_from_init(cfg)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        check_rules(
            cfg.task,
            "task",
            [
                ("k", lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
                ("temperature", lambda v: v > 0, "must be positive"),
            ],
        )
        if cfg.dataset.get("num_classes") is None:
            raise ConfigError(f"task=knn needs dataset.num_classes (dataset={cfg.dataset.name})")
        with torch.device("meta"):
            encoder_from_config(cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> KNNEvaluation:
        encoder = encoder_from_config(cfg)
        report = start_encoder(cfg, encoder)
        t = cfg.task
        module = cls(encoder, int(cfg.dataset.num_classes), t.k, t.temperature, bool(t.pixels))
        module.init_report = report
        return module

    def evaluation_loaders(self, datamodule: ImageDataModule) -> list:
        """[bank, queries] of the labelled split; a config error when the dataset has none."""
        loaders = datamodule.knn_dataloaders()
        if loaders is None:
            raise ConfigError(f"task=knn needs a labelled split (dataset={datamodule.cfg.name}: set its val split)")
        return list(loaders)

    def on_validation_epoch_start(self) -> None:
        if self.trainer.world_size > 1:
            raise RuntimeError("task=knn runs in one process: set trainer.devices=1")
        self.features = {"encoder": [[], []], "pixels": [[], []]}
        self.labels: list[list[torch.Tensor]] = [[], []]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images = batch["image"]
        with torch.autocast(self.device.type, enabled=False):  # the protocol's features are fp32 on every device
            pooled = self.encoder.forward_pooled(images.float())
        self.features["encoder"][dataloader_idx].append(F.normalize(pooled, dim=1))
        if self.pixels:
            self.features["pixels"][dataloader_idx].append(F.normalize(images.flatten(1).float(), dim=1))
        self.labels[dataloader_idx].append(batch["label"])

    def on_validation_epoch_end(self) -> None:
        bank_labels, query_labels = (torch.cat(labels).cpu() for labels in self.labels)
        metrics: dict[str, Any] = {"knn/bank_size": len(bank_labels), "knn/query_size": len(query_labels)}
        for name, prefix in (("encoder", "knn/"), ("pixels", "knn/pixels_")):
            bank, queries = (torch.cat(feats).cpu() if feats else None for feats in self.features[name])
            if bank is None:
                continue
            scores = knn_predict(bank, bank_labels, queries, self.num_classes, self.k, self.temperature)
            metrics[f"{prefix}top1"] = topk_accuracy(scores, query_labels, 1)
            metrics[f"{prefix}top5"] = topk_accuracy(scores, query_labels, 5)
        for key, value in metrics.items():
            self.log(key, float(value))
        self.features = {}
