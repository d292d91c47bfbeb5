"""A run's config settled once: composition, then the method's resolution; the one config a run checks, records
and shows.

Composition may apply a file by itself (``AUTOMATIC_GROUPS``: the demo's sizes for one objective x encoder x
dataset); the method then settles what the config leaves to it from the init checkpoint, read here once
(``TrainingMethod.settle_config``: the encoder a checkpoint records, detection's decoder sizes). Both are said
once: logged at the start of the run, or as comments above the config ``show_config=true`` prints. The composed
config is never changed; ``show_config`` itself is no part of the settled config, so it is neither recorded nor
compared with a run folder's record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from src.config import AUTOMATIC_GROUPS
from src.encoders.loading import InitCheckpoint
from src.methods.base import TrainingMethod
from src.pipeline.run_folder import config_changes, config_text

SHOW_KEY = "show_config"  # print the settled config and run nothing (each front door's config has it)


@dataclass(frozen=True)
class SettledRun:
    """The settled config, the method it runs and the init checkpoint both were read from; ``notes`` say what
    composition picked by itself and what the method settled."""

    cfg: DictConfig
    method: type[TrainingMethod]
    init: InitCheckpoint
    notes: tuple[str, ...] = ()

    def build(self) -> TrainingMethod:
        """The method's module (encoder included), started from the init checkpoint read for this run."""
        return self.method.from_config(self.cfg, self.init)

    def shown(self) -> str:
        """What ``config.yaml`` will hold, below the notes as YAML comments (so the text still parses as YAML)."""
        return "".join(f"# {note}\n" for note in self.notes) + config_text(self.cfg)


def settle(cfg: DictConfig, method: type[TrainingMethod]) -> SettledRun:
    """Read the init checkpoint once and let ``method`` settle a copy of ``cfg`` from it."""
    init = InitCheckpoint.read(cfg.get("init"))
    settled = method.settle_config(cfg, init)
    with open_dict(settled):
        settled.pop(SHOW_KEY, None)
    changes = {key: change for key, change in config_changes(cfg, settled).items() if key != SHOW_KEY}
    notes = automatic_choices(cfg)
    if changes:
        said = "; ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changes.items())
        notes.append(f"settled by {method.__name__}.settle_config: {said}")
    return SettledRun(settled, method, init, tuple(notes))


def automatic_choices(cfg: DictConfig) -> list[str]:
    """One line per file composition applied by itself (``AUTOMATIC_GROUPS``), naming it and each value the run
    takes from it; none for a config composed outside a front door (no Hydra run to ask which files it chose)."""
    if not HydraConfig.initialized():
        return []
    runtime = HydraConfig.get().runtime
    primary = next(Path(source.path) for source in runtime.config_sources if source.provider == "main")
    notes = []
    for group in AUTOMATIC_GROUPS:
        path = primary / group / f"{runtime.choices.get(group)}.yaml"
        if not path.is_file():  # optional: most combinations have no file
            continue
        said = []
        for key, value in leaves(OmegaConf.to_container(OmegaConf.load(path))):
            used = OmegaConf.select(cfg, key)
            said.append(f"{key}={used}" if used == value else f"{key}={used} (set elsewhere; the file's {value})")
        shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        notes.append(f"picked by itself: {shown} sets " + ", ".join(said))
    return notes


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container; lists are values."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.removesuffix("."), node
