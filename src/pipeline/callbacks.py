"""Lightning callbacks the pipeline adds to runs: online kNN monitor, method pictures, confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torchvision.utils import make_grid, save_image

from src.evaluation.confusion import confusion_picture
from src.evaluation.knn import knn_accuracy


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


class PictureLogger(L.Callback):
    """Keeps a fixed batch of training images so pictures are comparable across steps."""

    def __init__(
        self,
        out_dir: Path,
        every_n_steps: int = 100,
        num_images: int = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.mean = torch.tensor(list(mean or [0.0, 0.0, 0.0])).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std or [1.0, 1.0, 1.0])).view(1, 3, 1, 1)
        self._batch: dict[str, torch.Tensor] | None = None
        self.saved: list[Path] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._batch is None:
            self._batch = {k: v[: self.num_images].detach() for k, v in batch.items() if torch.is_tensor(v) and v.ndim}
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.estimated_stepping_batches:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.draw(trainer, pl_module)

    @rank_zero_only
    def draw(self, trainer: L.Trainer, pl_module) -> None:
        if self._batch is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        picture = pl_module.make_picture(self._batch)
        pl_module.train(was_training)
        if picture is None:
            return
        picture = (picture.float().cpu() * self.std + self.mean).clamp(0, 1)
        views = picture.shape[0] // self._batch["image"].shape[0]
        grid = make_grid(picture, nrow=views, padding=1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step{trainer.global_step:07d}.png"
        save_image(grid, path)
        self.saved.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("pictures/objective", [grid], step=trainer.global_step)


class ConfusionMatrixPicture(L.Callback):
    """Draws ``pl_module.last_confusion`` (set at the end of each validation epoch) as ``confusion_stepN.png``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.saved: list[Path] = []

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = getattr(pl_module, "last_confusion", None)
        if matrix is None:
            return
        picture = confusion_picture(matrix)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"confusion_step{trainer.global_step:07d}.png"
        picture.save(path)
        self.saved.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("pictures/confusion", [np.asarray(picture)], step=trainer.global_step)
