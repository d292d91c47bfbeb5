"""Supervised classification with DeiT's recipe: the teacher trainer, and the base the DeiT objective builds on.

Per-sample augmentation (RandAugment, erasing) runs in the DataLoader workers; mixup/cutmix need the
whole batch, so they run here, before the model (and before a DeiT teacher, which sees the same mixed
batch). Validation is top-1 on the dataset's labelled split (``datamodule.val_dataloader()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from src.config import ConfigError
from src.data.classification import ClassificationTrainTransform
from src.data.folder import find_class_folders
from src.encoders.base import MaskedEncoder
from src.encoders.loading import InitCheckpoint
from src.files import save_weights
from src.methods.base import TrainingMethod, encoder_export_state
from src.methods.optim import weight_decay_groups
from src.methods.teacher import ClassifierRecord, InputSpec


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """CE against hard labels with label smoothing, or against mixup/cutmix's soft targets (already smoothed)."""
    if targets.is_floating_point():
        return F.cross_entropy(logits.float(), targets)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def dataset_num_classes(cfg: DictConfig) -> int:
    """``dataset.num_classes``, else the class folders of an image folder; supervised objectives need it."""
    if cfg.dataset.get("num_classes") is not None:
        return int(cfg.dataset.num_classes)
    if cfg.dataset.kind == "image_folder":
        try:
            return len(find_class_folders(cfg.dataset.root, "dataset.root"))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    raise ConfigError(f"dataset.num_classes is required for a supervised objective (dataset.kind={cfg.dataset.kind})")


class SupervisedClassifier(TrainingMethod):
    """Trains ``encoder`` (any timm classifier: here a convnet teacher) on labels; ``augment`` is conf/augment/."""

    hparams_ignore: tuple[str, ...] = ("encoder", "record")  # modules and objects, not hyper-parameters
    trains_on_labels = True
    picture_columns = ("augmented", "as trained on (mixup / cutmix)")

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        augment: dict[str, Any],
        record: ClassifierRecord | None,
        optim: dict,
        batch_size: int,
        warmup_epochs: float,
    ) -> None:
        super().__init__(encoder, optim, batch_size, warmup_epochs)
        self.save_hyperparameters(ignore=list(self.hparams_ignore))  # also records subclasses' arguments
        self.num_classes = num_classes
        self.record = record  # what the classifier export says about itself (None: not one timm model)
        self.label_smoothing = augment["label_smoothing"]
        self.mixup = None
        if augment["mixup"] > 0 or augment["cutmix"] > 0:
            self.mixup = Mixup(
                mixup_alpha=augment["mixup"],
                cutmix_alpha=augment["cutmix"],
                prob=augment["mix_prob"],
                switch_prob=augment["switch_prob"],
                mode="batch",
                label_smoothing=self.label_smoothing,
                num_classes=num_classes,
            )
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        augment_config(cfg)
        dataset_num_classes(cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> SupervisedClassifier:
        num_classes = dataset_num_classes(cfg)
        kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
        model = timm.create_model(cfg.model.arch, pretrained=False, **{**kwargs, "num_classes": num_classes})
        spec = InputSpec.of(cfg.dataset.img_size, cfg.dataset.mean, cfg.dataset.std)
        record = ClassifierRecord(cfg.model.arch, kwargs, num_classes, spec)
        return cls(model, num_classes, augment_config(cfg), record, **cls.common_kwargs(cfg))

    # ---- data ----------------------------------------------------------------------------------
    @classmethod
    def train_transform(cls, cfg: DictConfig) -> ClassificationTrainTransform:
        a, d = cfg.objective.augment, cfg.dataset
        return ClassificationTrainTransform(
            d.img_size, d.mean, d.std, a.rand_augment, a.crop_scale, a.hflip, a.color_jitter, a.random_erasing
        )

    @classmethod
    def train_repeats(cls, cfg: DictConfig) -> int:
        return int(cfg.objective.augment.repeated_aug)

    def mix(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): mixup/cutmix-ed images with soft targets when enabled, else hard labels."""
        images, labels = batch["image"], batch["label"]
        if self.mixup is None:
            return images, labels
        if images.shape[0] % 2:  # timm mixes a batch with its reverse; a batch shortened by skipped samples may be odd
            images, labels = images[:-1], labels[:-1]
        return self.mixup(images.clone(), labels)  # timm mixes in place: leave the batch (pictures) intact

    # ---- model ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = self.mix(batch)
        return classification_loss(self(images), targets, self.label_smoothing), {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_top1(self(batch["image"]), batch["label"])
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=batch["image"].shape[0])

    def param_groups(self) -> list[dict]:
        """As DeiT (timm's optimizer factory): no weight decay on biases, norms and the model's own skip list."""
        skip = self.encoder.no_weight_decay() if hasattr(self.encoder, "no_weight_decay") else ()
        return weight_decay_groups(self.named_parameters(), self.optim["weight_decay"], skip)

    @torch.no_grad()
    def make_picture(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augmented image | the mixup/cutmix-ed image the model (and a teacher) is trained on, per image
        (an even count: timm mixes pairs)."""
        images = batch["image"][: batch["image"].shape[0] // 2 * 2]
        mixed = self.mix({"image": images, "label": batch["label"][: images.shape[0]]})[0]
        return torch.stack([images, mixed], dim=1)

    # ---- export --------------------------------------------------------------------------------
    def classifier_state(self) -> dict[str, torch.Tensor]:
        return encoder_export_state(self.encoder, heads=True)

    def export(self, out_dir: Path) -> dict[str, Path]:
        """classifier.safetensors (timm naming, with its record as metadata, loadable as a teacher); encoders
        of the masked-input contract also get the backbone export."""
        paths = super().export(out_dir) if isinstance(self.encoder, MaskedEncoder) else {}
        metadata = self.record.metadata() if self.record is not None else None
        paths["classifier"] = save_weights(self.classifier_state(), out_dir / "classifier.safetensors", metadata)
        return paths


def augment_config(cfg: DictConfig) -> dict[str, Any]:
    """``objective.augment`` (a conf/augment/ file) as a plain dict, checked against the batch and the data (each
    value alone is the schema's)."""
    augment = OmegaConf.to_container(cfg.objective.augment, resolve=True)
    mixing = augment["mixup"] > 0 or augment["cutmix"] > 0
    if mixing and cfg.batch_size % 2:
        raise ConfigError(f"batch_size={cfg.batch_size} must be even for mixup/cutmix (mixes a batch with its reverse)")
    repeats = augment["repeated_aug"]
    if repeats > 1 and cfg.dataset.kind == "shards":
        raise ConfigError(
            f"objective.augment.repeated_aug={repeats} needs a map-style dataset; dataset.kind=shards streams "
            f"samples: set objective.augment.repeated_aug=1"
        )
    return augment
