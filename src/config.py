"""Checks that make a typo or an impossible value fail before any work, naming the key.

``validate`` checks the keys every run shares, once; each method checks its own section
(``TrainingMethod.check_config``) with the same ``check_rules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, get_args

from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


class UserError(Exception):
    """Ends a run with its message, not a traceback: the message says what happened and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and says what would."""


class RunStopped(UserError, RuntimeError):
    """A run that could not go on (it kept diverging); the message says what is left and what to change."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Entry points: a UserError ends the process with its message and a non-zero status."""
    try:
        yield
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except RunStopped as e:
        sys.exit(f"run stopped: {e}")


_ABSENT = object()
Rule = tuple[str, Callable[[Any], bool], str]  # (key, predicate, what the value must be)

# What Lightning accepts as a precision (its own type), plus our "auto"; accelerators and strategies by name.
PRECISIONS = ("auto", *(str(v) for arg in get_args(_PRECISION_INPUT) for v in get_args(arg)))
ACCELERATORS = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
STRATEGIES = ("auto", *StrategyRegistry.available_strategies())


def _integer(value: Any, at_least: int) -> bool:
    """An integer of at least ``at_least``; true and false are not (Python counts them as 1 and 0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def _number(value: Any, above: float) -> bool:
    """A finite number above ``above``; not a bool, not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and above < value < float("inf")


def _device_indices(value: Any) -> bool:
    """A list of distinct GPU indices (``trainer.devices=[0,1]``), as Lightning takes it."""
    indices = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else []
    return bool(indices) and all(_integer(i, 0) for i in indices) and len(set(indices)) == len(indices)


# The weighted kNN vote's settings: one list for the online monitor (``knn.``) and the evaluation (``task.``).
KNN_RULES: list[Rule] = [
    ("k", lambda v: _integer(v, 1), "must be a positive integer (the neighbours that vote)"),
    ("temperature", lambda v: _number(v, 0), "must be a positive number (the votes are exp(sim / T))"),
    ("every_n_epochs", lambda v: _integer(v, 1), "must be a positive integer"),
]

# The keys every run shares. Keys absent from a composed config are not checked.
SHARED_RULES: list[Rule] = [
    ("batch_size", lambda v: _integer(v, 1), "must be a positive integer"),
    ("epochs", lambda v: v > 0, "must be positive"),
    ("warmup_epochs", lambda v: v >= 0, "must be >= 0"),
    ("num_workers", lambda v: _integer(v, 0), "must be an integer >= 0"),
    ("dataset.img_size", lambda v: _integer(v, 1), "must be a positive integer"),
    ("resume", lambda v: v in ("auto", True, False), "must be auto, true or false"),
    ("trainer.max_epochs", lambda v: v is None or v == -1 or v >= 1, "must be -1 (no limit) or at least 1"),
    ("trainer.max_steps", lambda v: _integer(v, -1) and v != 0, "must be -1 (no limit) or at least 1"),
    ("trainer.precision", lambda v: str(v) in PRECISIONS, f"must be one of {PRECISIONS}"),
    ("trainer.accelerator", lambda v: v in ACCELERATORS, f"must be one of {ACCELERATORS}"),
    ("trainer.strategy", lambda v: v in STRATEGIES, f"must be one of {STRATEGIES}"),
    ("max_nonfinite_steps", lambda v: _integer(v, 1), "must be a positive integer"),
    ("trainer.accumulate_grad_batches", lambda v: _integer(v, 1), "must be a positive integer"),
    (
        "trainer.devices",
        lambda v: v == "auto" or (_integer(v, -1) and v != 0) or _device_indices(v),
        "must be auto, a positive integer, -1 (every GPU) or a list of GPU indices such as [0,1]",
    ),
    ("trainer.num_nodes", lambda v: _integer(v, 1), "must be a positive integer"),
    ("trainer.log_every_n_steps", lambda v: _integer(v, 1), "must be a positive integer"),
    ("trainer.num_sanity_val_steps", lambda v: _integer(v, -1), "must be -1 (all), 0 or more"),
    ("trainer.gradient_clip_val", lambda v: v is None or _number(v, -1) and v >= 0, "must be null or a number >= 0"),
    (
        "trainer.timeout_s",
        lambda v: _number(v, 0),
        "must be a positive number of seconds (how long a rank waits for the others in a collective)",
    ),
    *((f"knn.{key}", ok, requirement) for key, ok, requirement in KNN_RULES),
]


def check_rules(node: DictConfig, prefix: str, rules: list[Rule]) -> None:
    """Apply ``rules`` to the keys of ``node`` that are present; a failure names ``prefix.key``."""
    for key, ok, requirement in rules:
        value = OmegaConf.select(node, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        try:
            valid = ok(value)
        except TypeError:
            valid = False
        if not valid:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{key}={value!r} {requirement}")


def validate(cfg: DictConfig) -> None:
    """Resolve every interpolation, refuse missing mandatory values, then check the shared keys."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing value for '{e.full_key}': set it, e.g. {e.full_key}=...") from None
    check_rules(cfg, "", SHARED_RULES)


def check_grid(encoder: Any, img_size: int, key: str = "dataset.img_size") -> tuple[int, int]:
    """The image must tile into the encoder's output grid."""
    try:
        return encoder.grid_size(img_size)
    except ValueError as e:
        raise ConfigError(f"{key}={img_size}: {e}") from None
