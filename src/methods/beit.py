"""BEiT (Bao et al. 2021): predict the visual tokens of blockwise-masked patches.

Each sample is one random resized crop seen twice: at the model's size (normalised) and at the
tokenizer's size ([0, 1]), chosen so the tokenizer's grid is the objective's target grid (BEiT:
224 px for the ViT-B/16, 112 px for the 8x-downsampling dVAE, 14 x 14 both), plus a blockwise mask
on that grid drawn in the DataLoader worker. The encoder replaces masked patches by its mask token
(``forward_mask_token``), a linear head maps its final-normed tokens to the vocabulary, and the
loss is the cross-entropy on masked positions only, averaged over all masked tokens of the batch.

Encoders whose output stride is a multiple of the target patch (Pale: 32 vs 16) predict the
r x r tokens each output token covers (``src/methods/grid.py``), as MAE does for pixels.

The tokenizer is frozen and not part of the run's checkpoints (it has its own file). Exports add
``beit_full_official.pth``: the encoder with ``mask_token`` and ``lm_head``, named as the official
pretraining checkpoints are (for ``encoder=beit_*``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from timm.layers import trunc_normal_
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from src.config import ConfigError
from src.data.transforms import _ImageTransform
from src.encoders import create_encoder
from src.encoders.base import MaskedEncoder
from src.encoders.beit import SHARED_TABLE, shared_to_per_layer_rel_pos_bias
from src.encoders.loading import InitCheckpoint
from src.files import save_weights
from src.methods.base import TrainingMethod, encoder_export_state
from src.methods.grid import TargetLayout, check_target_grid, target_layout, tokens_to_target_grid
from src.methods.masking import BlockwiseMaskGenerator, WorkerGenerator, beit_mask_counts
from src.methods.optim import weight_decay_groups
from src.tokenizers import load_tokenizer, tokenizer_spec
from src.tokenizers.base import VisualTokenizer

log = logging.getLogger(__name__)

UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # tokenizers take [0, 1] images
MASK_TINT = (1.0, 0.25, 0.25)  # masked patches in the pictures


class BeitTransform:
    """Flip, one random resized crop at two resolutions, and a blockwise mask on the target grid.

    Returns {"image": normalised (3, S, S), "tokenizer_image": [0, 1] (3, T, T), "mask": bool (h, w)}.
    The model view is bicubic, the tokenizer view Lanczos, as in the original.
    """

    def __init__(
        self,
        img_size: int,
        tokenizer_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        mask_generator: BlockwiseMaskGenerator,
        crop_scale: tuple[float, float] = (0.08, 1.0),
    ) -> None:
        self.img_size, self.tokenizer_size = img_size, tokenizer_size
        self.crop_scale = tuple(crop_scale)
        self.to_model = _ImageTransform([], mean, std)
        self.to_tokenizer = _ImageTransform([], UNIT_MEAN, UNIT_STD)
        self.mask_generator = mask_generator
        self.rng = WorkerGenerator()

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        if torch.rand(()) < 0.5:
            img = TF.horizontal_flip(img)
        box = RandomResizedCrop.get_params(img, list(self.crop_scale), [3 / 4, 4 / 3])
        model_view = TF.resized_crop(img, *box, [self.img_size] * 2, interpolation=v2.InterpolationMode.BICUBIC)
        tokenizer_view = TF.resized_crop(
            img, *box, [self.tokenizer_size] * 2, interpolation=v2.InterpolationMode.LANCZOS
        )
        return {
            "image": self.to_model(model_view)["image"],
            "tokenizer_image": self.to_tokenizer(tokenizer_view)["image"],
            "mask": torch.from_numpy(self.mask_generator(self.rng.get())),
        }


@dataclass(frozen=True)
class BeitSetup:
    """Everything checked before data or model are built: grids, tokenizer, mask generator."""

    layout: TargetLayout
    tokenizer_size: int
    mask_generator: BlockwiseMaskGenerator


class BEiT(TrainingMethod):
    pretraining_keys = ("lm_head.",)
    frozen_parts = ("tokenizer",)  # a fixed target with its own file, never trained here
    trains_mask_token = True
    picture_columns = ("input", "blockwise mask", "tokenizer's reconstruction", "predicted tokens decoded")

    def __init__(
        self,
        encoder: MaskedEncoder,
        tokenizer: VisualTokenizer,
        img_size: int,
        optim: dict,
        batch_size: int,
        warmup_epochs: float,
        target_patch: int | None = None,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__(encoder, optim, batch_size, warmup_epochs)
        self.save_hyperparameters(ignore=["encoder", "tokenizer"])
        layout = target_layout(encoder, img_size, target_patch)
        self.sub, self.out_grid, self.target_grid = layout.sub, layout.out_grid, layout.target_grid
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.vocab_size = tokenizer.vocab_size
        self.lm_head = torch.nn.Linear(encoder.num_features, self.sub * self.sub * self.vocab_size)
        trunc_normal_(self.lm_head.weight, std=0.02, a=-0.02, b=0.02)  # the official init (+-std truncation)
        torch.nn.init.zeros_(self.lm_head.bias)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # ---- configuration -------------------------------------------------------------------------
    @staticmethod
    def resolve(cfg: DictConfig) -> BeitSetup:
        """Check grids, tokenizer file and mask settings, naming the config key that is wrong."""
        o, img = cfg.objective, cfg.dataset.img_size
        spec = tokenizer_spec(o.tokenizer)
        layout = check_target_grid(cfg)
        with torch.device("meta"):  # the encoder must take a mask on the target grid
            try:
                create_encoder(cfg.encoder, img).forward_mask_token(
                    torch.empty(1, 3, img, img), torch.zeros(1, *layout.target_grid, dtype=bool)
                )
            except ValueError as e:
                raise ConfigError(f"objective.target_patch={o.target_patch}: {e}") from None
        num_masked, min_block = beit_mask_counts(layout.num_targets)
        m = o.mask
        try:
            generator = BlockwiseMaskGenerator(
                layout.target_grid,
                num_masked=m.num_patches or num_masked,
                min_block=m.min_block or min_block,
                min_aspect=m.min_aspect,
                max_tries=m.max_tries,
            )
        except ValueError as e:
            raise ConfigError(f"objective.mask: {e} (grid {layout.target_grid})") from None
        tokenizer_size = layout.target_grid[0] * spec["downsample"]
        if tokenizer_size != spec["img_size"]:
            log.warning(
                "the tokenizer was trained at %d px but sees %d px here (the %s target grid x its %d px tokens)",
                spec["img_size"],
                tokenizer_size,
                "x".join(map(str, layout.target_grid)),
                spec["downsample"],
            )
        return BeitSetup(layout, tokenizer_size, generator)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        cls.resolve(cfg)

    @classmethod
    def train_transform(cls, cfg: DictConfig) -> BeitTransform:
        setup = cls.resolve(cfg)
        d = cfg.dataset
        return BeitTransform(
            d.img_size, setup.tokenizer_size, d.mean, d.std, setup.mask_generator, cfg.objective.crop_scale
        )

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> BEiT:
        o, img = cfg.objective, cfg.dataset.img_size
        setup = cls.resolve(cfg)
        overrides: dict[str, Any] = {}
        if o.drop_path_rate is not None:
            overrides["drop_path_rate"] = o.drop_path_rate
        return cls(
            create_encoder(cfg.encoder, img, **overrides),
            load_tokenizer(o.tokenizer),
            img,
            target_patch=setup.layout.target_patch,
            mean=tuple(cfg.dataset.mean),
            std=tuple(cfg.dataset.std),
            **cls.common_kwargs(cfg),
        )

    def param_groups(self) -> list[dict]:
        """Matrices decay except cls_token and pos_embed, the official pretraining's exemptions."""
        return weight_decay_groups(self.named_parameters(), self.optim["weight_decay"], skip=("cls_token", "pos_embed"))

    # ---- model ---------------------------------------------------------------------------------
    def masked_logits(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N masked, vocab) scores for the masked target cells, in row-major order per sample."""
        latent = self.encoder.forward_mask_token(images, mask)[:, self.encoder.num_prefix_tokens :]
        flat = mask.flatten(1)
        if self.sub == 1:
            return self.lm_head(latent[flat])  # the head runs on masked positions only, as in the original
        return tokens_to_target_grid(self.lm_head(latent), self.out_grid, self.sub)[flat]

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["mask"]
        targets = self.tokenizer.tokenize(batch["tokenizer_image"])
        if targets.shape[1:] != mask.shape[1:]:
            raise ValueError(f"tokenizer grid {tuple(targets.shape[1:])} != mask grid {tuple(mask.shape[1:])}")
        logits = self.masked_logits(batch["image"], mask).float()
        labels = targets[mask]
        # mean over every masked token of the global batch: ranks may hold different numbers of masked tokens
        loss = self.global_mean(F.cross_entropy(logits, labels, reduction="sum"), labels.numel())
        return loss, {"mim_accuracy": (logits.argmax(-1) == labels).float().mean()}

    # ---- pictures ------------------------------------------------------------------------------
    def _normalize(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[0, 1] pixels at any size -> the model's normalised space at ``size`` (the picture logger undoes it)."""
        pixels = F.interpolate(pixels.float(), size=size, mode="nearest") if pixels.shape[-2:] != size else pixels
        return (pixels - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def make_picture(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input | blockwise mask over it | tokenizer's reconstruction | predicted tokens decoded, per image.

        The last two need a tokenizer with a decoder (not DALL-E's encoder). The prediction keeps the
        tokenizer's tokens where nothing was masked.
        """
        images, mask = batch["image"].float(), batch["mask"]
        size = tuple(images.shape[-2:])
        pixels = (images * self.pixel_std + self.pixel_mean).clamp(0, 1)
        covered = F.interpolate(mask[:, None].float(), size=size, mode="nearest")
        tint = torch.tensor(MASK_TINT, device=images.device).view(1, 3, 1, 1)
        views = [images, self._normalize(pixels * (1 - covered) + (0.4 * pixels + 0.6 * tint) * covered, size)]
        tokens = self.tokenizer.tokenize(batch["tokenizer_image"])
        recon = self.tokenizer.decode(tokens)
        if recon is not None:
            predicted = tokens.clone()
            predicted[mask] = self.masked_logits(images, mask).argmax(-1)
            views += [self._normalize(recon.clamp(0, 1), size), self._normalize(self.tokenizer.decode(predicted), size)]
        return torch.stack(views, dim=1)

    # ---- exports -------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> dict[str, Path]:
        """Adds the official pretraining layout and, for a shared relative position bias, per-layer tables."""
        paths = super().export(out_dir)
        paths["beit_full"] = out_dir / "beit_full_official.pth"
        torch.save({"model": self.official_state_dict()}, paths["beit_full"])
        state = encoder_export_state(self.encoder)
        if SHARED_TABLE in state:
            per_layer = shared_to_per_layer_rel_pos_bias(state)
            paths["encoder_per_layer"] = out_dir / "encoder_per_layer_rel_pos.safetensors"
            save_weights(per_layer, paths["encoder_per_layer"])
        return paths
