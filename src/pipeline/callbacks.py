"""Lightning callbacks the pipeline adds to runs: one config on every rank, non-finite step guard, kNN monitor,
pictures."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from src.config import RunStopped
from src.evaluation.knn import RawPixels, check_bank, knn_accuracy
from src.figures import figure_pixels, image_grid, log_picture, save_picture, side_by_side
from src.methods.optim import skips_on_found_inf
from src.pipeline.report import CURVE_KEYS, KNN, KNN_PIXELS, KNN_START, Points, read_curves, run_figures


class SameConfigOnEveryRank(L.Callback):
    """Stops a run whose processes composed different configs (an environment variable read by one node only).

    Every process of a run composes its config from the same command; rank zero records it. Once the processes
    can talk, each compares the digest of its resolved config with rank zero's.
    """

    def __init__(self, cfg: DictConfig) -> None:
        resolved = OmegaConf.to_yaml(cfg, resolve=True).encode()
        self.digest = hashlib.sha256(resolved).hexdigest()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        reference = trainer.strategy.broadcast(self.digest, src=0)
        if reference != self.digest:
            raise RunStopped(
                f"rank {trainer.global_rank} composed another config than rank 0 (sha256 {self.digest[:12]} vs "
                f"{reference[:12]}): every node must run the same command in the same environment"
            )


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose gradients hold a NaN or inf, counts it, and stops a run that keeps diverging.

    The decision stays on the device: fused AdamW (on a GPU, or on the CPU with ``objective.optim.fused=true``)
    and LARS read ``optimizer.found_inf`` inside their step, as under a GradScaler, so no step waits for the host.
    Gradients are checked after DDP has averaged them (FSDP2: the norm over every shard), so every rank skips the
    same steps. The run of skips is read on the
    host only where that costs nothing: every step on the CPU, at the logging cadence (when Lightning syncs
    anyway) on an accelerator.
    """

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.total = torch.zeros((), dtype=torch.long)  # skipped steps in this run, resumes included
        self.in_a_row = torch.zeros((), dtype=torch.long)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # trainer=fsdp: the norm over every rank's shards, the same on each rank
            norm = norm.full_tensor()
        bad = (~torch.isfinite(norm)).long()
        self.total = self.total.to(bad.device) + bad
        self.in_a_row = (self.in_a_row.to(bad.device) + 1) * bad
        if skips_on_found_inf(optimizer):
            optimizer.found_inf = bad.float()
        elif bad:  # AdamW's loop form (the CPU's default; MPS, XPU): decided on the host, no device sync on a CPU
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # a parameter without a gradient is left alone, moments and decay included

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        pl_module.log("train/nonfinite_steps", self.total.float(), batch_size=pl_module.batch_len(batch))
        if self.in_a_row.device.type != "cpu" and trainer.global_step % trainer.log_every_n_steps:
            return
        if int(self.in_a_row) >= self.max_in_a_row:
            raise RunStopped(
                f"the gradients were NaN or inf in the last {int(self.in_a_row)} steps in a row (step "
                f"{trainer.global_step}; {int(self.total)} skipped in all), so no weights changed since. The "
                f"last checkpoint in {trainer.default_root_dir}/checkpoints holds the last good weights. Start a "
                "new run_name with a lower lr, a longer warm-up or trainer.precision=32-true "
                f"(max_nonfinite_steps={self.max_in_a_row} sets this limit)"
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total.cpu(), "in_a_row": self.in_a_row.cpu()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.total, self.in_a_row = state_dict["total"], state_dict["in_a_row"]


def sharded_module(pl_module: L.LightningModule) -> bool:
    """``trainer=fsdp``: every rank holds a shard of the model, so every rank takes part in each pass through it."""
    return isinstance(pl_module, FSDPModule)


class KNNMonitor(L.Callback):
    """Every ``every_n_epochs`` (and before the first epoch), kNN top-1/top-5 of the pooled encoder features.

    The first evaluation also scores the raw pixels, so that the end of a run can be read against both the
    untrained encoder (``knn/start_top1``) and the pixels (``knn/pixels_top1``).
    """

    def __init__(self, every_n_epochs: int = 1, k: int = 20, temperature: float = 0.07) -> None:
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.baselines: dict[str, float] = {}
        self.last: dict[str, float] = {}

    @property
    def results(self) -> dict[str, float]:
        return self.baselines | self.last

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The bank must hold k images: checked on every rank before the first step, not on rank zero alone."""
        loaders = trainer.datamodule.knn_dataloaders()
        if loaders is None:
            return
        try:
            size = len(loaders[0].dataset)
        except TypeError:  # one pass over shards without a count: its size shows only once read
            return
        check_bank(self.k, size, "knn.k")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0 and trainer.global_step == 0:
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_epoch = trainer.current_epoch + 1 == trainer.max_epochs
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last_epoch:
            self._evaluate(trainer, pl_module)

    def _score(self, trainer: L.Trainer, features: torch.nn.Module, device: torch.device) -> tuple[float, float]:
        loaders = trainer.datamodule.knn_dataloaders()
        return knn_accuracy(features, loaders, trainer.datamodule.num_classes, self.k, self.temperature, device)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On rank zero; under FSDP2 on every rank alike (each reads the whole sets), rank zero reporting."""
        if not (trainer.is_global_zero or sharded_module(pl_module)) or trainer.datamodule.knn_dataloaders() is None:
            return
        top1, top5 = self._score(trainer, pl_module, pl_module.device)  # its forward_pooled: the encoder's
        self.last = {"knn/top1": top1, "knn/top5": top5}
        if trainer.global_step == 0:
            with torch.random.fork_rng(devices=[]):  # its loaders' seeds leave the run's random stream as it was
                pixels_top1 = self._score(trainer, RawPixels(), "cpu")[0]
            self.baselines = {"knn/start_top1": top1, "knn/pixels_top1": pixels_top1}
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
        rank_zero_info(f"kNN at step {trainer.global_step}: top-1 {top1:.4f}")

    def state_dict(self) -> dict[str, float]:
        return dict(self.baselines)  # a resumed run still reads its end against its own start

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.baselines = dict(state_dict)


class PictureLogger(L.Callback):
    """The method's picture of a fixed batch (comparable across steps) at step 0 and every N steps, and at the end
    of training the run's figures: the first and the last picture side by side, and the curves of its CSV log.

    Each goes to ``out_dir`` as a PNG and to every logger that shows pictures (``log_picture``); the kNN curve
    with its baselines also goes to W&B as one native chart.
    """

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
        self.first_and_last: Path | None = None
        self.curves: dict[str, Path] = {}  # "loss", "lr", "knn": the figures drawn at the end of training
        self._drawn_at: int | None = None  # the step of the last picture

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._batch is None:
            self._batch = {k: v[: self.num_images].detach() for k, v in batch.items() if torch.is_tensor(v) and v.ndim}
            if trainer.global_step == 0:  # the untrained model: what the last picture is compared with
                # on a forked generator: this picture came later than the others, and keeps their seeded runs
                cuda = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):
                    self.draw(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.estimated_stepping_batches:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._drawn_at != trainer.global_step:  # a run stopped before its last step (max_steps, a signal)
            self.draw(trainer, pl_module)
        if rank_zero_only.rank != 0:
            return
        steps = sorted(self.out_dir.glob("step*.png"))  # earlier commands of a resumed run included
        if len(steps) > 1:
            picture = side_by_side([np.asarray(Image.open(path).convert("RGB")) for path in (steps[0], steps[-1])])
            self.first_and_last = save_picture(picture, self.out_dir / "first_and_last.png")
            log_picture(trainer, "pictures/first_and_last", picture)
        self.draw_curves(trainer)

    def draw_curves(self, trainer: L.Trainer) -> None:
        """The curves of the run's whole CSV history (earlier commands of a resumed run included), flushed first."""
        csv_loggers = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]
        if not csv_loggers:
            return
        csv_loggers[0].save()
        curves = read_curves(Path(csv_loggers[0].experiment.metrics_file_path), CURVE_KEYS)
        for name, picture in run_figures(curves, self.out_dir).items():
            self.curves[name] = self.out_dir / f"{name}.png"
            log_picture(trainer, f"pictures/{name}", picture)
        log_knn_chart(trainer, curves)

    def draw(self, trainer: L.Trainer, pl_module) -> None:
        """On rank zero; under FSDP2 every rank draws (``make_picture`` gathers the shards), rank zero saves."""
        if self._batch is None or not (trainer.is_global_zero or sharded_module(pl_module)):
            return
        was_training = pl_module.training
        pl_module.eval()
        picture = pl_module.make_picture(self._batch)
        pl_module.train(was_training)
        self._drawn_at = trainer.global_step
        if picture is None or not trainer.is_global_zero:
            return
        views = picture.shape[1]
        picture = (picture.float().cpu().flatten(0, 1) * self.std + self.mean).unflatten(0, (-1, views))
        columns = [*pl_module.picture_columns, *(f"view {i + 1}" for i in range(views))][:views]
        images = picture.permute(0, 1, 3, 4, 2).numpy()  # (images, views, H, W, 3): the grid's layout
        pixels = figure_pixels(image_grid(images, columns, f"step {trainer.global_step}"))
        path = save_picture(pixels, self.out_dir / f"step{trainer.global_step:07d}.png")
        if path not in self.saved:
            self.saved.append(path)
        log_picture(trainer, "pictures/objective", pixels)


def log_knn_chart(trainer: L.Trainer, curves: dict[str, Points]) -> None:
    """W&B: kNN top-1 and its two baselines as one native line chart (the scalars are each a chart of their own)."""
    wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    if not wandb_loggers or not all(curves[key] for key in (KNN, KNN_START, KNN_PIXELS)):
        return
    import wandb

    steps = [step for step, _ in curves[KNN]]
    levels = [[curves[key][-1][1]] * len(steps) for key in (KNN_START, KNN_PIXELS)]
    chart = wandb.plot.line_series(
        xs=steps,
        ys=[[value for _, value in curves[KNN]], *levels],
        keys=["encoder", "untrained encoder (step 0)", "raw pixels"],
        title="online kNN top-1 against its baselines",
        xname="step",
    )
    for logger in wandb_loggers:
        logger.log_metrics({"knn/top1_with_baselines": chart}, step=trainer.global_step)
