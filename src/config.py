"""Checks that make a typo or an impossible value fail before any work, naming the key."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and says what would."""


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Entry points: a ConfigError ends the process with its message and a non-zero status, not a traceback."""
    try:
        yield
    except ConfigError as e:
        sys.exit(f"config error: {e}")


_ABSENT = object()

# (key, predicate, what the value must be). Keys absent from a composed config are not checked.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("objective.mask_ratio", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("objective.optim.base_lr", lambda v: v > 0, "must be positive"),
    ("objective.optim.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("batch_size", lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
    ("epochs", lambda v: v > 0, "must be positive"),
    ("warmup_epochs", lambda v: v >= 0, "must be >= 0"),
    ("num_workers", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
    ("dataset.img_size", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
    ("resume", lambda v: v in ("auto", True, False), "must be auto, true or false"),
]


def validate(cfg: DictConfig) -> None:
    """Resolve every interpolation, refuse missing mandatory values, then apply RULES."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing value for '{e.full_key}': set it, e.g. {e.full_key}=...") from None
    for key, ok, requirement in RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        try:
            valid = ok(value)
        except TypeError:
            valid = False
        if not valid:
            raise ConfigError(f"{key}={value!r} {requirement}")


def check_grid(encoder: Any, img_size: int, key: str = "dataset.img_size") -> tuple[int, int]:
    """The image must tile into the encoder's output grid."""
    try:
        return encoder.grid_size(img_size)
    except ValueError as e:
        raise ConfigError(f"{key}={img_size}: {e}") from None
