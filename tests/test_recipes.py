"""Every recipe composes with its entry point's config and passes the config checks, as the CLI would."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from src.config import validate
from tests.conftest import REPO, compose_config

RECIPES = sorted(path.stem for path in (REPO / "recipes").glob("*.yaml"))
FINETUNE_PREFIXES = ("knn_", "linear_", "classify_", "vit_t_fmnist32")


def entry_config(recipe: str) -> str:
    """The top-level config a recipe is written for (the command in its header comment)."""
    if recipe.startswith("tokenizer_"):
        return "tokenizer"
    if recipe.startswith("supervised_"):
        return "train_supervised"
    if recipe.startswith(FINETUNE_PREFIXES) or "_finetune_" in recipe or "_linprobe_" in recipe:
        return "finetune"
    return "pretrain"


def test_recipes_found() -> None:
    assert len(RECIPES) >= 20 and "mae_vit_t_fmnist" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe: str) -> None:
    config = entry_config(recipe)
    cfg = compose_config([f"recipe={recipe}"], config_name=config)
    if OmegaConf.is_missing(cfg.dataset, "root"):  # the ImageNet recipes: the user names the folder
        cfg.dataset.root = "/data/imagenet"
    validate(cfg)  # resolves every interpolation and applies the value rules
    header = (REPO / "recipes" / f"{recipe}.yaml").read_text()
    command = {"pretrain": "src.pretrain", "finetune": "src.finetune", "tokenizer": "src.train_tokenizer"}
    command["train_supervised"] = "src.train_supervised"
    assert f"python -m {command[config]}" in header or recipe == "vit_t_fmnist32", f"{recipe}: header names no command"
