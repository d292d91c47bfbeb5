"""Fuzzed weight files: a valid .ckpt, .pth and .safetensors written by the toolkit's own code, then truncated,
bit-flipped, emptied, replaced by garbage, given a broken safetensors header, or swapped for a pickle that is
no mapping. Every reader answers with one ConfigError line, or (resume, export) a warning naming the file and
the older checkpoint; never another exception.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import src.encoders  # noqa: F401  (registers the encoder families)
from src.config import ConfigError
from src.encoders import create_encoder
from src.encoders.loading import InitCheckpoint, load_encoder_weights
from src.files import save_weights
from src.pipeline.checkpoint import AtomicCheckpointIO
from src.pipeline.export import checkpoint_state
from src.pipeline.run_folder import LAST, PREVIOUS, resume_checkpoint

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def safetensors_header(header: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + b"\0" * 8


# A mutation turns the bytes of a valid file into those of a damaged one.
MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=8)),
    st.tuples(st.just("garbage"), st.binary(max_size=512)),
    st.sampled_from(
        [
            ("replace", b""),
            ("replace", safetensors_header(b"{}", 2**62)),  # a header length past any file
            ("replace", safetensors_header(b'{"w": {"dtype": "F32", "shape": [4], "data_of')),  # bad JSON
            ("replace", safetensors_header(json.dumps({"w": {"dtype": "F32", "shape": [2**40]}}).encode())),
            ("replace", safetensors_header(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}')),
            ("pickle", [torch.zeros(2)]),  # torch files whose top level is no mapping
            ("pickle", torch.zeros(3)),
            ("pickle", 7),
        ]
    ),
)


def mutate(path: Path, original: bytes, mutation: tuple) -> None:
    kind, arg = mutation
    if kind == "truncate":
        path.write_bytes(original[: int(arg * len(original))])
    elif kind == "flip":
        data = bytearray(original)
        for where, bit in arg:
            data[int(where * len(data))] ^= 1 << bit
        path.write_bytes(bytes(data))
    elif kind == "pickle":
        torch.save(arg, path)
    else:
        path.write_bytes(arg)


def one_line_error(error: ConfigError) -> None:
    assert str(error) and "\n" not in str(error), str(error)


@pytest.fixture(scope="module")
def encoder():
    cfg = compose_config(TINY)
    return create_encoder(cfg.encoder, 32), cfg.encoder


class Originals(dict):
    """The bytes of the valid files, shown by name only when hypothesis reports a failing example."""

    def __repr__(self) -> str:
        return f"Originals({', '.join(self)})"


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory, encoder) -> Originals:
    """A small valid file of each kind, as the toolkit writes it."""
    model, encoder_cfg = encoder
    folder = tmp_path_factory.mktemp("valid")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lightning = {
        "state_dict": {f"encoder.{k}": v for k, v in state.items()},
        "pytorch-lightning_version": "2.4",
        "global_step": 3,
        "hyper_parameters": {"encoder_config": OmegaConf.to_container(encoder_cfg, resolve=True)},
    }
    AtomicCheckpointIO().save_checkpoint(lightning, folder / LAST)
    torch.save({"model": state}, folder / "official.pth")  # the layout of the official exports
    save_weights(state, folder / "encoder.safetensors")
    return Originals({name: (folder / name).read_bytes() for name in (LAST, "official.pth", "encoder.safetensors")})


@FUZZ
@given(name=st.sampled_from([LAST, "official.pth", "encoder.safetensors"]), mutation=MUTATIONS)
def test_init_loader_reads_or_refuses_in_one_line(tmp_path: Path, encoder, valid_files, name, mutation) -> None:
    model, encoder_cfg = encoder
    path = tmp_path / name
    mutate(path, valid_files[name], mutation)
    init = OmegaConf.create({"checkpoint": str(path)})
    try:
        load_encoder_weights(model, InitCheckpoint.read(init), encoder_cfg)
    except ConfigError as e:
        one_line_error(e)
        assert str(path) in str(e)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, valid_files) -> Path:
    """A run folder whose older checkpoint (step 3) is whole."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / PREVIOUS).write_bytes(valid_files[LAST])
    return folder


@FUZZ
@given(mutation=MUTATIONS)
def test_resume_and_export_pass_over_a_damaged_newest_checkpoint(run_dir, valid_files, caplog, mutation) -> None:
    last = run_dir / "checkpoints" / LAST
    mutate(last, valid_files[LAST], mutation)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        chosen = resume_checkpoint(run_dir, "auto")
    assert chosen in (last, run_dir / "checkpoints" / PREVIOUS)
    if chosen != last:
        assert f"{last} cannot be read" in caplog.text
    try:
        path, state = checkpoint_state(run_dir, None)
    except ConfigError as e:  # the newest reads as a training checkpoint, yet holds no state dict: named
        one_line_error(e)
        assert str(last) in str(e)
    else:
        assert path == chosen and state


@FUZZ
@given(mutation=MUTATIONS)
def test_export_of_a_named_damaged_checkpoint_is_one_line(tmp_path: Path, valid_files, mutation) -> None:
    path = tmp_path / "named.ckpt"
    mutate(path, valid_files[LAST], mutation)
    try:
        checkpoint_state(tmp_path, path)
    except ConfigError as e:
        one_line_error(e)
        assert str(path) in str(e)
