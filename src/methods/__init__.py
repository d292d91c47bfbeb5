"""Every kind of run by name. A registry rather than `_target_` strings: configs never name code to run.

A run's config names its method in ``method`` (the pretraining objective, the fine-tune task, or the
command's own kind), and ``python -m src.export`` finds it there again.
"""

from __future__ import annotations

from src.config import ConfigError
from src.methods.base import TrainingMethod
from src.methods.beit import BEiT
from src.methods.classify import FineTuneClassifier, LinearProbeClassifier
from src.methods.deit import DeiT
from src.methods.detect import Detection, DetectionEvaluation
from src.methods.knn import KNNEvaluation
from src.methods.mae import MAE
from src.methods.supervised import SupervisedClassifier
from src.methods.tokenizer import TokenizerModule

METHODS: dict[str, type[TrainingMethod]] = {
    "mae": MAE,
    "beit": BEiT,
    "deit": DeiT,
    "supervised": SupervisedClassifier,
    "classify": FineTuneClassifier,
    "linear": LinearProbeClassifier,
    "knn": KNNEvaluation,
    "detect": Detection,
    "detect_eval": DetectionEvaluation,
    "tokenizer": TokenizerModule,
}


def method_class(name: str) -> type[TrainingMethod]:
    if name not in METHODS:
        raise ConfigError(f"method={name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]
