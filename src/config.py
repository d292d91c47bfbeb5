"""Checks that make a typo or an impossible value fail before any work, naming the key.

Types live in the schema (src/schema.py): every front door composes its config onto dataclasses, so a key that
does not exist or a value of the wrong type fails in composition, naming the key. What a type cannot say (a
range, a set of names) is a ``Check`` in the field's metadata; ``validate`` runs them all once
(``check_schema``). Rules that span several keys stay with their owners: ``TrainingMethod.check_config``, the
data kinds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


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


COMPOSITION_ERRORS = (ConfigCompositionException, MissingConfigException, OverrideParseException)
HYDRA_DETAIL = ("full_key:", "object_type=", "reference_type=", "To append to your config")


def composition_report(error: BaseException) -> str:
    """Hydra's several-line report of an override it cannot compose, in one line: what failed, why, and the
    choices a group offers (``encoder=vit_q``)."""
    text = "\n".join(str(e) for e in (error, error.__cause__) if e is not None).split("\nConfig search path:")[0]
    said, choices = [], []
    for line in text.splitlines():
        if line.startswith("\t"):
            choices.append(line.strip())
        elif line.strip() and not line.strip().startswith(HYDRA_DETAIL):
            said.append(line.strip().rstrip("."))
    return ": ".join(said) + (f" {', '.join(choices)}" if choices else "")


def run_front_door(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function so that an override Hydra cannot compose (a value of the wrong type, an
    unknown key or choice) ends in one ``config error:`` line, as every other config error does.
    ``HYDRA_FULL_ERROR=1`` set by the user still shows Hydra's full report."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises, instead of printing its report and exiting
    try:
        main()
    except COMPOSITION_ERRORS as e:
        sys.exit(f"config error: {composition_report(e)}")


# ---- what a schema field must be beyond its type -----------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """``ok(value)``, else ``requirement`` ends the message; a callable requirement lists a registry when asked."""

    ok: Callable[[Any], bool]
    requirement: str | Callable[[], str]

    def says(self) -> str:
        return self.requirement() if callable(self.requirement) else self.requirement


def setting(check: Check, default: Any = MISSING) -> Any:
    """A schema field the walker checks; without a default, the YAML file must set it."""
    return dataclasses.field(default=default, metadata={"check": check})


def _said(requirement: str, why: str) -> str:
    return f"{requirement} ({why})" if why else requirement


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: float, why: str = "") -> Check:
    return Check(lambda v: _number(v) and v >= low, _said(f"must be >= {low}", why))


def above(low: float, why: str = "") -> Check:
    return Check(lambda v: _number(v) and v > low, _said(f"must be > {low}", why))


def between(low: float, high: float, bounds: str = "[]", why: str = "") -> Check:
    """``bounds`` as an interval is written: "[)" takes ``low`` and leaves out ``high``."""
    low_in, high_in = bounds[0] == "[", bounds[1] == "]"
    return Check(
        lambda v: _number(v) and (v >= low if low_in else v > low) and (v <= high if high_in else v < high),
        _said(f"must be in {bounds[0]}{low}, {high}{bounds[1]}", why),
    )


def one_of(choices: Sequence[Any] | Callable[[], Sequence[Any]], why: str = "") -> Check:
    """A value from ``choices``; a callable is a registry, asked only when a config is checked."""
    listed = choices if callable(choices) else lambda: tuple(choices)
    return Check(lambda v: v in listed(), lambda: _said(f"must be one of {tuple(listed())}", why))


def _finite(value: Any) -> bool:
    if isinstance(value, ListConfig):
        return all(_finite(item) for item in value)
    return not isinstance(value, float) or math.isfinite(value)


def _passes(check: Check, value: Any) -> bool:
    try:
        return bool(check.ok(value))
    except TypeError:  # a value of another shape than the check reads (a list where a pair is expected)
        return False


def check_schema(node: DictConfig, prefix: str = "") -> None:
    """Every number finite, and every field's ``Check`` (read from the dataclass each node was composed onto)
    passed; the first failure is a ConfigError naming its full key. Null values are the schema's to allow."""
    schema = OmegaConf.get_type(node)
    fields = dataclasses.fields(schema) if dataclasses.is_dataclass(schema) else ()
    checks = {f.name: f.metadata["check"] for f in fields if "check" in f.metadata}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if not _finite(value):
            raise ConfigError(f"{path}={value!r} must be finite")
        check = checks.get(key)
        if check is not None and value is not None and not _passes(check, value):
            raise ConfigError(f"{path}={value!r} {check.says()}")
        if isinstance(value, DictConfig):
            check_schema(value, f"{path}.")


def validate(cfg: DictConfig) -> None:
    """Resolve every interpolation, refuse missing mandatory values, then run the schema's checks."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing value for '{e.full_key}': set it, e.g. {e.full_key}=...") from None
    except OmegaConfBaseException as e:  # an interpolation that resolves to a value of the wrong type
        raise ConfigError(f"{e.full_key}: {str(e).splitlines()[0]}") from None
    check_schema(cfg)


def check_grid(encoder: Any, img_size: int, key: str = "dataset.img_size") -> tuple[int, int]:
    """The image must tile into the encoder's output grid."""
    try:
        return encoder.grid_size(img_size)
    except ValueError as e:
        raise ConfigError(f"{key}={img_size}: {e}") from None


# ---- what a front door offers ----------------------------------------------------------------------------------
# Config groups that composition picks by itself, never a user's choice: ``combo``, sizes for one objective x
# encoder x dataset (conf/pretrain/pretrain.yaml), such as the demo's. The pipeline names the file it applied.
AUTOMATIC_GROUPS = ("combo",)


def user_choices() -> str:
    """``group: option, ...`` for each config group a user chooses from, as a front door's ``--help`` lists them
    (conf/hydra/help/choices.yaml); Hydra's own list would offer ``AUTOMATIC_GROUPS`` too."""
    from hydra.core.global_hydra import GlobalHydra  # only --help asks, once Hydra has started

    hydra = GlobalHydra.instance()
    if not hydra.is_initialized():  # a config with its hydra node resolved outside a front door: nothing to list
        return ""
    loader = hydra.config_loader()

    def groups(parent: str) -> Iterator[str]:
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            if group == "hydra" or group in AUTOMATIC_GROUPS:
                continue
            if loader.get_group_options(group):
                yield group
            yield from groups(group)

    return "\n".join(f"{g}: {', '.join(sorted(loader.get_group_options(g)))}" for g in sorted(groups("")))


OmegaConf.register_new_resolver("user_choices", user_choices)
