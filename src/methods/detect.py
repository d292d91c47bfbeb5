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
from src.detection.backbone import (
    SIZE_DIVISOR,
    STRIDE,
    MIMDetBackbone,
    backbone_kind,
    build_backbone,
    decoder_state_from_mae,
)
from src.detection.data import CocoDataModule
from src.detection.detector import ANCHOR_SIZES, PartialInputRCNN, build_detector
from src.detection.evaluation import DetectionEvaluator
from src.detection.pictures import DetectionPictures
from src.detection.released import is_released, load_released, released_settings
from src.encoders import create_encoder
from src.encoders.base import MaskedEncoder, PatchTokenEncoder
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
    plain_canvas: int | None = None  # objective.backbone=plain: the square input side the encoder runs on

    def lines(self) -> list[str]:
        out = [line.replace("init:", "init (encoder):", 1) for line in super().lines()]
        if self.decoder_loaded or self.decoder_not_loaded:
            out.append(
                f"init (decoder): loaded {len(self.decoder_loaded)} tensors from the MAE decoder, "
                f"{len(self.decoder_not_loaded)} left random{preview_names(self.decoder_not_loaded)}"
            )
        if self.plain_canvas:
            out.append(
                f"plain backbone (ViTDet): the encoder runs on a {self.plain_canvas}x{self.plain_canvas} canvas "
                "(dataset.sizes.max rounded up to 32), every batch padded to it"
            )
        out.append("random by design (new in detection): " + ", ".join(self.random_by_design))
        return out


def plain_canvas(dataset: DictConfig) -> int:
    """The square side the plain backbone's encoder runs on: the longest padded side the detector's resize can
    give (``dataset.sizes.max``, rounded up to the padding multiple of 32)."""
    return -(-int(dataset.sizes.max) // SIZE_DIVISOR) * SIZE_DIVISOR


def settle_released(settled: DictConfig, init: InitCheckpoint) -> None:
    """The ``objective`` sizes a released MIMDet detector was built with (its shapes say them), set in ``settled``;
    a file that is no MIMDet detector, or one that detects other classes than the dataset's, is refused."""
    if not is_released(init.state):
        raise ConfigError(
            f"init.kind=mimdet but init.checkpoint={init.path} is no MIMDet detector: it has no "
            "backbone.bottom_up.encoder.* entries, where a released MIMDet checkpoint (detectron2 names) holds its ViT"
        )
    try:
        values = released_settings(init.state)
    except KeyError as e:
        raise ConfigError(f"init.checkpoint={init.path} (init.kind=mimdet) has no {e.args[0]}") from None
    if values["objective.table_size"] is None:
        raise ConfigError(f"init.checkpoint={init.path}: its encoder's pos_embed does not hold a square grid")
    for key, value in values.items():
        if not key.startswith("dataset."):
            OmegaConf.update(settled, key, value)
        elif (configured := OmegaConf.select(settled, key)) != value:
            raise ConfigError(
                f"init.checkpoint={init.path} was trained with {key}={value}, but {key}={configured}: evaluate "
                "it on the data it detects (COCO's 80 classes with masks, for the released ones)"
            )


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
        warmup_factor: float = 0.001,
        iters_per_epoch: int | None = None,
    ) -> None:
        super().__init__(None, optim, batch_size, warmup_epochs)  # the backbone owns the encoder (``encoder`` below)
        self.detector = detector
        self.class_names = list(class_names)
        self.lr_mult = lr_mult
        self.lr_milestones = tuple(lr_milestones)
        self.warmup_factor = warmup_factor  # the lr at the first step, as a fraction of lr
        self.iters_per_epoch = iters_per_epoch  # steps per epoch of the schedule; None: a pass over the data
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
        cadence from ``objective.eval_every_n_epochs``; with ``objective.iters_per_epoch`` the run's length in steps
        (``epochs`` of that many steps). A released MIMDet detector (``init.kind=mimdet``) settles the sizes it was
        built with (``settle_released``).

        A ViT's decoder starts from the checkpoint's MAE decoder, so a checkpoint without one (unless
        ``objective.random_decoder``), or with fewer blocks than ``objective.decoder_depth``, is refused here.
        """
        settled = super().settle_config(cfg, init)
        settle_encoder(settled, init)
        t = settled.objective
        OmegaConf.update(settled, "trainer.check_val_every_n_epoch", t.eval_every_n_epochs, force_add=True)
        if t.iters_per_epoch:  # the original's fixed-length epochs: the run ends by steps, whatever the data's size
            OmegaConf.update(settled, "trainer.max_steps", int(settled.epochs) * t.iters_per_epoch)
            OmegaConf.update(settled, "trainer.max_epochs", -1)
        if init.kind == "mimdet":  # the encoder is built at MAE's size, then takes the file's tables
            t.pretrain_img_size = t.pretrain_img_size or MAE_IMG_SIZE
            settle_released(settled, init)
            return settled
        if t.backbone == "plain":  # no decoder, and the whole input always (docs/detection.md says why)
            t.train_ratio = t.eval_ratio = 1.0
            return settled
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
                f"init.checkpoint={init.path} has no MAE decoder, which objective.backbone=mimdet starts its decoder "
                "from (an encoder-only export, or another objective's checkpoint). Use the MAE run's last.ckpt or the "
                "official full MAE checkpoint, set objective.backbone=plain (ViTDet's simple feature pyramid: no "
                "decoder), or set objective.random_decoder=true to train MIMDet's decoder from scratch"
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
        t = cfg.objective
        encoder = cls.build_encoder(cfg, device="meta")
        named = f"encoder={cfg.encoder.name} ({cfg.encoder.arch})"
        kind = backbone_kind(encoder, t.backbone)
        if kind is None and t.backbone == "plain":
            raise ConfigError(
                f"objective.backbone=plain needs a flat token encoder (ViT, BEiT) for ViTDet's pyramid; {named} is "
                "not one (a four-stage encoder such as Pale feeds the FPN from its stages: objective.backbone=mimdet)"
            )
        if kind is None:
            plain = "; set objective.backbone=plain (ViTDet's simple feature pyramid on the full input)"
            raise ConfigError(
                f"{named} can be a detection backbone neither by token sampling (objective.backbone=mimdet: plain "
                "ViT) nor as a four-stage pyramid (Pale)" + (plain if isinstance(encoder, PatchTokenEncoder) else "")
            )
        if kind == "plain":
            try:
                with torch.device("meta"):
                    build_backbone(encoder, "plain", out_channels=t.fpn_channels)
            except ValueError as e:
                raise ConfigError(f"objective.backbone=plain with {named}: {e}") from None
        if kind != "mimdet" and t.compare_train_ratio:
            raise ConfigError(f"objective.compare_train_ratio: {named} samples no tokens on the {kind} backbone")
        if cfg.init.kind == "mimdet" and kind != "mimdet":
            raise ConfigError(
                f"init.kind=mimdet loads a whole MIMDet detector: objective.backbone=mimdet with a plain ViT encoder, "
                f"not the {kind} backbone of {named}"
            )

    @classmethod
    def build_encoder(cls, cfg: DictConfig, device: str = "cpu") -> MaskedEncoder:
        """The encoder at its pretraining size (its position table, settled), as the checkpoint will fill it; for
        the plain backbone at its canvas (the checkpoint's tables are resampled to it once, at load)."""
        t = cfg.objective
        size = plain_canvas(cfg.dataset) if t.backbone == "plain" else t.pretrain_img_size
        try:
            with torch.device(device):
                return create_encoder(cfg.encoder, size, drop_path_rate=t.drop_path)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"encoder={cfg.encoder.name} ({cfg.encoder.arch}): {e}") from None

    @classmethod
    def build_data(cls, cfg: DictConfig) -> CocoDataModule:
        return CocoDataModule(cfg.dataset, cfg.batch_size, cfg.num_workers, seed=cfg.seed)

    @classmethod
    def backbone_from_config(
        cls, cfg: DictConfig, init: InitCheckpoint, device: str = "cpu"
    ) -> tuple[nn.Module, DetectionInitReport]:
        """The backbone of the settled config, started from ``init``, and the report of what went where (built on
        ``device``: "meta" checks shapes without allocating).

        MIMDet's: the encoder and the decoder loaded from the MAE checkpoint, then both position tables resized
        once to the grid of ``objective.table_size`` (the original's 800 px image: 50x50); every LayerNorm of
        both at ``objective.layer_norm_eps``; ``objective.grad_checkpointing``. A released MIMDet detector
        (``init.kind=mimdet``) is loaded whole once the detector is built: here its parts keep their init.
        """
        t = cfg.objective
        start = InitCheckpoint() if init.kind == "mimdet" else init
        encoder = cls.build_encoder(cfg, device)
        report = start_encoder(cfg, start, encoder)
        kind = backbone_kind(encoder, t.backbone)
        token_drop = kind == "mimdet"  # else ViTDet's or the pyramid backbone (Pale), without these settings
        mimdet = ("decoder_dim", "decoder_depth", "decoder_heads", "layer_norm_eps") if token_drop else ()
        norm = {} if kind == "plain" else {"fpn_norm": t.fpn_norm}
        settings = {"out_channels": t.fpn_channels, **norm, **{key: t[key] for key in mimdet}}
        with torch.device(device):
            backbone = build_backbone(encoder, t.backbone, **settings)
        report = DetectionInitReport(**vars(report), random_by_design=["FPN", "RPN", "RoI heads"])
        if kind == "plain":
            report.random_by_design[0] = "simple feature pyramid"
            report.plain_canvas = plain_canvas(cfg.dataset)
        if token_drop:
            report.random_by_design[:0] = ["ConvStem", "decoder fill-in projection"]
            state, report.decoder_loaded, report.decoder_not_loaded = decoder_state_from_mae(
                checkpoint_decoder(start), t.decoder_depth
            )
            backbone.decoder.load_state_dict(state, strict=False)
            if t.table_size:
                (h, w), side = backbone.decoder.decoder_grid, t.table_size // STRIDE
                backbone.resize_tables((side, side))
                report.notes.append(
                    f"position tables (encoder, decoder) resized once from {h}x{w} to {side}x{side} "
                    f"(objective.table_size={t.table_size}), then to each batch's grid, as MIMDet"
                )
        if t.grad_checkpointing:
            (backbone if token_drop else encoder).set_grad_checkpointing(True)
        return backbone, report

    @classmethod
    def detector_from_config(
        cls, cfg: DictConfig, init: InitCheckpoint, device: str = "cpu"
    ) -> tuple[PartialInputRCNN, InitReport]:
        """The whole detector started from ``init`` (a released MIMDet detector fills all of it), and the report."""
        t, d = cfg.objective, cfg.dataset
        backbone, report = cls.backbone_from_config(cfg, init, device)
        with torch.device(device):
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
                box_loss=t.box_loss,
            )
        if init.kind == "mimdet":
            report = load_released(detector, init.state, str(init.path.resolve()))
        return detector, report

    @classmethod
    def from_config(cls, cfg: DictConfig, init: InitCheckpoint) -> Detection:
        t, d = cfg.objective, cfg.dataset
        detector, report = cls.detector_from_config(cfg, init)
        token_drop = isinstance(detector.backbone, MIMDetBackbone)
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
            warmup_factor=t.warmup_factor,
            iters_per_epoch=t.iters_per_epoch,
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
        skip = ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token", "relative_position_bias_table")
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

    def schedule_epoch_steps(self) -> int:
        """``objective.iters_per_epoch`` steps when set (the original 3x: 1,875 at batch 64), else a pass over data."""
        return self.iters_per_epoch or super().schedule_epoch_steps()

    def lr_schedule(self, lr: float, warmup: int, total: int, steps_per_epoch: int):
        """Warm-up from ``warmup_factor`` x lr (MIMDet: 0), then x0.1 at each of ``lr_milestones`` (epochs)."""
        milestones = [int(m * steps_per_epoch) for m in self.lr_milestones]
        return partial(warmup_step_decay, warmup_steps=warmup, milestones=milestones, warmup_factor=self.warmup_factor)

    # ---- exports -------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> dict[str, Path]:
        paths = super().export(out_dir)
        paths["detector"] = save_weights(self.detector.state_dict(), out_dir / "detector.safetensors")
        return paths


class DetectionEvaluation(Detection):
    """``objective=detect_eval``: a trained detector evaluated on the validation split, nothing trained.

    It starts from a released MIMDet detector (``init.kind=mimdet``), which reproduces the paper's COCO AP with
    ``recipe=mimdet_vit_b_coco_3x`` (docs/detection.md), at ``objective.eval_ratio`` (1.0, as the paper).
    """

    fits = False

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        if cfg.init.kind != "mimdet":
            raise ConfigError(
                f"objective=detect_eval evaluates a trained detector, but init.kind={cfg.init.kind}: "
                "set init.kind=mimdet init.checkpoint=<a released MIMDet .pth>"
            )
