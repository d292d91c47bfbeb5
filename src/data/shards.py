"""WebDataset tar shards (``<key>.png|jpg`` + optional ``<key>.cls``) read and decoded in DataLoader workers.

Failure policy, so one bad file never ends a long run:
- an undecodable or image-less sample becomes None (dropped and counted by ``collate_skipping``),
  with a warning naming the shard and key;
- a truncated or corrupt tar ends that shard with a warning naming it (and how many samples it gave);
  reading goes on with the next shard. Where the shard's manifest (``<prefix>-shards.json``, written
  by ``src.data.write_shards``) gives its sample count, each lost sample becomes a None too, so the
  loss is counted; a cut that the manifest reveals is found even at a member boundary, where the tar
  alone looks like a shorter valid one.

An IterableDataset has no natural epoch when shards are cycled, so with ``repeat=True`` each epoch is
``num_samples`` over all ranks, split between DataLoader workers in whole batches; ``len()`` then
matches the batches Lightning sees.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from src.data.distributed import mix_seed
from src.data.folder import decode_or_none
from src.data.transforms import labelled_sample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
# Errors from opening/reading a tar stream: truncation, bad headers, gzip damage, duplicate members.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


def expand_shards(urls: str | Sequence[str], key: str) -> list[str]:
    """Brace-expand ``urls`` and check that local shards exist; errors name the config ``key``."""
    patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    shards = [shard for pattern in patterns for shard in wds.shardlists.expand_urls(pattern)]
    if not shards:
        raise ValueError(f"{key}: {urls!r} expands to no shards")
    for shard in shards:
        is_remote = "://" in shard or shard.startswith("pipe:")
        if not is_remote and not Path(shard).is_file():
            raise FileNotFoundError(f"{key}: shard {shard} does not exist (from {urls!r})")
    return shards


MANIFEST_SUFFIX = "-shards.json"  # <prefix>-shards.json: {shard file name: number of samples}


def manifest_counts(shards: Sequence[str]) -> dict[str, int]:
    """Samples per local shard, from the manifests in the shards' folders (shards without one are absent)."""
    counts: dict[str, int] = {}
    for folder in {Path(shard).parent for shard in shards if "://" not in shard and not shard.startswith("pipe:")}:
        for manifest in folder.glob(f"*{MANIFEST_SUFFIX}"):
            try:
                listed = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("ignoring unreadable shard manifest %s: %s", manifest, exc)
                continue
            counts |= {str(folder / name): int(n) for name, n in listed.items()}
    return {shard: counts[shard] for shard in shards if shard in counts}


def worker_quota(total: int, batch_size: int, num_workers: int, worker: int) -> int:
    """Samples ``worker`` yields so that round-robin batches over all workers add up to ``total``.

    ``total`` is cut into batch-sized chunks dealt to workers in turn (the DataLoader's fetch order),
    so each worker's stream splits into exactly its share of full batches.
    """
    full, rest = divmod(total, batch_size)
    quota = (full // num_workers + (worker < full % num_workers)) * batch_size
    return quota + (rest if worker == full % num_workers else 0)


class ShardDataset(IterableDataset):
    """Samples from tar shards through a sample transform (adds "label", -1 without ``.cls``).

    ``repeat=False``: one pass, at most ``num_samples`` (all if None). ``repeat=True``: cycle the
    shards and end each epoch after ``num_samples`` over all ranks (rounded down to whole batches).
    ``split_by_node`` gives each rank its own shards (training); evaluation reads all on every rank.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Callable[[Image.Image], dict[str, torch.Tensor]],
        *,
        key: str = "dataset.train_urls",
        num_samples: int | None = None,
        repeat: bool = False,
        split_by_node: bool = False,
        shuffle_buffer: int = 0,
        batch_size: int = 1,
        resampled: bool = False,
    ) -> None:
        if (repeat or resampled) and num_samples is None:
            raise ValueError("repeat/resampled needs num_samples (dataset.samples_per_epoch) to end an epoch")
        self.shards = expand_shards(urls, key)
        self.expected = manifest_counts(self.shards)
        self.transform = transform
        self.num_samples = num_samples
        self.repeat = repeat
        self.split_by_node = split_by_node
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.resampled = resampled

    def _rank_total(self, world_size: int) -> int:
        assert self.num_samples is not None
        if not (self.repeat or self.resampled):
            return self.num_samples
        per_rank = self.num_samples // world_size if self.split_by_node or self.resampled else self.num_samples
        return per_rank // self.batch_size * self.batch_size

    def describe(self, world_size: int, num_workers: int) -> str:
        """One line on how the shards are laid out over ranks and workers, for the log."""
        if self.resampled:
            return (
                f"{len(self.shards)} shards drawn with replacement by each of {world_size} ranks x "
                f"{max(num_workers, 1)} workers from its own seed; {self.num_samples} samples per epoch"
            )
        share = f"shards[r::{world_size}] on rank r" if self.split_by_node and world_size > 1 else "all shards"
        epoch = f"{self.num_samples} samples per epoch, cycling" if self.repeat else "one pass per epoch"
        return (
            f"{len(self.shards)} shards, {share}, split again over {max(num_workers, 1)} workers; {epoch}; "
            "each shard read once per pass over all ranks"
        )

    def __len__(self) -> int:
        """Samples per epoch on this rank; TypeError (= unknown to Lightning) for an unbounded pass."""
        if self.num_samples is None:
            raise TypeError("a single pass over shards has no known length")
        return self._rank_total(wds.utils.pytorch_worker_info()[1])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | None]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        quota = None
        if self.num_samples is not None:
            quota = worker_quota(self._rank_total(world_size), self.batch_size, num_workers, worker)
        # Drawn from torch's RNG: differs per worker and per epoch, reproducible under seed_everything; mixed with
        # the rank and worker, which a main-process reader (num_workers=0) would otherwise share with other ranks.
        seed = mix_seed(int(torch.randint(2**31, ()).item()), rank, worker) % 2**31
        produced = 0
        while quota is None or produced < quota:
            in_pass = 0
            for sample in self._one_pass(seed + produced):
                if quota is not None and produced >= quota:
                    return
                yield sample
                produced += 1
                in_pass += 1
            if not (self.repeat or self.resampled):
                return
            if in_pass == 0:
                raise RuntimeError(
                    f"rank {rank}/{world_size} worker {worker}/{num_workers} got no samples in a full pass over "
                    f"its share of {len(self.shards)} shards: they are all unreadable, or there are fewer "
                    "shards than ranks x workers (write more, smaller shards)"
                )

    def _one_pass(self, seed: int) -> wds.DataPipeline:
        if self.resampled:  # an endless draw of shards with replacement: no split, any number of ranks x workers
            stages: list = [wds.ResampledShards(self.shards, seed=seed, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(self.shards)]
            if self.split_by_node:
                stages.append(wds.split_by_node)
            stages.append(wds.split_by_worker)
        if self.shuffle_buffer > 0:
            stages.append(wds.shuffle(len(self.shards), initial=len(self.shards), seed=seed))
        stages.append(partial(read_shards, expected=self.expected))
        if self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, seed=seed + 1))
        stages.append(self._decode_samples)
        return wds.DataPipeline(*stages)

    def _decode_samples(self, samples: Iterator[dict]) -> Iterator[dict[str, torch.Tensor] | None]:
        for sample in samples:
            yield None if sample is None else self._decode(sample)  # None: lost in a truncated shard

    def _decode(self, sample: dict) -> dict[str, torch.Tensor] | None:
        where = f"shard {sample['__url__']} key {sample['__key__']}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            log.warning("skipping sample without an image (%s) in %s", "/".join(IMAGE_EXTENSIONS), where)
            return None
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
        except ValueError as exc:
            log.warning("skipping sample with an unreadable label in %s: %s", where, exc)
            return None
        img = decode_or_none(io.BytesIO(sample[ext]), where)
        return None if img is None else labelled_sample(self.transform, img, label)


def read_shards(shards: Iterator[dict], expected: dict[str, int]) -> Iterator[dict | None]:
    """webdataset's tar reader, one shard at a time, so a broken shard ends only itself.

    A shard that gives fewer samples than ``expected`` lists yields one None per lost sample.
    """
    for shard in shards:
        url, count, problem = shard["url"], 0, None
        try:
            for sample in wds.tarfile_samples([{"url": url}]):
                yield sample
                count += 1
        except SHARD_ERRORS as exc:
            # webdataset appends " @ <file object>" to the message; the shard is named below anyway
            reason = str(exc.args[0]).split(" @ <")[0] if exc.args else ""
            problem = f"is truncated or corrupt ({type(exc).__name__}: {reason})"
        lost = expected.get(url, count) - count
        if lost > 0:
            problem = problem or "ends early"
        if problem is None:
            continue
        counted = f"{lost} samples lost, counted as skipped" if lost > 0 else "samples lost: unknown (no manifest)"
        log.warning("shard %s %s after %d samples (%s); continuing with the next shard", url, problem, count, counted)
        yield from [None] * max(lost, 0)
