"""Data: sample transforms, Fashion-MNIST / image-folder / tar-shard datasets, their kinds, the data module."""

from src.data.builtin import TensorImageDataset, load_fashion_mnist
from src.data.datamodule import ImageDataModule, SkippingDataLoader, build_datamodule, collate_skipping
from src.data.folder import ImageFolderDataset
from src.data.kinds import DATA_KINDS, DataKind, ImageKind, register_kind
from src.data.shards import ShardDataset
from src.data.transforms import EvalTransform, PretrainTransform

__all__ = [
    "DATA_KINDS",
    "DataKind",
    "EvalTransform",
    "ImageDataModule",
    "ImageFolderDataset",
    "ImageKind",
    "PretrainTransform",
    "ShardDataset",
    "SkippingDataLoader",
    "TensorImageDataset",
    "build_datamodule",
    "collate_skipping",
    "load_fashion_mnist",
    "register_kind",
]
