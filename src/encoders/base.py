"""The masked-input contract every encoder implements, so that methods never name a concrete class.

Grids: an encoder's output tokens sit on a grid of ``patch_size`` pixels. Methods define masks on their
own target grid (``target_patch``); it must tile the encoder's output grid, i.e. ``patch_size %
target_patch == 0``. For plain ViT both are 16; for Pale the output stride is 32 and a 16 px target grid
is predicted as 2x2 sub-patches per output token.

Every encoder owns a learned ``mask_token``, used or not: a method never has to decide at construction
whether it will mask. Exports drop it (``EXPORT_DROPPED``). It is drawn on a side stream of the random
generator (``side_stream``), so its presence does not shift the initialisation of anything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

# Pretraining-only parts of an encoder that never leave it in an export or go into a classifier.
EXPORT_DROPPED = ("mask_token",)
# Classifier heads: a new task always starts them afresh (new classes).
HEADS = ("head.", "head_dist.")


def pretrained_cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """timm's default config of a registered arch: ImageNet input and statistics; no weights to download."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        **kwargs,
    }


def keeping_own_mask_token(filter_fn: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., dict[str, torch.Tensor]]:
    """A family filter for timm's (strict) pretrained loading: a checkpoint without a mask token keeps the model's.

    Exports never carry the mask token, so ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=export))`` loads them strictly through this.
    """

    def pretrained_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        state = filter_fn(state, model)
        state.setdefault("mask_token", model.mask_token.detach().clone())
        return state

    return pretrained_filter


@contextmanager
def side_stream() -> Iterator[None]:
    """Random draws inside do not advance the global generator: what follows initialises as if they never ran."""
    with torch.random.fork_rng(devices=[]):
        yield


@dataclass
class FilterReport:
    """What a checkpoint filter changed on the way into a model (extended by the loader's full report)."""

    dropped: list[str] = field(default_factory=list)
    remapped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def move_final_norm(state: dict[str, torch.Tensor], model: nn.Module, report: FilterReport, to_fc_norm: bool) -> None:
    """Global pooling moves the final norm after the pool (timm's ``fc_norm``): start it from ``norm`` or afresh.

    ``to_fc_norm=False`` is the MAE code's choice: fc_norm starts at ones/zeros and the pretrained norm is unused.
    """
    own = model.state_dict()
    if "fc_norm.weight" not in own or "norm.weight" in own:
        return
    for suffix in ("weight", "bias"):
        if f"norm.{suffix}" not in state:
            continue
        if to_fc_norm:
            state[f"fc_norm.{suffix}"] = state.pop(f"norm.{suffix}")
            report.remapped[f"norm.{suffix}"] = f"fc_norm.{suffix}"
        else:
            del state[f"norm.{suffix}"]
            report.dropped.append(f"norm.{suffix}")


def mask_token_in_stem(matcher: dict[str, Any]) -> dict[str, Any]:
    """timm's group matcher with the mask token among the embeddings (layer 0 of layer-wise lr decay)."""
    return {**matcher, "stem": f"^mask_token|{matcher['stem']}"}


class MaskedEncoder(nn.Module, ABC):
    """What methods rely on (in the spirit of lightly's MaskedVisionTransformer); abstract methods are enforced."""

    patch_size: int  # pixels per output token side
    num_features: int  # channels of the output tokens
    num_prefix_tokens: int = 0  # class/distillation tokens before the patch tokens
    supports_token_drop: bool = False  # True only when forward_visible is implemented
    mask_token: nn.Parameter

    def grid_size(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """Output token grid (rows, cols) for an input of ``img_size`` pixels."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the encoder's patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def forward_visible(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Encode only the patches at ``keep_idx`` (B, K) -> (B, prefix + K, D), final-normed."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop tokens; use forward_mask_token")

    @abstractmethod
    def forward_mask_token(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace masked patches by the mask token and encode the full grid.

        ``mask`` is (B, h, w) bool, True = masked, on any grid whose cells tile the encoder's input unit
        (token encoders: exactly their patch grid; Pale: any multiple of its 4 px stem). Returns
        (B, prefix + L, D) final-normed tokens on the output grid (row-major).
        """

    @abstractmethod
    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features for kNN and linear probes: final-normed patch tokens, mean-pooled."""

    @abstractmethod
    def filter_checkpoint(
        self, state: dict[str, torch.Tensor], report: FilterReport, norm_to_fc_norm: bool = True
    ) -> dict[str, torch.Tensor]:
        """Fit a checkpoint of this family (official or ours, timm naming) to this model: the family's filter."""

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_prefix_tokens, D) final-normed prefix tokens (cls first); only for encoders that have them."""
        if not self.num_prefix_tokens:
            raise ValueError(f"{type(self).__name__} has no prefix (cls) token: use forward_pooled")
        return self.forward_features(x)[:, : self.num_prefix_tokens]


class PatchTokenEncoder(MaskedEncoder):
    """Flat token encoders (ViT, BEiT): prefix tokens, then one token per patch, the same width throughout.

    Subclasses provide timm's ``patch_embed``, ``forward_features``, an optional ``fc_norm``, and
    ``encode_tokens``: the one encoding path every input takes, whether its patch embeddings come from the
    encoder's own ``patch_embed`` (full grid, masked, or a kept subset) or from another stem on another grid
    (detection's ConvStem). ``token_parameters`` says which parameters that path runs.
    """

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The patch grid of the image size the encoder was built for: the grid its position table holds."""
        return tuple(self.patch_embed.grid_size)

    @abstractmethod
    def encode_tokens(
        self, tokens: torch.Tensor, grid: tuple[int, int], keep_idx: torch.Tensor | None = None, prefix: bool = True
    ) -> torch.Tensor:
        """(B, h*w, D) patch embeddings on ``grid`` (no position embedding yet) -> final-normed tokens.

        Adds the encoder's position table resized to ``grid`` (the table itself on ``patch_grid``), keeps the
        tokens at ``keep_idx`` (B, K) if given, prepends the prefix tokens when ``prefix``, then runs the blocks
        (under the encoder's own gradient-checkpointing switch) and the final norm:
        (B, [num_prefix_tokens +] K or h*w, D). A family that cannot honour a request refuses it by name.
        """

    @abstractmethod
    def token_parameters(self, prefix: bool = True) -> list[nn.Parameter]:
        """The parameters ``encode_tokens`` runs: a caller that brings its own tokens (detection) freezes the rest."""

    def forward_visible(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(self.patch_embed(x), self.patch_grid, keep_idx)

    def forward_mask_token(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        grid = self.patch_grid
        if tuple(mask.shape[1:]) != grid:
            raise ValueError(f"{type(self).__name__} masks must lie on its {grid} patch grid, got {tuple(mask.shape)}")
        patches = self.patch_embed(x)
        patches = torch.where(mask.flatten(1).unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        return self.encode_tokens(patches, grid)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the final-normed patch tokens (then ``fc_norm``, which is the identity unless pooling uses it)."""
        return self.fc_norm(self.forward_features(x)[:, self.num_prefix_tokens :].mean(dim=1))
