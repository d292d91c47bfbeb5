"""Every command the README and docs/ print works as printed, at least up to composing its config.

Their bash blocks are read as a shell would split them (quotes, line continuations, comments, the variables
the blocks set); optional parts in [brackets] are taken, `<run>` stands for a recipe's run and any other
`<name>` for a run name.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from src.benchmarks.core import parse_args as benchmark_args
from tests.conftest import REPO, compose_config

FRONT_DOORS = {"src.pretrain": "pretrain", "src.finetune": "finetune", "src.train_tokenizer": "tokenizer"}
FRONT_DOORS["src.train_supervised"] = "supervised"
OTHER_COMMANDS = ("src.export", "src.benchmark", "src.data.write_shards", "src.detection.build_sets")


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands(path: Path) -> list[list[str]]:
    """argv (after `-m`) of every `python -m src...` command in one document's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
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
                statement = re.sub(r"<(\w+)>", r"\1", statement)  # other placeholders name a run: run_name=<row>
                words = shlex.split(statement, comments=True)
                if "--wrap" in words:  # sbatch: the wrapped command line
                    words = shlex.split(words[words.index("--wrap") + 1])
                if "-m" in words and words[words.index("-m") + 1].startswith("src."):
                    commands.append(words[words.index("-m") + 1 :])
    return commands


README_COMMANDS = documented_commands(REPO / "README.md")
COMMANDS = {(path.name, tuple(argv)): argv for path in DOCUMENTS for argv in documented_commands(path)}


def test_the_readme_has_its_commands() -> None:
    modules = {argv[0] for argv in README_COMMANDS}
    assert set(FRONT_DOORS) <= modules, modules
    assert len(README_COMMANDS) >= 20
    assert any("dataset.train_urls=" in word for argv in README_COMMANDS for word in argv)  # the shard command


@pytest.mark.parametrize("argv", COMMANDS.values(), ids=[f"{doc}: {' '.join(argv)[:80]}" for doc, argv in COMMANDS])
def test_each_documented_command_composes(argv: list[str]) -> None:
    module, args = argv[0], [a for a in argv[1:] if a not in ("--cfg", "job", "-m")]  # -m: Hydra's multirun
    if module in FRONT_DOORS:
        cfg = compose_config(args, config_name=FRONT_DOORS[module])
        assert cfg.method
    elif module == "src.benchmark":
        benchmark_args(args)
    else:
        assert module in OTHER_COMMANDS, module
