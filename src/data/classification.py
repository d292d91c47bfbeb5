"""The data side of supervised recipes (DeiT): timm's per-sample augmentation and repeated augmentation.

Batch-level mixing (mixup/cutmix) is not here: it needs the whole batch and the class count, so the
objective applies timm's ``Mixup`` in its training step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler


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


class _DistributedRepeatAugSampler(RepeatAugSampler, DistributedSampler):
    """timm's sampler, also a DistributedSampler so Lightning uses it as is instead of wrapping it per rank."""


class RepeatedAugmentation:
    """DeiT's repeated augmentation: each image ``num_repeats`` times per epoch, the copies on different ranks.

    As in the DeiT code it applies only to distributed training; one process keeps plain shuffling
    (returns None). A datamodule calls it with its training set and the world it runs in.
    """

    def __init__(self, num_repeats: int) -> None:
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.num_repeats = num_repeats

    def __call__(self, dataset: Dataset, num_replicas: int, rank: int) -> Sampler | None:
        if num_replicas == 1 or self.num_repeats == 1:
            return None
        return _DistributedRepeatAugSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=self.num_repeats
        )
