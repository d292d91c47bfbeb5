"""DeiT distillation (Touvron et al. 2020): a ViT (or Pale) student learns from labels and a frozen teacher.

Students: a ViT encoder config becomes its ``<arch>_distilled`` variant (src/encoders/vit.py): a
distillation token beside the cls token, with its own position embedding and head. A hierarchical
encoder (Pale) has no tokens to append, so its second head reads the pooled features, as LeViT does.
Training scores the cls head on the labels and the distillation head on the teacher; evaluation
averages the two heads' logits (the DeiT code's choice). ``distillation=none`` trains the plain
encoder with one head and no teacher: the paper's baseline.

Loss (DeiT's ``DistillationLoss``): base = CE on the cls logits (soft targets under mixup/cutmix, else
label smoothing); soft = KL(log_softmax(s/tau) || log_softmax(t/tau)) summed, * tau^2 / (batch * classes);
hard = CE against the teacher's argmax; total = (1 - alpha) * base + alpha * distill. The teacher sees
the same (mixed) batch, frozen and without gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.layers import trunc_normal_
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from src.config import ConfigError
from src.encoders import create_encoder
from src.encoders.base import MaskedEncoder
from src.encoders.loading import InitCheckpoint
from src.encoders.vit import DISTILLED_SUFFIX
from src.methods.base import encoder_export_state, encoder_from_config
from src.methods.supervised import SupervisedClassifier, augment_config, classification_loss, dataset_num_classes
from src.methods.teacher import PACKAGED, ClassifierRecord, FrozenTeacher, InputSpec, build_teacher
from src.schema import DISTILLATIONS


class DistillationLoss(nn.Module):
    """``none`` | ``soft`` | ``hard`` distillation mixed with the base classification loss by ``alpha``."""

    MODES = DISTILLATIONS

    def __init__(self, mode: str = "hard", alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.1) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"distillation={mode!r} must be one of {self.MODES}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be in [0, 1]")
        if tau <= 0:
            raise ValueError(f"tau={tau} must be positive")
        self.mode, self.alpha, self.tau, self.label_smoothing = mode, alpha, tau, label_smoothing

    def forward(
        self,
        cls_logits: torch.Tensor,
        targets: torch.Tensor,
        dist_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts; ``targets`` are labels (B,) or soft targets (B, C)."""
        base = classification_loss(cls_logits, targets, self.label_smoothing)
        if self.mode == "none":
            return base, {"loss_base": base}
        if dist_logits is None or teacher_logits is None:
            raise ValueError(f"{self.mode} distillation needs the distillation-head and the teacher logits")
        if teacher_logits.shape != dist_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} vs student {tuple(dist_logits.shape)}")
        student, teacher = dist_logits.float(), teacher_logits.float()
        if self.mode == "soft":
            t = self.tau
            log_s, log_t = F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1)
            distill = F.kl_div(log_s, log_t, reduction="sum", log_target=True) * t * t / student.numel()
        else:
            distill = F.cross_entropy(student, teacher.argmax(dim=1))
        total = (1 - self.alpha) * base + self.alpha * distill
        return total, {"loss_base": base, "loss_distill": distill}


class DeiT(SupervisedClassifier):
    """A student with a cls and a distillation head; ``teacher`` is None only for ``distillation=none``."""

    hparams_ignore = (*SupervisedClassifier.hparams_ignore, "teacher")
    frozen_parts = ("teacher",)  # comes from its own file: checkpoints stay student-sized

    def __init__(
        self,
        encoder: MaskedEncoder,
        num_classes: int,
        augment: dict[str, Any],
        record: ClassifierRecord | None,
        optim: dict,
        batch_size: int,
        warmup_epochs: float,
        teacher: FrozenTeacher | None,
        distillation: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        pooled_dist_head: bool = False,
    ) -> None:
        super().__init__(encoder, num_classes, augment, record, optim, batch_size, warmup_epochs)
        self.distill = DistillationLoss(distillation, alpha, tau, self.label_smoothing)
        self.distilled = distillation != "none"
        if self.distilled and teacher is None:
            raise ValueError(f"{distillation} distillation needs a teacher")
        self.teacher = teacher if self.distilled else None
        self.head_dist = None
        if self.distilled and pooled_dist_head:  # LeViT-style second head on the pooled features
            self.head_dist = nn.Linear(encoder.num_features, num_classes)
            trunc_normal_(self.head_dist.weight, std=0.02)
            nn.init.zeros_(self.head_dist.bias)
        if self.distilled:
            self.val_top1_cls = MulticlassAccuracy(num_classes, average="micro")
            self.val_top1_dist = MulticlassAccuracy(num_classes, average="micro")

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        distilled = cfg.objective.distillation != "none"
        if distilled:
            check_teacher_file(cfg)
        student_encoder_config(cfg, distilled)

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> DeiT:
        o, img = cfg.objective, cfg.dataset.img_size
        distilled = o.distillation != "none"
        num_classes = dataset_num_classes(cfg)
        encoder_cfg, pooled_dist_head = student_encoder_config(cfg, distilled)
        encoder = create_encoder(encoder_cfg, img, num_classes=num_classes)
        data_input = InputSpec.of(img, cfg.dataset.mean, cfg.dataset.std)
        teacher = build_teacher(o.teacher, num_classes, data_input) if distilled else None
        record = None
        if not pooled_dist_head:  # the classifier export is one timm model: record it (usable as a teacher)
            kwargs = OmegaConf.to_container(encoder_cfg.get("kwargs") or {}, resolve=True)
            record = ClassifierRecord(encoder_cfg.arch, {**kwargs, "img_size": img}, num_classes, data_input)
        return cls(
            encoder,
            num_classes,
            augment_config(cfg),
            record,
            teacher=teacher,
            distillation=o.distillation,
            alpha=o.alpha,
            tau=o.tau,
            pooled_dist_head=pooled_dist_head,
            **cls.common_kwargs(cfg),
        )

    # ---- model ---------------------------------------------------------------------------------
    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls-head, distillation-head) logits of a distilled student."""
        if self.head_dist is None:
            return self.encoder.forward_heads(images)
        pooled = self.encoder.forward_head(self.encoder.forward_features(images), pre_logits=True)
        return self.encoder.get_classifier()(pooled), self.head_dist(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training: (cls, dist) logits; eval: their average. Without distillation: the one head's logits."""
        if not self.distilled:
            return self.encoder(images)
        cls_logits, dist_logits = self.heads(images)
        return (cls_logits, dist_logits) if self.training else (cls_logits + dist_logits) / 2

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = self.mix(batch)
        if not self.distilled:
            return self.distill(self.encoder(images), targets)
        cls_logits, dist_logits = self.heads(images)
        teacher_logits = self.teacher(images)  # same mixed batch; no_grad, eval mode inside FrozenTeacher
        loss, parts = self.distill(cls_logits, targets, dist_logits, teacher_logits)
        parts["teacher_agreement"] = (dist_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
        return loss, parts

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Top-1 of the averaged heads (``val/top1``), and of each head alone (the paper's ablation)."""
        if not self.distilled:
            return super().validation_step(batch, batch_idx)
        images, labels, n = batch["image"], batch["label"], batch["image"].shape[0]
        cls_logits, dist_logits = self.heads(images)
        self.val_top1((cls_logits + dist_logits) / 2, labels)
        self.val_top1_cls(cls_logits, labels)
        self.val_top1_dist(dist_logits, labels)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=n)
        self.log("val/top1_cls", self.val_top1_cls, batch_size=n)
        self.log("val/top1_dist", self.val_top1_dist, batch_size=n)

    # ---- export --------------------------------------------------------------------------------
    def classifier_state(self) -> dict[str, torch.Tensor]:
        """The student as one classifier: timm's DeiT naming for ViT; Pale's own plus ``head_dist.*``."""
        state = encoder_export_state(self.encoder, heads=True)
        if self.head_dist is not None:
            state.update({f"head_dist.{k}": v for k, v in self.head_dist.state_dict().items()})
        return state


def student_encoder_config(cfg: DictConfig, distilled: bool) -> tuple[DictConfig, bool]:
    """The encoder config to build, and whether the distillation head reads pooled features (no token to add).

    Token encoders (ViT) have a registered ``<arch>_distilled`` variant with a distillation token; encoders
    without prefix tokens (hierarchical: Pale) get the LeViT-style pooled second head.
    """
    with torch.device("meta"):  # the encoder's traits, without allocating it
        probe = encoder_from_config(cfg)
    distilled_arch = f"{cfg.encoder.arch}{DISTILLED_SUFFIX}"
    if not distilled:
        return cfg.encoder, False
    if timm.is_model(distilled_arch):
        return OmegaConf.merge(cfg.encoder, {"arch": distilled_arch}), False
    if probe.num_prefix_tokens == 0:
        return cfg.encoder, True
    raise ConfigError(f"encoder.arch={cfg.encoder.arch} has prefix tokens but no {distilled_arch} variant")


def check_teacher_file(cfg: DictConfig) -> None:
    """Fail before any work when the configured teacher file is missing, saying how to make one."""
    t = cfg.objective.teacher
    if t.checkpoint is None:
        raise ConfigError(
            f"objective.teacher.checkpoint is required for objective.distillation={cfg.objective.distillation}: "
            f"the weights file of the {t.arch} teacher"
        )
    if str(t.checkpoint) not in PACKAGED and not Path(t.checkpoint).is_file():
        raise ConfigError(
            f"objective.teacher.checkpoint={t.checkpoint} does not exist. DeiT distils from a trained classifier: "
            f"make this one with `python -m src.train_supervised model.arch={t.arch} dataset={cfg.dataset.name} "
            f"dataset.img_size={cfg.dataset.img_size} runs_dir={cfg.runs_dir}` (plus this run's other dataset "
            "overrides), or point objective.teacher.checkpoint (and .arch) at a timm checkpoint, or train without "
            "a teacher: objective.distillation=none"
        )
