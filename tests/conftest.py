"""Shared test helpers: compose the real Hydra configs with overrides, the way the CLI does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import settings
from omegaconf import DictConfig

# The fuzz tests draw the same examples on every run, so that CI never fails by chance; a search for new faults
# draws fresh ones: `pytest tests/test_fuzz_*.py --hypothesis-profile=random` (a failure prints its example).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("random", derandomize=False)
settings.load_profile("deterministic")

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


def compose_config(overrides: list[str], config_name: str = "pretrain", hydra: bool = False) -> DictConfig:
    """The config of a front door (pretrain, finetune, tokenizer, supervised), composed as its command would
    (``hydra=True``: with the ``hydra`` section a front door sees, overrides included)."""
    with initialize_config_dir(config_dir=str(CONF / config_name), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return [*TINY, f"runs_dir={tmp_path}"]


def assert_export_reproduces(run_dir: Path, exports: dict[str, Path], out_dir: Path) -> None:
    """``python -m src.export`` rebuilds the run from its saved config and writes the same weights again."""
    import torch
    from safetensors.torch import load_file

    from src.export import export_run

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
