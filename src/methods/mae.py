"""MAE (He et al. 2021): reconstruct removed patches from the visible ones.

Attribute names follow the official release (decoder_embed, mask_token, decoder_pos_embed,
decoder_blocks, decoder_norm, decoder_pred); the encoder sits under ``encoder.``, so the official
layout is ours with that prefix stripped (``official_state_dict``/``load_official``), less the encoder's
own mask token, which the official encoder does not have.

Encoders that cannot drop tokens (Pale) run SimMIM-style: masked patches are replaced by the
encoder's mask token at its input, the full grid is encoded, and the same decoder runs over every
output token. An output token covering r x r target patches predicts all of them; the loss is
still taken on removed patches only.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from src.config import ConfigError
from src.data.distributed import SampleExtras
from src.encoders import create_encoder
from src.encoders.base import MaskedEncoder
from src.encoders.decoder import TokenGridDecoder
from src.encoders.loading import InitCheckpoint
from src.encoders.vit import init_linear_and_norm
from src.methods.base import TrainingMethod
from src.methods.grid import check_target_grid, target_layout, tokens_to_target_grid
from src.methods.masking import mask_noise, num_kept, random_masking


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), each patch flattened in (row, col, channel) order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify``."""
    b = patches.shape[0]
    h, w = grid
    x = patches.reshape(b, h, w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, h * patch, w * patch)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """norm_pix_loss target: per patch (x - mean) / sqrt(var + eps), unbiased variance as in the original."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over removed patches only."""
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAE(TrainingMethod, TokenGridDecoder):
    pretraining_keys = ("decoder_", "mask_token")
    official_skip = ("encoder.mask_token",)
    picture_columns = ("original", "masked input", "reconstruction")

    def __init__(
        self,
        encoder: MaskedEncoder,
        img_size: int,
        optim: dict,
        batch_size: int,
        warmup_epochs: float,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        token_drop: bool = True,
        target_patch: int | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ) -> None:
        super().__init__(encoder, optim, batch_size, warmup_epochs)
        self.save_hyperparameters(ignore=["encoder"])
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        layout = target_layout(encoder, img_size, target_patch)
        self.target_patch, self.sub = layout.target_patch, layout.sub  # sub: target patches per output token side
        self.out_grid, self.target_grid = layout.out_grid, layout.target_grid
        # Encode only visible patches where the encoder can (ViT); otherwise mask tokens over the full grid.
        self.token_drop = token_drop and encoder.supports_token_drop and self.sub == 1
        self.trains_mask_token = not self.token_drop
        self.decoder_prefix = encoder.num_prefix_tokens if self.token_drop else 0

        mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.build_decoder(
            encoder.num_features, decoder_dim, decoder_depth, decoder_heads, self.out_grid, ("mask_token", mask_token)
        )
        self.decoder_pred = nn.Linear(decoder_dim, self.sub * self.sub * self.target_patch**2 * 3)
        self._init_decoder()

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        layout = check_target_grid(cfg)
        kept, total = num_kept(layout.num_targets, cfg.objective.mask_ratio), layout.num_targets
        if not 1 <= kept < total:
            raise ConfigError(
                f"objective.mask_ratio={cfg.objective.mask_ratio} keeps {kept} of the {total} patches of the "
                f"{layout.target_grid[0]}x{layout.target_grid[1]} grid: MAE needs at least one visible and one "
                "removed patch"
            )

    @classmethod
    def sample_extras(cls, cfg: DictConfig) -> SampleExtras:
        """Each sample's mask noise, from its own seed: the masks do not depend on the world size."""
        return partial(mask_noise, num_patches=check_target_grid(cfg).num_targets)

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> MAE:
        o, img = cfg.objective, cfg.dataset.img_size
        return cls(
            create_encoder(cfg.encoder, img),
            img,
            mask_ratio=o.mask_ratio,
            norm_pix_loss=o.norm_pix_loss,
            token_drop=o.token_drop,
            target_patch=o.target_patch,
            decoder_dim=o.decoder_dim,
            decoder_depth=o.decoder_depth,
            decoder_heads=o.decoder_heads,
            **cls.common_kwargs(cfg),
        )

    def _init_decoder(self) -> None:
        """The official order of draws: the mask token, then the linears of the embedding, blocks and head."""
        nn.init.normal_(self.mask_token, std=0.02)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            part.apply(init_linear_and_norm)

    # ---- model ---------------------------------------------------------------------------------
    @property
    def num_target_patches(self) -> int:
        return self.target_grid[0] * self.target_grid[1]

    def encode_and_decode(
        self, images: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pred (B, L, p*p*3) on the target grid, mask (B, L) with 1 = removed)."""
        b = images.shape[0]
        m = random_masking(b, self.num_target_patches, self.mask_ratio, images.device, noise)
        if self.token_drop:
            latent = self.decoder_embed(self.encoder.forward_visible(images, m.ids_keep))
            prefix, visible = latent[:, : self.decoder_prefix], latent[:, self.decoder_prefix :]
            fill = self.mask_token.expand(b, self.num_target_patches - visible.shape[1], -1).to(visible.dtype)
            tokens = torch.cat([visible, fill], dim=1)
            tokens = torch.gather(tokens, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            x = torch.cat([prefix, tokens], dim=1)
        else:
            mask_grid = m.mask.bool().reshape(b, *self.target_grid)
            latent = self.encoder.forward_mask_token(images, mask_grid)[:, self.encoder.num_prefix_tokens :]
            x = self.decoder_embed(latent)
        pred = self.decoder_pred(self.decode(x, self.out_grid, self.decoder_prefix))[:, self.decoder_prefix :]
        return self._to_target_grid(pred), m.mask

    def _to_target_grid(self, pred: torch.Tensor) -> torch.Tensor:
        """(B, out_h*out_w, r*r*p*p*3) -> (B, (out_h*r)*(out_w*r), p*p*3) in row-major target order."""
        return tokens_to_target_grid(pred, self.out_grid, self.sub)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.target_patch)
        return normalize_patches(target) if self.norm_pix_loss else target

    def compute_loss(
        self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"]
        pred, mask = self.encode_and_decode(images, batch.get("mask_noise") if noise is None else noise)
        return masked_mse(pred.float(), self.target(images).float(), mask), {}

    # ---- pictures ------------------------------------------------------------------------------
    @torch.no_grad()
    def make_picture(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Original | masked input | reconstruction (the visible patches pasted back) of each image."""
        images = batch["image"]
        pred, mask = self.encode_and_decode(images)
        pred = pred.float()
        target = patchify(images, self.target_patch).float()
        if self.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = mask.unsqueeze(-1)
        masked = unpatchify(target * (1 - m), self.target_patch, self.target_grid)
        recon = unpatchify(target * (1 - m) + pred * m, self.target_patch, self.target_grid)
        return torch.stack([images.float(), masked, recon], dim=1)

    # ---- exports -------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> dict[str, Path]:
        paths = super().export(out_dir)
        paths["mae_full"] = out_dir / "mae_full_official.pth"
        torch.save({"model": self.official_state_dict()}, paths["mae_full"])
        return paths
