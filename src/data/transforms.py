"""Sample transforms: ``transform(img: PIL.Image) -> dict[str, Tensor]`` with at least ``"image"``.

They are classes (not lambdas) so DataLoader workers can pickle them under any start method.
Geometric ops run on the PIL image before the grey -> RGB conversion, so grey data (Fashion-MNIST)
is cropped and resized once per image rather than once per replicated channel.

``PretrainTransform`` and ``EvalTransform`` also have ``batch(images)``: the same view for a whole batch of
in-memory grey uint8 images with tensor ops (``dataset.tensor_transforms=true``). Per image it costs a
fraction of the PIL path's Python overhead, which matters when two cores share data and model. Flips-only
views draw the same random numbers in the same order as the per-image path: at the images' own size both
give the same views (to float rounding), resized ones differ by at most a grey level (torch's bicubic is
not PIL's). Crops draw in another order, so those runs differ from the PIL path's.

The batched forms also run on a GPU (``dataset.device_transforms=true``): the loader hands the uint8 images as
stored (``StoredImages``) and the data module calls ``batch`` on them once they are on the device. The draws
stay on the CPU, from each sample's seed, so the device makes the views the CPU batched path would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

BICUBIC = v2.InterpolationMode.BICUBIC
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision's and MAE's default)
SampleTransform = Callable[[Image.Image], dict[str, torch.Tensor]]


def labelled_sample(transform: SampleTransform, img: Image.Image, label: int) -> dict[str, torch.Tensor]:
    """What every dataset yields: the transform's dict plus ``"label"`` (-1 = unlabelled)."""
    sample = transform(img)
    sample["label"] = torch.tensor(label, dtype=torch.long)
    return sample


class _ImageTransform:
    """Shared tail: 3-channel float tensor normalised with the data set's mean/std."""

    def __init__(self, head: list[v2.Transform], mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
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

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, H, W) grey -> float (B, 3, H, W) normalised, as the per-image tail does, on their device."""
        # non_blocking: the copy of six floats to a GPU does not wait for the work queued there
        mean, std = (t.to(images.device, non_blocking=True) for t in (self.mean, self.std))
        return ((images.float() / 255.0 - mean) / std).contiguous()


def resize_and_centre_crop(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """(B, C, H, W) uint8: the short side to ``img_size`` (bicubic, antialiased), then a centre crop."""
    return TF.center_crop(TF.resize(images, img_size, interpolation=BICUBIC, antialias=True), img_size)


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
        self.img_size = img_size
        self.crop_scale = None if crop_scale is None else [float(v) for v in crop_scale]
        if crop_scale is None:
            view = [v2.Resize(img_size, interpolation=BICUBIC), v2.CenterCrop(img_size)]
        else:
            view = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=BICUBIC)]
        super().__init__([*view, v2.RandomHorizontalFlip()], mean, std)

    def batch(self, images: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        """uint8 (B, H, W) grey -> (B, 3, img_size, img_size): a crop (or the whole image), a flip, normalised.

        With ``seeds`` each image draws its crop and flip under its own seed, first the crop then the flip,
        as the per-image path does; without, the batch draws them from the running stream. The draws are made
        on the CPU, the pixel work on the images' device.
        """
        images = images.unsqueeze(1)
        boxes, flips = self._draw(images, seeds)
        if boxes is None:
            views = resize_and_centre_crop(images, self.img_size)
        else:
            size = [self.img_size, self.img_size]
            views = torch.stack(
                [
                    TF.resized_crop(img, *box, size, interpolation=BICUBIC, antialias=True)
                    for img, box in zip(images, boxes, strict=True)
                ]
            )
        flip = flips.to(views.device, non_blocking=True).view(-1, 1, 1, 1)
        return self._normalise(torch.where(flip, views.flip(-1), views))

    def _draw(self, images: torch.Tensor, seeds: list[int] | None) -> tuple[list[tuple] | None, torch.Tensor]:
        """Each image's crop box (None without crops) and flip, from torch's CPU generator.

        Per seed, the generator is seeded as ``sample_rng`` seeds it and put back once at the end. Only torch's
        generator is touched: it is the one these draws use, and saving numpy's state for every image (what
        ``sample_rng`` does) costs more than the draws themselves.
        """

        def box() -> tuple[int, int, int, int]:
            return RandomResizedCrop.get_params(images[0], self.crop_scale, list(CROP_RATIO))

        cropped = self.crop_scale is not None
        if seeds is None:
            boxes = [box() for _ in images] if cropped else None
            return boxes, torch.rand(len(images)) < 0.5
        state = torch.get_rng_state()
        boxes, flips = [], []
        try:
            for seed in seeds:
                torch.default_generator.manual_seed(seed)
                if cropped:
                    boxes.append(box())
                flips.append(bool(torch.rand(1) < 0.5))
        finally:
            torch.set_rng_state(state)
        return (boxes if cropped else None), torch.tensor(flips)


class StoredImages:
    """The loader's half of ``dataset.device_transforms``: each grey image as stored, uint8 (H, W).

    The training transform's ``batch`` makes the views once the batch is on the device: the loader spends no
    time on pixels and sends one byte per stored pixel, where a float view of the same size takes twelve.
    """

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": TF.pil_to_tensor(img)[0]}

    def batch(self, images: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        """The batch's images unchanged; ``seeds`` travel with the samples (``sample_seed``) to the device step."""
        return images


class EvalTransform(_ImageTransform):
    """Deterministic view: bicubic resize of the short side to ``img_size``, then a centre crop.

    The crop is a no-op on square images (Fashion-MNIST) and keeps image folders with mixed
    aspect ratios collatable.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.img_size = img_size
        super().__init__([v2.Resize(img_size, interpolation=BICUBIC), v2.CenterCrop(img_size)], mean, std)

    def batch(self, images: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        """uint8 (B, H, W) grey -> (B, 3, img_size, img_size), normalised (deterministic: ``seeds`` unused)."""
        return self._normalise(resize_and_centre_crop(images.unsqueeze(1), self.img_size))


# Transforms whose batched form runs on any device (``dataset.device_transforms``): MAE's views and the evaluation view.
DEVICE_TRANSFORMS = (PretrainTransform, EvalTransform)
