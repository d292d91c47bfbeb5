"""What `python -m src.finetune` does: classify/linear train through the shared runner, knn evaluates directly."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from torch import nn

from src.classify import CLASSIFIERS, encoder_from_config
from src.config import ConfigError, validate
from src.data.datamodule import build_datamodule
from src.data.transforms import EvalTransform
from src.init_weights import load_encoder_weights
from src.knn import knn_accuracy
from src.loggers import build_loggers, wandb_run_dir
from src.runner import RunResult, pretrain

TASKS = ("classify", "linear", "knn")


class RawPixels(nn.Module):
    """The pixel baseline of the kNN protocol: the normalised image itself, flattened, is the feature."""

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def finetune(cfg: DictConfig) -> RunResult:
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not one of {TASKS}")
    if cfg.task.name == "knn":
        return evaluate_knn(cfg)
    result = pretrain(cfg, objective=CLASSIFIERS[cfg.task.name])  # the shared fit -> export pipeline
    write_metrics(result.run_dir, result.metrics)
    return result


@rank_zero_only
def write_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def evaluate_knn(cfg: DictConfig) -> RunResult:
    """The shared/data.md kNN protocol on the (initialised) encoder, and on raw pixels beside it."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir).resolve()
    eval_transform = EvalTransform(cfg.dataset.img_size, cfg.dataset.mean, cfg.dataset.std)
    try:
        datamodule = build_datamodule(cfg.dataset, eval_transform, eval_transform, cfg.batch_size, cfg.num_workers)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    num_classes = datamodule.num_classes
    loaders = datamodule.knn_dataloaders()
    if loaders is None or num_classes is None:
        raise ConfigError(f"task=knn needs a labelled split and dataset.num_classes (dataset={cfg.dataset.name})")
    encoder = encoder_from_config(cfg)
    report = load_encoder_weights(encoder, cfg.init, cfg.encoder)
    report.publish(run_dir)

    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if on_gpu else "cpu")
    k, temperature = cfg.task.k, cfg.task.temperature
    top1, top5 = knn_accuracy(encoder.to(device), loaders, num_classes, k, temperature, device)
    metrics = {"knn/top1": top1, "knn/top5": top5}
    if cfg.task.pixels:
        top1, top5 = knn_accuracy(RawPixels(), loaders, num_classes, k, temperature, device)
        metrics |= {"knn/pixels_top1": top1, "knn/pixels_top5": top5}
    sizes = {"knn/bank_size": len(loaders[0].dataset), "knn/query_size": len(loaders[1].dataset)}

    loggers = build_loggers(cfg, run_dir)
    for logger in loggers:
        logger.log_metrics(metrics | sizes, step=0)
        logger.finalize("success")
    write_metrics(run_dir, metrics | sizes)
    return RunResult(run_dir=run_dir, checkpoint=None, wandb_dir=wandb_run_dir(loggers), metrics=metrics)
