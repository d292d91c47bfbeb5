"""Detection fine-tuning (``objective=detect``): MIMDet's partial-input detector on torchvision's Mask R-CNN.

Fang et al. 2022, "Unleashing Vanilla Vision Transformer with Masked Image Modeling for Object Detection":
a ConvStem feeds the high-resolution pyramid levels, an MAE-pretrained ViT sees only a random sample of its
stride-16 tokens while training (all of them in evaluation), a small decoder started from the MAE decoder
fills the grid back in, and an FPN + Mask R-CNN detects (``src/detection``). A hierarchical encoder (Pale)
feeds the same FPN from its four stages instead, as in the Pale paper's Mask R-CNN results.

The optimiser follows the paper's "3x" recipe: AdamW with three lr groups (ConvStem at lr, the ViT encoder at
lr / m, everything else at lr * m), no weight decay on biases, norms and position embeddings, linear warm-up
then x0.1 steps. lr = ``base_lr`` x global batch / ``reference_batch``: 8e-5 at batch 64, scaled once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src.config import ConfigError
from src.detection.backbone import backbone_kind, build_backbone, decoder_state_from_mae
from src.detection.data import CocoDataModule
from src.detection.detector import ANCHOR_SIZES, build_detector
from src.detection.evaluation import DetectionEvaluator
from src.detection.pictures import DetectionPictures
from src.encoders import create_encoder
from src.encoders.base import MaskedEncoder
from src.encoders.loading import InitCheckpoint, InitReport, preview_names
from src.files import save_weights
from src.methods.base import TrainingMethod
from src.methods.classify import settle_encoder, start_encoder
from src.methods.optim import exempt_from_weight_decay, warmup_step_decay

ROI_LOSSES = ("loss_classifier", "loss_box_reg")  # torchvision's means over the sampled RoIs
DECODER_KEYS = ("decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm")
MAE_IMG_SIZE = 224  # the size the MAE encoders MIMDet starts from were pretrained at: their position tables


@dataclass
class DetectionInitReport(InitReport):
    """The encoder's report plus what the decoder took from the checkpoint and what starts random by design."""

    decoder_loaded: list[str] = field(default_factory=list)
    decoder_not_loaded: list[str] = field(default_factory=list)
    random_by_design: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [line.replace("init:", "init (encoder):", 1) for line in super().lines()]
        if self.decoder_loaded or self.decoder_not_loaded:
            out.append(
                f"init (decoder): loaded {len(self.decoder_loaded)} tensors from the MAE decoder, "
                f"{len(self.decoder_not_loaded)} left random{preview_names(self.decoder_not_loaded)}"
            )
        out.append("random by design (new in detection, as in MIMDet): " + ", ".join(self.random_by_design))
        return out


def checkpoint_decoder(init: InitCheckpoint) -> dict[str, torch.Tensor]:
    """The MAE decoder tensors the init checkpoint holds (empty if none)."""
    return {k: v for k, v in init.state.items() if k.startswith(DECODER_KEYS)}


class Detection(TrainingMethod):
    """A detector on a pretrained encoder: losses from torchvision's heads, COCO AP on the validation split."""

    def __init__(
        self,
        detector: torch.nn.Module,
        class_names: list[str],
        masks: bool,
        optim: dict,
        batch_size: int,
        warmup_epochs: float,
        lr_mult: float = 2.0,
        lr_milestones: tuple[float, ...] = (),
        train_ratio: float = 1.0,
        eval_ratio: float = 1.0,
        compare_train_ratio: bool = False,
        num_pictures: int = 4,
        eval_backend: str = "pycocotools",
    ) -> None:
        super().__init__(None, optim, batch_size, warmup_epochs)  # the backbone owns the encoder (``encoder`` below)
        self.detector = detector
        self.class_names = list(class_names)
        self.lr_mult = lr_mult
        self.lr_milestones = tuple(lr_milestones)
        self.train_ratio, self.eval_ratio = train_ratio, eval_ratio  # token sample ratios (MIMDet), passed per call
        self.compare_train_ratio = compare_train_ratio
        self.num_pictures = num_pictures
        self.evaluator = DetectionEvaluator(self.class_names, masks, backend=eval_backend)
        self.evaluator_train_ratio = (
            DetectionEvaluator(self.class_names, masks, backend=eval_backend) if compare_train_ratio else None
        )
        self.detection_samples: list[tuple[torch.Tensor, dict, dict]] = []  # drawn by DetectionPictures
        self.last_per_class: list[dict] = []
        self.validated_at_step = -1
        self.loss_terms: dict[str, int] = {}  # RoIs behind each RoI-head loss in the last forward
        heads = detector.roi_heads
        counted = ((heads.box_predictor, ROI_LOSSES), (getattr(heads, "mask_predictor", None), ("loss_mask",)))
        for predictor, keys in counted:
            if predictor is not None:
                predictor.register_forward_hook(partial(self._count_rows, keys))

    def _count_rows(self, keys: tuple[str, ...], module: nn.Module, inputs: Any, output: Any) -> None:
        rows = (output[0] if isinstance(output, tuple) else output).shape[0]
        self.loss_terms |= dict.fromkeys(keys, rows)

    @property
    def encoder(self) -> MaskedEncoder:
        return self.detector.backbone.encoder

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def settle_config(cls, cfg: DictConfig, init: InitCheckpoint) -> DictConfig:
        """The encoder the checkpoint records, at the size it was pretrained at (its position table: the size its
        MAE recorded, else MAE's 224); the decoder's width and heads from its MAE decoder; Lightning's validation
        cadence from ``objective.eval_every_n_epochs``.

        A ViT's decoder starts from the checkpoint's MAE decoder, so a checkpoint without one (unless
        ``objective.random_decoder``), or with fewer blocks than ``objective.decoder_depth``, is refused here.
        """
        settled = super().settle_config(cfg, init)
        settle_encoder(settled, init)
        t = settled.objective
        OmegaConf.update(settled, "trainer.check_val_every_n_epoch", t.eval_every_n_epochs, force_add=True)
        if t.pretrain_img_size is None:
            t.pretrain_img_size = int(init.hparams.get("img_size", MAE_IMG_SIZE))
        decoder = checkpoint_decoder(init)
        if decoder:
            t.decoder_dim = int(decoder["decoder_embed.weight"].shape[0])
            t.decoder_heads = int(init.hparams.get("decoder_heads", t.decoder_heads))
        if init.path is None or not cls.build_encoder(settled, device="meta").supports_token_drop:
            return settled  # a pyramid backbone (Pale) has no MIMDet decoder
        depth = 1 + max((int(k.split(".")[1]) for k in decoder if k.startswith("decoder_blocks.")), default=-1)
        if depth == 0 and not t.random_decoder:
            raise ConfigError(
                f"init.checkpoint={init.path} has no MAE decoder, which MIMDet's decoder starts from "
                "(an encoder-only export, or another objective's checkpoint). Use the MAE run's last.ckpt or the "
                "official full MAE checkpoint, or set objective.random_decoder=true to train the decoder from scratch"
            )
        if 0 < depth < t.decoder_depth:
            raise ConfigError(
                f"objective.decoder_depth={t.decoder_depth} but the checkpoint's MAE decoder has {depth} blocks: "
                f"set objective.decoder_depth={depth} or fewer"
            )
        return settled

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        if cfg.dataset.get("kind") != "coco":
            raise ConfigError(
                f"objective=detect needs a COCO-format dataset (dataset.kind=coco), got {cfg.dataset.kind}"
            )
        encoder = cls.build_encoder(cfg, device="meta")
        if backbone_kind(encoder) is None:
            raise ConfigError(
                f"encoder={cfg.encoder.name} ({cfg.encoder.arch}) can be a detection backbone neither by token "
                "sampling (plain ViT: MIMDet) nor as a four-stage pyramid (Pale); BEiT's encoder is neither yet"
            )
        if not encoder.supports_token_drop and cfg.objective.compare_train_ratio:
            raise ConfigError(f"objective.compare_train_ratio: encoder={cfg.encoder.name} samples no tokens")

    @classmethod
    def build_encoder(cls, cfg: DictConfig, device: str = "cpu") -> MaskedEncoder:
        """The encoder at its pretraining size (its position table, settled), as the checkpoint will fill it."""
        t = cfg.objective
        try:
            with torch.device(device):
                return create_encoder(cfg.encoder, t.pretrain_img_size, drop_path_rate=t.drop_path)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"encoder={cfg.encoder.name} ({cfg.encoder.arch}): {e}") from None

    @classmethod
    def build_data(cls, cfg: DictConfig) -> CocoDataModule:
        return CocoDataModule(cfg.dataset, cfg.batch_size, cfg.num_workers, seed=cfg.seed)

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> Detection:
        t, d = cfg.objective, cfg.dataset
        encoder = cls.build_encoder(cfg)
        report = start_encoder(cfg, init, encoder)
        token_drop = encoder.supports_token_drop  # MIMDet; else the pyramid backbone (Pale), without these settings
        mimdet = ("decoder_dim", "decoder_depth", "decoder_heads") if token_drop else ()
        backbone = build_backbone(encoder, out_channels=t.fpn_channels, **{key: t[key] for key in mimdet})
        report = DetectionInitReport(**vars(report), random_by_design=["FPN", "RPN", "RoI heads"])
        if token_drop:
            report.random_by_design[:0] = ["ConvStem", "decoder fill-in projection"]
            state, report.decoder_loaded, report.decoder_not_loaded = decoder_state_from_mae(
                checkpoint_decoder(init), t.decoder_depth
            )
            backbone.decoder.load_state_dict(state, strict=False)
        detector = build_detector(
            backbone,
            int(d.num_classes),
            bool(d.masks),
            d.sizes.train,
            d.sizes.test,
            d.sizes.max,
            d.mean,
            d.std,
            anchor_sizes=t.anchor_sizes or ANCHOR_SIZES,
            roi_samples=t.roi_samples,
            test_proposals=t.test_proposals,
        )
        module = cls(
            detector,
            class_names=CocoDataModule.read_class_names(d),
            masks=bool(d.masks),
            optim=OmegaConf.to_container(t.optim, resolve=True),
            batch_size=cfg.batch_size,
            warmup_epochs=cfg.warmup_epochs,
            lr_mult=t.lr_mult,
            lr_milestones=tuple(t.lr_milestones or ()),
            train_ratio=t.train_ratio if token_drop else 1.0,
            eval_ratio=t.eval_ratio if token_drop else 1.0,
            compare_train_ratio=t.compare_train_ratio,
            num_pictures=cfg.pictures.num_images,
            eval_backend=t.eval_backend,
        )
        module.init_report = report
        return module

    def callbacks(self, run_dir: Path) -> list[L.Callback]:
        return [DetectionPictures(run_dir / "pictures", self.num_pictures, score_threshold=0.5)]

    # ---- training ------------------------------------------------------------------------------
    def batch_len(self, batch: dict[str, Any]) -> int:
        return len(batch["images"])

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of torchvision's RPN and RoI-head losses; each is logged. Random choices follow each image's seed."""
        targets = batch["targets"]
        seeds = [int(t["sample_seed"]) for t in targets] if all("sample_seed" in t for t in targets) else None
        losses = self.detector(batch["images"], targets, ratio=self.train_ratio, seeds=seeds)
        # torchvision averages the RoI-head losses over this rank's RoIs, whose number varies (positives for the
        # mask loss): average over the global batch's instead, so the gradient does not change with the world size
        for key, rows in self.loss_terms.items():
            if key in losses:
                losses[key] = self.global_mean(losses[key] * rows, rows)
        return sum(losses.values()), losses

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections with the encoder seeing ``eval_ratio`` of its tokens (1.0, as MIMDet evaluates)."""
        return self.detector(images, ratio=self.eval_ratio)

    # ---- evaluation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, targets = batch["images"], batch["targets"]
        predictions = self(images)
        self.evaluator.update(predictions, targets)
        if self.evaluator_train_ratio is not None:
            self.evaluator_train_ratio.update(self.detector(images, ratio=self.train_ratio), targets)
        room = self.num_pictures - len(self.detection_samples)
        for image, prediction, target in list(zip(images, predictions, targets, strict=True))[: max(room, 0)]:
            prediction, target = (
                {k: v.cpu() if torch.is_tensor(v) else v for k, v in d.items()} for d in (prediction, target)
            )
            self.detection_samples.append((image.cpu(), prediction, target))

    def on_validation_epoch_start(self) -> None:
        self.detection_samples = []

    def on_validation_epoch_end(self) -> None:
        results = self.evaluator.compute()
        self.last_per_class = results.pop("per_class")
        for key, value in results.items():
            self.log(f"val/{key}", value, sync_dist=False)
        self.evaluator.reset()
        if self.evaluator_train_ratio is not None:
            at_train = self.evaluator_train_ratio.compute()
            at_train.pop("per_class")
            for key, value in at_train.items():
                self.log(f"val_train_ratio/{key}", value, sync_dist=False)
            self.evaluator_train_ratio.reset()
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.trainer.global_step

    def needs_final_validation(self) -> bool:
        return self.validated_at_step != self.trainer.global_step

    # ---- optimisation --------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """MIMDet's three lr groups (ConvStem x1, encoder x 1/m, the rest x m), each with and without decay."""
        skip = ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token")
        groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        stem_ids = {id(p) for p in getattr(self.detector.backbone, "stem", torch.nn.Identity()).parameters()}
        for name, param in self.detector.named_parameters():
            if not param.requires_grad:
                continue
            scale = 1.0 if id(param) in stem_ids else 1.0 / self.lr_mult if id(param) in encoder_ids else self.lr_mult
            groups.setdefault((scale, exempt_from_weight_decay(name, param, skip)), []).append(param)
        wd = self.optim["weight_decay"]
        return [
            {"params": params, "lr_scale": scale, "weight_decay": 0.0 if exempt else wd}
            for (scale, exempt), params in sorted(groups.items())
        ]

    def lr_schedule(self, lr: float, warmup: int, total: int, steps_per_epoch: int):
        """Warm-up from 0.001 x lr, then x0.1 at each of ``lr_milestones`` (epochs)."""
        milestones = [int(m * steps_per_epoch) for m in self.lr_milestones]
        return partial(warmup_step_decay, warmup_steps=warmup, milestones=milestones)

    # ---- exports -------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> dict[str, Path]:
        paths = super().export(out_dir)
        paths["detector"] = save_weights(self.detector.state_dict(), out_dir / "detector.safetensors")
        return paths
