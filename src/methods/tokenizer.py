"""Training BEiT's visual tokenizer (``python -m src.train_tokenizer``): fit a VQ-VAE, report codebook use.

It is a training method like the others (its "encoder" is the whole VQ-VAE), so lr scaling, warm-up +
cosine, logging, checkpoints and the run folder are the shared pipeline's. After training it measures the
codebook on held-out images (``usage.json``); its export is what ``objective.tokenizer.path`` points at.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from src.config import ConfigError
from src.data.datamodule import ImageDataModule
from src.encoders.loading import InitCheckpoint
from src.methods.base import TrainingMethod
from src.tokenizers import save_tokenizer
from src.tokenizers.base import codebook_usage
from src.tokenizers.vq import VQTokenizer

# Tokenizers see [0, 1] images: the data transforms with a zero mean and unit std.
UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
ARCH_KEYS = ("vocab_size", "downsample", "img_size", "hidden", "code_dim", "res_blocks")
LOSS_KEYS = ("commitment", "ema_decay", "restart_threshold")


class TokenizerModule(TrainingMethod):
    """Reconstruction + commitment loss; the codebook follows its EMA inside each training step."""

    picture_columns = ("input", "reconstruction from its tokens")

    def __init__(
        self, tokenizer: VQTokenizer, optim: dict, batch_size: int, warmup_epochs: float, report_images: int = 2000
    ) -> None:
        super().__init__(tokenizer, optim, batch_size, warmup_epochs)
        self.report_images = report_images

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        build_tokenizer(cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> TokenizerModule:
        return cls(build_tokenizer(cfg), report_images=cfg.report_images, **cls.common_kwargs(cfg))

    @classmethod
    def pixel_stats(cls, cfg: DictConfig) -> tuple[Sequence[float], Sequence[float]]:
        return UNIT_MEAN, UNIT_STD

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
        """Input | reconstruction from its tokens, per image, in [0, 1]."""
        images = batch["image"]
        recon = self.tokenizer.decode(self.tokenizer.tokenize(images)).clamp(0, 1)
        return torch.stack([images, recon], dim=1)

    def after_fit(self, trainer: L.Trainer, datamodule: ImageDataModule, run_dir: Path) -> dict[str, float]:
        """Codebook usage and reconstruction error on held-out images (the test split when there is one)."""
        loaders = datamodule.knn_dataloaders()
        held_out = loaders[1] if loaders is not None else datamodule.train_dataloader()
        report = evaluate_tokenizer(self.tokenizer, held_out, self.report_images, self.device)
        (run_dir / "usage.json").write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"  codebook   : perplexity {report['perplexity']:.1f} of {self.tokenizer.vocab_size}, "
            f"{report['dead_codes']:.0f} dead codes, held-out recon MSE {report['recon_mse']:.4f} "
            f"({report['images']:.0f} images; {run_dir / 'usage.json'})"
        )
        return {f"tokenizer/{k}": v for k, v in report.items()}

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
    """The VQ-VAE of ``cfg.objective``; sizes that do not fit together (img_size, downsample) are config errors."""
    t = cfg.objective
    try:
        return VQTokenizer(**{k: t[k] for k in ARCH_KEYS + LOSS_KEYS})
    except ValueError as e:
        raise ConfigError(f"objective.{e}") from None
