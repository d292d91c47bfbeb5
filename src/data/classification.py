"""The data side of supervised recipes (DeiT): timm's per-sample augmentation.

Repeated augmentation is the training sampler's (``GlobalBatchSampler(repeats=...)``, src/data/distributed.py).

Batch-level mixing (mixup/cutmix) is not here: it needs the whole batch and the class count, so the
objective applies timm's ``Mixup`` in its training step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from timm.data import create_transform


class ClassificationTrainTransform:
    """RandomResizedCrop + flip + RandAugment (or colour jitter) + normalise + random erasing, via timm.

    Grey images are made RGB first: RandAugment's colour operations and the 3-channel encoders expect it.
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        rand_augment: str | None,
        crop_scale: Sequence[float],
        hflip: float,
        color_jitter: float,
        random_erasing: float,
    ) -> None:
        self.pipeline = create_transform(
            img_size,
            is_training=True,
            scale=tuple(crop_scale),
            hflip=hflip,
            color_jitter=color_jitter,  # timm uses it only when rand_augment is off
            auto_augment=rand_augment,
            interpolation="bicubic",
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            re_prob=random_erasing,
            re_mode="pixel",
            re_count=1,
        )

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": self.pipeline(img.convert("RGB"))}
