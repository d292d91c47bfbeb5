"""Pictures out of a run: one call hands a picture to every logger of the run that can show it."""

from __future__ import annotations

import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger


def log_picture(trainer: L.Trainer, key: str, picture: np.ndarray, step: int | None = None) -> None:
    """``picture`` is (H, W, 3) uint8; W&B, TensorBoard and MLflow each get it under ``key`` at ``step``."""
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [picture], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, picture, global_step=step, dataformats="HWC")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, picture, key=key.replace("/", "."), step=step)
