"""Online kNN top-1 on a labelled split during pretraining: shows whether the encoder is learning."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from src.knn import knn_accuracy


class KNNMonitor(L.Callback):
    """Every ``every_n_epochs`` (and before the first epoch), kNN top-1/top-5 of the pooled encoder features."""

    def __init__(self, every_n_epochs: int = 1, k: int = 20, temperature: float = 0.07) -> None:
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0 and trainer.global_step == 0:
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_epoch = trainer.current_epoch + 1 == trainer.max_epochs
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last_epoch:
            self._evaluate(trainer, pl_module)

    @rank_zero_only
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.datamodule.knn_dataloaders()
        if loaders is None:
            return
        top1, top5 = knn_accuracy(
            pl_module.encoder, loaders, trainer.datamodule.num_classes, self.k, self.temperature, pl_module.device
        )
        self.last = {"knn/top1": top1, "knn/top5": top5}
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=trainer.global_step)
        rank_zero_info(f"kNN at step {trainer.global_step}: top-1 {self.last['knn/top1']:.4f}")
