"""Shared test helpers: compose the real Hydra configs with overrides, the way the CLI does."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

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


def compose_config(overrides: list[str], config_name: str = "pretrain") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return [*TINY, f"runs_dir={tmp_path}"]
