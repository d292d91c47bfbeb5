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

# The keys every run shares. Keys absent from a composed config are not checked.
SHARED_RULES: list[Rule] = [
    ("batch_size", lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
    ("epochs", lambda v: v > 0, "must be positive"),
    ("warmup_epochs", lambda v: v >= 0, "must be >= 0"),
    ("num_workers", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
    ("dataset.img_size", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
    ("resume", lambda v: v in ("auto", True, False), "must be auto, true or false"),
    ("trainer.max_epochs", lambda v: v is None or v == -1 or v >= 1, "must be -1 (no limit) or at least 1"),
    ("trainer.max_steps", lambda v: v is None or v == -1 or v >= 1, "must be -1 (no limit) or at least 1"),
    ("trainer.precision", lambda v: str(v) in PRECISIONS, f"must be one of {PRECISIONS}"),
    ("trainer.accelerator", lambda v: v in ACCELERATORS, f"must be one of {ACCELERATORS}"),
    ("trainer.strategy", lambda v: v in STRATEGIES, f"must be one of {STRATEGIES}"),
    ("max_nonfinite_steps", lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
    ("trainer.accumulate_grad_batches", lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
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
