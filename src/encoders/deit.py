"""DeiT's distilled ViT (Touvron et al. 2020): a distillation token beside the cls token, with its own head.

``DistilledMaskableViT`` is timm's ``VisionTransformerDistilled`` with this toolkit's masked-input
contract (``MaskableViT``), so a DeiT student is also an encoder for kNN, fine-tuning and masked
objectives. Names are timm's: ``cls_token``, ``dist_token``, ``pos_embed`` (1, N + 2, D) with rows for
both prefix tokens, ``head`` and ``head_dist``, so official DeiT distilled checkpoints (timm's
``deit_*_distilled_patch16_224``) load strictly and exports load back into those timm models.

Registered as ``<arch>_distilled`` for every ``mim_vit_*`` arch; the DeiT objective picks that name
for a ViT encoder config.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.deit import VisionTransformerDistilled

from src.encoders.vit import MaskableViT


class DistilledMaskableViT(MaskableViT, VisionTransformerDistilled):
    """cls + distillation tokens, two heads; with ``distilled_training`` on, training returns both logits.

    In eval mode (and in training with ``distilled_training`` off, timm's default) ``forward`` returns
    the average of the two heads' logits, which is how the DeiT code evaluates a distilled model.
    """

    def _prefix_tokens(self, batch: int) -> torch.Tensor:
        """cls and distillation tokens, each with its own position embedding (rows 0 and 1)."""
        prefix = torch.cat([self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1)], dim=1)
        return prefix + self.pos_embed[:, : self.num_prefix_tokens]

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls-head logits, distillation-head logits) whatever the mode; objectives score each head."""
        tokens = self.forward_features(x)
        return self.head(self.head_drop(tokens[:, 0])), self.head_dist(self.head_drop(tokens[:, 1]))


# width / depth / heads of the plain mim_vit_* archs (src/encoders/vit.py), so every ViT config has a student
SIZES = {
    "mim_vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "mim_vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "mim_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mim_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mim_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def _create(arch: str, **kwargs) -> DistilledMaskableViT:
    for timm_only in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)  # nothing is downloaded: weights come from local files only
    return DistilledMaskableViT(**{**SIZES[arch], **kwargs})


@register_model
def mim_vit_tiny_patch16_distilled(**kwargs) -> DistilledMaskableViT:
    return _create("mim_vit_tiny_patch16", **kwargs)


@register_model
def mim_vit_small_patch16_distilled(**kwargs) -> DistilledMaskableViT:
    return _create("mim_vit_small_patch16", **kwargs)


@register_model
def mim_vit_base_patch16_distilled(**kwargs) -> DistilledMaskableViT:
    return _create("mim_vit_base_patch16", **kwargs)


@register_model
def mim_vit_large_patch16_distilled(**kwargs) -> DistilledMaskableViT:
    return _create("mim_vit_large_patch16", **kwargs)


@register_model
def mim_vit_huge_patch14_distilled(**kwargs) -> DistilledMaskableViT:
    return _create("mim_vit_huge_patch14", **kwargs)
