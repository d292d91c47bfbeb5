"""The one pipeline every run goes through: validate -> data -> method -> trainer -> fit -> export -> summary.

Pretraining, fine-tuning, the kNN evaluation, the teacher trainer and the tokenizer trainer differ only in
the method the config names (``cfg.method``, looked up in ``src.methods.METHODS``). A method that trains
nothing (``fits = False``, the kNN evaluation) is validated once instead of fitted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, validate
from src.evaluation.knn import check_configured_bank
from src.export import export_run, pickle_allowed, pickle_permissions
from src.methods import method_class
from src.methods.base import TrainingMethod
from src.pipeline.callbacks import KNNMonitor, NonFiniteGuard, PictureLogger, SameConfigOnEveryRank
from src.pipeline.checkpoint import AtomicCheckpointIO
from src.pipeline.elastic import keep_global_batch
from src.pipeline.loggers import build_loggers, check_logger, wandb_run_dir
from src.pipeline.output import log_to_file, single_log_stream
from src.pipeline.report import loss_curve
from src.pipeline.run_folder import (
    FINISHED_FILE,
    METRICS_FILE,
    RECORDED_PATHS,
    check_same_run,
    check_writable,
    finished_run,
    load_recorded,
    mark_finished,
    record_run,
    resume_checkpoint,
    run_folder,
    run_lock,
    write_atomically,
)
from src.pipeline.strategy import (
    build_strategy,
    check_trainer,
    cluster_plugins,
    maybe_compile,
    stopped_ranks_end_the_run,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path | None
    exports: dict[str, Path] = field(default_factory=dict)
    pictures: Path | None = None
    loss_curve: Path | None = None
    first_and_last: Path | None = None
    wandb_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int = 0
    finished_before: bool = False  # the same command had already finished this run: nothing ran, nothing changed

    def record(self) -> dict:
        """What ``finished.json`` keeps of the result: paths relative to the run folder, which may move."""
        return {
            "step": self.global_step,
            "paths": {k: _relative(getattr(self, k), self.run_dir) for k in RECORDED_PATHS},
            "exports": {k: _relative(v, self.run_dir) for k, v in self.exports.items()},
        }

    @classmethod
    def recorded(cls, run_dir: Path, record: dict) -> RunResult:
        """The result a finished run recorded, read back from its folder."""
        paths = {k: v if v is None else run_dir / v for k, v in record["paths"].items()}
        wandb_dir = paths.pop("wandb_dir")
        return cls(
            run_dir=run_dir,
            **paths,
            wandb_dir=str(wandb_dir) if wandb_dir else None,
            exports={k: run_dir / v for k, v in record["exports"].items()},
            metrics=dict(load_recorded(run_dir / METRICS_FILE)),
            global_step=int(record["step"]),
            finished_before=True,
        )


def _relative(path: str | Path | None, run_dir: Path) -> str | None:
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """`auto`: bf16 mixed precision on a GPU that has it, full fp32 on the CPU."""
    if trainer_cfg.precision != "auto":
        return str(trainer_cfg.precision)
    on_gpu = trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], loggers: list, module: TrainingMethod
) -> L.Trainer:
    """The Trainer of ``cfg.trainer``, laid out for the module (FSDP units, compiled blocks) and the cluster.

    The data module splits the data over the ranks itself (one global batch whatever the world size), so
    Lightning must not put a DistributedSampler in front of it. ``trainer.compile`` and ``trainer.fsdp`` are
    read here, not passed to the Trainer.
    """
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.pop("fsdp", None)
    trainer_kwargs.pop("timeout_s", None)
    maybe_compile(module, bool(trainer_kwargs.pop("compile", False)))
    trainer_kwargs["precision"] = resolve_precision(cfg.trainer)
    trainer_kwargs["strategy"] = build_strategy(cfg, module)
    return L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir),  # where Lightning writes hpc_ckpt_<N>.ckpt on a SLURM requeue signal
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        use_distributed_sampler=False,
    )


def check_pickle_permission(cfg: DictConfig) -> None:
    """Unpickling runs code from the file it reads: only the person typing the command may allow it, never a
    config or recipe file (outside a front door, the caller composed the config itself)."""
    if not HydraConfig.initialized():
        return
    typed = {override.lstrip("+").split("=", 1)[0] for override in HydraConfig.get().overrides.task}
    from_files = [key for key in pickle_permissions(OmegaConf.to_container(cfg)) if key not in typed]
    if from_files:
        raise ConfigError(
            f"{from_files[0]}=true comes from a config or recipe file: unpickling runs code from the file it reads, "
            f"so only the command line may allow it; if you trust the file, type {from_files[0]}=true yourself"
        )


def prepare(cfg: DictConfig) -> type[TrainingMethod]:
    """Everything checked before any work: shared keys, then the method's own; the method may settle the config."""
    validate(cfg)
    check_trainer(cfg)
    if cfg.get("knn") is not None:  # the monitor's bank, as task=knn checks its own
        check_configured_bank(cfg.knn.k, cfg.dataset, "knn.k")
    check_pickle_permission(cfg)
    check_logger(cfg)
    method = method_class(cfg.method)
    method.resolve_config(cfg)
    method.check_config(cfg)
    return method


def run(cfg: DictConfig) -> RunResult:
    """Fit (or, for an evaluation, validate) the method ``cfg.method`` names, then export and summarise.

    Rank zero holds the run folder's lock throughout; other ranks (DDP children, torchrun) join its run.
    """
    single_log_stream()
    method = prepare(cfg)
    with stopped_ranks_end_the_run(cfg.trainer):
        run_dir = run_folder(cfg)
        if rank_zero_only.rank != 0:  # decides as rank zero does: the marker is gone before rank zero changes anything
            finished = finished_run(run_dir, cfg)
            return RunResult.recorded(run_dir, finished) if finished else fit(cfg, method, run_dir)
        check_writable(run_dir)
        with run_lock(run_dir, takeover=bool(cfg.get("takeover", False))):
            check_same_run(run_dir, cfg)
            finished = finished_run(run_dir, cfg)
            if finished is not None:
                return RunResult.recorded(run_dir, finished)
            return fit(cfg, method, run_dir)


def fit(cfg: DictConfig, method: type[TrainingMethod], run_dir: Path) -> RunResult:
    """The pipeline itself, once the config and the run folder are settled."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resume_checkpoint(run_dir, cfg.resume) if method.fits else None
    if rank_zero_only.rank == 0:
        (run_dir / FINISHED_FILE).unlink(missing_ok=True)  # a longer run: its old results are no longer whole
        record_run(run_dir, cfg)
        log_to_file(run_dir)  # rank zero's: another rank may start before the folder exists

    datamodule = method.build_data(cfg)  # data first: a wrong path fails before any model is built
    module = method.from_config(cfg)
    if module.init_report is not None:
        module.init_report.publish(run_dir)
    if cfg.get("encoder") is not None:  # fine-tuning rebuilds the encoder a checkpoint records
        module.hparams["encoder_config"] = OmegaConf.to_container(cfg.encoder, resolve=True)

    callbacks: list[L.Callback] = [SameConfigOnEveryRank(cfg), *module.callbacks(run_dir)]
    sharded = cfg.trainer.strategy == "fsdp"  # parameters live in shards: nothing may run the model on rank zero alone
    pictures = None
    if method.fits:
        callbacks.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",  # last.ckpt; AtomicCheckpointIO keeps the one before too
                save_last=True,
                save_top_k=0,
                every_n_train_steps=cfg.checkpoint_every_n_steps,
                save_on_train_epoch_end=True,
                enable_version_counter=False,  # never last-v1.ckpt: a moved folder's resume must find last.ckpt
            )
        )
        guard = NonFiniteGuard(cfg.max_nonfinite_steps)
        callbacks.append(guard)
        mean, std = method.pixel_stats(cfg)
        if not sharded:
            pictures = PictureLogger(
                run_dir / "pictures", cfg.pictures.every_n_steps, cfg.pictures.num_images, mean, std
            )
            callbacks.append(pictures)
    knn = None
    if sharded and (cfg.get("knn") is not None or method.fits):
        log.warning(
            "trainer=fsdp: the kNN monitor and the pictures are off (rank zero alone cannot run a sharded model); "
            "the exports are written from the final checkpoint; evaluate it with `python -m src.finetune task=knn`"
        )
    elif cfg.get("knn") is not None:  # off for models outside the encoder contract (a supervised convnet teacher)
        knn = KNNMonitor(cfg.knn.every_n_epochs, cfg.knn.k, cfg.knn.temperature)
        callbacks.append(knn)
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks, loggers, module)

    checkpoint = None
    if method.fits:
        if ckpt_path is not None:
            log.info("resuming from %s", ckpt_path)
            changed = keep_global_batch(trainer, ckpt_path, cfg.batch_size)
            if changed and trainer.is_global_zero:
                log.warning(changed)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if module.needs_final_validation():  # every rank: a validation between epochs missed the last weights
            trainer.validate(module, datamodule=datamodule, verbose=False)
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(checkpoint, weights_only=False)  # full state: a max_steps stop would lose steps
    else:
        trainer.validate(module, dataloaders=module.evaluation_loaders(datamodule), verbose=False)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics |= knn.results if knn else {}
    result = RunResult(
        run_dir=run_dir,
        checkpoint=checkpoint,
        pictures=run_dir / "pictures" if pictures is not None and pictures.saved else None,
        wandb_dir=wandb_run_dir(loggers) if trainer.is_global_zero else None,
        metrics=metrics,
        global_step=trainer.global_step,
    )
    if trainer.is_global_zero:
        extra = {} if sharded else module.after_fit(trainer, datamodule, run_dir)
        if extra:
            for logger in trainer.loggers:
                logger.log_metrics(extra, step=trainer.global_step)
                logger.save()
            result.metrics |= extra
        if cfg.get("export", True):  # a sharded model is exported from its consolidated checkpoint
            out = run_dir / "export"
            if sharded:  # with the command's own permission to unpickle (never the recorded config's)
                allowed = pickle_allowed(OmegaConf.to_container(cfg, resolve=True))
                result.exports = export_run(run_dir, checkpoint, out, allow_pickle=allowed)
            else:
                result.exports = module.export(out)
        if method.fits:
            result.loss_curve = loss_curve(run_dir / "csv" / "metrics.csv", run_dir / "pictures" / "loss.png")
            result.first_and_last = pictures.first_and_last if pictures is not None else None
        write_atomically(run_dir / METRICS_FILE, json.dumps(result.metrics, indent=2, sort_keys=True))
        mark_finished(run_dir, cfg, result.record())
    return result


def summary(result: RunResult) -> str:
    """The one block a user reads at the end of a run: where everything went, and what the numbers mean."""
    lines = [f"run finished at step {result.global_step}: {result.run_dir}"]
    if result.finished_before:
        lines = [
            f"run already finished at step {result.global_step}: {result.run_dir} (nothing ran, nothing changed; to "
            "go on longer, pass resume_changes=[trainer.max_steps] with a larger trainer.max_steps, or "
            "resume_changes=[epochs] with more epochs)"
        ]
    if result.checkpoint:
        lines.append(f"  checkpoint : {result.checkpoint}  (resume: same command, resume=auto)")
    for name, path in result.exports.items():
        lines.append(f"  export     : {name} -> {path}")
    if result.pictures:
        lines.append(f"  pictures   : {result.pictures}")
    if result.first_and_last:
        lines.append(f"  first/last : {result.first_and_last}  (the same images at the first and the last step)")
    if result.loss_curve:
        lines.append(f"  loss curve : {result.loss_curve}")
    lines.append(f"  metrics    : {result.run_dir / METRICS_FILE}, history in {result.run_dir / 'csv' / 'metrics.csv'}")
    if result.wandb_dir:
        lines.append(f"  W&B run    : {result.wandb_dir}  (offline runs upload with `wandb sync {result.wandb_dir}`)")
    else:
        lines.append("  W&B run    : off (logger=csv or logger.wandb.enabled=false)")
    metrics = result.metrics
    if "data/skipped" in metrics or "train/nonfinite_steps" in metrics:
        lines.append(
            f"  skipped    : {metrics.get('data/skipped', 0):.0f} corrupt samples (named in the warnings), "
            f"{metrics.get('train/nonfinite_steps', 0):.0f} steps with NaN/inf gradients"
        )
    shown = {
        k: v
        for k, v in metrics.items()
        if k.startswith(("train/loss", "val/", "val_train_ratio/", "tokenizer/", "knn/top5"))
    }
    if shown:
        lines.append("  results    : " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())))
    if "knn/top1" in metrics:
        lines.extend(knn_reading(metrics, result.global_step))
    return "\n".join(lines)


def knn_reading(metrics: dict[str, float], step: int) -> list[str]:
    """kNN top-1 now, beside the untrained encoder and the raw pixels, and what the difference says."""
    now = 100 * metrics["knn/top1"]
    line = f"  kNN top-1  : {now:.1f} at step {step}"
    if "knn/start_top1" not in metrics:
        return [line]
    start, pixels = 100 * metrics["knn/start_top1"], 100 * metrics["knn/pixels_top1"]
    lines = [f"{line}; {start:.1f} at step 0 (the untrained encoder); {pixels:.1f} on the raw pixels"]
    gain = now - start
    if gain > 0:
        verdict = f"the encoder learned: {gain:.1f} points above its untrained self"
    else:
        verdict = f"no gain over the untrained encoder yet ({gain:+.1f} points): this run was too short to show one"
    if now < pixels:
        verdict += "; raw pixels are still ahead: on small grey images they are a kNN baseline short runs miss"
    lines.append(f"               {verdict}")
    return lines
