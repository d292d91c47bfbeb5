"""Built-in real data that works offline: Fashion-MNIST from Debian's ``dataset-fashion-mnist``.

When those IDX files are absent, scikit-learn's bundled 8x8 digits stand in, so a fresh machine
without apt can still run the demo and the tests; the substitution is always logged.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.data.transforms import labelled_sample

log = logging.getLogger(__name__)

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
CLASSES = 10  # Fashion-MNIST's garments and the digits both
# label i -> name, in the order of the IDX files' labels (Fashion-MNIST's README) and of the digits
CLASS_NAMES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "digits": tuple(str(digit) for digit in range(CLASSES)),
}
DIGITS_TRAIN = 1500  # deterministic split of the 1,797 digits: first 1,500 train, the rest test
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (after `apt-get update`)"


def fashion_mnist_source(root: str | Path) -> str:
    """``"fashion_mnist"`` if the IDX files are under ``root``, else ``"digits"`` if scikit-learn can stand in.

    Raises FileNotFoundError naming both ways out when neither is available, so a config check can
    fail before any training work starts.
    """
    root = Path(root)
    if all((root / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair):
        return "fashion_mnist"
    if importlib.util.find_spec("sklearn") is not None:
        return "digits"
    raise FileNotFoundError(
        f"Fashion-MNIST not found at {root} (dataset.root) and scikit-learn, the fallback, is not installed: "
        f"{INSTALL_HINT}, or `pip install scikit-learn` to use its 8x8 digits instead"
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzipped IDX file; header = magic + one big-endian uint32 per dimension."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read gzipped IDX file: {exc}") from exc
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number is {found}, expected {magic}")
    shape = tuple(int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    part = slice(None, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return torch.from_numpy(images[part].copy()), torch.from_numpy(labels[part].copy())


def load_fashion_mnist(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` for ``split`` in {"train", "test"}.

    Falls back to scikit-learn's digits (8x8, 1,500 train / 297 test) with a warning when the
    Fashion-MNIST files are missing.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    root = Path(root)
    if fashion_mnist_source(root) == "digits":
        log.warning(
            "Fashion-MNIST was not found at %s; falling back to scikit-learn's 8x8 digits (1,797 images). "
            "For the real benchmark, %s.",
            root,
            INSTALL_HINT,
        )
        return _load_digits(split)
    image_name, label_name = FASHION_MNIST_FILES[split]
    images = _read_idx(root / image_name, IMAGES_MAGIC, ndim=3)
    labels = _read_idx(root / label_name, LABELS_MAGIC, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root / image_name} has {len(images)} images but {root / label_name} has {len(labels)}")
    return torch.from_numpy(images), torch.from_numpy(labels)


class TensorImageDataset(Dataset):
    """In-memory grey uint8 images served as PIL "L" images through a sample transform (adds "label").

    With ``batched=True`` the DataLoader's batched fetch (``__getitems__``) runs the transform's
    ``batch`` form once over all the batch's images instead of once per PIL image.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[Image.Image], dict[str, torch.Tensor]],
        limit: int | None = None,
        batched: bool = False,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batched and not hasattr(transform, "batch"):
            raise ValueError(f"{type(transform).__name__} has no batched form")
        self.images = images[:limit].numpy()
        self.labels = labels[:limit].tolist()
        self.transform = transform
        self.batched = batched

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return labelled_sample(self.transform, Image.fromarray(self.images[index]), self.labels[index])  # uint8 -> "L"

    def __getitems__(self, indices: list[int], seeds: list[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """A batch at once; ``seeds`` (from ``SeededDataset``) give each image's random view its own generator."""
        if not self.batched:
            return [self[i] for i in indices]
        views = self.transform.batch(torch.from_numpy(self.images[indices]), seeds)
        return [{"image": view, "label": torch.tensor(self.labels[i])} for view, i in zip(views, indices, strict=True)]
