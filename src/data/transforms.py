"""Sample transforms: ``transform(img: PIL.Image) -> dict[str, Tensor]`` with at least ``"image"``.

They are classes (not lambdas) so DataLoader workers can pickle them under any start method.
Geometric ops run on the PIL image before the grey -> RGB conversion, so grey data (Fashion-MNIST)
is cropped and resized once per image rather than once per replicated channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

BICUBIC = v2.InterpolationMode.BICUBIC
SampleTransform = Callable[[Image.Image], dict[str, torch.Tensor]]


def labelled_sample(transform: SampleTransform, img: Image.Image, label: int) -> dict[str, torch.Tensor]:
    """What every dataset yields: the transform's dict plus ``"label"`` (-1 = unlabelled)."""
    sample = transform(img)
    sample["label"] = torch.tensor(label, dtype=torch.long)
    return sample


class _ImageTransform:
    """Shared tail: 3-channel float tensor normalised with the data set's mean/std."""

    def __init__(self, head: list[v2.Transform], mean: Sequence[float], std: Sequence[float]) -> None:
        self.pipeline = v2.Compose(
            [
                *head,
                v2.RGB(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([float(m) for m in mean], [float(s) for s in std]),
                v2.ToPureTensor(),  # plain Tensor, so tv_tensors subclasses never reach the model
            ]
        )

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": self.pipeline(img)}


class PretrainTransform(_ImageTransform):
    """MAE's augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip.

    ``crop_scale=None`` keeps the whole image (bicubic resize) and only flips: small images such as 28 px
    garments lose their object to a 20 % crop.
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] | None = (0.2, 1.0),
    ) -> None:
        if crop_scale is None:
            view = [v2.Resize(img_size, interpolation=BICUBIC), v2.CenterCrop(img_size)]
        else:
            view = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=BICUBIC)]
        super().__init__([*view, v2.RandomHorizontalFlip()], mean, std)


class EvalTransform(_ImageTransform):
    """Deterministic view: bicubic resize of the short side to ``img_size``, then a centre crop.

    The crop is a no-op on square images (Fashion-MNIST) and keeps image folders with mixed
    aspect ratios collatable.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__([v2.Resize(img_size, interpolation=BICUBIC), v2.CenterCrop(img_size)], mean, std)
