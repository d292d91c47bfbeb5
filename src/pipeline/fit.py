"""The one pipeline every run goes through: settle -> validate -> data -> method -> trainer -> fit -> export.

Pretraining, fine-tuning, the kNN evaluation, the teacher trainer and the tokenizer trainer differ only in
the method the config names (``cfg.method``, looked up in ``src.methods.METHODS``). A method that trains
nothing (``fits = False``, the kNN evaluation) is validated once instead of fitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, validate
from src.evaluation.knn import check_configured_bank
from src.methods import method_class
from src.methods.base import TrainingMethod
from src.pipeline.callbacks import KNNMonitor, NonFiniteGuard, PictureLogger, SameConfigOnEveryRank
from src.pipeline.checkpoint import AtomicCheckpointIO
from src.pipeline.elastic import ElasticLayout, keep_global_batch
from src.pipeline.export import export_run, pickle_allowed, pickle_permissions
from src.pipeline.loggers import build_loggers, check_logger, wandb_run_dir
from src.pipeline.output import log_to_file, single_log_stream
from src.pipeline.progress import progress_callbacks
from src.pipeline.run_folder import (
    FINISHED_FILE,
    check_same_run,
    check_writable,
    checkpoint_step,
    finished_run,
    record_run,
    resume_checkpoint,
    run_folder,
    run_lock,
)
from src.pipeline.settle import SettledRun, settle
from src.pipeline.strategy import (
    build_strategy,
    check_trainer,
    cluster_plugins,
    maybe_compile,
    resolved_precision,
    stopped_ranks_end_the_run,
)
from src.pipeline.summary import RunResult
from src.shards import is_sharded

log = logging.getLogger(__name__)


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], loggers: list, module: TrainingMethod
) -> L.Trainer:
    """The Trainer of ``cfg.trainer``, laid out for the module (FSDP units, compiled blocks) and the cluster.

    The data module splits the data over the ranks itself (one global batch whatever the world size), so
    Lightning must not put a DistributedSampler in front of it. ``trainer.compile`` and ``trainer.fsdp`` are
    read here, not passed to the Trainer; ``trainer.progress`` picks how progress shows (``progress.py``).
    """
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.pop("fsdp", None)
    trainer_kwargs.pop("timeout_s", None)
    maybe_compile(module, bool(trainer_kwargs.pop("compile", False)))
    progress = progress_callbacks(trainer_kwargs.pop("progress"))
    trainer_kwargs["precision"] = resolved_precision(cfg.trainer)
    trainer_kwargs["strategy"] = build_strategy(cfg, module)
    return L.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir),  # where Lightning writes hpc_ckpt_<N>.ckpt on a SLURM requeue signal
        logger=loggers,
        callbacks=[*callbacks, *progress],
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


def prepare(cfg: DictConfig) -> SettledRun:
    """Settle the composed config once (``settle``), then check the settled config: all before any work.

    The permission to unpickle is checked first, since settling reads the init checkpoint.
    """
    check_pickle_permission(cfg)
    settled = settle(cfg, method_class(cfg.method))
    cfg = settled.cfg
    validate(cfg)
    check_trainer(cfg)
    if cfg.get("knn") is not None:  # the monitor's bank, as objective=knn checks its own
        check_configured_bank(cfg.knn.k, cfg.dataset, "knn.k")
    check_logger(cfg)
    settled.method.check_config(cfg)
    return settled


def shown_config(cfg: DictConfig) -> str:
    """``show_config=true``: the config ``run`` would record for the same command, settled and checked, with what
    composition and the method chose as comments above it; nothing is written."""
    return prepare(cfg).shown()


def run(cfg: DictConfig) -> RunResult:
    """Fit (or, for an evaluation, validate) the method ``cfg.method`` names, then export and summarise.

    Rank zero holds the run folder's lock throughout; other ranks (DDP children, torchrun) join its run.
    """
    single_log_stream()
    settled = prepare(cfg)
    for note in settled.notes:
        log.info(note)
    cfg = settled.cfg
    with stopped_ranks_end_the_run(cfg.trainer):
        run_dir = run_folder(cfg)
        if rank_zero_only.rank != 0:  # decides as rank zero does: the marker is gone before rank zero changes anything
            finished = finished_run(run_dir, cfg)
            return RunResult.recorded(run_dir, finished) if finished else fit(settled, run_dir)
        check_writable(run_dir)
        with run_lock(run_dir, takeover=bool(cfg.get("takeover", False))):
            check_same_run(run_dir, cfg)
            finished = finished_run(run_dir, cfg)
            if finished is not None:
                return RunResult.recorded(run_dir, finished)
            return fit(settled, run_dir)


def fit(settled: SettledRun, run_dir: Path) -> RunResult:
    """The pipeline itself, once the config and the run folder are settled: its steps, in order."""
    cfg, method = settled.cfg, settled.method
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resume_checkpoint(run_dir, cfg.resume) if method.fits else None
    if ckpt_path is not None and is_sharded(ckpt_path) and cfg.trainer.strategy != "fsdp":
        raise ConfigError(
            f"{ckpt_path} is a folder of shards written under trainer=fsdp, and trainer.strategy="
            f"{cfg.trainer.strategy} reads one file: resume with trainer=fsdp (any number of processes; "
            "trainer=cpu_fsdp on the CPU), or start a new run_name from its export (python -m src.export)"
        )
    if rank_zero_only.rank == 0:
        (run_dir / FINISHED_FILE).unlink(missing_ok=True)  # a longer run: its old results are no longer whole
        record_run(run_dir, cfg)
        log_to_file(run_dir)  # rank zero's: another rank may start before the folder exists

    datamodule = method.build_data(cfg)  # data first: a wrong path fails before any model is built
    module = settled.build()
    if module.init_report is not None:
        module.init_report.publish(run_dir)
    if cfg.get("encoder") is not None:  # fine-tuning rebuilds the encoder a checkpoint records
        module.hparams["encoder_config"] = OmegaConf.to_container(cfg.encoder, resolve=True)

    watch = RunCallbacks.for_run(cfg, method, module, run_dir)
    loggers = build_loggers(cfg, run_dir, checkpoint_step(ckpt_path) if ckpt_path is not None else None)
    trainer = build_trainer(cfg, run_dir, watch.callbacks, loggers, module)
    checkpoint = train_or_evaluate(trainer, module, datamodule, ckpt_path, run_dir, cfg.batch_size)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics |= watch.knn.results if watch.knn else {}
    result = RunResult(
        run_dir=run_dir,
        checkpoint=checkpoint,
        pictures=run_dir / "pictures" if watch.pictures is not None and watch.pictures.saved else None,
        wandb_dir=wandb_run_dir(loggers) if trainer.is_global_zero else None,
        metrics=metrics,
        global_step=trainer.global_step,
    )
    if trainer.is_global_zero:
        finish(cfg, trainer, module, datamodule, watch, result)
    return result


def sharded(cfg: DictConfig) -> bool:
    """Parameters live in shards: rank zero alone cannot run the model after training, so the exports come from
    the final checkpoint (its shards gathered) and the method's last measures are skipped."""
    return cfg.trainer.strategy == "fsdp"


@dataclass
class RunCallbacks:
    """Every callback of a run, and the two whose results the pipeline reads afterwards."""

    callbacks: list[L.Callback]
    pictures: PictureLogger | None = None
    knn: KNNMonitor | None = None

    @classmethod
    def for_run(
        cls, cfg: DictConfig, method: type[TrainingMethod], module: TrainingMethod, run_dir: Path
    ) -> RunCallbacks:
        watch = cls(
            [
                SameConfigOnEveryRank(cfg),
                ElasticLayout(cfg.batch_size),  # the global batch a checkpoint was made with, kept on an elastic resume
                *module.callbacks(run_dir),
            ]
        )
        if method.fits:
            watch.callbacks.append(
                ModelCheckpoint(
                    dirpath=run_dir / "checkpoints",  # last.ckpt; AtomicCheckpointIO keeps the one before too
                    save_last=True,
                    save_top_k=0,
                    every_n_train_steps=cfg.checkpoint_every_n_steps,
                    save_on_train_epoch_end=True,
                    enable_version_counter=False,  # never last-v1.ckpt: a moved folder's resume must find last.ckpt
                )
            )
            watch.callbacks.append(NonFiniteGuard(cfg.max_nonfinite_steps))
            mean, std = method.pixel_stats(cfg)
            watch.pictures = PictureLogger(
                run_dir / "pictures", cfg.pictures.every_n_steps, cfg.pictures.num_images, mean, std
            )
            watch.callbacks.append(watch.pictures)
        if cfg.get("knn") is not None:  # off for models outside the encoder contract (a supervised convnet teacher)
            watch.knn = KNNMonitor(cfg.knn.every_n_epochs, cfg.knn.k, cfg.knn.temperature)
            watch.callbacks.append(watch.knn)
        return watch


def train_or_evaluate(
    trainer: L.Trainer,
    module: TrainingMethod,
    datamodule: L.LightningDataModule,
    ckpt_path: Path | None,
    run_dir: Path,
    batch_size: int,
) -> Path | None:
    """Fit (resuming from ``ckpt_path``) and return the final checkpoint; an evaluation validates once instead."""
    if not module.fits:
        trainer.validate(module, dataloaders=module.evaluation_loaders(datamodule), verbose=False)
        return None
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
        changed = keep_global_batch(trainer, ckpt_path, batch_size)
        if changed and trainer.is_global_zero:
            log.warning(changed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if module.needs_final_validation():  # every rank: a validation between epochs missed the last weights
        trainer.validate(module, datamodule=datamodule, verbose=False)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=False)  # full state: a max_steps stop would lose steps
    return checkpoint


def finish(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: TrainingMethod,
    datamodule: L.LightningDataModule,
    watch: RunCallbacks,
    result: RunResult,
) -> None:
    """Rank zero, after training: the method's last measures, the exports, the loss curve, then the record."""
    run_dir = result.run_dir
    extra = {} if sharded(cfg) else module.after_fit(trainer, datamodule, run_dir)
    if extra:
        for logger in trainer.loggers:
            logger.log_metrics(extra, step=trainer.global_step)
            logger.save()
        result.metrics |= extra
    if cfg.get("export", True):  # a sharded model is exported from its consolidated checkpoint
        out = run_dir / "export"
        allowed = pickle_allowed(OmegaConf.to_container(cfg, resolve=True))  # the command's, never the record's
        if sharded(cfg):
            result.exports = export_run(run_dir, result.checkpoint, out, allow_pickle=allowed)
        else:
            result.exports = module.export(out)
        if cfg.get("export_formats"):  # hf, onnx: rebuilt from the final checkpoint on the CPU, each file checked
            formats = list(cfg.export_formats)
            result.exports |= export_run(run_dir, result.checkpoint, out, allow_pickle=allowed, formats=formats)
    if module.fits:
        result.loss_curve = watch.pictures.curves.get("loss")  # drawn with the other figures at the end of training
        result.first_and_last = watch.pictures.first_and_last
    result.save(cfg)
