"""What `python -m src.pretrain` does: validate, build data and objective, fit, export, summarise."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from src.callbacks.knn_monitor import KNNMonitor
from src.callbacks.pictures import PictureLogger
from src.checkpoint import AtomicCheckpointIO, remove_partial_writes
from src.config import ConfigError, validate
from src.data.datamodule import build_datamodule
from src.data.transforms import EvalTransform
from src.loggers import build_loggers, wandb_run_dir
from src.objectives import objective_class
from src.objectives.base import PretrainModule

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path | None
    exports: dict[str, Path] = field(default_factory=dict)
    pictures: Path | None = None
    wandb_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int = 0


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """`auto`: bf16 mixed precision on a GPU that has it, full fp32 on the CPU."""
    if trainer_cfg.precision != "auto":
        return str(trainer_cfg.precision)
    on_gpu = trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def resume_checkpoint(run_dir: Path, resume: str | bool) -> Path | None:
    """auto: continue if the run has a last checkpoint; true: insist on one; false: refuse to overwrite one."""
    last = run_dir / "checkpoints" / "last.ckpt"
    for stale in remove_partial_writes(last.parent):
        log.warning("removed %s, left half-written by a killed save", stale)
    if resume is True and not last.is_file():
        raise ConfigError(f"resume=true but there is no checkpoint at {last}")
    if resume is False and last.is_file():
        raise ConfigError(f"run_dir={run_dir} already holds {last}: pass resume=auto to continue or a new run_name")
    return last if last.is_file() else None


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], loggers: list) -> L.Trainer:
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = resolve_precision(cfg.trainer)
    return L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def record_encoder_config(module: L.LightningModule, cfg: DictConfig) -> None:
    """Keep the encoder config in the checkpoint's hyper-parameters: fine-tuning checks its arch against them.

    An objective that builds another arch from ``cfg.encoder`` (DeiT's ``*_distilled``) sets
    ``module.encoder_config``; a supervised run of a plain timm classifier has no encoder config.
    """
    config = getattr(module, "encoder_config", None) or cfg.get("encoder")
    if config is not None:
        module.hparams["encoder_config"] = OmegaConf.to_container(config, resolve=True)


def pretrain(cfg: DictConfig, objective: type[PretrainModule] | None = None) -> RunResult:
    """Train ``objective`` (default: the class named by ``objective.name``); ``knn: null`` turns the monitor off."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir).resolve()
    ckpt_path = resume_checkpoint(run_dir, cfg.resume)

    objective = objective or objective_class(cfg.objective.name)
    try:  # data first: a wrong path fails before any model is built
        datamodule = build_datamodule(
            cfg.dataset,
            train_transform=objective.train_transform(cfg),
            eval_transform=EvalTransform(cfg.dataset.img_size, cfg.dataset.mean, cfg.dataset.std),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            train_sampler=objective.train_sampler(cfg),
        )
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    module = objective.from_config(cfg)
    record_encoder_config(module, cfg)

    checkpointing = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        save_on_train_epoch_end=True,
    )
    pictures = PictureLogger(
        run_dir / "pictures", cfg.pictures.every_n_steps, cfg.pictures.num_images, cfg.dataset.mean, cfg.dataset.std
    )
    callbacks = [checkpointing, pictures, *module.callbacks(cfg)]
    knn = None
    if cfg.get("knn") is not None:  # off for models outside the encoder contract (a supervised convnet teacher)
        knn = KNNMonitor(cfg.knn.every_n_epochs, cfg.knn.k, cfg.knn.temperature)
        callbacks.append(knn)
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks, loggers)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    final = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(final, weights_only=False)  # full state: a max_steps stop would lose the last steps

    result = RunResult(
        run_dir=run_dir,
        checkpoint=final,
        pictures=run_dir / "pictures" if pictures.saved else None,
        wandb_dir=wandb_run_dir(loggers) if trainer.is_global_zero else None,
        metrics={k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        | (knn.last if knn else {}),
        global_step=trainer.global_step,
    )
    if cfg.export and trainer.is_global_zero:
        result.exports = module.export(run_dir / "export")
    return result


def summary(result: RunResult) -> str:
    """The one block a user reads at the end of a run."""
    lines = [f"run finished at step {result.global_step}: {result.run_dir}"]
    if result.checkpoint:
        lines.append(f"  checkpoint : {result.checkpoint}  (resume: same command, resume=auto)")
    for name, path in result.exports.items():
        lines.append(f"  export     : {name} -> {path}")
    if result.pictures:
        lines.append(f"  pictures   : {result.pictures}")
    if result.wandb_dir:
        lines.append(f"  W&B run    : {result.wandb_dir}  (offline runs upload with `wandb sync {result.wandb_dir}`)")
    shown = {k: v for k, v in result.metrics.items() if k.startswith(("train/loss", "knn/", "val/"))}
    if shown:
        lines.append("  metrics    : " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())))
    return "\n".join(lines)
