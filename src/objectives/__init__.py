"""Objectives by config name. A registry rather than `_target_` strings: configs never name code to run."""

from __future__ import annotations

from src.objectives.base import PretrainModule
from src.objectives.beit import BEiT
from src.objectives.deit import DeiT
from src.objectives.mae import MAE

OBJECTIVES: dict[str, type[PretrainModule]] = {"mae": MAE, "deit": DeiT, "beit": BEiT}


def objective_class(name: str) -> type[PretrainModule]:
    if name not in OBJECTIVES:
        raise KeyError(f"objective.name={name!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
