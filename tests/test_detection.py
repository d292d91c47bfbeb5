"""Detection fine-tuning (``objective=detect``): MIMDet on torchvision's Mask R-CNN through the front door.

A real (tiny) MAE pretraining run on Fashion-MNIST makes the checkpoints; the detector then trains and is
evaluated on real Fashion-MNIST scenes, deepforest's aerial tree tiles (boxes only) and stardist's nuclei.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_HEADS, TINY, both_ranks, compose_config, scenes_run
from omegaconf import OmegaConf
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from src.config import ConfigError
from src.detection.data import CocoDataModule
from src.detection.detector import AlignedMultiScaleRoIAlign, DetectionTransform, PartialInputRCNN, build_detector
from src.encoders.pos_embed import resize_table
from src.methods.detect import Detection
from src.methods.optim import scaled_lr, warmup_step_decay
from src.pipeline.fit import prepare, run

MAE_LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=2", "objective.decoder_heads=2"]
PALE_SMALL = ["+encoder.kwargs.embed_dim=16", "+encoder.kwargs.depths=[1,1,1,1]", "+encoder.kwargs.num_heads=[2,2,2,2]"]


def detect_overrides(tmp_path: Path, *overrides: str) -> list[str]:
    """A tiny detection run on real scenes: 4 px ViT-T (2 blocks) as the MAE fixture trains, 32-wide heads."""
    return [
        *[o for o in TINY if not o.startswith("dataset.")],
        *scenes_run(tmp_path),
        "objective=detect",
        "objective.pretrain_img_size=32",
        "objective.decoder_depth=2",
        "objective.decoder_dim=32",
        "objective.decoder_heads=2",
        *SMALL_HEADS,
        "batch_size=4",
        "epochs=1",
        "warmup_epochs=0",
        *overrides,
    ]


def detect_config(tmp_path: Path, *overrides: str):
    return compose_config(detect_overrides(tmp_path, *overrides), config_name="finetune")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    """A real (tiny) MAE pretraining run: Lightning checkpoint, encoder export and the official-layout file."""
    runs = tmp_path_factory.mktemp("mae")
    fast = ["dataset.train_limit=32", "epochs=1", "warmup_epochs=0", "knn=null"]
    result = run(compose_config([*TINY, *fast, *MAE_LIGHT, f"runs_dir={runs}", "run_name=mae"]))
    return result.run_dir


def mae_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def built(cfg) -> Detection:
    settled = prepare(cfg)
    CocoDataModule(cfg.dataset, cfg.batch_size, 0)  # builds the scenes on first use
    return settled.build()


# ---- the front door --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_detection_trains_from_an_mae_checkpoint_and_reports_coco_ap(mae_run, tmp_path):
    ckpt = mae_run / "checkpoints" / "last.ckpt"
    cfg = detect_config(
        tmp_path, f"init.checkpoint={ckpt}", "trainer.max_steps=2", "objective.compare_train_ratio=true"
    )
    result = run(cfg)
    metrics = result.metrics
    for key in ("box/ap", "box/ap50", "box/ap_small", "mask/ap", "mask/ap75"):
        assert 0.0 <= metrics[f"val/{key}"] <= 1.0 or metrics[f"val/{key}"] == -1.0, key
    assert "val_train_ratio/box/ap" in metrics  # the paper's comparison: evaluation at the train ratio
    assert {"train/loss_classifier", "train/loss_mask", "train/loss_objectness"} <= set(metrics)
    report = json.loads((result.run_dir / "init_report.json").read_text())
    assert report["kind"] == "lightning" and report["loaded"] and not report["unexpected"]
    assert any(k.startswith("decoder_blocks.1.") for k in report["decoder_loaded"])
    assert report["decoder_not_loaded"] == []  # the MAE decoder had all it needs; fill_proj is new by design
    assert report["random_by_design"][:2] == ["ConvStem", "decoder fill-in projection"]
    assert list((result.run_dir / "pictures").glob("detections_step*.png"))
    assert (result.run_dir / "export" / "detector.safetensors").is_file()


def test_the_decoder_starts_as_the_mae_decoder_and_the_encoder_as_its_encoder(mae_run, tmp_path):
    state = mae_state(mae_run)
    module = built(detect_config(tmp_path, f"init.checkpoint={mae_run / 'checkpoints' / 'last.ckpt'}"))
    decoder = module.detector.backbone.decoder.state_dict()
    for key in ("decoder_embed.weight", "decoder_blocks.0.attn.qkv.weight", "decoder_blocks.1.mlp.fc2.bias"):
        assert torch.equal(decoder[key], state[key]), key
    encoder = module.encoder.state_dict()
    assert torch.equal(encoder["blocks.1.attn.proj.weight"], state["encoder.blocks.1.attn.proj.weight"])
    # both tables resized once from the MAE's 8x8 grid to objective.table_size's (800 px / 16: 50x50), as MIMDet
    mae_table, grid = state["decoder_pos_embed"], (50, 50)
    assert torch.equal(module.detector.backbone.decoder.decoder_pos_embed, resize_table(mae_table, (8, 8), grid, 1))
    assert torch.equal(module.encoder.pos_embed, resize_table(state["encoder.pos_embed"], (8, 8), grid, 1))
    assert "  position tables (encoder, decoder) resized once from 8x8 to 50x50" in "\n".join(
        module.init_report.lines()
    )


def test_the_official_full_mae_layout_loads_encoder_and_decoder(mae_run, tmp_path):
    official = mae_run / "export" / "mae_full_official.pth"
    state = torch.load(official, weights_only=True)["model"]
    cfg = detect_config(tmp_path, f"init.checkpoint={official}", "init.kind=official", "encoder.kwargs.patch_size=4")
    module = built(cfg)
    assert module.init_report.kind == "official"
    decoder = module.detector.backbone.decoder.state_dict()
    assert torch.equal(decoder["decoder_blocks.1.attn.qkv.weight"], state["decoder_blocks.1.attn.qkv.weight"])
    assert torch.equal(module.encoder.state_dict()["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.weight"])


def test_an_encoder_only_checkpoint_is_refused_for_the_decoder_unless_asked(mae_run, tmp_path):
    export = mae_run / "export" / "encoder.safetensors"
    overrides = [f"init.checkpoint={export}", "encoder.kwargs.patch_size=4"]
    with pytest.raises(ConfigError, match="has no MAE decoder.*objective.random_decoder=true"):
        prepare(detect_config(tmp_path, *overrides))
    module = built(detect_config(tmp_path, *overrides, "objective.random_decoder=true"))
    report = module.init_report
    assert report.loaded and not report.decoder_loaded
    assert "decoder_blocks.0.attn.qkv.weight" in report.decoder_not_loaded
    assert any(
        "init (decoder): loaded 0 tensors from the MAE decoder, 29 left random" in line for line in report.lines()
    )


def test_a_decoder_deeper_than_the_checkpoints_is_refused(mae_run, tmp_path):
    cfg = detect_config(
        tmp_path, f"init.checkpoint={mae_run / 'checkpoints' / 'last.ckpt'}", "objective.decoder_depth=4"
    )
    with pytest.raises(ConfigError, match="objective.decoder_depth=4 but the checkpoint's MAE decoder has 2 blocks"):
        prepare(cfg)


# ---- the detector on real images --------------------------------------------------------------------------------
def real_batch(cfg) -> dict:
    data = CocoDataModule(cfg.dataset, cfg.batch_size, 0)
    return next(iter(data.train_dataloader())), next(iter(data.val_dataloader()))


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_every_trainable_parameter_gets_a_gradient_on_real_scenes(tmp_path, ratio):
    """DDP (find_unused_parameters=False) needs this; ratio 1.0 leaves MIMDet's fill-in projection idle."""
    cfg = detect_config(tmp_path, f"objective.train_ratio={ratio}")
    module = built(cfg)
    train, _ = real_batch(cfg)
    loss, losses = module.compute_loss(train)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    loss.backward()
    idle = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle


def test_evaluation_sees_the_full_input_and_returns_detections_in_image_pixels(tmp_path):
    cfg = detect_config(tmp_path, "objective.train_ratio=0.25")
    module = built(cfg).eval()
    _, val = real_batch(cfg)
    seen = []
    module.detector.backbone.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        predictions = module(val["images"])
    grid = [(img.shape[-2] // 16, img.shape[-1] // 16) for img in val["images"]]
    assert seen[0] >= max(h * w for h, w in grid)  # all tokens of the padded grid, none sampled away
    for image, prediction in zip(val["images"], predictions, strict=True):
        assert prediction["masks"].shape[-2:] == image.shape[-2:]
        if len(prediction["boxes"]):
            assert (
                prediction["boxes"][:, 2].max() <= image.shape[-1]
                and prediction["boxes"][:, 3].max() <= image.shape[-2]
            )


def test_boxes_only_data_trains_faster_rcnn_with_a_pale_encoder(tmp_path):
    """deepforest's aerial tiles have boxes only; Pale feeds the FPN from its four stages."""
    cfg = compose_config(
        [
            "objective=detect",
            "encoder=pale_t",
            *PALE_SMALL,
            "dataset=deepforest_trees",
            f"dataset.root={tmp_path}/trees",
            "dataset.sizes.train=[128]",
            "dataset.sizes.test=128",
            "dataset.sizes.max=128",
            *SMALL_HEADS,
            "batch_size=2",
            "logger=csv",
            f"runs_dir={tmp_path}",
        ],
        config_name="finetune",
    )
    module = built(cfg)
    assert module.init_report.random_by_design == ["FPN", "RPN", "RoI heads"]
    train, val = real_batch(cfg)
    loss, losses = module.compute_loss(train)
    assert "loss_mask" not in losses and torch.isfinite(loss)
    loss.backward()
    assert not [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    with torch.no_grad():
        predictions = module.eval()(val["images"])
    assert all("masks" not in p and p["boxes"].shape[1] == 4 for p in predictions)


# ---- parts and recipe facts ----------------------------------------------------------------------------------------
def test_roi_align_is_aligned_on_the_level_torchvision_assigns():
    features = {str(i): torch.randn(1, 4, 64 // 2**i, 64 // 2**i) for i in range(4)}
    boxes = [torch.tensor([[3.3, 4.1, 20.7, 30.2], [1.0, 2.0, 60.0, 61.0]])]
    ours = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0)(features, boxes, [(128, 128)])
    plain = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0)(features, boxes, [(128, 128)])
    # first box: level 0 (scale 1/2); the second, larger, one: level 1 (scale 1/4), as torchvision maps them
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    expected = [roi_align(features["0"], rois[:1], 7, 0.5, 0, aligned=True)]
    expected.append(roi_align(features["1"], rois[1:], 7, 0.25, 0, aligned=True))
    assert torch.allclose(ours, torch.cat(expected), atol=1e-6)
    assert not torch.allclose(ours, plain, atol=1e-3)  # torchvision's own pooler is not aligned


def test_the_transform_resizes_by_mode():
    transform = DetectionTransform([96, 128], 160, 300, [0.5] * 3, [0.25] * 3)
    images = [torch.rand(3, 50, 100)]
    transform.train()
    sides = {min(transform(images)[0].image_sizes[0]) for _ in range(30)}
    assert sides == {96, 128}
    transform.eval()
    assert transform(images)[0].image_sizes[0] == (150, 300)  # test size 160 capped by max 300 on the long side


def test_the_step_schedule_warms_up_then_drops_tenfold():
    assert warmup_step_decay(0, 10, [100, 150]) == pytest.approx(0.001)
    assert warmup_step_decay(10, 10, [100, 150]) == 1.0
    assert warmup_step_decay(120, 10, [100, 150]) == pytest.approx(0.1)
    assert warmup_step_decay(150, 10, [100, 150]) == pytest.approx(0.01)


def test_three_lr_groups_and_the_papers_lr_at_batch_64(tmp_path):
    module = built(detect_config(tmp_path, "objective.lr_mult=2.0"))
    scale_of = {id(p): g["lr_scale"] for g in module.param_groups() for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in module.param_groups() for p in g["params"]}
    backbone = module.detector.backbone
    assert {scale_of[id(p)] for p in backbone.stem.parameters()} == {1.0}
    assert {scale_of[id(p)] for p in module.encoder.blocks.parameters()} == {0.5}
    assert {scale_of[id(p)] for p in backbone.decoder.decoder_blocks.parameters()} == {2.0}
    assert {scale_of[id(p)] for p in module.detector.roi_heads.parameters()} == {2.0}
    assert decay_of[id(module.encoder.blocks[0].norm1.weight)] == 0.0
    assert decay_of[id(module.encoder.blocks[0].attn.qkv.bias)] == 0.0
    assert decay_of[id(module.encoder.blocks[0].attn.qkv.weight)] == 0.1
    recipe = compose_config(["recipe=mimdet_vit_b_coco_3x", "dataset.root=/data/coco"], config_name="finetune")
    optim = recipe.objective.optim
    assert scaled_lr(optim.base_lr, recipe.batch_size * 8, optim.reference_batch) == pytest.approx(8e-5)
    assert OmegaConf.to_container(recipe.objective.lr_milestones) == [27, 33] and recipe.epochs == 36


def test_the_coco_recipe_counts_the_originals_iterations_and_warms_up_from_zero(tmp_path):
    """MIMDet's 3x: 36 "epochs" of 1,875 steps whatever the filtered set's size: 67,500 steps, x0.1 at 50,625 and
    61,875, a quarter epoch of warm-up starting at lr 0 (configure_optimizers, as the trainer calls it)."""
    recipe = prepare(compose_config(["recipe=mimdet_vit_b_coco_3x", "dataset.root=/data/coco"], config_name="finetune"))
    assert (recipe.cfg.trainer.max_steps, recipe.cfg.trainer.max_epochs) == (67_500, -1)
    assert recipe.cfg.objective.warmup_factor == 0.0 and recipe.cfg.objective.grad_checkpointing
    schedule = ["objective.iters_per_epoch=1875", "objective.lr_milestones=[27,33]", "warmup_epochs=0.25"]
    module = built(detect_config(tmp_path, *schedule, "epochs=36"))
    module.trainer = SimpleNamespace(world_size=8, accumulate_grad_batches=1, estimated_stepping_batches=67_500)
    factor = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert module.schedule_epoch_steps() == 1875
    steps = (0, 234, 468, 50_624, 50_625, 61_874, 61_875, 67_499)
    assert [factor(step) for step in steps] == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def heads_with(box_loss: str) -> PartialInputRCNN:
    """A 3-class Faster R-CNN's RPN and RoI heads at width 16 (their backbone is never run here)."""
    backbone = nn.Identity()
    backbone.out_channels = 16
    return build_detector(backbone, 3, False, [128], 128, 128, [0.0] * 3, [1.0] * 3, box_loss=box_loss).train()


@pytest.mark.parametrize(("box_loss", "beta"), [("l1", 0.0), ("smooth_l1", 1 / 9)])
@torch.no_grad()
def test_box_losses_are_detectron2s_l1_or_torchvisions_smooth_l1(box_loss, beta):
    """Few enough anchors and RoIs that every one is sampled: the losses computed here from what was sampled."""
    torch.manual_seed(0)
    detector = heads_with(box_loss)
    labels = [torch.tensor([1.0] * 6 + [0.0] * 10 + [-1.0] * 4)]  # 6 positive anchors, 10 negative, 4 ignored
    deltas, targets = torch.randn(20, 4), [torch.randn(20, 4)]
    _, rpn_box = detector.rpn.compute_loss(torch.randn(20), deltas, labels, targets)
    expected = F.smooth_l1_loss(deltas[:6], targets[0][:6], beta=beta, reduction="sum") / 16
    assert float(rpn_box) == pytest.approx(float(expected))

    heads = detector.roi_heads
    features = {name: torch.randn(1, 16, 128 // 2**i, 128 // 2**i) for i, name in enumerate("0123")}
    truth = [
        {"boxes": torch.tensor([[10.0, 10.0, 70.0, 60.0], [50.0, 40.0, 120.0, 110.0]]), "labels": torch.tensor([1, 3])}
    ]
    proposals = [torch.cat([truth[0]["boxes"] + 3 * torch.randn(2, 4), torch.tensor([[0.0, 90.0, 30.0, 127.0]])])]
    sampled, _, roi_labels, roi_targets = heads.select_training_samples([proposals[0].clone()], truth)
    roi_deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, sampled, [(128, 128)])))[1]
    roi_labels, roi_targets = roi_labels[0], roi_targets[0]
    positive = torch.where(roi_labels > 0)[0]
    chosen = roi_deltas.reshape(len(roi_labels), -1, 4)[positive, roi_labels[positive]]
    expected = F.smooth_l1_loss(chosen, roi_targets[positive], beta=beta, reduction="sum") / len(roi_labels)
    _, losses = heads(features, proposals, [(128, 128)], truth)
    assert positive.numel() >= 2 and float(losses["loss_box_reg"]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_two_process_ddp_at_ratio_one_has_no_unused_parameters(mae_run, tmp_path):
    """Lightning's DDP runs with find_unused_parameters=False: an idle parameter would stop the run."""
    ckpt = mae_run / "checkpoints" / "last.ckpt"
    overrides = [f"init.checkpoint={ckpt}", "trainer=cpu_ddp", "trainer.max_steps=1", "objective.train_ratio=1.0"]
    args = detect_overrides(tmp_path, *overrides, "run_name=ddp")
    args = [a for a in args if not a.startswith("trainer.devices")]  # cpu_ddp's 2 processes, not TINY's 1
    ranks = both_ranks("src.finetune", args)  # the scenes are built once, under a lock
    for result in ranks:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in ranks[1].stdout + ranks[1].stderr
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").is_file()


def test_an_encoder_that_is_neither_mimdet_nor_a_pyramid_is_refused_before_work():
    cfg = compose_config(["objective=detect", "encoder=beit_t", "dataset=stardist_nuclei"], config_name="finetune")
    with pytest.raises(ConfigError, match="encoder=beit_t .* neither by token sampling"):
        prepare(cfg)
