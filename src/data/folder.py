"""Image folders in torchvision's ImageFolder layout (``root/<class>/<image>``), corrupt files skipped.

Scanning uses torchvision's own ``make_dataset`` so a validation folder can be indexed with the
training folder's class -> index map; a val folder lacking a class would otherwise shift every label
after it and silently break kNN evaluation.

Every reader decodes through ``load_image``: the formats a folder lists, each pixel mode brought to 8-bit
grey or RGB by a stated rule (see ``to_8bit``), or refused by name.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

from src.config import ConfigError
from src.data.transforms import labelled_sample

log = logging.getLogger(__name__)

# What PIL raises on bad bytes: UnidentifiedImageError/truncation (OSError), SyntaxError from some
# plugins, ValueError for bad headers and for pixels ``to_8bit`` refuses, and its decompression-bomb guard.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# The formats of the files a folder lists (torchvision's IMG_EXTENSIONS) and shards hold (png, jpg): bytes of any
# other format, whatever their name, are refused, not handed to a decoder nobody asked for (EPS runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")
GREY_MODES = ("1", "LA", "La")  # bilevel and grey + alpha: grey "L" (the alpha is dropped, as RGB drops it)
PROBE = 8  # files decoded before work to tell a folder of images from a folder of corrupt files

T = TypeVar("T")


def to_8bit(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit grey ("L") or RGB, its values scaled by the range its mode stores, never clipped.

    - "L", "RGB": as they are; "1", "LA", "La": grey; any other mode PIL can convert (P, PA, RGBA, CMYK, YCbCr,
      LAB, HSV, ...): RGB.
    - integer modes ("I;16", "I;16B", ..., and "I", which PIL gives 16-bit PNG/PGM/TIFF data): 16-bit samples,
      scaled by 255/65535 (rounded; 8-bit data widened as v * 257 comes back exactly). Values outside
      0..65535 (32-bit data) have no known range: refused.
    - float "F": its range is not in the file, so only the two unambiguous ones are taken: all values in [0, 1]
      (scaled by 255) or else in [0, 255] (as they are). Anything else, NaN or infinity included: refused.

    A refusal is a ValueError naming the mode and the values, so the readers skip the file with that reason.
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in GREY_MODES:
        return img.convert("L")
    if mode != "F" and not mode.startswith("I"):
        return img.convert("RGB")
    values = np.asarray(img)
    low, high = values.min(), values.max()
    if mode == "F":
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 255):
            raise ValueError(f"float (mode F) pixels range {low}..{high}, not [0, 1] nor [0, 255]: save it as 8-bit")
        scaled = values * 255.0 if high <= 1 else values
        return Image.fromarray(np.rint(scaled).astype(np.uint8))
    if low < 0 or high > 65535:
        raise ValueError(f"integer (mode {mode}) pixels range {low}..{high}, beyond 16 bits: save it as 8- or 16-bit")
    return Image.fromarray(((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (some decoders' messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def load_image(source: str | Path | BinaryIO) -> Image.Image:
    """Fully decode an image (so corruption surfaces here, not inside a transform) as grey "L" or "RGB"."""
    img = Image.open(source, formats=IMAGE_FORMATS)
    img.load()
    return to_8bit(img)


def decode_or_none(source: str | Path | BinaryIO, where: str) -> Image.Image | None:
    """The decoded image, or None (with a warning naming ``where``) when its bytes are not a readable image."""
    try:
        return load_image(source)
    except DECODE_ERRORS as exc:
        log.warning("skipping unreadable image %s: %s", where, one_line(exc))
        return None


def spread(items: Sequence[T], limit: int | None) -> list[T]:
    """``limit`` items evenly spaced over ``items``: folder listings are sorted by class, so a prefix would not be."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def find_class_folders(root: str | Path, key: str) -> list[str]:
    """Sorted class sub-folder names of ``root``; errors name the config ``key`` and the path."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{key}: image folder {path} does not exist or is not a directory")
    classes = sorted(entry.name for entry in path.iterdir() if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{key}: {path} has no class sub-folders (expected {path}/<class>/<image>)")
    return classes


def is_image_file(path: str) -> bool:
    """An image file name that is a regular file: opening a FIFO named ``x.png`` would wait forever."""
    return has_file_allowed_extension(path, IMG_EXTENSIONS) and os.path.isfile(path)


def check_readable(samples: Sequence[tuple[str, int]], root: str | Path, key: str) -> None:
    """Decode up to ``PROBE`` files spread over ``samples``; ConfigError naming the first bad ones if none decodes.

    Run before work: a folder of corrupt files would otherwise surface only once every batch came back empty.
    """
    bad = []
    for path, _ in spread(samples, PROBE):
        try:
            load_image(path)
            return
        except DECODE_ERRORS as exc:
            bad.append(f"{path} ({one_line(exc).replace(repr(path), '').strip()})")  # PIL repeats the path
    raise ConfigError(
        f"{key}: none of the {len(bad)} files tried under {root} is a readable image: {'; '.join(bad[:3])}"
        + ("; ..." if len(bad) > 3 else "")
        + f"; replace or remove them (formats read: {', '.join(IMAGE_FORMATS)})"
    )


def scan_image_folder(
    root: str | Path, key: str, class_to_idx: dict[str, int] | None = None
) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, label) pairs of ``root/<class>/<image>`` plus the class map (given, or built from ``root``)."""
    classes = find_class_folders(root, key)
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(classes) - set(class_to_idx))
    if unknown:
        raise ConfigError(f"{key}: class folders {unknown} in {root} are not among the training classes")
    samples = make_dataset(str(root), class_to_idx, is_valid_file=is_image_file, allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"{key}: no image files ({', '.join(IMG_EXTENSIONS)}) under {root}/<class>/")
    labelled = {label for _, label in samples}
    empty = [name for name in classes if class_to_idx[name] not in labelled]
    if empty:
        raise FileNotFoundError(f"{key}: class folders {empty} under {root} hold no image files")
    return samples, class_to_idx


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` files through a sample transform; an unreadable file yields None (see collate)."""

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], dict[str, torch.Tensor]],
        *,
        key: str = "dataset.root",
        limit: int | None = None,
        scanned: tuple[list[tuple[str, int]], dict[str, int]] | None = None,
    ) -> None:
        """``scanned``: what ``scan_image_folder`` already returned, so a large folder is listed once."""
        self.scanned, self.class_to_idx = scanned or scan_image_folder(root, key)
        self.samples = spread(self.scanned, limit)
        self.transform = transform

    def view(
        self, transform: Callable[[Image.Image], dict[str, torch.Tensor]], limit: int | None = None
    ) -> ImageFolderDataset:
        """The same scanned files with another transform/limit, so a large folder is listed only once."""
        other = copy.copy(self)
        other.transform = transform
        other.samples = spread(self.scanned, limit)
        return other

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        path, label = self.samples[index]
        img = decode_or_none(path, path)
        return None if img is None else labelled_sample(self.transform, img, label)
