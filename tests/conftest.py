"""Shared test helpers: compose the real Hydra configs with overrides, the way the CLI does."""

from __future__ import annotations

import logging
import os
import runpy
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hypothesis import settings
from omegaconf import DictConfig

from src.schema import register_schemas

# The fuzz tests draw the same examples on every run, so that CI never fails by chance; a search for new faults
# draws fresh ones: `pytest tests/test_fuzz_*.py --hypothesis-profile=random` (a failure prints its example).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("random", derandomize=False)
settings.load_profile("deterministic")
register_schemas()  # the YAML files name their schemas (src/schema.py), as the front doors register them
# make test runs the suite on every core (pytest-xdist, --dist loadfile: a file's tests on one worker, so that its
# module fixtures are built once); one test process per core, so one thread each (and in the commands the tests
# start): threads that outnumber the cores spin.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A tiny but real setup: ViT with 4 px patches at 32 px Fashion-MNIST, a light decoder, few images.
TINY = [
    "encoder=vit_t",
    "encoder.kwargs.patch_size=4",
    "+encoder.kwargs.depth=2",
    "dataset.img_size=32",
    "dataset.train_limit=64",
    "dataset.knn_bank=64",
    "dataset.knn_queries=32",
    "batch_size=16",
    "num_workers=0",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
]


# Real Fashion-MNIST detection scenes, few and small, and heads to match (tests of detection and of its config).
SMALL_HEADS = [
    "objective.fpn_channels=32",
    "objective.roi_samples=32",
    "objective.test_proposals=50",
    "objective.anchor_sizes=[8,16,32,64,128]",
]
SCENES = [
    "dataset=fmnist_scenes",
    "dataset.build_args.train_images=8",
    "dataset.build_args.val_images=4",
    "dataset.build_args.canvas=96",
    "dataset.build_args.scale=[1,2]",
    "dataset.sizes.train=[64,96]",
    "dataset.sizes.test=96",
    "dataset.sizes.max=160",
    "dataset.crop.sizes=[64]",
    "dataset.crop.range=[48,64]",
]


def scenes_run(tmp_path: Path) -> list[str]:
    """``SCENES`` built into this test's folder, and the run folders beside them."""
    return [*SCENES, f"runs_dir={tmp_path}", f"dataset.root={tmp_path}/scenes"]


def start_pretraining(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A pretraining run in the background, in its own process group (so a test can kill all of it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "src.pretrain", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def command(module: str, args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` as a user types it, W&B offline, its output captured (``env``: more variables)."""
    environ = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout
    )


def commands(*calls: tuple[str, list[str]], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Independent commands at the same time, so that each start-up has a core of its own; results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: command(*call, timeout=timeout), calls))


@dataclass(frozen=True)
class Said:
    """What a front door run in this process returned and printed."""

    returncode: int
    stdout: str
    stderr: str


def in_process(module: str, args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Said:
    """``python -m MODULE ARGS`` run in this process as the interpreter runs it (``__main__``: Hydra's parsing,
    ``run_front_door``, ``exit_on_user_error``), without a new interpreter's 6 s of imports. A ``sys.exit``
    message goes to stderr, as the interpreter would print it."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # run_front_door sets it to 1; monkeypatch puts 0 back
    monkeypatch.setenv("WANDB_MODE", "offline")
    returncode, message = 0, ""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra's job logging replaces them for the command
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        returncode = e.code if isinstance(e.code, int) else 1
        message = "" if isinstance(e.code, int) or e.code is None else f"{e.code}\n"
    finally:
        GlobalHydra.instance().clear()
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return Said(returncode, out, err + message)


def free_port() -> int:
    """A port nothing listens on, for a rendezvous on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def both_ranks(module: str, args: list[str], timeout: int = 300, **env: str) -> list[subprocess.CompletedProcess]:
    """The two processes of a two-process command (``trainer=cpu_ddp``, ``trainer=fsdp``) started at once, as
    torchrun starts them (LOCAL_RANK set: Lightning launches none itself), so that their start-ups share the two
    cores instead of taking turns (``env``: more variables)."""
    rank = partial(command, module, args, timeout, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **env)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda r: rank(LOCAL_RANK=str(r)), range(2)))


# A tiny MAE pretraining command that shows everything a run can: W&B offline, pictures, the kNN monitor and a
# CSV row at each of its 4 steps. The tests of what such a command prints and leaves read one run of it.
SHOWING_RUN = [*TINY, "objective.decoder_dim=64", "objective.decoder_depth=1", "objective.decoder_heads=4"]
SHOWING_RUN += ["logger=wandb", "logger.wandb.mode=offline", "pictures.every_n_steps=2", "trainer.log_every_n_steps=1"]


@dataclass(frozen=True)
class CommandRun:
    """A finished ``python -m src.pretrain`` run: its arguments (runs_dir and run_name apart), folder and output."""

    args: list[str]
    run_dir: Path
    done: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def pretrain_command_run(tmp_path_factory: pytest.TempPathFactory) -> CommandRun:
    """One run of ``SHOWING_RUN`` through the front door, for every test that only reads its results."""
    runs = tmp_path_factory.mktemp("command")
    done = command("src.pretrain", [*SHOWING_RUN, f"runs_dir={runs}", "run_name=first"])
    assert done.returncode == 0, done.stderr[-3000:]
    return CommandRun(SHOWING_RUN, runs / "first", done)


def compose_config(overrides: list[str], config_name: str = "pretrain", hydra: bool = False) -> DictConfig:
    """The config of a front door (pretrain, finetune, tokenizer, supervised), composed as its command would
    (``hydra=True``: with the ``hydra`` section a front door sees, overrides included)."""
    with initialize_config_dir(config_dir=str(CONF / config_name), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)


def composition_refusal(overrides: list[str], config_name: str = "pretrain") -> str:
    """What composition says when the schema refuses ``overrides`` (a value of the wrong type, a key it does not
    have): Hydra's message and OmegaConf's, which names the full key."""
    with pytest.raises(ConfigCompositionException) as refused:
        compose_config(overrides, config_name)
    return f"{refused.value}\n{refused.value.__cause__}"


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return [*TINY, f"runs_dir={tmp_path}"]


def assert_export_reproduces(run_dir: Path, exports: dict[str, Path], out_dir: Path) -> None:
    """``python -m src.export`` rebuilds the run from its saved config and writes the same weights again."""
    import torch
    from safetensors.torch import load_file

    from src.pipeline.export import export_run

    again = export_run(run_dir, out_dir=out_dir)
    assert again.keys() == exports.keys()
    for name, path in exports.items():
        if path.suffix == ".safetensors":
            first, second = load_file(str(path)), load_file(str(again[name]))
        elif path.suffix == ".pth":
            first, second = (torch.load(p, weights_only=True)["model"] for p in (path, again[name]))
        else:
            assert path.read_text() == again[name].read_text(), name
            continue
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name
