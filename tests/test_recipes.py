"""Recipes belong to a front door: each composes with its own and passes its checks; others fail before work."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException

from src.config import ConfigError
from src.pipeline.fit import prepare
from tests.conftest import REPO, commands, compose_config, in_process

FRONT_DOORS = {  # recipes/<folder> -> the command that reads it
    "pretrain": "src.pretrain",
    "finetune": "src.finetune",
    "tokenizer": "src.train_tokenizer",
    "supervised": "src.train_supervised",
}
RECIPES = sorted((path.parent.name, path.stem) for path in (REPO / "recipes").glob("*/*.yaml"))
# Files a recipe names but the user provides (a trained tokenizer or teacher, an ImageNet folder).
USER_FILES = ("objective.tokenizer.path", "objective.teacher.checkpoint", "dataset.root")


def test_every_recipe_belongs_to_a_front_door() -> None:
    assert {folder for folder, _ in RECIPES} == set(FRONT_DOORS)
    assert not list((REPO / "recipes").glob("*.yaml")), "a recipe outside recipes/<front door>/"
    assert len(RECIPES) >= 20 and ("pretrain", "mae_vit_t_fmnist") in RECIPES


@pytest.mark.parametrize(("door", "recipe"), RECIPES)
def test_recipe_composes_and_passes_its_checks(door: str, recipe: str, tmp_path) -> None:
    cfg = compose_config([f"recipe={recipe}", f"runs_dir={tmp_path}"], config_name=door)
    try:
        prepare(cfg)  # the shared checks and the method's own, as a run does before any work
    except ConfigError as e:  # only a file the user has to make or point at may be missing
        assert any(key in str(e) for key in USER_FILES), f"{recipe}: {e}"
    header = (REPO / "recipes" / door / f"{recipe}.yaml").read_text()
    assert f"python -m {FRONT_DOORS[door]}" in header or recipe == "vit_t_fmnist32", f"{recipe}: names no command"


@pytest.mark.parametrize("recipe", ["mae_vit_t_fmnst", "knn_vit_t_fmnist"])
def test_a_misspelt_or_foreign_recipe_fails_naming_the_valid_ones(recipe: str) -> None:
    with pytest.raises(MissingConfigException, match=f"recipe/{recipe}") as refused:
        compose_config([f"recipe={recipe}"], config_name="pretrain")
    assert "mae_vit_t_fmnist" in str(refused.value) and "knn_vit_t_fmnist\n" not in str(refused.value)


@pytest.mark.slow
def test_help_lists_the_recipes_of_each_front_door() -> None:
    """The four commands at once, each a real start from the command line (in-process they take longer: Hydra
    reads every config group for the help)."""
    helps = commands(*((module, ["--help"]) for module in FRONT_DOORS.values()), timeout=120)
    for door, out in zip(FRONT_DOORS, helps, strict=True):
        assert out.returncode == 0, out.stderr[-2000:]
        line = next(line for line in out.stdout.splitlines() if line.startswith("recipe: "))
        listed = {name.strip() for name in line.removeprefix("recipe: ").split(",")}
        assert listed == {recipe for folder, recipe in RECIPES if folder == door}, (door, listed)
        assert "\ncombo:" not in out.stdout and "show_config=true" in out.stdout  # combo is picked, never chosen


@pytest.mark.parametrize("door", FRONT_DOORS.values())
@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("batch_size=abc", "override batch_size=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ("batch_sise=8", "Could not override 'batch_sise': Key 'batch_sise' not in"),
        ("dataset=nowhere", "Could not find 'dataset/nowhere': Available options in 'dataset': "),
        ("encoder=[", "no viable alternative at input '['"),
    ],
)
def test_an_override_hydra_cannot_compose_is_one_line_naming_it(door, override, said, capsys, monkeypatch):
    """Each front door's own start, in-process: Hydra's several-line report becomes one line, status 1."""
    done = in_process(door, [override], capsys, monkeypatch)
    assert done.returncode == 1 and done.stderr.startswith("config error: "), done.stderr
    assert said in done.stderr and done.stderr.count("\n") == 1, done.stderr
