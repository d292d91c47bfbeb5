"""The LightningDataModule of images with labels: loaders, samplers and device views over a kind's sets.

The kind of data (``dataset.kind``: Fashion-MNIST, image folders, tar shards) is a class in src/data/kinds.py.

Batches are dicts: "image" (B, 3, H, W) float, "label" (B,) long (-1 = unlabelled), "skipped" (a long
scalar: samples of this batch dropped as corrupt) and any extra tensors the sample transform returns.
The dataset config is checked by ``validate()`` at construction, so a wrong path or value, or data none of
which a sample of it can be read from, fails before any model is built, as a ConfigError naming the key.
Later, an unreadable sample is a counted skip; a pass in which every sample was skipped ends the run (RunStopped).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from src.config import ConfigError, RunStopped, UserError
from src.data.distributed import SampleExtras, SeededDataset, evaluation_split, training_sampler
from src.data.kinds import ImageKind, ImageRequest, check_image_keys, kind_class, kinds_of
from src.data.shards import ShardDataset
from src.data.transforms import DEVICE_TRANSFORMS, SampleTransform, StoredImages

log = logging.getLogger(__name__)


def collate_skipping(samples: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Default-collate the samples that decoded; None marks a corrupt one, counted in "skipped".

    If every sample is None the batch is just ``{"skipped": n}``; ``SkippingDataLoader`` drops it.
    """
    kept = [s for s in samples if s is not None]
    skipped = torch.tensor(len(samples) - len(kept), dtype=torch.long)
    if not kept:
        return {"skipped": skipped}
    batch = default_collate(kept)
    batch["skipped"] = skipped
    return batch


def _drop_empty_batches(
    batches: Iterator[dict[str, torch.Tensor]], full: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """The non-empty batches, each handed on only once the next one is in: the corrupt samples of dropped batches
    are added to a batch still held, so those at the end of a pass are counted too.

    ``full``: the batch size, when batches of fewer samples (a stream's last) are dropped too, as ``drop_last``
    would drop them, with their corrupt samples counted.
    """
    carried = 0  # corrupt samples of dropped batches, not yet added to a batch
    held: dict[str, torch.Tensor] | None = None
    unused = False  # readable samples dropped in a short last batch: the pass was not all corrupt
    try:
        for batch in batches:
            skipped, kept = int(batch["skipped"]), _kept(batch)
            if kept == 0 or (full is not None and kept + skipped < full):
                carried, unused = carried + skipped, unused or kept > 0
                if kept == 0:
                    log.warning("dropped a batch in which all %d samples were corrupt", skipped)
                continue
            if held is not None:
                yield held
            held, batch["skipped"], carried = batch, batch["skipped"] + carried, 0
    except UserError as e:
        raise _unwrapped(e) from None
    if held is None:
        if carried and not unused:
            raise RunStopped(
                f"every sample of this pass over the data was corrupt ({carried} skipped; the warnings above name each "
                "and why): replace or remove those files"
            )
        return
    held["skipped"] = held["skipped"] + carried
    yield held


def _kept(batch: dict[str, Any]) -> int:
    """Samples a collated batch holds (its first entry other than "skipped" has one row per sample)."""
    return next((len(value) for key, value in batch.items() if key != "skipped"), 0)


def _unwrapped(error: UserError) -> UserError:
    """``error`` with its own one-line message: torch re-raises a DataLoader worker's error with its traceback."""
    text = str(error)
    if "Original Traceback" not in text:
        return error
    last = text.rstrip().splitlines()[-1]  # "<module>.<class>: <message>"
    return type(error)(last.split(": ", 1)[-1])


class SkippingDataLoader(DataLoader):
    """A DataLoader that never hands the model an empty batch; it fails only if a whole pass was corrupt.

    A batch is handed on one step late (``_drop_empty_batches``), so that every skipped sample is counted in
    some batch's "skipped", however the empty batches fall.

    Its state lives in the trainer: a ``GlobalBatchSampler`` resumes from the trainer's global step, so there is
    nothing of its own to save (``state_dict`` tells Lightning that a mid-epoch checkpoint resumes exactly).
    """

    def __init__(self, dataset: Dataset, *args: Any, drop_last: bool = False, **kwargs: Any) -> None:
        """``drop_last`` of a stream (IterableDataset) is done here, after collation, so that the corrupt samples of
        its short batches are counted; torch would drop them uncounted in the workers."""
        streamed = isinstance(dataset, IterableDataset)
        super().__init__(dataset, *args, drop_last=drop_last and not streamed, **kwargs)
        self.full = self.batch_size if drop_last and streamed else None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return _drop_empty_batches(super().__iter__(), self.full)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the position is the trainer's (see the class docstring)."""


class ImageDataModule(L.LightningDataModule):
    """Training loader plus the labelled kNN bank/query loaders of the shared evaluation protocol.

    ``kind`` (the class ``dataset.kind`` names) checks its own keys and builds the sets; this module checks the keys
    every image kind shares and the views, and makes the loaders.
    """

    def __init__(
        self,
        cfg: DictConfig,
        train_transform: SampleTransform,
        eval_transform: SampleTransform,
        batch_size: int,
        num_workers: int,
        seed: int = 0,
        train_repeats: int = 1,
        sample_extras: SampleExtras | None = None,
        labelled: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_repeats = train_repeats
        self.sample_extras = sample_extras
        # the training loader hands uint8 images, whose views are made on the model's device (transfer_batch_to_device)
        self.device_transforms = bool(cfg.get("device_transforms", False))
        train_view = StoredImages() if self.device_transforms else train_transform
        request = ImageRequest(train_view, eval_transform, batch_size, train_repeats, labelled)
        self.kind = kind_class(cfg, ImageKind)(cfg, request)
        self._sets: dict[str, Dataset] | None = None
        self.validate()

    # ---- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Fail fast on a bad dataset config: paths exist, sizes are sane; messages name the config key."""
        try:
            check_image_keys(self.cfg, self.batch_size)
            self._check_views()
            self.kind.check()
        except FileNotFoundError as e:  # a missing folder, file or shard: the user's to fix
            raise ConfigError(str(e)) from None

    def _check_views(self) -> None:
        """Batched views (``tensor_transforms``) and views made on the device need in-memory images and transforms
        that have those forms."""
        cfg, kind = self.cfg, self.cfg.kind
        in_memory = "/".join(name for name, known in kinds_of(ImageKind).items() if known.in_memory)
        if self.device_transforms:
            if not self.kind.in_memory or not cfg.get("tensor_transforms", False):
                raise ConfigError(
                    "dataset.device_transforms=true needs the in-memory built-in set with batched views "
                    f"(dataset.kind={in_memory}, dataset.tensor_transforms=true), got kind={kind}, "
                    f"tensor_transforms={cfg.get('tensor_transforms', False)}"
                )
            if not isinstance(self.train_transform, DEVICE_TRANSFORMS):
                name = type(self.train_transform).__name__
                raise ConfigError(
                    f"dataset.device_transforms=true: this run's training transform ({name}) has no device form "
                    "(MAE's views have); set dataset.device_transforms=false"
                )
        if cfg.get("tensor_transforms", False):
            if not self.kind.in_memory:
                raise ConfigError(f"dataset.tensor_transforms=true needs in-memory images ({in_memory}): {kind}")
            for role, transform in (("training", self.train_transform), ("evaluation", self.eval_transform)):
                if not hasattr(transform, "batch"):
                    raise ConfigError(
                        f"dataset.tensor_transforms=true: this run's {role} transform ({type(transform).__name__}) "
                        "has no batched form; set dataset.tensor_transforms=false"
                    )

    # ---- datasets ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build the kind's sets once (Lightning may call this per stage)."""
        if self._sets is not None:
            return
        sets = self.kind.build()
        train = sets["train"]
        if not isinstance(train, IterableDataset) and len(train) < self.batch_size:
            raise ConfigError(
                f"the training set has {len(train)} images (dataset.train_limit={self.cfg.get('train_limit')}) "
                f"but batch_size is {self.batch_size}: drop_last would leave no batches"
            )
        self._sets = sets

    # ---- loaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self._sets is not None
        train = self._sets["train"]
        if isinstance(train, ShardDataset):  # streamed: whole shards per rank and worker
            world = self._world_size()
            if not train.resampled and len(train.shards) < world:
                raise ConfigError(
                    f"dataset.train_urls has {len(train.shards)} shards for {world} ranks; "
                    "every rank needs at least one (write more, smaller shards)"
                )
            if world > 1 and train.num_samples is None:
                raise ConfigError(
                    "dataset.samples_per_epoch=null with several processes: ranks would run out of shards at "
                    "different steps and wait for each other forever; set dataset.samples_per_epoch"
                )
            workers = self._workers_for(train, per_rank=True)
            rank_zero_info(f"data: {train.describe(world, workers)}")
            return self._loader(train, workers, True, batch_size=self.batch_size, drop_last=True)
        sampler = training_sampler(self.trainer, len(train), self.batch_size, self.seed, self.train_repeats)
        dataset = SeededDataset(train, self.sample_extras)
        return self._loader(dataset, self.num_workers, True, batch_sampler=sampler)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's move to the model's device, then, for a training batch under ``dataset.device_transforms``,
        its views made there (``device_views``). The data module's hook, not the methods': it holds the transform,
        and Lightning warns on every run whose LightningModule overrides a transfer hook beside a data module.
        (A ``labelled`` run's batches hold only labelled samples: the shard reader skips the others.)"""
        moved = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if self.device_transforms and self.trainer is not None and self.trainer.training:
            return self.device_views(moved, batch["sample_seed"].tolist())
        return moved

    def device_views(self, batch: dict[str, torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
        """A training batch of uint8 images (``dataset.device_transforms``), now on its device: the training views.

        ``seeds`` are the samples' ``sample_seed`` values, read on the host before the batch moved (read on a GPU,
        they would wait for the work queued there); each image draws its crop and flip from its own.
        """
        batch["image"] = self.train_transform.batch(batch["image"], seeds)
        return batch

    def _loader(self, dataset: Dataset, num_workers: int, persistent: bool, **kwargs: Any) -> SkippingDataLoader:
        return SkippingDataLoader(
            dataset,
            num_workers=num_workers,
            persistent_workers=persistent and num_workers > 0,
            collate_fn=collate_skipping,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def knn_dataloaders(self, rank_split: bool = False) -> tuple[DataLoader, DataLoader] | None:
        """(bank, queries) with the eval transform, unshuffled; None without a labelled val split.

        ``rank_split``: each rank reads positions rank, rank + world, ... (``RankStrideSampler``); otherwise every
        caller reads the whole sets (the rank-zero kNN monitor).
        """
        self.setup()
        assert self._sets is not None
        bank, queries = self._sets.get("bank"), self._sets.get("queries")
        if bank is None or queries is None:
            return None
        return self._eval_loader(bank, rank_split), self._eval_loader(queries, rank_split)

    def val_dataloader(self) -> DataLoader | list:
        """The kNN query loader, split over the ranks (for methods with a validation_step); [] when there is none."""
        loaders = self.knn_dataloaders(rank_split=True)
        return loaders[1] if loaders is not None else []

    def _eval_loader(self, dataset: Dataset, rank_split: bool) -> DataLoader:
        workers = self._workers_for(dataset, per_rank=False)
        split = rank_split and not isinstance(dataset, IterableDataset)
        sampler, batch_size = (
            evaluation_split(self.trainer, len(dataset), self.batch_size) if split else (None, self.batch_size)
        )
        return self._loader(dataset, workers, False, batch_size=batch_size, sampler=sampler)

    def _workers_for(self, dataset: Dataset, per_rank: bool) -> int:
        """Shard readers split whole shards between workers: more workers than shards would sit idle."""
        if not isinstance(dataset, ShardDataset) or self.num_workers == 0:
            return self.num_workers
        shards = len(dataset.shards) // self._world_size() if per_rank else len(dataset.shards)
        return max(1, min(self.num_workers, shards))

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    # ---- facts other code needs ----------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        """From ``dataset.num_classes``, else what the data shows (an image folder's class count); None if unknown."""
        if self.cfg.get("num_classes") is not None:
            return int(self.cfg.num_classes)
        return self.kind.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Label i's name where the data says it (Fashion-MNIST's garments, an image folder's class folders)."""
        return self.kind.class_names

    @property
    def img_size(self) -> int:
        return int(self.cfg.img_size)


def build_datamodule(
    dataset_cfg: DictConfig | Mapping[str, Any],
    train_transform: SampleTransform,
    eval_transform: SampleTransform,
    batch_size: int,
    num_workers: int,
    seed: int = 0,
    train_repeats: int = 1,
    sample_extras: SampleExtras | None = None,
    labelled: bool = False,
) -> ImageDataModule:
    """Build and validate the data module for ``conf/dataset/<name>.yaml``."""
    cfg = dataset_cfg if isinstance(dataset_cfg, DictConfig) else OmegaConf.create(dict(dataset_cfg))
    return ImageDataModule(
        cfg, train_transform, eval_transform, batch_size, num_workers, seed, train_repeats, sample_extras, labelled
    )
