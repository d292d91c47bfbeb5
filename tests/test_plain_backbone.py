"""ViTDet's plain backbone (``objective.backbone=plain``): every encoder family as a detection backbone.

The pyramid's levels for ViT and BEiT encoders at several image sizes, what trains and what is frozen, the
refusals, and real (tiny) detection fine-tunes on Fashion-MNIST scenes from a BEiT and a DeiT checkpoint, each
in the layout its objective releases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_HEADS, TINY, compose_config, scenes_run
from omegaconf import OmegaConf
from torch import nn

from src.config import ConfigError
from src.detection.backbone import build_backbone
from src.detection.data import CocoDataModule
from src.detection.detector import DetectionTransform
from src.detection.plain_backbone import PlainBackbone
from src.encoders import create_encoder
from src.encoders.beit import SHARED_TABLE
from src.methods.beit import BEiT
from src.pipeline.fit import prepare, run
from src.tokenizers import VQTokenizer

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoder"
LEVELS = ["0", "1", "2", "3", "pool"]
STRIDES = [4, 8, 16, 32, 64]
CANVAS = 160
SMALL = dict(patch_size=16, depth=2, embed_dim=64, num_heads=2)
VIT_TINY = [o for o in TINY if o.startswith(("encoder", "+encoder"))]  # 4 px patches, 2 blocks
BEIT_TINY = ["encoder=beit_t", "encoder.kwargs.patch_size=4", "+encoder.kwargs.depth=2"]


def encoder(name: str, img_size: int = CANVAS, **kwargs) -> nn.Module:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.kwargs = OmegaConf.merge(cfg.kwargs, {**SMALL, **kwargs})
    return create_encoder(cfg, img_size)


def padded_batch(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images of these sizes as the detector hands them over: resized (shortest edge 100, long side <= 160) and
    padded to a multiple of 32."""
    transform = DetectionTransform([100], 100, CANVAS, [0.5] * 3, [0.25] * 3).eval()
    batch, _ = transform([torch.rand(3, h, w) for h, w in sizes])
    return batch.tensors, batch.image_sizes


# ---- the backbone --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit_t", "beit_t"])
@pytest.mark.parametrize("sizes", [[(50, 70)], [(81, 45)], [(50, 70), (81, 45)], [(33, 33)]], ids=str)
def test_five_levels_at_strides_4_to_64_with_the_out_channels(family, sizes):
    backbone = build_backbone(encoder(family), "plain", out_channels=24).eval()
    images, image_sizes = padded_batch(sizes)
    height, width = images.shape[-2:]
    assert (height % 32, width % 32) == (0, 0) and max(images.shape[-2:]) <= CANVAS
    with torch.no_grad():
        out = backbone(images, image_sizes)
    assert list(out) == LEVELS
    for name, stride in zip(LEVELS, STRIDES, strict=True):
        assert out[name].shape == (len(sizes), 24, -(-height // stride), -(-width // stride)), (name, sizes)
    torch.testing.assert_close(out["pool"], out["3"][..., ::2, ::2])  # P6: P5 max-pooled by stride 2, kernel 1


def test_the_pyramid_is_vitdets_on_stride_16_and_follows_a_finer_patch():
    """ViT-B (paper): 4x by two deconvolutions 768 -> 384 -> 192 with LayerNorm + GELU between, 2x by one to 384,
    1x as is, 1/2x by max pool; then 1x1 and 3x3 convs, each with a LayerNorm. A 4 px patch pools to 8, 16 and 32."""
    with torch.device("meta"):
        vit_b = create_encoder(OmegaConf.load(CONF / "vit_b.yaml"), 224)
        levels = build_backbone(vit_b, "plain").pyramid.levels
    kinds = [[type(m).__name__ for m in level] for level in levels]
    head = ["Conv2d", "LayerNorm2d", "Conv2d", "LayerNorm2d"]
    assert kinds[0] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", *head]
    assert kinds[1:] == [["ConvTranspose2d", *head], head, ["MaxPool2d", *head]]
    assert [levels[0][0].out_channels, levels[0][3].out_channels, levels[1][0].out_channels] == [384, 192, 384]
    assert [levels[i][-4].in_channels for i in range(4)] == [192, 384, 768, 768]
    assert {levels[i][-2].kernel_size for i in range(4)} == {(3, 3)} and levels[3][0].kernel_size == 2
    fine = build_backbone(encoder("vit_t", patch_size=4), "plain").pyramid.levels
    assert [[m.kernel_size for m in level if isinstance(m, nn.MaxPool2d)] for level in fine] == [[], [2], [4], [8]]


@pytest.mark.parametrize("family", ["vit_t", "beit_t"])
def test_the_encoder_sees_its_whole_canvas_and_every_trainable_parameter_gets_a_gradient(family):
    """DDP (find_unused_parameters=False) needs every trainable parameter used; the mask token never is."""
    backbone = build_backbone(encoder(family), "plain", out_channels=16)
    seen = []
    backbone.encoder.patch_embed.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    images, image_sizes = padded_batch([(50, 70), (40, 30)])
    out = backbone(images, image_sizes)
    assert seen == [(2, 3, CANVAS, CANVAS)]  # the batch padded to the canvas the encoder was built for
    sum(level.pow(2).mean() for level in out.values()).backward()
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None] == []
    assert "encoder.mask_token" not in trainable
    assert {"encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.blocks.1.mlp.fc2.weight"} <= trainable


@pytest.mark.parametrize("family", ["vit_t", "beit_t"])
def test_the_pyramid_reads_the_encoders_patch_tokens_on_the_batchs_corner_of_the_canvas(family):
    """The map is the encoder's own output (timm's forward_features on the padded canvas) in row-major order,
    cropped to the batch: a transposed or shifted map would keep every shape."""
    backbone = build_backbone(encoder(family), "plain").eval()
    seen = []
    backbone.pyramid.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images, image_sizes = padded_batch([(50, 70)])  # 128 x 160 of the 160 x 160 canvas
    with torch.no_grad():
        backbone(images, image_sizes)
        tokens = backbone.encoder.forward_features(F.pad(images, (0, 0, 0, CANVAS - 128)))[:, 1:]
    expected = tokens.transpose(1, 2).reshape(1, -1, 10, 10)[:, :, :8, :10]
    torch.testing.assert_close(seen[0], expected)


def test_bad_inputs_and_encoders_are_refused_by_name():
    backbone = build_backbone(encoder("vit_t", img_size=64), "plain")
    with pytest.raises(ValueError, match="samples no tokens: the sample ratio must be 1.0, got 0.5"):
        backbone(torch.rand(1, 3, 64, 64), [(64, 64)], 0.5)
    with pytest.raises(ValueError, match="a 96x64 batch does not fit the encoder's 64x64 canvas"):
        backbone(torch.rand(1, 3, 96, 64), [(96, 64)])
    with pytest.raises(ValueError, match="multiple of 32, got 64x48"):
        backbone(torch.rand(1, 3, 64, 48), [(64, 48)])
    with pytest.raises(ValueError, match="stride-14 map cannot become a stride-4 level"):
        build_backbone(encoder("vit_t", img_size=224, patch_size=14), "plain")
    pale = OmegaConf.load(CONF / "pale_t.yaml")
    pale.kwargs = OmegaConf.merge(pale.kwargs, dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2]))
    with pytest.raises(ValueError, match="needs a flat token encoder"):
        PlainBackbone(create_encoder(pale, 64), STRIDES[:4])


# ---- the config ------------------------------------------------------------------------------------------------
def detect_overrides(tmp_path: Path, *overrides: str, encoder: list[str] = VIT_TINY) -> list[str]:
    """A tiny detection run on real scenes (a 4 px encoder with 2 blocks), 32-wide heads, a 96 px canvas."""
    return [
        *[o for o in TINY if not o.startswith(("dataset.", "encoder", "+encoder"))],
        *encoder,
        *scenes_run(tmp_path),
        "dataset.sizes.max=96",
        "objective=detect",
        *SMALL_HEADS,
        "batch_size=4",
        "epochs=1",
        "warmup_epochs=0",
        *overrides,
    ]


def detect_config(tmp_path: Path, *overrides: str, encoder: list[str] = VIT_TINY):
    return compose_config(detect_overrides(tmp_path, *overrides, encoder=encoder), config_name="finetune")


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory) -> Path:
    """A DeiT distilled student in the official DeiT layout (cls + distillation tokens, two heads): no decoder."""
    cfg = compose_config(TINY)
    cfg.encoder.arch = f"{cfg.encoder.arch}_distilled"
    torch.manual_seed(0)
    student = create_encoder(cfg.encoder, 32, num_classes=10)
    path = tmp_path_factory.mktemp("deit") / "deit_distilled.pth"
    torch.save({"model": student.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def beit_file(tmp_path_factory) -> Path:
    """A BEiT module's release layout (``beit_full_official.pth``: shared relative position table, lm_head)."""
    cfg = compose_config(BEIT_TINY)
    torch.manual_seed(0)
    tokenizer = VQTokenizer(vocab_size=16, downsample=4, img_size=32, hidden=8, code_dim=4, res_blocks=0)
    optim = {"base_lr": 1.5e-3, "reference_batch": 256, "betas": [0.9, 0.999], "weight_decay": 0.05}
    module = BEiT(create_encoder(cfg.encoder, 32), tokenizer, 32, optim, batch_size=4, warmup_epochs=0, target_patch=4)
    path = tmp_path_factory.mktemp("beit") / "beit_full_official.pth"
    torch.save({"model": module.official_state_dict()}, path)
    return path


def test_mimdet_asked_with_a_checkpoint_without_a_decoder_is_refused_in_one_line(tmp_path, deit_file):
    with pytest.raises(ConfigError) as refused:
        prepare(detect_config(tmp_path, f"init.checkpoint={deit_file}", "objective.backbone=mimdet"))
    message = str(refused.value)
    assert "\n" not in message and "has no MAE decoder, which objective.backbone=mimdet" in message
    assert "set objective.backbone=plain" in message


def test_the_config_refuses_what_the_plain_path_cannot_do_and_settles_its_ratios(tmp_path):
    with pytest.raises(ConfigError, match="encoder=beit_t .* neither by token sampling.*objective.backbone=plain"):
        prepare(detect_config(tmp_path, encoder=BEIT_TINY))
    with pytest.raises(ConfigError, match="objective.backbone=plain needs a flat token encoder.*encoder=pale_t"):
        prepare(detect_config(tmp_path, "objective.backbone=plain", encoder=["encoder=pale_t"]))
    with pytest.raises(ConfigError, match="objective.compare_train_ratio: encoder=vit_t .* on the plain backbone"):
        prepare(detect_config(tmp_path, "objective.backbone=plain", "objective.compare_train_ratio=true"))
    with pytest.raises(ConfigError, match="objective.backbone=plain with encoder=vit_t .*stride-12 map cannot"):
        prepare(detect_config(tmp_path, "objective.backbone=plain", "encoder.kwargs.patch_size=12"))
    with pytest.raises(ConfigError, match="objective.backbone"):
        prepare(detect_config(tmp_path, "objective.backbone=vitdet"))
    settled = prepare(detect_config(tmp_path, "objective.backbone=plain", "objective.train_ratio=0.25"))
    assert (settled.cfg.objective.train_ratio, settled.cfg.objective.eval_ratio) == (1.0, 1.0)
    assert any("objective.train_ratio 0.25 -> 1.0" in note for note in settled.notes)


# ---- real fine-tunes -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("start", ["beit", "deit"])
def test_detection_fine_tunes_and_evaluates_from_a_beit_and_a_deit_checkpoint(tmp_path, start, request):
    checkpoint = request.getfixturevalue(f"{start}_file")
    family = BEIT_TINY if start == "beit" else VIT_TINY
    overrides = [f"init.checkpoint={checkpoint}", "objective.backbone=plain", "trainer.max_steps=2"]
    cfg = detect_config(tmp_path, *overrides, encoder=family)
    settled = prepare(cfg)
    CocoDataModule(cfg.dataset, cfg.batch_size, 0)  # builds the scenes on first use
    module = settled.build()
    state = torch.load(checkpoint, weights_only=True)["model"]
    encoder = module.encoder.state_dict()
    torch.testing.assert_close(encoder["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    if start == "beit":  # the shared table resized once to the 24 x 24 canvas grid (96 px / 4)
        assert encoder[SHARED_TABLE].shape == ((2 * 24 - 1) ** 2 + 3, 3)
        groups = {id(p): g for g in module.param_groups() for p in g["params"]}
        assert groups[id(module.encoder.rel_pos_bias.relative_position_bias_table)]["weight_decay"] == 0.0
    scale_of = {id(p): g["lr_scale"] for g in module.param_groups() for p in g["params"]}
    assert {scale_of[id(p)] for p in module.encoder.blocks.parameters()} == {0.5}  # encoder lr / m, the rest x m
    assert {scale_of[id(p)] for p in module.detector.backbone.pyramid.parameters()} == {2.0}

    result = run(cfg)
    assert result.global_step == 2
    for key in ("box/ap", "box/ap50", "mask/ap"):
        assert 0.0 <= result.metrics[f"val/{key}"] <= 1.0 or result.metrics[f"val/{key}"] == -1.0, key
    assert {"train/loss_classifier", "train/loss_mask", "train/loss_objectness"} <= set(result.metrics)
    report = json.loads((result.run_dir / "init_report.json").read_text())
    assert report["kind"] == "official" and report["loaded"] and not report["unexpected"]
    assert report["random_by_design"] == ["simple feature pyramid", "RPN", "RoI heads"]
    assert report["plain_canvas"] == 96 and not report["decoder_loaded"]
    dropped = {"beit": {"lm_head.weight", "mask_token"}, "deit": {"dist_token", "head_dist.weight", "mask_token"}}
    assert dropped[start] <= set(report["dropped"])
