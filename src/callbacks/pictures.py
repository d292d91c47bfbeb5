"""Every N steps, the objective's picture (e.g. original | masked | reconstruction) to W&B and a PNG."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image


class PictureLogger(L.Callback):
    """Keeps a fixed batch of training images so pictures are comparable across steps."""

    def __init__(self, out_dir: Path, every_n_steps: int = 100, num_images: int = 8, mean=None, std=None) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.mean = torch.tensor(mean or [0.0, 0.0, 0.0]).view(1, 3, 1, 1)
        self.std = torch.tensor(std or [1.0, 1.0, 1.0]).view(1, 3, 1, 1)
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
