"""Every command the README prints works as printed, at least up to composing its config.

The README's bash blocks are read as a shell would split them (quotes, line continuations, comments, the
variables the blocks set); optional parts in [brackets] are taken, and `<run>` stands for a recipe's run.
"""

from __future__ import annotations

import re
import shlex

import pytest

from src.benchmarks.core import parse_args as benchmark_args
from tests.conftest import REPO, compose_config

FRONT_DOORS = {"src.pretrain": "pretrain", "src.finetune": "finetune", "src.train_tokenizer": "tokenizer"}
FRONT_DOORS["src.train_supervised"] = "supervised"
OTHER_COMMANDS = ("src.export", "src.benchmark", "src.data.write_shards", "src.detection.build_sets")


def readme_commands() -> list[list[str]]:
    """argv (after `-m`) of every `python -m src...` command in the README's bash blocks."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            for statement in re.split(r";\s+(?=[A-Z]+=)", line):  # `A="..."; B="..."` sets two variables
                assignment = re.match(r'^([A-Z]+)="(.*)"$', statement.strip())
                if assignment:
                    variables[assignment[1]] = assignment[2]
                    continue
                for name, value in variables.items():
                    statement = statement.replace(f"${name}", value)
                statement = re.sub(r"\[([^\]]*)\]", r"\1", statement).replace("<run>", "mae_vit_t_fmnist")
                words = shlex.split(statement, comments=True)
                if "--wrap" in words:  # sbatch: the wrapped command line
                    words = shlex.split(words[words.index("--wrap") + 1])
                if "-m" in words and words[words.index("-m") + 1].startswith("src."):
                    commands.append(words[words.index("-m") + 1 :])
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_its_commands() -> None:
    modules = {argv[0] for argv in COMMANDS}
    assert set(FRONT_DOORS) <= modules, modules
    assert len(COMMANDS) >= 20
    assert any("dataset.train_urls=" in word for argv in COMMANDS for word in argv)  # the shard command


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(argv)[:80] for argv in COMMANDS])
def test_each_readme_command_composes(argv: list[str]) -> None:
    module, args = argv[0], [a for a in argv[1:] if a not in ("--cfg", "job", "-m")]  # -m: Hydra's multirun
    if module in FRONT_DOORS:
        cfg = compose_config(args, config_name=FRONT_DOORS[module])
        assert cfg.method
    elif module == "src.benchmark":
        benchmark_args(args)
    else:
        assert module in OTHER_COMMANDS, module
