"""kNN evaluation of a frozen encoder, as a method that trains nothing: the pipeline validates it once.

The two loaders are the labelled split's bank (training images) and queries (test images), both with the
eval transform. Features are the encoder's ``forward_pooled`` output, L2-normalised; the scores are
``src/evaluation/knn.py``'s weighted vote. With ``objective.pixels`` the normalised pixels themselves are scored
beside the encoder, the baseline every kNN result sits beside (docs/protocols.md).

Over W processes rank r extracts the positions r, r + W, ... of both sets. The bank is all-gathered back into
dataset order, so every rank holds the one-process bank; each rank scores its own queries against it and the
hit counts are summed, so the metrics are the one-process metrics.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset

from src.config import ConfigError
from src.data.datamodule import ImageDataModule
from src.encoders.loading import InitCheckpoint
from src.evaluation.gather import gather_strided
from src.evaluation.knn import check_bank, check_configured_bank, knn_predict, topk_hits
from src.methods.base import TrainingMethod, encoder_from_config
from src.methods.classify import settle_encoder, start_encoder

BANK, QUERIES = 0, 1  # validation dataloader indices


class RankSplitLoaders(L.LightningDataModule):
    """[bank, queries], each rank's share, made inside ``trainer.validate`` once the trainer knows the ranks.

    The pipeline asks for the loaders before the trainer runs, and the rank split reads the trainer's world size
    and rank: Lightning attaches the trainer to a data module before it calls ``val_dataloader``.
    """

    def __init__(self, data: ImageDataModule) -> None:
        super().__init__()
        self.data = data

    def val_dataloader(self) -> list[DataLoader]:
        world = self.trainer.world_size
        self.data.trainer = self.trainer
        if world > 1:  # refused alike on every rank, before any of them waits for the others
            for key, loader in zip(("knn_bank", "knn_queries"), self.data.knn_dataloaders(), strict=True):
                if isinstance(loader.dataset, IterableDataset):
                    raise ConfigError(
                        f"objective=knn over {world} processes needs map-style data: every rank reads all the shards "
                        "(dataset.kind=shards), so run it with trainer.devices=1"
                    )
                if len(loader.dataset) < world:
                    raise ConfigError(
                        f"dataset.{key}={len(loader.dataset)} gives some of the {world} processes nothing to "
                        f"evaluate: use at least {world} images or fewer devices"
                    )
        return list(self.data.knn_dataloaders(rank_split=True))


class KNNEvaluation(TrainingMethod):
    """Collects pooled features of the bank and the queries, then scores the queries once both are seen."""

    fits = False

    def __init__(self, encoder: torch.nn.Module, num_classes: int, k: int, temperature: float, pixels: bool) -> None:
        super().__init__(encoder, {"base_lr": 0.0, "reference_batch": 1, "weight_decay": 0.0}, 1, 0.0)
        self.encoder.requires_grad_(False)
        self.num_classes, self.k, self.temperature, self.pixels = num_classes, k, temperature, pixels
        self.features: dict[str, list[list[torch.Tensor]]] = {}

    @classmethod
    def settle_config(cls, cfg: DictConfig, init: InitCheckpoint) -> DictConfig:
        """The encoder the init checkpoint records (``settle_encoder``)."""
        settled = super().settle_config(cfg, init)
        settle_encoder(settled, init)
        return settled

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        check_configured_bank(cfg.objective.k, cfg.dataset, "objective.k")
        if cfg.dataset.get("num_classes") is None:
            raise ConfigError(f"objective=knn needs dataset.num_classes (dataset={cfg.dataset.name})")
        with torch.device("meta"):
            encoder_from_config(cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> KNNEvaluation:
        encoder = encoder_from_config(cfg)
        report = start_encoder(cfg, init, encoder)
        t = cfg.objective
        module = cls(encoder, int(cfg.dataset.num_classes), t.k, t.temperature, bool(t.pixels))
        module.init_report = report
        return module

    def evaluation_loaders(self, datamodule: ImageDataModule) -> RankSplitLoaders:
        """[bank, queries] of the labelled split, split over the ranks; a config error when there is none."""
        if datamodule.knn_dataloaders() is None:
            raise ConfigError(
                f"objective=knn needs a labelled split (dataset={datamodule.cfg.name}: set its val split)"
            )
        return RankSplitLoaders(datamodule)

    def on_validation_epoch_start(self) -> None:
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
        """Gathers the bank, scores this rank's queries, and logs the hit counts summed over the ranks."""
        world = self.trainer.world_size
        bank_labels = gather_strided(torch.cat(self.labels[BANK]), world).cpu()
        check_bank(self.k, len(bank_labels), "objective.k")  # the bank read, counted alike on every rank
        query_labels = torch.cat(self.labels[QUERIES]).cpu()
        prefixes = {"encoder": "knn/", "pixels": "knn/pixels_"}
        scored = [name for name in prefixes if self.features[name][BANK]]
        counts = [len(query_labels)]
        for name in scored:
            bank = gather_strided(torch.cat(self.features[name][BANK]), world).cpu()
            queries = torch.cat(self.features[name][QUERIES]).cpu()
            scores = knn_predict(bank, bank_labels, queries, self.num_classes, self.k, self.temperature)
            counts += [topk_hits(scores, query_labels, 1), topk_hits(scores, query_labels, 5)]
        total = torch.tensor(counts, device=self.device)
        num_queries, *hits = self.trainer.strategy.reduce(total, reduce_op="sum").tolist()
        metrics = {"knn/bank_size": len(bank_labels), "knn/query_size": num_queries}
        for i, name in enumerate(scored):
            metrics[f"{prefixes[name]}top1"] = hits[2 * i] / num_queries
            metrics[f"{prefixes[name]}top5"] = hits[2 * i + 1] / num_queries
        for key, value in metrics.items():  # equal on every rank: the max over them is the value, exactly
            self.log(key, float(value), sync_dist=True, reduce_fx="max")
        self.features = {}
