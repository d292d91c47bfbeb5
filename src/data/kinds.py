"""Kinds of data (``dataset.kind``), one class each, in one registry: how a kind checks its ``dataset.*`` keys
before any work and how it builds its sets.

A data module reads one family of kinds and composes the kind the config names (``kind_class``):
``ImageDataModule`` reads the ``ImageKind`` subclasses below (images with labels: the built-in set, image folders,
tar shards); detection's ``CocoDataModule`` reads ``CocoKind``, which src/detection/data.py registers here when it
is imported, as timm's model files register into timm's registry. So ``DATA_KINDS`` lists every kind while
src/data imports nothing from the layers above it. A new kind of images is one new ``ImageKind`` subclass with
``@register_kind``: its ``check``, its ``build`` and its facts (``in_memory``, ``num_classes``); the data module,
its loaders and its samplers stay as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from src.config import ConfigError
from src.data.builtin import CLASS_NAMES, CLASSES, TensorImageDataset, fashion_mnist_source, load_fashion_mnist
from src.data.folder import ImageFolderDataset, check_readable, scan_image_folder
from src.data.shards import ShardDataset, check_shards_readable, expand_shards, manifest_counts
from src.data.transforms import SampleTransform


class DataKind(ABC):
    """One kind of data: its ``dataset.*`` checks, run before any model is built, and its sets by role."""

    name: ClassVar[str]  # the value of dataset.kind
    reader: ClassVar[str]  # the data module that reads this family of kinds, for messages

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def check(self) -> None:
        """Paths exist, values are sane, some sample is readable; a ConfigError (or FileNotFoundError) names the key."""

    @abstractmethod
    def build(self) -> dict[str, Dataset]:
        """The sets by role (each family says which roles), built once, after ``check``."""


DATA_KINDS: dict[str, type[DataKind]] = {}
K = TypeVar("K", bound=DataKind)


def register_kind(kind: type[K]) -> type[K]:
    """Class decorator: ``dataset.kind=<kind.name>`` now means ``kind``."""
    DATA_KINDS[kind.name] = kind
    return kind


def kinds_of(family: type[K]) -> dict[str, type[K]]:
    """The registered kinds a data module of ``family`` reads, by name."""
    return {name: kind for name, kind in DATA_KINDS.items() if issubclass(kind, family)}


def kind_class(cfg: DictConfig, family: type[K]) -> type[K]:
    """The kind ``dataset.kind`` names, if a data module of ``family`` reads it; else a ConfigError listing those."""
    name = cfg.get("kind")
    kind = DATA_KINDS.get(name)
    if kind is not None and issubclass(kind, family):
        return kind
    reader = f": {name} is read by {kind.reader}" if kind is not None else ""
    raise ConfigError(f"dataset.kind must be one of {tuple(kinds_of(family))}, got {name!r}{reader}")


# ---- images with labels: the kinds ImageDataModule reads ----------------------------------------------------------
@dataclass(frozen=True)
class ImageRequest:
    """What a run asks of its images beyond ``dataset.*``: the views its loaders serve and what its training needs."""

    train_view: SampleTransform
    eval_view: SampleTransform
    batch_size: int
    train_repeats: int = 1  # copies of each drawn training image per epoch (repeated augmentation)
    labelled: bool = False  # training needs a label per sample (supervised runs)


class ImageKind(DataKind):
    """Images with labels. ``build`` gives "train", and "bank" and "queries" (the labelled kNN evaluation) when
    the config names a labelled split."""

    reader: ClassVar[str] = "the image data module (pretraining, fine-tuning, kNN)"
    in_memory: ClassVar[bool] = False  # images held in memory: whole batches can be viewed at once, on any device

    def __init__(self, cfg: DictConfig, request: ImageRequest) -> None:
        super().__init__(cfg)
        self.request = request

    @property
    def num_classes(self) -> int | None:
        """The classes the data itself shows once checked (an image folder's class folders); None if it does not say."""
        return None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Label i's name, for pictures (a confusion matrix); None where the data does not name its classes."""
        return None


def check_image_keys(cfg: DictConfig, batch_size: int) -> None:
    """What every image kind's keys must be beside the batch: a training limit of one batch at least. Each key
    alone (the image size, the normalisation, the set sizes) is the schema's (src/schema.py)."""
    _positive_or_none(cfg, "train_limit", minimum=batch_size)


def _positive_or_none(cfg: DictConfig, key: str, minimum: int = 1) -> int | None:
    value = cfg.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ConfigError(f"dataset.{key} must be null or an integer >= {minimum}, got {value!r}")
    return value


def _required(cfg: DictConfig, key: str, example: str) -> Any:
    if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] is None:
        raise ConfigError(f"dataset.{key} is required for dataset.kind={cfg.kind} (e.g. dataset.{key}={example})")
    return cfg[key]


def _check_num_classes(cfg: DictConfig, labels: int, what: str) -> None:
    """``dataset.num_classes``, when set, must cover the data's labels 0..labels-1 (kNN and heads index by them)."""
    num_classes = cfg.get("num_classes")
    if num_classes is not None and num_classes < labels:
        raise ConfigError(
            f"dataset.num_classes={num_classes} but {what} {labels} classes (labels up to {labels - 1}): "
            f"set dataset.num_classes={labels}"
        )


@register_kind
class BuiltinKind(ImageKind):
    """Fashion-MNIST (or scikit-learn's digits standing in), held in memory; its test split gives the kNN queries."""

    name = "fashion_mnist"
    in_memory = True
    source: str | None = None  # "fashion_mnist", or "digits" standing in: known once checked

    def check(self) -> None:
        self.source = fashion_mnist_source(_required(self.cfg, "root", "/usr/share/datasets/fashion-mnist"))
        _check_num_classes(self.cfg, CLASSES, "Fashion-MNIST (or the digits standing in) has")

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return CLASS_NAMES[self.source] if self.source else None

    def build(self) -> dict[str, Dataset]:
        cfg, request = self.cfg, self.request
        train_images, train_labels = load_fashion_mnist(cfg.root, "train")
        test_images, test_labels = load_fashion_mnist(cfg.root, "test")
        dataset = partial(TensorImageDataset, batched=bool(cfg.get("tensor_transforms", False)))
        return {
            "train": dataset(train_images, train_labels, request.train_view, cfg.get("train_limit")),
            "bank": dataset(train_images, train_labels, request.eval_view, cfg.get("knn_bank")),
            "queries": dataset(test_images, test_labels, request.eval_view, cfg.get("knn_queries")),
        }


@register_kind
class ImageFolderKind(ImageKind):
    """``root/<class>/<image>`` files, listed once when checked; ``val_root`` (same classes) gives the kNN queries."""

    name = "image_folder"

    def __init__(self, cfg: DictConfig, request: ImageRequest) -> None:
        super().__init__(cfg, request)
        self._scanned: tuple[list[tuple[str, int]], dict[str, int]] | None = None
        self._val_scanned: tuple[list[tuple[str, int]], dict[str, int]] | None = None

    def check(self) -> None:
        cfg = self.cfg
        root = _required(cfg, "root", "/data/imagenet/train")
        self._scanned = scan_image_folder(root, "dataset.root")  # listed once here, reused by build
        check_readable(self._scanned[0], root, "dataset.root")
        _check_num_classes(cfg, len(self._scanned[1]), f"dataset.root={root} has class folders for")
        if cfg.get("val_root") is not None:
            self._val_scanned = scan_image_folder(cfg.val_root, "dataset.val_root", self._scanned[1])
            check_readable(self._val_scanned[0], cfg.val_root, "dataset.val_root")

    def build(self) -> dict[str, Dataset]:
        cfg, request = self.cfg, self.request
        train = ImageFolderDataset(cfg.root, request.train_view, key="dataset.root", scanned=self._scanned)
        sets: dict[str, Dataset] = {"train": train.view(request.train_view, cfg.get("train_limit"))}
        if cfg.get("val_root") is not None:
            sets["bank"] = train.view(request.eval_view, cfg.get("knn_bank"))
            sets["queries"] = ImageFolderDataset(
                cfg.val_root, request.eval_view, limit=cfg.get("knn_queries"), scanned=self._val_scanned
            )
        return sets

    @property
    def num_classes(self) -> int | None:
        return len(self._scanned[1]) if self._scanned is not None else None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class folders' names, in label order."""
        return tuple(sorted(self._scanned[1], key=self._scanned[1].get)) if self._scanned is not None else None


@register_kind
class ShardsKind(ImageKind):
    """webdataset tar shards, streamed: whole shards per rank; with ``val_urls`` the training shards are the bank."""

    name = "shards"

    def check(self) -> None:
        cfg, request = self.cfg, self.request
        if cfg.get("train_limit") is not None:
            raise ConfigError("dataset.train_limit does not apply to shards; use dataset.samples_per_epoch")
        if request.train_repeats > 1:
            raise ConfigError("dataset.kind=shards streams samples: repeated augmentation cannot apply")
        evaluated = cfg.get("val_urls") is not None  # the kNN bank is the training shards: they need labels too
        if evaluated and cfg.get("num_classes") is None:
            raise ConfigError(
                "dataset.num_classes is required with dataset.val_urls: the kNN evaluation votes over that many "
                "classes, and shards do not say how many there are (set it to the largest .cls label + 1)"
            )
        urls = {"train_urls": _required(cfg, "train_urls", "'data/train-{000000..000009}.tar'")}
        if evaluated:
            urls["val_urls"] = cfg.val_urls
        for key, pattern in urls.items():
            shards = expand_shards(pattern, f"dataset.{key}")
            manifest_counts(shards)
            check_shards_readable(shards, f"dataset.{key}", cfg.get("num_classes"), request.labelled or evaluated)
        if OmegaConf.is_missing(cfg, "samples_per_epoch"):
            raise ConfigError("dataset.samples_per_epoch is required for shards (null = one pass per epoch)")
        if _positive_or_none(cfg, "samples_per_epoch", minimum=request.batch_size) is None and cfg.get("resampled"):
            raise ConfigError("dataset.resampled=true streams without end: set dataset.samples_per_epoch")

    def build(self) -> dict[str, Dataset]:
        cfg, request = self.cfg, self.request
        epoch, num_classes = cfg.get("samples_per_epoch"), cfg.get("num_classes")
        sets: dict[str, Dataset] = {
            "train": ShardDataset(
                cfg.train_urls,
                request.train_view,
                key="dataset.train_urls",
                num_samples=epoch,
                repeat=epoch is not None,
                split_by_node=True,
                shuffle_buffer=cfg.get("shuffle_buffer", 1000),
                batch_size=request.batch_size,
                resampled=bool(cfg.get("resampled", False)),
                num_classes=num_classes,
                labelled=request.labelled,
            )
        }
        if cfg.get("val_urls") is not None:
            evaluation = partial(
                ShardDataset, transform=request.eval_view, batch_size=request.batch_size, num_classes=num_classes
            )
            sets["bank"] = evaluation(cfg.train_urls, num_samples=cfg.get("knn_bank"), labelled=True)
            sets["queries"] = evaluation(
                cfg.val_urls, key="dataset.val_urls", num_samples=cfg.get("knn_queries"), labelled=True
            )
        return sets
