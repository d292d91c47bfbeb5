"""Classifiers on a pretrained encoder: MAE's full fine-tune recipe and its linear probe on frozen features.

Both build on the supervised classifier (DeiT's recipe: timm per-sample augmentation, mixup/cutmix,
label smoothing, shared lr scaling and warm-up + cosine schedule) and add what MAE's evaluation does:

- fine-tune: global average pooling + fc_norm (timm then drops the final norm), drop path, a head
  initialised at std 2e-5, layer-wise lr decay from the encoder's ``group_matcher``, every weight
  trained (a fixed sin-cos position table becomes learnable, as in the MAE code).
- linear probe: the encoder frozen (and kept in eval mode), BatchNorm1d without affine + a linear layer
  (std 0.01) on the final-normed cls token (``pool=cls``, MAE's choice) or on the mean of the
  final-normed patch tokens (``pool=avg``, the kNN protocol's feature; the only one for Pale).

Validation on the labelled split reports top-1, top-5, per-class accuracy and a confusion matrix.

Both start from ``init`` (any checkpoint, ``src/encoders/loading.py``): a Lightning checkpoint records the
encoder config it was trained with, and the run's settled config holds that encoder (``init.encoder_from_checkpoint``).
"""

from __future__ import annotations

from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.layers import trunc_normal_
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from src.config import ConfigError
from src.encoders.base import MaskedEncoder
from src.encoders.loading import InitCheckpoint, InitReport, load_encoder_weights
from src.evaluation.confusion import ConfusionMatrixPicture
from src.methods.base import all_pretraining_keys, encoder_export_state, encoder_from_config
from src.methods.optim import layer_decay_groups, weight_decay_groups
from src.methods.supervised import SupervisedClassifier, augment_config, dataset_num_classes

HEAD_INIT_STD = {"classify": 2e-5, "linear": 0.01}  # MAE's fine-tune and linear-probe head inits


def settle_encoder(settled: DictConfig, init: InitCheckpoint) -> None:
    """Replace ``encoder`` of a settled config by the one the init checkpoint records, unless
    ``init.encoder_from_checkpoint=false`` keeps the configured one."""
    recorded = init.encoder_config
    if recorded is None or not settled.init.get("encoder_from_checkpoint", True):
        return
    schema = OmegaConf.get_type(settled, "encoder")  # a fresh node of the section's schema holds the record only
    settled.encoder = OmegaConf.merge(OmegaConf.structured(schema), recorded) if is_dataclass(schema) else recorded


def start_encoder(cfg: DictConfig, init: InitCheckpoint, model: MaskedEncoder) -> InitReport:
    """Load ``init`` into ``model``; the pipeline publishes the report of what went where next to the run."""
    return load_encoder_weights(model, init, cfg.encoder, all_pretraining_keys())


class FineTuneClassifier(SupervisedClassifier):
    """The whole encoder trained with its timm head; ``layer_decay`` < 1 scales lrs down towards the input."""

    def __init__(
        self,
        encoder: MaskedEncoder,
        num_classes: int,
        augment: dict[str, Any],
        optim: dict,
        batch_size: int,
        warmup_epochs: float,
        layer_decay: float = 1.0,
    ) -> None:
        super().__init__(encoder, num_classes, augment, None, optim, batch_size, warmup_epochs)
        self.layer_decay = layer_decay
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.val_per_class = MulticlassAccuracy(num_classes, average=None)
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.last_confusion: torch.Tensor | None = None  # drawn by ConfusionMatrixPicture
        self.setup_trainable()

    def setup_trainable(self) -> None:
        """What trains and how the head starts: every weight; the new head near zero (std 2e-5), as MAE."""
        self.encoder.requires_grad_(True)
        classifier = self.encoder.get_classifier()
        for head in classifier if isinstance(classifier, tuple) else (classifier,):
            trunc_normal_(head.weight, std=HEAD_INIT_STD["classify"])
            nn.init.zeros_(head.bias)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def settle_config(cls, cfg: DictConfig, init: InitCheckpoint) -> DictConfig:
        """The encoder the init checkpoint records (``settle_encoder``)."""
        settled = super().settle_config(cfg, init)
        settle_encoder(settled, init)
        return settled

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        with torch.device("meta"):  # the encoder must build with the task's settings
            cls.build_encoder(cfg, dataset_num_classes(cfg))

    @classmethod
    def build_encoder(cls, cfg: DictConfig, num_classes: int) -> MaskedEncoder:
        t = cfg.objective
        return encoder_from_config(cfg, num_classes=num_classes, global_pool=t.global_pool, drop_path_rate=t.drop_path)

    @classmethod
    def task_kwargs(cls, cfg: DictConfig) -> dict[str, Any]:
        return {"layer_decay": cfg.objective.layer_decay}

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> FineTuneClassifier:
        """Encoder built for the task, started from ``init`` (reported in ``init_report``)."""
        num_classes = dataset_num_classes(cfg)
        encoder = cls.build_encoder(cfg, num_classes)
        report = start_encoder(cfg, init, encoder)
        module = cls(
            encoder,
            num_classes,
            augment_config(cfg),
            optim=OmegaConf.to_container(cfg.objective.optim, resolve=True),
            batch_size=cfg.batch_size,
            warmup_epochs=cfg.warmup_epochs,
            **cls.task_kwargs(cfg),
        )
        module.init_report = report
        return module

    def callbacks(self, run_dir: Path) -> list[L.Callback]:
        return [ConfusionMatrixPicture(run_dir / "pictures")]

    # ---- optimisation --------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """MAE's fine-tune groups: layer-wise lr decay; no weight decay on biases, norms, tokens, positions."""
        skip = self.encoder.no_weight_decay() if hasattr(self.encoder, "no_weight_decay") else ()
        return layer_decay_groups(self.encoder, self.optim["weight_decay"], self.layer_decay, skip)

    # ---- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, labels = self(batch["image"]), batch["label"]
        size = labels.shape[0]
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.val_per_class.update(logits, labels)
        self.val_confusion.update(logits, labels)
        self.log("val/loss", F.cross_entropy(logits.float(), labels), batch_size=size, sync_dist=True)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=size)
        self.log("val/top5", self.val_top5, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        for i, acc in enumerate(self.val_per_class.compute().tolist()):
            self.log(f"val_class/acc_{i}", acc)
        self.last_confusion = self.val_confusion.compute().cpu()
        self.val_per_class.reset()
        self.val_confusion.reset()


class LinearProbeClassifier(FineTuneClassifier):
    """MAE's linear probe: frozen encoder, BatchNorm1d(affine=False) + linear on cls or mean-pooled features."""

    def __init__(
        self,
        encoder: MaskedEncoder,
        num_classes: int,
        augment: dict[str, Any],
        optim: dict,
        batch_size: int,
        warmup_epochs: float,
        pool: str = "cls",
    ) -> None:
        super().__init__(encoder, num_classes, augment, optim, batch_size, warmup_epochs)
        self.pool = pool

    def setup_trainable(self) -> None:
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        linear = nn.Linear(self.encoder.num_features, self.num_classes)
        trunc_normal_(linear.weight, std=HEAD_INIT_STD["linear"])
        nn.init.zeros_(linear.bias)
        self.probe = nn.Sequential(nn.BatchNorm1d(self.encoder.num_features, affine=False, eps=1e-6), linear)

    @classmethod
    def build_encoder(cls, cfg: DictConfig, num_classes: int) -> MaskedEncoder:
        encoder = encoder_from_config(cfg)
        if cfg.objective.pool == "cls" and encoder.num_prefix_tokens == 0:
            raise ConfigError(
                f"objective.pool=cls needs a class token; encoder={cfg.encoder.name} has none: use objective.pool=avg"
            )
        return encoder

    @classmethod
    def task_kwargs(cls, cfg: DictConfig) -> dict[str, Any]:
        return {"pool": cfg.objective.pool}

    def train(self, mode: bool = True) -> LinearProbeClassifier:
        """The frozen encoder stays in eval mode (no dropout, no norm-statistics updates) while the probe trains."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return self.encoder.forward_prefix(images)[:, 0]
        return self.encoder.forward_pooled(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe(self.features(images))

    def param_groups(self) -> list[dict]:
        return weight_decay_groups(self.probe.named_parameters(), self.optim["weight_decay"])

    def classifier_state(self) -> dict[str, torch.Tensor]:
        """The frozen encoder (timm naming) plus the probe under ``probe.``."""
        probe = {f"probe.{k}": v for k, v in self.probe.state_dict().items()}
        return encoder_export_state(self.encoder) | probe
