"""The one LightningModule every training method extends: config checks, optimizer groups, schedule, logging.

Methods add their heads and a loss (solo-learn's split). What a method declares, and the pipeline
(``src/pipeline/fit.py``) calls, in order:

- ``settle_config(cfg, init)``: the config with what it leaves to the method settled (a copy), once per run;
- ``check_config(cfg)``: every value of its config section, before any data or model is built;
- ``train_transform`` / ``eval_transform`` / ``train_repeats`` / ``sample_extras``: what its data module needs;
- ``from_config(cfg, init)``: the module, encoder included, started from the init checkpoint;
- ``compute_loss`` (and ``make_picture``), ``callbacks``;
- ``after_fit``: anything measured once training ends; ``export``: its weights in their released formats.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from src.config import ConfigError, check_grid
from src.data.datamodule import ImageDataModule, SampleTransform, build_datamodule
from src.data.distributed import SampleExtras, global_batch
from src.data.transforms import EvalTransform, PretrainTransform
from src.encoders import create_encoder
from src.encoders.base import EXPORT_DROPPED, HEADS, MaskedEncoder
from src.encoders.loading import InitCheckpoint, InitReport
from src.files import save_weights
from src.methods.global_norm import use_global_batchnorm
from src.methods.optim import create_optimizer, scaled_lr, warmup_cosine, weight_decay_groups


class TrainingMethod(L.LightningModule):
    """Shared training machinery; ``optim`` holds base_lr, reference_batch, betas, weight_decay, min_lr."""

    # Key prefixes of the method's own parts in a flat (official) checkpoint: never encoder weights.
    pretraining_keys: ClassVar[tuple[str, ...]] = ()
    fits: ClassVar[bool] = True  # False: an evaluation (``trainer.validate``), nothing is trained
    trains_on_labels: ClassVar[bool] = False  # the data module refuses unlabelled training samples (on the host)
    picture_columns: ClassVar[tuple[str, ...]] = ()  # the titles of ``make_picture``'s views, in order
    trains_mask_token: bool = False  # frozen otherwise, so DDP never meets a parameter without a gradient
    init_report: InitReport | None = None  # what a fine-tune started from; the pipeline publishes it

    def __init__(self, encoder: nn.Module | None, optim: dict[str, Any], batch_size: int, warmup_epochs: float) -> None:
        """``encoder`` is registered as ``encoder`` (``encoder.*`` in checkpoints) when the method owns it; a method
        whose encoder lives inside another of its parts passes None and defines the ``encoder`` property instead
        (detection: the backbone's), so the encoder is registered once, where it lives."""
        super().__init__()
        if encoder is not None:
            self.encoder = encoder
        self.optim = dict(optim)
        self.batch_size = batch_size
        self.warmup_epochs = warmup_epochs
        self._window: tuple[float, int, int] | None = None  # throughput window: (start, batches, images)
        self.register_buffer("skipped_total", torch.zeros((), dtype=torch.long), persistent=True)

    # ---- what methods implement ----------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Refuse values that cannot work together, naming the keys; one key's type, range or names are the
        schema's (src/schema.py), checked before this. Extend, then call super()."""

    @classmethod
    def settle_config(cls, cfg: DictConfig, init: InitCheckpoint) -> DictConfig:
        """The run's config with what it leaves to the method settled (from ``init``, the file it starts from).

        A copy: the composed config is never changed. The pipeline checks, records, shows and runs what this
        returns, and logs what it changed. Extend: call super(), then set keys on its result.
        """
        return copy.deepcopy(cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> TrainingMethod:
        """Build the module (encoder included) from the settled run config, started from ``init``."""
        raise NotImplementedError

    @classmethod
    def common_kwargs(cls, cfg: DictConfig) -> dict[str, Any]:
        """Arguments every method takes from the run config."""
        return {
            "optim": OmegaConf.to_container(cfg.objective.optim, resolve=True),
            "batch_size": cfg.batch_size,
            "warmup_epochs": cfg.warmup_epochs,
        }

    @classmethod
    def pixel_stats(cls, cfg: DictConfig) -> tuple[Sequence[float], Sequence[float]]:
        """(mean, std) the images are normalised with; pictures undo it."""
        return cfg.dataset.mean, cfg.dataset.std

    @classmethod
    def build_data(cls, cfg: DictConfig) -> L.LightningDataModule:
        """The data module, checked before any model is built (images and labels through the method's transforms)."""
        return build_datamodule(
            cfg.dataset,
            train_transform=cls.train_transform(cfg),
            eval_transform=cls.eval_transform(cfg),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            train_repeats=cls.train_repeats(cfg),
            sample_extras=cls.sample_extras(cfg),
            labelled=cls.trains_on_labels,
        )

    @classmethod
    def train_transform(cls, cfg: DictConfig) -> SampleTransform:
        """Per-sample training transform run in DataLoader workers (MAE's crop + flip by default)."""
        crop_scale = cfg.objective.get("crop_scale", (0.2, 1.0))
        return PretrainTransform(cfg.dataset.img_size, *cls.pixel_stats(cfg), crop_scale=crop_scale)

    @classmethod
    def eval_transform(cls, cfg: DictConfig) -> SampleTransform:
        """The deterministic view of the labelled split (kNN, validation)."""
        return EvalTransform(cfg.dataset.img_size, *cls.pixel_stats(cfg))

    @classmethod
    def train_repeats(cls, cfg: DictConfig) -> int:
        """Copies of each drawn training image per epoch (DeiT's repeated augmentation); 1 = plain shuffling."""
        return 1

    @classmethod
    def sample_extras(cls, cfg: DictConfig) -> SampleExtras | None:
        """Per-sample tensors the model draws its randomness from, made from each sample's seed (MAE's mask noise).

        Drawn in the data workers, they make a run's masks independent of how many processes share its batch.
        """
        return None

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss and any extra scalars to log."""
        raise NotImplementedError

    def make_picture(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """What the method does to a few images, or None: (images, views, 3, H, W), each view a column of the
        picture titled by ``picture_columns``, normalised as ``pixel_stats`` says (the picture undoes it)."""
        return None

    def callbacks(self, run_dir: Path) -> list[L.Callback]:
        """Method-specific callbacks added by the pipeline (e.g. confusion-matrix pictures)."""
        return []

    def evaluation_loaders(self, datamodule: ImageDataModule) -> list:
        """What ``trainer.validate`` reads for a method that trains nothing (``fits = False``)."""
        return [datamodule.val_dataloader()]

    def needs_final_validation(self) -> bool:
        """Whether the pipeline validates once more after fitting (a method that validates every N epochs)."""
        return False

    def after_fit(self, trainer: L.Trainer, datamodule: ImageDataModule, run_dir: Path) -> dict[str, float]:
        """Measurements taken once on rank zero after training (e.g. a tokenizer's codebook usage)."""
        return {}

    def export(self, out_dir: Path) -> dict[str, Path]:
        """Write the encoder in timm naming as safetensors; methods add their own formats."""
        return {"encoder": save_weights(encoder_export_state(self.encoder), out_dir / "encoder.safetensors")}

    # ---- training ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before the strategy wraps the model: freeze an unused mask token (DDP rejects gradient-less
        parameters), and with several processes let every BatchNorm see the global batch."""
        if isinstance(self.encoder, MaskedEncoder):
            self.encoder.mask_token.requires_grad_(self.trains_mask_token)
        if self.trainer.world_size > 1:
            use_global_batchnorm(self)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled features (the kNN monitor's), asked of the module: under FSDP2 a method of the
        module gathers the shards outside the blocks first (``FORWARD_METHODS``), one of the encoder does not."""
        return self.encoder.forward_pooled(images)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` the strategy shards the model here (FSDP2), before the optimizer sees it."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, extras = self.compute_loss(batch)  # a non-finite loss is skipped by the pipeline's NonFiniteGuard
        self.skipped_total += batch.get("skipped", torch.zeros((), dtype=torch.long, device=self.device)).sum()
        # the mean over the ranks: the logged loss is the global batch's, whatever the world size
        self.log("train/loss", loss, prog_bar=True, batch_size=self.batch_size, sync_dist=True)
        for key, value in extras.items():
            self.log(f"train/{key}", value, batch_size=self.batch_size, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=self.batch_size)
        self.log("data/skipped", self.skipped_total.float(), batch_size=self.batch_size)
        return loss

    def global_mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """``total / count`` over every rank's micro-batch, scaled so that DDP's gradient average keeps it exact.

        For losses whose terms per rank vary in number (BEiT's masked tokens): a per-rank mean would weight
        each rank's tokens by its own count, and the result would change with the world size.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return total / count
        counts = total.new_full((), float(count))  # filled on the device: no host-to-device copy to wait for
        torch.distributed.all_reduce(counts)
        return total * world / counts

    def batch_len(self, batch: Any) -> int:
        """Images in a batch (a detection batch holds a list of images of different sizes)."""
        return batch["image"].shape[0]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._window is None:
            self._window = (time.perf_counter(), 0, 0)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Images per second over the last ``log_every_n_steps`` batches, data loading included.

        The clock is read once per window, after waiting for the device there (the logging cadence, where
        Lightning reads the logged values anyway): timing each step would block the device every step.
        """
        if self._window is None:
            return
        start, batches, images = self._window
        batches, images = batches + 1, images + self.batch_len(batch) * self.trainer.world_size
        if batches < self.trainer.log_every_n_steps:
            self._window = (start, batches, images)
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.log("train/images_per_sec", images / max(now - start, 1e-9), prog_bar=True, batch_size=self.batch_size)
        self._window = (now, 0, 0)

    def on_train_epoch_end(self) -> None:
        self._window = None  # the next window starts with the next epoch's first batch (no validation in it)

    # ---- optimisation --------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Weight decay on matrices only (biases and 1-D params exempt), as MAE/BEiT pretraining do."""
        return weight_decay_groups(self.named_parameters(), self.optim["weight_decay"])

    def configure_optimizers(self) -> dict:
        batch = global_batch(self.batch_size, self.trainer.world_size, self.trainer.accumulate_grad_batches)
        lr = scaled_lr(self.optim["base_lr"], batch, self.optim["reference_batch"])
        groups = [{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in self.param_groups()]  # layer-wise lr decay
        optimizer = create_optimizer(groups, lr, self.optim)
        total = int(self.trainer.estimated_stepping_batches)  # also loads the train loader: batches are known
        steps_per_epoch = self.schedule_epoch_steps()
        warmup = min(int(self.warmup_epochs * steps_per_epoch), total)
        schedule = self.lr_schedule(lr, warmup, total, steps_per_epoch)
        rank_zero_info(  # a log line: LightningModule.print drops output before the progress bar exists
            f"lr {lr:.3g} (base {self.optim['base_lr']:g} x {batch}/"
            f"{self.optim['reference_batch']}), warm-up {warmup} of {total} steps"
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    def on_train_start(self) -> None:
        """Set the lr to the schedule's value at the current step.

        A resumed run restores the optimizer's lr of the last step it took; the schedule is recomputed for the
        run's current length (``resume_changes=[trainer.max_steps]`` makes it longer), and its first step must
        use the new schedule's lr, not the old schedule's final one.
        """
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR):
                pairs = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
                lrs = [base * factor(scheduler.last_epoch) for base, factor in pairs]
                for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr

    def schedule_epoch_steps(self) -> int:
        """Optimizer steps the schedule counts as one epoch (``warmup_epochs``, milestones): one pass over the data.
        Detection's COCO recipes count fixed-length epochs instead, as the original's iteration-based schedule."""
        return max(1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches))

    def lr_schedule(self, lr: float, warmup: int, total: int, steps_per_epoch: int) -> Callable[[int], float]:
        """The lr multiplier per optimizer step: linear warm-up, then a half-cosine down to ``optim.min_lr``."""
        return partial(
            warmup_cosine, warmup_steps=warmup, total_steps=total, min_ratio=self.optim.get("min_lr", 0.0) / lr
        )

    # ---- checkpoints ---------------------------------------------------------------------------
    frozen_parts: ClassVar[tuple[str, ...]] = ()  # submodules loaded from their own files, kept out of checkpoints

    def train(self, mode: bool = True) -> TrainingMethod:
        """Frozen parts stay in eval mode whatever the trainer asks."""
        super().train(mode)
        for name in self.frozen_parts:
            part = getattr(self, name, None)
            if part is not None:
                part.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave frozen parts (a tokenizer, a teacher) out: they have their own files and may be large."""
        prefixes = tuple(f"{name}." for name in self.frozen_parts)
        if prefixes:
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(prefixes)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume with the configured frozen parts' weights, so that loading stays strict."""
        for name in self.frozen_parts:
            part = getattr(self, name)
            if part is not None:
                checkpoint["state_dict"].update({f"{name}.{k}": v for k, v in part.state_dict().items()})

    # ---- the official release's layout (MAE, BEiT) ------------------------------------------------
    official_skip: ClassVar[tuple[str, ...]] = ()  # keys of ours the official layout has no place for

    def _not_official(self, key: str) -> bool:
        frozen = tuple(f"{name}." for name in self.frozen_parts)
        return key == "skipped_total" or key.startswith(("encoder.head.", *frozen, *self.official_skip))

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model named as the official release names it: encoder keys at the top level."""
        return {
            k.removeprefix("encoder."): v.detach().cpu()
            for k, v in self.state_dict().items()
            if not self._not_official(k)
        }

    def load_official(self, state: dict[str, torch.Tensor], strict: bool = True):
        """Load an official checkpoint (its ``model`` entry); what it has no place for keeps our values."""
        own = self.state_dict()
        renamed = {
            (k if k in own else f"encoder.{k}"): v for k, v in state.items() if "relative_position_index" not in k
        }
        renamed |= {k: v for k, v in own.items() if self._not_official(k) and k not in renamed}
        return self.load_state_dict(renamed, strict=strict)


def encoder_export_state(encoder: nn.Module, heads: bool = False) -> dict[str, torch.Tensor]:
    """Encoder weights in timm naming, without pretraining-only parts (mask token) or, unless asked, a classifier."""
    drop = EXPORT_DROPPED if heads else EXPORT_DROPPED + HEADS
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items() if not k.startswith(drop)}


def all_pretraining_keys() -> tuple[str, ...]:
    """Every registered method's ``pretraining_keys``: what an official checkpoint may carry besides the encoder."""
    from src.methods import METHODS  # the registry imports every method module, this one included

    return tuple(sorted({key for method in METHODS.values() for key in method.pretraining_keys}))


def encoder_from_config(cfg: DictConfig, **overrides: Any) -> MaskedEncoder:
    """``create_encoder`` for the run's image size; kwargs that do not fit the arch are a config error."""
    try:
        encoder = create_encoder(cfg.encoder, cfg.dataset.img_size, **overrides)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"encoder={cfg.encoder.name} ({cfg.encoder.arch}) with {dict(overrides)}: {e}") from None
    check_grid(encoder, cfg.dataset.img_size)
    return encoder
