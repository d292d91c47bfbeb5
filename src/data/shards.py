"""WebDataset tar shards (``<key>.png|jpg`` + optional ``<key>.cls``) read and decoded in DataLoader workers.

Failure policy, so one bad file never ends a long run:
- an undecodable or image-less sample, or one whose label is not a class index (a decimal integer >= 0, below
  ``dataset.num_classes`` when set; required when the reader needs labels), becomes None (dropped and counted
  by ``collate_skipping``), with a warning naming the shard, key and reason;
- a truncated or corrupt tar ends that shard with a warning naming it (and how many samples it gave);
  reading goes on with the next shard. Where the shard's manifest (``<prefix>-shards.json``, written
  by ``src.data.write_shards``) gives its sample count, each lost sample becomes a None too, so the
  loss is counted; a cut that the manifest reveals is found even at a member boundary, where the tar
  alone looks like a shorter valid one.

What cannot be a per-sample skip is refused before work (ConfigError): a pattern that expands to no shards, a
missing shard, a manifest that is not ``{shard file name: count >= 0}`` or lists more samples than its shard's
bytes can hold (each takes at least one 512-byte tar header), and shards whose first samples are all unusable.

An IterableDataset has no natural epoch when shards are cycled, so with ``repeat=True`` each epoch is
``num_samples`` over all ranks, split between DataLoader workers in whole batches; ``len()`` then
matches the batches Lightning sees.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from src.config import ConfigError, RunStopped
from src.data.distributed import mix_seed
from src.data.folder import DECODE_ERRORS, PROBE, load_image, one_line, spread
from src.data.transforms import labelled_sample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
# Errors from opening/reading a tar stream: truncation, bad headers, gzip damage, duplicate members.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)
TAR_BLOCK = 512  # every tar member starts with a header block this long: a shard of N bytes holds <= N // 512 samples
LABEL = re.compile(rb"\s*(\d{1,18})\s*")  # a class index as text: what write_shards stores in ``.cls``


def is_local(shard: str) -> bool:
    """A shard on this machine's file system (not a URL or a ``pipe:`` command): it can be checked before work."""
    return "://" not in shard and not shard.startswith("pipe:")


def shard_error(exc: BaseException) -> str:
    """What a tar reader's error says, on one line, less the `` @ <file object>`` webdataset appends."""
    text = str(exc.args[0]).split(" @ <")[0] if exc.args else ""
    return " ".join(text.split()) or type(exc).__name__


def expand_shards(urls: str | Sequence[str], key: str) -> list[str]:
    """Brace-expand ``urls`` and check that local shards exist; ConfigErrors name the config ``key``."""
    if isinstance(urls, str):
        patterns = [urls]
    elif isinstance(urls, Sequence) and all(isinstance(u, str) for u in urls):
        patterns = list(urls)
    else:
        raise ConfigError(f"{key}={urls!r} must be a shard path or brace pattern, or a list of them")
    shards = [shard for pattern in patterns for shard in wds.shardlists.expand_urls(pattern)]
    if not shards:
        raise ConfigError(f"{key}: {urls!r} expands to no shards")
    for shard in shards:
        if is_local(shard) and not Path(shard).is_file():
            raise ConfigError(f"{key}: shard {shard} does not exist (from {urls!r})")
    return shards


MANIFEST_SUFFIX = "-shards.json"  # <prefix>-shards.json: {shard file name: number of samples}


def read_manifest(manifest: Path) -> dict[str, int]:
    """``{shard file name: samples}`` from a manifest; ConfigError naming it when it is anything else."""
    fix = "rewrite it with `python -m src.data.write_shards`, or delete it (lost samples then go uncounted)"
    try:
        listed = json.loads(manifest.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, an int too long
        raise ConfigError(f"shard manifest {manifest} is not readable JSON ({one_line(exc)[:200]}): {fix}") from None
    if not isinstance(listed, dict):
        raise ConfigError(f"shard manifest {manifest} is not a JSON object {{shard file name: samples}}: {fix}")
    for name, count in listed.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            shown = f"{name[:60]!r} has {str(count)[:40]!r} samples"
            raise ConfigError(f"shard manifest {manifest}: {shown}, not a count >= 0: {fix}")
    return listed


def manifest_counts(shards: Sequence[str]) -> dict[str, int]:
    """Samples per local shard, from the manifests in the shards' folders (shards without one are absent).

    ConfigError for a manifest that is not ``{name: count}`` or lists more samples than a shard's size allows.
    """
    counts: dict[str, int] = {}
    for folder in sorted({Path(shard).parent for shard in shards if is_local(shard)}):
        for manifest in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
            counts |= {str(folder / name): count for name, count in read_manifest(manifest).items()}
    expected = {shard: counts[shard] for shard in shards if shard in counts}
    for shard, count in expected.items():
        size = Path(shard).stat().st_size
        if count > size // TAR_BLOCK:
            raise ConfigError(
                f"shard {shard} is {size} bytes, too small for the {count} samples its manifest in "
                f"{Path(shard).parent} lists (each takes at least {TAR_BLOCK}): it was cut short or the manifest is "
                "wrong; copy the shard again or rewrite the shards with `python -m src.data.write_shards`"
            )
    return expected


def parse_label(data: bytes, num_classes: int | None) -> int:
    """A ``.cls`` member's class index; ValueError saying why it is none (text, negative, too large)."""
    match = LABEL.fullmatch(data)
    if match is None:
        raise ValueError(f"its label (.cls) {data[:20]!r} is not a class index (a decimal integer >= 0)")
    label = int(match.group(1))
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"its label {label} is not below dataset.num_classes={num_classes}")
    return label


def read_sample(sample: dict, num_classes: int | None, labelled: bool) -> tuple[Image.Image, int]:
    """A tar sample's decoded image and label (-1: none, unless ``labelled``); a DECODE_ERRORS error says why not."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError(f"it has no image ({'/'.join(IMAGE_EXTENSIONS)} member)")
    if "cls" in sample:
        label = parse_label(sample["cls"], num_classes)
    elif labelled:
        raise ValueError("it has no label (.cls member), and this reader needs one")
    else:
        label = -1
    return load_image(io.BytesIO(sample[ext])), label


def check_shards_readable(shards: Sequence[str], key: str, num_classes: int | None, labelled: bool) -> None:
    """Read up to ``PROBE`` samples of each of up to ``PROBE`` local shards spread over the list, until one is usable;
    ConfigError naming the shards and why if none is.

    Run before work: shards that hold no images (or no labels a run needs) would otherwise surface only once
    every batch came back empty. Remote shards are not probed.
    """
    bad = []
    for shard in spread([shard for shard in shards if is_local(shard)], PROBE):
        first_problem = None
        try:
            for sample in islice(wds.tarfile_samples([{"url": shard}]), PROBE):
                try:
                    read_sample(sample, num_classes, labelled)
                    return
                except DECODE_ERRORS as exc:
                    first_problem = first_problem or f"key {sample['__key__']!r}: {one_line(exc)}"
        except SHARD_ERRORS as exc:
            first_problem = first_problem or shard_error(exc)
        bad.append(f"{shard} ({(first_problem or 'it holds no samples')[:200]})")
    if bad:
        raise ConfigError(
            f"{key}: no sample of the first {PROBE} in each of {len(bad)} shards tried is usable: {'; '.join(bad[:3])}"
            + ("; ..." if len(bad) > 3 else "")
            + f"; a sample needs a decodable {'/'.join(IMAGE_EXTENSIONS)} member"
            + (" and a .cls label" if labelled else "")
        )


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
    ``labelled``: a sample without ``.cls`` is skipped (counted), not given label -1; ``num_classes``: labels at
    or above it are skipped too (kNN votes and cross-entropy index a vector of that many classes).
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
        num_classes: int | None = None,
        labelled: bool = False,
    ) -> None:
        if (repeat or resampled) and num_samples is None:
            raise ValueError("repeat/resampled needs num_samples (dataset.samples_per_epoch) to end an epoch")
        self.shards = expand_shards(urls, key)
        self.expected = manifest_counts(self.shards)
        self.transform = transform
        self.num_classes = num_classes
        self.labelled = labelled
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
                raise RunStopped(
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
        try:
            img, label = read_sample(sample, self.num_classes, self.labelled)
        except DECODE_ERRORS as exc:
            log.warning("skipping sample %r of shard %s: %s", sample["__key__"], sample["__url__"], one_line(exc))
            return None
        return labelled_sample(self.transform, img, label)


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
            problem = f"is truncated or corrupt ({type(exc).__name__}: {shard_error(exc)})"
        lost = expected.get(url, count) - count
        if lost > 0:
            problem = problem or "ends early"
        elif lost < 0:
            log.warning("shard %s gave %d samples, more than the %d its manifest lists", url, count, expected[url])
        if problem is None:
            continue
        counted = f"{lost} samples lost, counted as skipped" if lost > 0 else "samples lost: unknown (no manifest)"
        log.warning("shard %s %s after %d samples (%s); continuing with the next shard", url, problem, count, counted)
        yield from [None] * max(lost, 0)
