"""What `python -m src.train_tokenizer` does: fit a VQ tokenizer, report codebook use, export it.

The tokenizer trains as an objective of the shared ``PretrainModule`` (its "encoder" is the whole
VQ-VAE), so lr scaling, warm-up + cosine, logging and throughput are the pretraining ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from src.callbacks.pictures import PictureLogger
from src.config import ConfigError, validate
from src.data.datamodule import build_datamodule
from src.data.transforms import EvalTransform, PretrainTransform
from src.loggers import build_loggers, wandb_run_dir
from src.objectives.base import PretrainModule
from src.runner import RunResult, build_trainer, resume_checkpoint
from src.tokenizers import save_tokenizer
from src.tokenizers.base import codebook_usage
from src.tokenizers.vq import VQTokenizer

log = logging.getLogger(__name__)

# Tokenizers see [0, 1] images: the data transforms with a zero mean and unit std.
UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
ARCH_KEYS = ("vocab_size", "downsample", "img_size", "hidden", "code_dim", "res_blocks")
LOSS_KEYS = ("commitment", "ema_decay", "restart_threshold")


class TokenizerModule(PretrainModule):
    """Reconstruction + commitment loss; the codebook follows its EMA inside each training step."""

    def __init__(self, tokenizer: VQTokenizer, optim: dict, batch_size: int, warmup_epochs: float) -> None:
        super().__init__(tokenizer, optim, batch_size, warmup_epochs)

    @property
    def tokenizer(self) -> VQTokenizer:
        return self.encoder

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.tokenizer(batch["image"])
        restarted = self.tokenizer.update_codebook(out["z"], out["tokens"])
        counts = torch.bincount(out["tokens"].flatten(), minlength=self.tokenizer.vocab_size)
        usage = codebook_usage(counts)
        return out["loss"], {
            "recon_loss": out["recon_loss"].detach(),
            "commit_loss": out["commit_loss"].detach(),
            "batch_perplexity": torch.tensor(usage["perplexity"]),
            "codes_restarted": torch.tensor(float(restarted)),
        }

    @torch.no_grad()
    def make_picture(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pairs of input | reconstruction from its tokens, in [0, 1]."""
        images = batch["image"]
        recon = self.tokenizer.decode(self.tokenizer.tokenize(images)).clamp(0, 1)
        return torch.stack([images, recon], dim=1).flatten(0, 1)

    def export(self, out_dir: Path) -> dict[str, Path]:
        return save_tokenizer(self.tokenizer, out_dir)


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: VQTokenizer, loader: DataLoader, max_images: int, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Reconstruction MSE through the tokens and codebook usage over up to ``max_images`` images."""
    was_training = tokenizer.training
    tokenizer.eval()
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    squared_error, pixels, seen = 0.0, 0, 0
    for batch in loader:
        images = batch["image"][: max_images - seen].to(device)
        tokens = tokenizer.tokenize(images)
        recon = tokenizer.decode(tokens)
        squared_error += float((recon - images).pow(2).sum())
        pixels += images.numel()
        counts += torch.bincount(tokens.flatten().cpu(), minlength=tokenizer.vocab_size)
        seen += images.shape[0]
        if seen >= max_images:
            break
    tokenizer.train(was_training)
    return {"recon_mse": squared_error / max(pixels, 1), "images": float(seen), **codebook_usage(counts)}


def build_tokenizer(cfg: DictConfig) -> VQTokenizer:
    t = cfg.tokenizer
    if t.kind != "vq":
        raise ConfigError(f"tokenizer.kind={t.kind!r}: only 'vq' is trained here (DALL-E's is loaded from a file)")
    try:
        return VQTokenizer(**{k: t[k] for k in ARCH_KEYS + LOSS_KEYS})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def train_tokenizer(cfg: DictConfig) -> tuple[RunResult, dict[str, float]]:
    """Fit, then the usage report on held-out images (the test split when there is one)."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir).resolve()
    ckpt_path = resume_checkpoint(run_dir, cfg.resume)
    tokenizer = build_tokenizer(cfg)
    size = cfg.tokenizer.img_size
    try:
        datamodule = build_datamodule(
            cfg.dataset,
            train_transform=PretrainTransform(size, UNIT_MEAN, UNIT_STD),
            eval_transform=EvalTransform(size, UNIT_MEAN, UNIT_STD),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
        )
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    optim: dict[str, Any] = OmegaConf.to_container(cfg.tokenizer.optim, resolve=True)
    module = TokenizerModule(tokenizer, optim, cfg.batch_size, cfg.warmup_epochs)

    checkpointing = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every_n_steps
    )
    pictures = PictureLogger(run_dir / "pictures", cfg.pictures.every_n_steps, cfg.pictures.num_images)
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, [checkpointing, pictures], loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    final = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(final, weights_only=False)  # full state, so a resume continues exactly

    result = RunResult(
        run_dir=run_dir,
        checkpoint=final,
        pictures=run_dir / "pictures" if pictures.saved else None,
        wandb_dir=wandb_run_dir(loggers) if trainer.is_global_zero else None,
        metrics={k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        global_step=trainer.global_step,
    )
    report: dict[str, float] = {}
    if trainer.is_global_zero:
        loaders = datamodule.knn_dataloaders()
        held_out = loaders[1] if loaders is not None else datamodule.train_dataloader()
        report = evaluate_tokenizer(tokenizer, held_out, cfg.report_images, module.device)
        for logger in trainer.loggers:
            logger.log_metrics({f"tokenizer/{k}": v for k, v in report.items()}, step=trainer.global_step)
        (run_dir / "usage.json").write_text(json.dumps(report, indent=2) + "\n")
        result.exports = module.export(run_dir / "export")
    return result, report
