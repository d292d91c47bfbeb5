"""Fuzzed tar shards and manifests: a one-line ConfigError before work, or counted skips; nothing else, no hang.

A valid shard and manifest come from the project's own writer; hypothesis then cuts, overwrites and rebuilds them
(members of other types, hostile labels, broken images) and rewrites the manifest with anything JSON can hold.
Each case goes through what a run does: the data module's checks, then one pass of the training loader.
"""

from __future__ import annotations

import io
import json
import signal
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from src.config import ConfigError, RunStopped
from src.data import EvalTransform, build_datamodule
from src.data.write_shards import write_shards

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "shards.yaml"
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # or scikit-learn's digits where it is not installed
SAMPLES = 6
SHARD, MANIFEST = "train-000000.tar", "train-shards.json"
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass(repr=False)
class Shard:
    """A shard's bytes and its members (name, content); shown short in hypothesis's report of a failing case."""

    data: bytes
    members: list[tuple[tarfile.TarInfo, bytes]]

    def __repr__(self) -> str:
        return f"<the writer's shard: {len(self.data)} bytes>"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Shard:
    """The writer's shard of ``SAMPLES`` samples."""
    out = tmp_path_factory.mktemp("valid")
    write_shards("fashion_mnist", FMNIST_ROOT, "test", out, maxcount=SAMPLES, limit=SAMPLES)
    assert json.loads((out / MANIFEST).read_text()) == {SHARD: SAMPLES}
    with tarfile.open(out / SHARD) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    return Shard((out / SHARD).read_bytes(), members)


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """A read that takes longer than ``seconds`` fails the case: a hang is a failure, not a slow test."""

    def stop(signum: int, frame: object) -> None:
        raise Hang(f"reading took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_pass(shard: bytes, manifest: str | None) -> None:
    """Build the data module on these bytes and read one labelled pass; check the outcome is one the issue allows."""
    with tempfile.TemporaryDirectory() as folder, time_limit(20):
        (Path(folder) / SHARD).write_bytes(shard)
        if manifest is not None:
            (Path(folder) / MANIFEST).write_text(manifest)
        cfg = OmegaConf.load(CONF)
        cfg.train_urls, cfg.samples_per_epoch, cfg.num_classes, cfg.shuffle_buffer = f"{folder}/{SHARD}", None, 10, 0
        cfg.img_size, cfg.mean, cfg.std = 8, [0.5] * 3, [0.5] * 3
        view = EvalTransform(8, cfg.mean, cfg.std)
        try:
            dm = build_datamodule(cfg, view, view, batch_size=2, num_workers=0, labelled=True)
        except ConfigError as e:  # refused before work: one line that names what
            assert "\n" not in str(e) and ("dataset.train_urls" in str(e) or "manifest" in str(e)), str(e)
            return
        try:
            batches = list(dm.train_dataloader())
        except RunStopped as e:  # every sample of the pass was skipped: one line
            assert "\n" not in str(e) and str(e).startswith("every sample of this pass"), str(e)
            return
        kept, skipped = sum(len(b["label"]) for b in batches), sum(int(b["skipped"]) for b in batches)
        assert all(0 <= label < 10 for b in batches for label in b["label"].tolist())
        listed = json.loads(manifest).get(SHARD) if manifest is not None else None
        if isinstance(listed, int):  # the manifest passed the checks: every sample it lists is read or counted
            assert kept + skipped >= listed, (kept, skipped, listed)


# ---- the tar's bytes --------------------------------------------------------------------------------------------
@st.composite
def cut_or_overwritten(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "empty", "garbage"]))
    at = draw(st.integers(0, len(data)))
    if kind == "truncate":
        return data[:at]
    if kind == "empty":
        return b""
    junk = draw(st.binary(min_size=1, max_size=600))
    if kind == "garbage":
        return junk
    return data[:at] + junk + data[at + (len(junk) if kind == "overwrite" else 0) :]


# ---- the tar's members --------------------------------------------------------------------------------------------
HOSTILE_LABELS = st.one_of(
    st.sampled_from([b"-1", b"-7", b"10", b"nan", b"inf", b"1e9", b"3.5", b"", b" ", b"9" * 5000, b"1" * 19]),
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.binary(max_size=24),
    st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
MEMBER_TYPES = [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE]


@st.composite
def rebuilt(draw: st.DrawFn, members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """The shard rebuilt with a few members changed: content, type or name, or one dropped or doubled."""
    changed = [(tarfile.TarInfo(m.name), data) for m, data in members]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(changed) - 1))
        info, data = changed[i]
        change = draw(st.sampled_from(["label", "image", "type", "name", "drop", "double"]))
        if change == "label" and info.name.endswith(".cls"):
            data = draw(HOSTILE_LABELS)
        elif change == "image" and not info.name.endswith(".cls"):
            data = draw(st.one_of(st.binary(max_size=200), st.integers(0, len(data)).map(lambda n, d=data: d[:n])))
        elif change == "type":
            info.type, info.linkname = draw(st.sampled_from(MEMBER_TYPES)), changed[0][0].name
        elif change == "name":
            info.name = draw(st.sampled_from(["noextension", "__meta__", "x/../../y.png", "a.PNG", ".cls", "k.jpg"]))
        elif change == "drop":
            del changed[i]
            continue
        elif change == "double":
            changed.insert(i, (info, data))
        changed[i] = (info, data)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in changed:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mutated",
    [lambda shard: cut_or_overwritten(shard.data), lambda shard: rebuilt(shard.members)],
    ids=["cut_or_overwritten_bytes", "hostile_members"],
)
@FUZZ
@given(data=st.data(), keep_manifest=st.booleans())
def test_mutated_shards(valid, mutated, data, keep_manifest):
    shard = data.draw(mutated(valid))
    one_pass(shard, json.dumps({SHARD: SAMPLES}) if keep_manifest else None)


# ---- the manifest ---------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
COUNTS = st.one_of(st.integers(-(10**12), 10**12), st.integers(0, 40), JSON)


@FUZZ
@given(
    manifest=st.one_of(
        st.builds(lambda count: json.dumps({SHARD: count}), COUNTS),  # hostile counts
        st.builds(lambda other: json.dumps(other), JSON),  # missing keys, wrong types
        st.text(max_size=40),  # garbage
        st.builds(lambda text: json.dumps({SHARD: SAMPLES})[: len(text)], st.text(max_size=25)),  # cut short
        st.just("[" * 100_000),  # nested past the parser's recursion limit
    )
)
def test_mutated_manifests(valid, manifest):
    one_pass(valid.data, manifest)
