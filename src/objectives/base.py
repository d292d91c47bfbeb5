"""The one LightningModule every objective extends: optimizer groups, lr scaling, schedule, logging.

Objectives only add their heads and a loss (solo-learn's split): they implement ``compute_loss``
and, where they have something to show, ``make_picture``.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from src.data.datamodule import SamplerFactory
from src.data.transforms import PretrainTransform
from src.encoders.base import MaskedEncoder
from src.optim import create_optimizer, scaled_lr, warmup_cosine, weight_decay_groups


class PretrainModule(L.LightningModule):
    """Shared training machinery; ``optim`` holds base_lr, reference_batch, betas, weight_decay, min_lr."""

    def __init__(
        self,
        encoder: MaskedEncoder,
        optim: dict[str, Any],
        batch_size: int,
        warmup_epochs: float,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.optim = dict(optim)
        self.batch_size = batch_size
        self.warmup_epochs = warmup_epochs
        self._step_started: float | None = None
        self.register_buffer("skipped_total", torch.zeros((), dtype=torch.long), persistent=True)

    # ---- what objectives implement -------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: DictConfig) -> PretrainModule:
        """Build the module (encoder included) from the composed run config."""
        raise NotImplementedError

    @staticmethod
    def common_kwargs(cfg: DictConfig) -> dict[str, Any]:
        """Arguments every objective takes from the run config."""
        return {
            "optim": OmegaConf.to_container(cfg.objective.optim, resolve=True),
            "batch_size": cfg.batch_size,
            "warmup_epochs": cfg.warmup_epochs,
        }

    @classmethod
    def train_transform(cls, cfg: DictConfig):
        """Per-sample training transform run in DataLoader workers (MAE's crop + flip by default)."""
        return PretrainTransform(cfg.dataset.img_size, cfg.dataset.mean, cfg.dataset.std)

    @classmethod
    def train_sampler(cls, cfg: DictConfig) -> SamplerFactory | None:
        """How the datamodule samples training images (e.g. DeiT's repeated augmentation); None = shuffle."""
        return None

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss and any extra scalars to log."""
        raise NotImplementedError

    def make_picture(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """An image grid (3, H, W) in [0, 1] showing what the objective does, or None."""
        return None

    def callbacks(self, cfg: DictConfig) -> list[L.Callback]:
        """Objective-specific callbacks added by the runner (e.g. tokenizer pictures)."""
        return []

    def export(self, out_dir: Path) -> dict[str, Path]:
        """Write the encoder in timm naming as safetensors; objectives add their own formats."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "encoder.safetensors"
        state = {k: v.contiguous() for k, v in encoder_export_state(self.encoder).items()}
        save_file(state, str(path), metadata={"format": "pt"})
        return {"encoder": path}

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, extras = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.global_step}")
        self.skipped_total += batch.get("skipped", torch.zeros((), dtype=torch.long, device=self.device)).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_size)
        for key, value in extras.items():
            self.log(f"train/{key}", value, batch_size=self.batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=self.batch_size)
        self.log("data/skipped", self.skipped_total.float(), batch_size=self.batch_size)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_started is None:
            return
        seconds = time.perf_counter() - self._step_started
        images = batch["image"].shape[0] * self.trainer.world_size
        self.log("train/images_per_sec", images / max(seconds, 1e-9), prog_bar=True, batch_size=self.batch_size)

    # ---- optimisation --------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Weight decay on matrices only (biases and 1-D params exempt), as MAE/BEiT pretraining do."""
        return weight_decay_groups(self.named_parameters(), self.optim["weight_decay"])

    def global_batch(self) -> int:
        return self.batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def configure_optimizers(self) -> dict:
        lr = scaled_lr(self.optim["base_lr"], self.global_batch(), self.optim["reference_batch"])
        groups = [{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in self.param_groups()]  # layer-wise lr decay
        optimizer = create_optimizer(groups, lr, self.optim)
        total = int(self.trainer.estimated_stepping_batches)  # also loads the train loader: batches are known
        steps_per_epoch = max(1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches))
        warmup = min(int(self.warmup_epochs * steps_per_epoch), total)
        schedule = partial(
            warmup_cosine, warmup_steps=warmup, total_steps=total, min_ratio=self.optim.get("min_lr", 0.0) / lr
        )
        rank_zero_info(  # a log line: LightningModule.print drops output before the progress bar exists
            f"lr {lr:.3g} (base {self.optim['base_lr']:g} x {self.global_batch()}/"
            f"{self.optim['reference_batch']}), warm-up {warmup} of {total} steps"
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }


def encoder_export_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Encoder weights in timm naming, without pretraining-only parts (mask token) or a classifier."""
    drop = ("mask_token", "head.", "head_dist.")
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items() if not k.startswith(drop)}
