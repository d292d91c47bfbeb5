"""Fuzzing the files a run folder holds besides checkpoints: the lock, the recorded config, the init file's
identity and the finished-run marker. Whatever bytes they hold, a command gets a one-line ConfigError that
names the file, or goes on as the file says; never another exception."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from conftest import TINY, compose_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from src.config import ConfigError
from src.pipeline.loggers import AppendingCSVLogger
from src.pipeline.report import read_curves
from src.pipeline.run_folder import (
    CONFIG_FILE,
    FINISHED_FILE,
    IDENTITY_FILE,
    LOCK_FILE,
    check_same_run,
    finished_run,
    record_run,
    run_length,
    run_lock,
)

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Bytes as a damaged file holds them: random bytes, text, JSON of any shape, or a valid record cut short.
CONTENT = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    JSON.map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture(scope="module")
def cfg():
    return compose_config([*TINY, "runs_dir=/tmp/unused"])


def one_line(error: ConfigError, name: str) -> None:
    assert "\n" not in str(error) and name in str(error), str(error)


@FUZZ
@given(content=CONTENT)
def test_any_lock_file_is_refused_by_name_or_taken_over_when_asked(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        lock = Path(folder) / LOCK_FILE
        lock.write_bytes(content)
        try:
            with run_lock(Path(folder)):
                taken = True
        except ConfigError as e:
            one_line(e, folder)
            taken = False
        if not taken:  # the way out the message names works
            lock.write_bytes(content)
            with run_lock(Path(folder), takeover=True):
                assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()


@FUZZ
@given(name=st.sampled_from([CONFIG_FILE, IDENTITY_FILE]), content=CONTENT, cut=st.integers(0, 4000))
def test_any_damaged_record_is_named_or_read_as_another_run(cfg, name: str, content: bytes, cut: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        record_run(Path(folder), cfg)
        path = Path(folder) / name
        intact = path.read_bytes()
        path.write_bytes(intact[:cut] + content if cut < len(intact) else content)
        try:
            check_same_run(Path(folder), cfg)
        except ConfigError as e:
            one_line(e, folder)


@FUZZ
@given(content=CONTENT, fields=st.dictionaries(st.sampled_from(["step", "paths", "exports"]), JSON))
def test_any_finished_marker_is_named_or_read(cfg, content: bytes, fields: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for marker in (content, json.dumps({**fields, "length": run_length(cfg)}).encode()):
            (Path(folder) / FINISHED_FILE).write_bytes(marker)
            try:
                record = finished_run(Path(folder), cfg)
            except ConfigError as e:
                one_line(e, FINISHED_FILE)
                continue
            if record is not None:  # only a whole record of this run's length reads as finished
                assert type(record["step"]) is int and marker != content


@FUZZ
@given(content=CONTENT, cut=st.integers(0, 400))
@example(content=b"\r\x00", cut=0)  # a header without a step column (found by this test)
def test_any_damaged_csv_history_draws_what_it_can_or_is_named(content: bytes, cut: int) -> None:
    """A history cut by a kill or damaged: the loss curve passes over what it cannot read; resuming names the file."""
    history = b"epoch,step,train/loss,train/lr\n" + b"".join(b"0,%d,%f,0.1\n" % (s, 1 / (s + 1)) for s in range(20))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "metrics.csv"
        path.write_bytes(history[:cut] + content)
        points = read_curves(path, ["train/loss"])["train/loss"]
        assert all(type(s) is int and math.isfinite(v) for s, v in points)
        try:
            AppendingCSVLogger(save_dir=folder, name="", version="").experiment.metrics_file_path  # noqa: B018
        except ConfigError as e:
            one_line(e, "metrics.csv")
