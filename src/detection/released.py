"""A released MIMDet detector (a detectron2 checkpoint of hustvl/MIMDet's config) in this toolkit's detector.

The released files are detectron2 state dicts: ``backbone.bottom_up.encoder`` (the ConvStem as ``patch_embed`` and
the ViT), ``backbone.bottom_up.decoder``, ``backbone.fpn_*``, ``proposal_generator.rpn_head`` and
``roi_heads.{box_head, box_predictor, mask_head}``. Every tensor has one place in ``PartialInputRCNN``
(``NAME_PREFIXES``); two layouts differ beyond the names:

- class order: detectron2's classifier scores the K classes first and the background last, torchvision's the
  background first (class k is row k + 1 here, as the COCO data module labels it);
- detectron2's box regression and mask predictor hold the K classes only; torchvision's hold a background slot
  first, which is never trained or read (its boxes are dropped before scoring, and a detection's mask is picked
  by its label, never 0). The slot is filled with zeros.

The ViT parameters detection never runs (its own patch embedding, cls and mask tokens) are not in the file and
keep their init; everything else must be filled, and every tensor of the file must find its place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from src.config import ConfigError
from src.detection.backbone import STRIDE
from src.encoders.loading import InitReport, check_fit, preview_names

ENCODER = "backbone.bottom_up.encoder."
DECODER = "backbone.bottom_up.decoder."
CLASSIFIER = "roi_heads.box_predictor.cls_score."  # rows (K classes, background) -> (background, K classes)
PARTS = ("ConvStem", "ViT", "decoder", "FPN", "RPN", "box head", "box predictor", "mask head")  # as the report lists
BACKGROUND_SLOT = {  # our prefix -> rows of the background slot torchvision's predictors have and detectron2's not
    "roi_heads.box_predictor.bbox_pred.": 4,
    "roi_heads.mask_predictor.mask_fcn_logits.": 1,
}


def _name_prefixes() -> list[tuple[str, str, str]]:
    """(released prefix, our prefix, the part the report counts it in), the longest released prefix first.

    detectron2 puts a conv's norm under ``<conv>.norm``; torchvision's conv + norm is a Sequential (0: conv, 1: norm).
    """
    rows = [(f"{ENCODER}patch_embed.proj.3.3.", "backbone.stem.proj.", "ConvStem")]  # the 1x1 conv after stage 3
    rows += [
        (f"{ENCODER}patch_embed.proj.{i}.{j}.", f"backbone.stem.stages.{i}.{j}.", "ConvStem")
        for i in range(4)
        for j in range(2)
    ]
    rows += [
        (ENCODER, "backbone.encoder_input.encoder.", "ViT"),
        (f"{DECODER}conv_feat_proj.", "backbone.decoder.fill_proj.", "decoder"),
        (DECODER, "backbone.decoder.", "decoder"),
        ("proposal_generator.rpn_head.objectness_logits.", "rpn.head.cls_logits.", "RPN"),
        ("proposal_generator.rpn_head.anchor_deltas.", "rpn.head.bbox_pred.", "RPN"),
        ("roi_heads.box_head.fc1.", "roi_heads.box_head.5.", "box head"),  # after 4 convs and the Flatten
        ("roi_heads.box_predictor.", "roi_heads.box_predictor.", "box predictor"),
        ("roi_heads.mask_head.deconv.", "roi_heads.mask_predictor.conv5_mask.", "mask head"),
        ("roi_heads.mask_head.predictor.", "roi_heads.mask_predictor.mask_fcn_logits.", "mask head"),
    ]
    rows += [(f"proposal_generator.rpn_head.conv.conv{i}.", f"rpn.head.conv.{i}.0.", "RPN") for i in range(2)]
    for level in range(2, 6):
        for theirs, ours in (("lateral", "inner"), ("output", "layer")):
            rows.append((f"backbone.fpn_{theirs}{level}.norm.", f"backbone.fpn.{ours}_blocks.{level - 2}.1.", "FPN"))
            rows.append((f"backbone.fpn_{theirs}{level}.", f"backbone.fpn.{ours}_blocks.{level - 2}.0.", "FPN"))
    for i in range(4):
        for theirs, ours, part in (
            ("box_head.conv", "box_head.", "box head"),
            ("mask_head.mask_fcn", "mask_head.", "mask head"),
        ):
            rows.append((f"roi_heads.{theirs}{i + 1}.norm.", f"roi_heads.{ours}{i}.1.", part))
            rows.append((f"roi_heads.{theirs}{i + 1}.", f"roi_heads.{ours}{i}.0.", part))
    return sorted(rows, key=lambda row: -len(row[0]))


NAME_PREFIXES = _name_prefixes()


def our_name(released: str) -> tuple[str, str] | None:
    """(our name, part) of a released name, or None when no prefix takes it."""
    for theirs, ours, part in NAME_PREFIXES:
        if released.startswith(theirs):
            return ours + released[len(theirs) :], part
    return None


def to_torchvision_layout(name: str, value: torch.Tensor) -> torch.Tensor:
    """A predictor tensor (our ``name``) in torchvision's class layout, background first; any other as it is."""
    if name.startswith(CLASSIFIER):
        return torch.cat([value[-1:], value[:-1]])
    for prefix, rows in BACKGROUND_SLOT.items():
        if name.startswith(prefix):
            return torch.cat([value.new_zeros(rows, *value.shape[1:]), value])
    return value


def detector_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
    """(the detector's state dict from a released one, tensors per part, released names no prefix takes)."""
    mapped, counts, unplaced = {}, dict.fromkeys(PARTS, 0), []
    for key, value in state.items():
        placed = our_name(key)
        if placed is None:
            unplaced.append(key)
            continue
        name, part = placed
        mapped[name] = to_torchvision_layout(name, value)
        counts[part] += 1
    return mapped, {part: count for part, count in counts.items() if count}, unplaced


def is_released(state: Mapping[str, object]) -> bool:
    """Whether a state dict has a released MIMDet detector's layout: its ViT under ``backbone.bottom_up.encoder``."""
    return any(key.startswith(ENCODER) for key in state)


def released_settings(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """What a released detector was built with, read from its shapes: ``objective`` values and the data it
    detects (``dataset.num_classes``, ``dataset.masks``). Raises KeyError naming an entry it lacks."""
    table_rows = state[f"{ENCODER}pos_embed"].shape[1] - 1  # one cls row, then a square grid
    side = round(table_rows**0.5)
    blocks = {key.split(".")[4] for key in state if key.startswith(f"{DECODER}decoder_blocks.")}
    return {
        "objective.table_size": side * STRIDE if side * side == table_rows else None,
        "objective.decoder_dim": int(state[f"{DECODER}decoder_embed.weight"].shape[0]),
        "objective.decoder_depth": len(blocks),
        "objective.fpn_channels": int(state["backbone.fpn_output2.weight"].shape[0]),
        "objective.fpn_norm": "syncbn" if "backbone.fpn_output2.norm.weight" in state else "",
        "dataset.num_classes": int(state[f"{CLASSIFIER}weight"].shape[0]) - 1,
        "dataset.masks": any(key.startswith("roi_heads.mask_head.") for key in state),
    }


@dataclass
class ReleasedReport(InitReport):
    """What a released MIMDet checkpoint filled: tensors per part, and the ViT parameters it does not hold."""

    parts: dict[str, int] = field(default_factory=dict)
    not_in_checkpoint: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        counts = ", ".join(f"{part} {count}" for part, count in self.parts.items())
        slots = ", ".join(prefix.rstrip(".") for prefix in BACKGROUND_SLOT)
        return [
            f"init: released MIMDet detector {self.checkpoint}",
            f"  loaded {len(self.loaded)} tensors, every one of the file, nothing left over: {counts}",
            f"  classes: detectron2's background row moved first, as torchvision orders them; zero background slot in "
            f"{slots}",
            f"  not in the file, never run in detection (kept at init): {', '.join(self.not_in_checkpoint) or 'none'}",
        ]


def load_released(detector: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> ReleasedReport:
    """Load a released detector's ``state`` (the file ``path``) into ``detector`` (a ``PartialInputRCNN`` on
    ``MIMDetBackbone``): every tensor of the file takes its place and every tensor the detector runs is filled, or
    one line names what does not fit, before anything is loaded."""
    mapped, parts, unplaced = detector_state(state)
    refusal = f"init.checkpoint={path} (init.kind=mimdet) does not fit this detector"
    if unplaced:
        raise ConfigError(f"{refusal}: no place here for {len(unplaced)}{preview_names(unplaced)}")
    encoder_input = "backbone.encoder_input."
    unused = [encoder_input + name for name in detector.backbone.encoder_input.unused_parameters()]
    check_fit({k: v for k, v in detector.state_dict().items() if k not in unused}, mapped, refusal)
    detector.load_state_dict(mapped, strict=False)  # what is not in ``mapped`` is ``unused`` alone (check_fit)
    return ReleasedReport(
        kind="mimdet",
        checkpoint=str(path),
        loaded=sorted(mapped),
        parts=parts,
        not_in_checkpoint=[name.removeprefix(f"{encoder_input}encoder.") for name in unused],
    )
