"""Image folders in torchvision's ImageFolder layout (``root/<class>/<image>``), corrupt files skipped.

Scanning uses torchvision's own ``make_dataset`` so a validation folder can be indexed with the
training folder's class -> index map; a val folder lacking a class would otherwise shift every label
after it and silently break kNN evaluation.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from src.data.transforms import labelled_sample

log = logging.getLogger(__name__)

# What PIL raises on bad bytes: UnidentifiedImageError/truncation (OSError), SyntaxError from some
# plugins, ValueError for bad headers, and its decompression-bomb guard.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

T = TypeVar("T")


def load_image(source: str | Path | BinaryIO) -> Image.Image:
    """Fully decode an image (so corruption surfaces here, not inside a transform); keep L or RGB."""
    img = Image.open(source)
    img.load()
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def decode_or_none(source: str | Path | BinaryIO, where: str) -> Image.Image | None:
    """The decoded image, or None (with a warning naming ``where``) when its bytes are not a readable image."""
    try:
        return load_image(source)
    except DECODE_ERRORS as exc:
        log.warning("skipping unreadable image %s: %s", where, exc)
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


def scan_image_folder(
    root: str | Path, key: str, class_to_idx: dict[str, int] | None = None
) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, label) pairs of ``root/<class>/<image>`` plus the class map (given, or built from ``root``)."""
    classes = find_class_folders(root, key)
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(classes) - set(class_to_idx))
    if unknown:
        raise ValueError(f"{key}: class folders {unknown} in {root} are not among the training classes")
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
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
        class_to_idx: dict[str, int] | None = None,
        limit: int | None = None,
        scanned: tuple[list[tuple[str, int]], dict[str, int]] | None = None,
    ) -> None:
        """``scanned``: what ``scan_image_folder(root, key)`` already returned, so a large folder is listed once."""
        self.scanned, self.class_to_idx = scanned or scan_image_folder(root, key, class_to_idx)
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
