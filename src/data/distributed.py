"""Results that do not depend on how many processes produced them.

Three rules make a run's numbers a function of its config and seed alone, not of its world size:

- **The global batch is fixed.** ``GlobalBatchSampler`` draws one permutation per epoch from (seed, epoch), cuts
  it into global batches of ``batch_size x world x accumulation`` samples, and gives rank r at micro-step a the
  chunk ``a * world + r`` of each. An optimizer step therefore sees the same samples at any world size.
- **Randomness belongs to the sample.** Each sample gets a seed from (seed, epoch, its position in the epoch's
  order); ``SeededDataset`` draws its augmentation under it (``sample_rng``) and hands it on as
  ``"sample_seed"``, and a transform may draw per-sample tensors the model needs (MAE's mask noise) from it.
  Repeated copies of an image (DeiT's repeated augmentation) sit at different positions, so they differ.
- **The position comes from the trainer.** The sampler starts each epoch after the global batches the trainer's
  global step says are done, so a resumed run, at any world size, goes on with the next global batch.

Evaluation loaders are split with ``RankStrideSampler``: rank r reads positions r, r + world, ...; metrics
and gathered features put them back together.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset, Sampler

from src.config import ConfigError

SampleKey = tuple[int, int]  # (index into the dataset, the sample's seed)
ORDER_TAG = 0x5EED  # the epoch order's stream: mix_seed of 4 values, where derived generators mix 2


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence)."""
    state = np.random.SeedSequence(list(values)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> list[int]:
    """The seeds of the samples at ``positions`` of an epoch's order, from (run seed, epoch, position), 63 bits.

    Vectorised: the sampler makes a global batch's seeds in one go in the loader's main process.
    """
    base = _splitmix64(_splitmix64(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
    return (_splitmix64(base ^ positions.astype(np.uint64)) >> np.uint64(1)).tolist()


def derived_generator(seed: int, tag: int) -> torch.Generator:
    """A CPU generator of its own for one purpose (``tag``) of one sample: independent of the augmentation draws."""
    return torch.Generator().manual_seed(mix_seed(seed, tag))


_current_seed: list[int] = []  # the seed of the sample being drawn, for transforms with generators of their own


def current_sample_seed() -> int | None:
    """The seed of the sample whose transform runs now (inside ``sample_rng``), else None."""
    return _current_seed[-1] if _current_seed else None


@contextmanager
def sample_rng(seed: int) -> Iterator[None]:
    """Run a transform with torch's CPU, numpy's and Python's global generators seeded for one sample.

    The three states are put back afterwards, so a main-process loader (``num_workers=0``) leaves the
    training stream (dropout, drop-path) as it was. Device generators are never touched.
    """
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    _current_seed.append(seed)
    try:
        yield
    finally:
        _current_seed.pop()
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


# A method's per-sample tensors drawn from the sample's seed (MAE's mask noise), built in the data workers.
SampleExtras = Callable[[int], dict[str, torch.Tensor]]


class SeededDataset(Dataset):
    """A map-style dataset read by ``(index, seed)`` keys: each sample is drawn under its own seed.

    The seed and the method's ``extras`` join the sample: a dict sample takes them as keys, an
    ``(image, target)`` pair (detection) in its target. A dataset with a batched fetch
    (``__getitems__(indices, seeds)``) gets the seeds with the indices.
    """

    def __init__(self, dataset: Dataset, extras: SampleExtras | None = None) -> None:
        self.dataset = dataset
        self.extras = extras

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        index, seed = key
        with sample_rng(seed):
            sample = self.dataset[index]
        return self._attach(sample, seed)

    def __getitems__(self, keys: list[SampleKey]) -> list[Any]:
        if getattr(self.dataset, "batched", False):
            indices, seeds = [k[0] for k in keys], [k[1] for k in keys]
            samples = self.dataset.__getitems__(indices, seeds)
            return [self._attach(sample, seed) for sample, seed in zip(samples, seeds, strict=True)]
        return [self[key] for key in keys]

    def _attach(self, sample: Any, seed: int) -> Any:
        if sample is None:  # a corrupt sample, counted by the collate function
            return None
        if isinstance(sample, tuple):  # a detection target: a plain int stays on the host when the batch moves
            sample[1]["sample_seed"] = seed
            sample[1].update(self.extras(seed) if self.extras else {})
            return sample
        sample["sample_seed"] = torch.tensor(seed, dtype=torch.long)
        sample.update(self.extras(seed) if self.extras else {})
        return sample


# Called when an epoch's iteration starts: (epoch, optimizer steps done so far in the whole run).
Position = Callable[[], tuple[int, int]]


def global_batch(batch_size: int, world_size: int, accumulate: int) -> int:
    """Samples per optimizer step: the one product the sampler, the lr scaling and elastic resume all read."""
    return batch_size * world_size * accumulate


class GlobalBatchSampler(Sampler[list[SampleKey]]):
    """Micro-batches of ``(index, seed)`` keys for one rank; the global batches are the same at any world size.

    ``repeats`` > 1 is DeiT's repeated augmentation: each drawn image appears ``repeats`` times in a row in the
    epoch's order (so its copies share a global batch), and the order is cut back to the dataset's length.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        world_size: int,
        rank: int,
        accumulate: int,
        seed: int,
        position: Position,
        shuffle: bool = True,
        repeats: int = 1,
    ) -> None:
        self.size, self.batch_size, self.world_size, self.rank = size, batch_size, world_size, rank
        self.accumulate, self.seed, self.position = accumulate, seed, position
        self.shuffle, self.repeats = shuffle, repeats
        self.global_batch = global_batch(batch_size, world_size, accumulate)
        if size < self.global_batch:
            raise ConfigError(
                f"batch_size={batch_size}: the training set has {size} samples but the global batch is "
                f"{self.global_batch} (batch_size {batch_size} x {world_size} processes x accumulation {accumulate}): "
                "no step fits; choose a smaller batch_size (or fewer processes, or more data)"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the last partial one is dropped): the same at every world size."""
        return self.size // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulate

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Dataset indices in this epoch's order, from (seed, epoch) only."""
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0, ORDER_TAG))
        order = torch.randperm(self.size, generator=generator)
        if self.repeats > 1:
            order = order[: -(-self.size // self.repeats)].repeat_interleave(self.repeats)[: self.size]
        return order

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, step = self.position()
        done = min(max(step - epoch * self.steps_per_epoch, 0), self.steps_per_epoch)  # resumed mid-epoch
        order = self.epoch_order(epoch).tolist()
        for g in range(done, self.steps_per_epoch):
            for a in range(self.accumulate):
                start = g * self.global_batch + (a * self.world_size + self.rank) * self.batch_size
                seeds = sample_seeds(self.seed, epoch, np.arange(start, start + self.batch_size))
                yield list(zip(order[start : start + self.batch_size], seeds, strict=True))

    def describe(self) -> str:
        """One line on how the data is laid out over the ranks, for the log."""
        return (
            f"global batch {self.global_batch} = {self.batch_size} per micro-batch x {self.world_size} processes "
            f"x {self.accumulate} accumulated; rank r reads chunk (micro-step x {self.world_size} + r) of each; "
            f"{self.steps_per_epoch} steps per epoch over {self.size} samples"
        )


class RankStrideSampler(Sampler[int]):
    """Evaluation split: rank r reads positions r, r + world, r + 2 world, ... (no padding, no duplicate)."""

    def __init__(self, size: int, world_size: int, rank: int) -> None:
        self.size, self.world_size, self.rank = size, world_size, rank

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))


def training_sampler(
    trainer: L.Trainer | None, size: int, batch_size: int, seed: int, repeats: int = 1
) -> GlobalBatchSampler:
    """The training sampler for the trainer's world, accumulation and position (one process, step 0, without one).

    Says once, on rank zero, how the global batch is laid out over the ranks.
    """
    if trainer is None:
        world, rank, accumulate, position = 1, 0, 1, lambda: (0, 0)
    else:
        world, rank, accumulate = trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches
        position = lambda: (trainer.current_epoch, trainer.global_step)  # noqa: E731 - read when an epoch starts
    sampler = GlobalBatchSampler(size, batch_size, world, rank, accumulate, seed, position, repeats=repeats)
    rank_zero_info(f"data: {sampler.describe()}")
    return sampler


def evaluation_split(trainer: L.Trainer | None, size: int, batch_size: int) -> tuple[RankStrideSampler | None, int]:
    """This rank's share of an evaluation set (None: every sample, in order, for one process) and its batch size.

    The shares differ by one sample at most; the batch size grows until they make the same number of batches on
    every rank (17 and 16 images: batches of 9, not 8). A sharded model (``trainer=fsdp``) runs each forward pass
    on all ranks together, so a rank with one batch more would wait for the others forever.
    """
    if trainer is None or trainer.world_size == 1:
        return None, batch_size
    world = trainer.world_size
    shares = {len(range(rank, size, world)) for rank in range(world)}
    while batch_size < max(shares) and len({-(-share // batch_size) for share in shares}) > 1:
        batch_size += 1
    return RankStrideSampler(size, world, trainer.global_rank), batch_size
