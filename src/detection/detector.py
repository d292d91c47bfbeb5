"""Mask R-CNN (Faster R-CNN for boxes-only data) assembled from torchvision's parts around our backbones.

What differs from ``torchvision.models.detection.maskrcnn_resnet50_fpn_v2``, and why:

- the backbone receives the real image sizes beside the padded batch (``PartialInputRCNN``): MIMDet drops
  padding tokens first, so it must know where each image ends;
- RoIAlign samples with ``aligned=True`` (half-pixel offset) and an adaptive sampling ratio
  (``AlignedMultiScaleRoIAlign``), as the detectron2 models MIMDet reports; torchvision's pooler hard-codes
  ``aligned=False``;
- resizing follows train/eval mode (``DetectionTransform``): a random shortest edge from ``train_sizes`` in
  training, ``test_size`` in evaluation, the long side capped at ``max_size``;
- the RPN keeps 2000 proposals per level before NMS in training and 1000 in testing, 1000 after NMS in both;
- ``box_loss="l1"`` makes both box regression losses (RPN and RoI heads) plain L1, detectron2's default (its
  smooth-L1 beta 0) and MIMDet's; torchvision's smooth L1 (beta 1/9) is ``"smooth_l1"``.

The heads are the ``*_fpn_v2`` shapes: a 2-conv RPN head, a 4-conv + 1-fc(1024) box head and a 4-conv mask
head, each conv followed by BatchNorm. Anchors are 32..512 px on P2..P6 with ratios 0.5/1/2 by default.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from src.data.distributed import derived_generator
from src.schema import BOX_LOSSES

FEATURE_MAPS = ["0", "1", "2", "3"]  # P2..P5 for the RoI heads; "pool" (P6) feeds the RPN only
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)


class DetectionTransform(GeneralizedRCNNTransform):
    """Normalise, resize and pad to a multiple of 32; the resize follows train/eval mode.

    While ``draws`` is set (one generator per image, in order: only ever for one detector call) each image draws
    its training size from its own generator.
    """

    draws: Iterator[torch.Generator] | None = None

    def __init__(
        self, train_sizes: Sequence[int], test_size: int, max_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__(tuple(train_sizes), max_size, list(mean), list(std), size_divisible=32)
        self.train_sizes, self.test_size = tuple(int(s) for s in train_sizes), int(test_size)

    def train(self, mode: bool = True) -> DetectionTransform:
        super().train(mode)
        self.min_size = self.train_sizes if mode else (self.test_size,)  # torchvision draws from min_size in training
        return self

    def torch_choice(self, k: list[int]) -> int:
        """torchvision calls this once per image, in order: the image's own generator when there is one."""
        if self.draws is None:
            return super().torch_choice(k)
        return k[int(torch.randint(len(k), (1,), generator=next(self.draws)))]


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced positive/negative sampler; while ``generators`` is set (for one detector call), image
    i draws with generator i."""

    generators: list[torch.Generator] | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.generators is None:
            return super().__call__(matched_idxs)
        positives, negatives = [], []
        for matched, generator in zip(matched_idxs, self.generators, strict=True):
            positive, negative = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
            num_pos = min(int(self.batch_size_per_image * self.positive_fraction), positive.numel())
            num_neg = min(self.batch_size_per_image - num_pos, negative.numel())
            for chosen, pool, count in ((positives, positive, num_pos), (negatives, negative, num_neg)):
                picked = pool[torch.randperm(pool.numel(), generator=generator)[:count].to(pool.device)]
                mask = torch.zeros_like(matched, dtype=torch.uint8)
                mask[picked] = 1
                chosen.append(mask)
        return positives, negatives


SIZE_TAG, TOKEN_TAG, RPN_TAG, ROI_TAG = 0x5A, 0x70, 0x52, 0x4F  # a stream per random choice of an image


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's FPN pooler (same level assignment and scales) with ``aligned=True`` RoIAlign."""

    def forward(
        self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        features = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio, aligned=True)
            out[index] = pooled.to(out.dtype)
        return out


class L1BoxRPN(RegionProposalNetwork):
    """torchvision's RPN with an L1 anchor-box loss (detectron2's): the same sampled anchors and normaliser."""

    def compute_loss(
        self,
        objectness: torch.Tensor,
        pred_bbox_deltas: torch.Tensor,
        labels: list[torch.Tensor],
        regression_targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positive_masks, negative_masks = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive_masks))[0]
        sampled = torch.cat([positive, torch.where(torch.cat(negative_masks))[0]])
        targets = torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[positive], targets[positive], reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss


class L1BoxRoIHeads(RoIHeads):
    """torchvision's RoI heads whose box regression loss is L1 (detectron2's) on the same class-specific boxes.

    torchvision computes its smooth-L1 loss inside ``forward``; the sampled labels and targets and the predicted
    deltas of that call are kept (for the call only) and ``loss_box_reg`` is replaced by the L1 loss over them,
    with torchvision's normaliser (all sampled RoIs), which is detectron2's too.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._sampled: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._deltas: torch.Tensor | None = None
        self.box_predictor.register_forward_hook(self._keep_deltas)

    def _keep_deltas(self, module: nn.Module, inputs: object, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.training:
            self._deltas = output[1]

    def select_training_samples(
        self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled[2], sampled[3]
        return sampled

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
            if self.training:
                labels, targets_encoded = (torch.cat(part) for part in self._sampled)
                positive = torch.where(labels > 0)[0]
                deltas = self._deltas.reshape(labels.numel(), -1, 4)[positive, labels[positive]]
                losses["loss_box_reg"] = F.l1_loss(deltas, targets_encoded[positive], reduction="sum") / labels.numel()
            return result, losses
        finally:
            self._sampled = self._deltas = None


class PartialInputRCNN(GeneralizedRCNN):
    """GeneralizedRCNN whose backbone takes ``(padded batch, real image sizes)``; the token sample ratio and the
    per-image seeds are arguments of each call, never state left between calls."""

    @contextmanager
    def _torchvision_draws(self, generators: dict[int, list[torch.Generator]]) -> Iterator[None]:
        """torchvision calls the size choice and the two balanced samplers itself: hand them this call's per-image
        generators for the call only (none: the global generator), and take them back however it ends."""
        samplers = ((self.rpn.fg_bg_sampler, RPN_TAG), (self.roi_heads.fg_bg_sampler, ROI_TAG))
        self.transform.draws = iter(generators[SIZE_TAG]) if generators else None
        for sampler, tag in samplers:
            sampler.generators = generators.get(tag)
        try:
            yield
        finally:
            self.transform.draws = None
            for sampler, _ in samplers:
                sampler.generators = None

    def forward(
        self,
        images: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
        ratio: float = 1.0,
        seeds: list[int] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training: the loss dict (targets required). Evaluation: detections in the input images' pixels.

        ``ratio``: the fraction of stride-16 tokens a token-sampling backbone's encoder sees (1.0: all of them).
        ``seeds`` (one per image): every random choice of training (size, token sample, RPN and RoI samples) is
        drawn from the image's own seed, so it depends on the image, not on which rank or batch position it has.
        (Images of mixed sizes still pad to their batch's largest, so exact agreement across world sizes needs
        one image size.) Without seeds they come from the global generator.
        """
        if self.training and targets is None:
            raise ValueError("training needs targets")
        tags = (SIZE_TAG, TOKEN_TAG, RPN_TAG, ROI_TAG)
        generators = {} if seeds is None else {tag: [derived_generator(seed, tag) for seed in seeds] for tag in tags}
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        with self._torchvision_draws(generators):
            batch, targets = self.transform(images, targets)
            features = self.backbone(batch.tensors, batch.image_sizes, ratio, generators.get(TOKEN_TAG))
            if isinstance(features, torch.Tensor):
                features = OrderedDict([("0", features)])
            proposals, proposal_losses = self.rpn(batch, features, targets)
            detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)


def build_detector(
    backbone: nn.Module,
    num_classes: int,
    masks: bool,
    train_sizes: Sequence[int],
    test_size: int,
    max_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    anchor_sizes: Sequence[int] = ANCHOR_SIZES,
    roi_samples: int = 512,
    test_proposals: int = 1000,
    box_loss: str = "l1",
) -> PartialInputRCNN:
    """Mask R-CNN (``masks``) or Faster R-CNN for ``num_classes`` foreground classes on ``backbone``.

    ``backbone`` returns an OrderedDict of five maps ("0".."3", "pool") with ``backbone.out_channels``, which
    the head convs keep (256 in the paper). ``roi_samples``: proposals per image that train the RoI heads
    (512 in the paper; the heads' cost on a CPU grows with it); ``test_proposals``: RPN proposals per image
    kept after NMS in evaluation (1000 in the paper); ``box_loss`` (``BOX_LOSSES``): "l1" for both box regression
    losses as detectron2 and MIMDet, "smooth_l1" (beta 1/9) for torchvision's.
    """
    if len(anchor_sizes) != len(FEATURE_MAPS) + 1:
        raise ValueError(f"anchor_sizes needs one size per level P2..P6 (5), got {list(anchor_sizes)}")
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    l1 = box_loss == "l1"
    channels = backbone.out_channels
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (ANCHOR_RATIOS,) * len(anchor_sizes))
    rpn = (L1BoxRPN if l1 else RegionProposalNetwork)(
        anchors,
        RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 1000, "testing": test_proposals},
        nms_thresh=0.7,
    )
    box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [1024], norm_layer=nn.BatchNorm2d)
    mask_parts = {}
    if masks:
        mask_parts = {
            "mask_roi_pool": AlignedMultiScaleRoIAlign(FEATURE_MAPS, 14, sampling_ratio=0),
            "mask_head": MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=nn.BatchNorm2d),
            "mask_predictor": MaskRCNNPredictor(channels, channels, num_classes + 1),
        }
    roi_heads = (L1BoxRoIHeads if l1 else RoIHeads)(
        AlignedMultiScaleRoIAlign(FEATURE_MAPS, 7, sampling_ratio=0),
        box_head,
        FastRCNNPredictor(1024, num_classes + 1),
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=roi_samples,
        positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
        **mask_parts,
    )
    rpn.fg_bg_sampler = SeededSampler(rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction)
    samples = roi_heads.fg_bg_sampler
    roi_heads.fg_bg_sampler = SeededSampler(samples.batch_size_per_image, samples.positive_fraction)
    transform = DetectionTransform(train_sizes, test_size, max_size, mean, std)
    return PartialInputRCNN(backbone, rpn, roi_heads, transform)
