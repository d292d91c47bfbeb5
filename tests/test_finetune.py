"""The fine-tune stage: layer-wise lr decay, LARS, checkpoint loading reports, and each task end to end.

A real MAE pretraining run (tiny, Fashion-MNIST) makes the Lightning checkpoint, the export and the
official-layout file every loading test starts from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_export_reproduces, compose_config
from omegaconf import OmegaConf
from safetensors.torch import load_file

import src.encoders.pale  # noqa: F401  (registers pale_* with timm)
from src.config import ConfigError, validate
from src.encoders import create_encoder
from src.encoders.loading import InitCheckpoint, InitReport, load_encoder_weights
from src.methods.base import all_pretraining_keys
from src.methods.classify import FineTuneClassifier
from src.methods.optim import LARS, layer_decay_groups
from src.pipeline.fit import run

DECAY = 0.5
FAST = ["dataset.train_limit=32", "dataset.knn_bank=64", "dataset.knn_queries=32", "epochs=1", "warmup_epochs=0"]
PALE_SMALL = ["+encoder.kwargs.embed_dim=16", "+encoder.kwargs.depths=[1,1,2,1]", "+encoder.kwargs.num_heads=[2,2,2,2]"]
MAE_LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"]


def scales_by_name(model: torch.nn.Module, layer_decay: float = DECAY) -> dict[str, float]:
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=layer_decay)
    by_id = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def init_from(path: Path) -> InitCheckpoint:
    """The init checkpoint a run with ``init.checkpoint=path`` (and the other ``init`` keys' defaults) reads."""
    return InitCheckpoint.read(OmegaConf.create({"checkpoint": str(path)}))


def load_file_into(model: torch.nn.Module, path: Path, cfg) -> InitReport:
    """The fine-tune stage's loading of ``path`` (any kind), official checkpoints' method keys dropped."""
    return load_encoder_weights(model, init_from(path), cfg.encoder, all_pretraining_keys())


def finetune_config(tmp_path: Path, *overrides: str):
    return compose_config([*TINY, *FAST, f"runs_dir={tmp_path}", *overrides], config_name="finetune")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    """A real (tiny) MAE pretraining run: checkpoint, encoder export and the official-layout file."""
    runs = tmp_path_factory.mktemp("mae")
    cfg = compose_config([*TINY, *FAST, *MAE_LIGHT, f"runs_dir={runs}", "run_name=mae", "knn=null"])
    result = run(cfg)
    assert result.checkpoint.is_file() and result.exports["encoder"].is_file()
    return result.run_dir


def checkpoint_encoder(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


# ---- layer-wise lr decay --------------------------------------------------------------------------
@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_layer_decay_follows_the_mae_formula_on_vit(global_pool):
    cfg = compose_config(TINY)  # depth 2
    model = create_encoder(cfg.encoder, 32, num_classes=10, global_pool=global_pool)
    depth = len(model.blocks)
    scales = scales_by_name(model)
    for name, scale in scales.items():
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:  # fc_norm (avg) or the final norm (token), and the head: all at depth + 1, as in MAE
            assert name.startswith(("fc_norm.", "norm.", "head.")), name
            layer = depth + 1
        assert scale == pytest.approx(DECAY ** (depth + 1 - layer)), name
    assert scales["head.weight"] == 1.0 and scales["patch_embed.proj.weight"] == DECAY**3


def test_layer_decay_follows_the_mae_formula_on_pale():
    cfg = compose_config(["encoder=pale_t", *PALE_SMALL])
    model = create_encoder(cfg.encoder, 64, num_classes=10)
    depths = [len(stage.blocks) for stage in model.stages]
    first_block = [sum(depths[:s]) for s in range(len(depths))]  # global index of each stage's first block
    depth = sum(depths)
    scales = scales_by_name(model)
    for name, scale in scales.items():
        parts = name.split(".")
        if name.startswith(("stem", "mask_token")):
            layer = 0
        elif name.startswith("stages.") and parts[2] == "blocks":
            layer = first_block[int(parts[1])] + int(parts[3]) + 1
        elif name.startswith("stages.") and parts[2] == "downsample":  # with the first block of its stage
            layer = first_block[int(parts[1])] + 1
        else:
            assert name.startswith(("norm.", "head.")), name
            layer = depth + 1
        assert scale == pytest.approx(DECAY ** (depth + 1 - layer)), name
    assert len({round(s, 12) for s in scales.values()}) == depth + 2


def test_layer_decay_groups_exempt_biases_norms_and_tokens_and_lead_with_the_peak_lr():
    cfg = compose_config(TINY)
    model = create_encoder(cfg.encoder, 32, num_classes=10, global_pool="avg")
    groups = layer_decay_groups(model, 0.05, 0.75, skip=model.no_weight_decay())
    assert groups[0]["lr_scale"] == 1.0
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        exempt = p.ndim <= 1 or name in ("cls_token", "pos_embed", "mask_token")
        assert (id(p) in decayed) != exempt, name


def test_lars_scales_matrix_updates_by_the_trust_ratio_and_leaves_vectors_plain():
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    lr, wd, eta = 0.5, 0.1, 0.001
    LARS([{"params": [weight, bias], "weight_decay": wd}], lr=lr, trust_coefficient=eta).step()
    update = weight.grad + wd * w0
    expected = w0 - lr * eta * w0.norm() / update.norm() * update
    torch.testing.assert_close(weight.detach(), expected)
    torch.testing.assert_close(bias.detach(), b0 - lr * bias.grad)


# ---- loading checkpoints --------------------------------------------------------------------------
@pytest.mark.slow
def test_lightning_checkpoint_loads_with_a_full_report_and_norm_moved_to_fc_norm(mae_run):
    cfg = compose_config(TINY)
    model = create_encoder(cfg.encoder, 32, num_classes=10, global_pool="avg")
    init = OmegaConf.create({"checkpoint": str(mae_run / "checkpoints" / "last.ckpt")})
    report = load_encoder_weights(model, InitCheckpoint.read(init), cfg.encoder)
    saved = checkpoint_encoder(mae_run)
    assert report.kind == "lightning"
    assert report.missing == ["head.bias", "head.weight"]
    assert report.unexpected == [] and report.mismatched == []
    assert report.remapped == {"norm.weight": "fc_norm.weight", "norm.bias": "fc_norm.bias"}
    assert any(k.startswith("decoder_blocks.") for k in report.dropped) and "skipped_total" in report.dropped
    assert "mask_token" in report.dropped  # pretraining-only: a classifier never takes it
    expected = (set(saved) - {"norm.weight", "norm.bias", "mask_token"}) | {"fc_norm.weight", "fc_norm.bias"}
    assert set(report.loaded) == expected
    own = model.state_dict()
    torch.testing.assert_close(own["blocks.1.mlp.fc2.weight"], saved["blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(own["fc_norm.weight"], saved["norm.weight"])

    init.norm_to_fc_norm = False  # the MAE code's way: fc_norm starts fresh, the pretrained norm is unused
    fresh = create_encoder(cfg.encoder, 32, num_classes=10, global_pool="avg")
    report = load_encoder_weights(fresh, InitCheckpoint.read(init), cfg.encoder)
    assert {"norm.weight", "norm.bias"} <= set(report.dropped) and not report.remapped
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert torch.equal(fresh.fc_norm.weight, torch.ones(192))


@pytest.mark.slow
def test_export_file_loads_every_tensor_into_a_bare_encoder(mae_run):
    cfg = compose_config(TINY)
    model = create_encoder(cfg.encoder, 32)
    path = mae_run / "export" / "encoder.safetensors"
    report = load_encoder_weights(model, init_from(path), cfg.encoder, all_pretraining_keys())
    exported = load_file(str(path))
    assert report.kind == "export" and report.missing == [] and report.dropped == []
    assert sorted(report.loaded) == sorted(exported)
    torch.testing.assert_close(model.state_dict()["patch_embed.proj.weight"], exported["patch_embed.proj.weight"])


@pytest.mark.slow
def test_official_mae_layout_drops_the_decoder(mae_run):
    cfg = compose_config(TINY)
    model = create_encoder(cfg.encoder, 32)
    path = mae_run / "export" / "mae_full_official.pth"
    official = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert "decoder_pred.weight" in official and "mask_token" in official  # the official names, decoder included
    report = load_encoder_weights(model, init_from(path), cfg.encoder, all_pretraining_keys())
    assert report.kind == "official" and report.missing == [] and report.unexpected == []
    assert set(report.dropped) == {k for k in official if k.startswith(("decoder_", "mask_token"))}
    torch.testing.assert_close(model.state_dict()["norm.weight"], official["norm.weight"])


@pytest.mark.slow
def test_official_deit_layout_drops_the_distillation_token_and_its_position(tmp_path, mae_run):
    cfg = compose_config(TINY)
    state = dict(load_file(str(mae_run / "export" / "encoder.safetensors")))
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat([pos[:, :1], torch.randn(1, 1, pos.shape[-1]), pos[:, 1:]], dim=1)
    state |= {"dist_token": torch.randn(1, 1, pos.shape[-1]), "head.weight": torch.randn(7, pos.shape[-1])}
    state |= {"head_dist.weight": torch.randn(7, pos.shape[-1]), "head_dist.bias": torch.randn(7)}
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)
    model = create_encoder(cfg.encoder, 32, num_classes=10)
    report = load_encoder_weights(model, init_from(path), cfg.encoder, all_pretraining_keys())
    assert {"dist_token", "head.weight", "head_dist.weight", "head_dist.bias"} <= set(report.dropped)
    torch.testing.assert_close(model.pos_embed.detach(), pos)
    assert report.missing == ["head.bias", "head.weight"] and any("distillation" in n for n in report.notes)


@pytest.mark.slow
def test_position_embeddings_are_resampled_to_a_new_grid_and_reported(mae_run):
    cfg = compose_config(TINY)
    model = create_encoder(cfg.encoder, 48)  # 12 x 12 patches, pretrained on 8 x 8
    path = mae_run / "export" / "encoder.safetensors"
    report = load_encoder_weights(model, init_from(path), cfg.encoder, all_pretraining_keys())
    assert "pos_embed" in report.loaded and any("8x8 to a 12x12" in n for n in report.notes)
    torch.testing.assert_close(model.pos_embed[:, :1], load_file(str(path))["pos_embed"][:, :1])  # cls row kept


@pytest.mark.slow
def test_a_mismatched_checkpoint_is_refused_naming_the_key_unless_not_strict(mae_run):
    cfg = compose_config([*TINY, "encoder.kwargs.depth=1"])  # the checkpoint has 2 blocks
    model = create_encoder(cfg.encoder, 32)
    init = OmegaConf.create({"checkpoint": str(mae_run / "checkpoints" / "last.ckpt")})
    with pytest.raises(ConfigError, match=r"blocks\.1\.") as refused:
        load_encoder_weights(model, InitCheckpoint.read(init), cfg.encoder)
    assert "init.strict=false" in str(refused.value)
    init.strict = False
    report = load_encoder_weights(model, InitCheckpoint.read(init), cfg.encoder)
    assert report.unexpected and all(k.startswith("blocks.1.") for k in report.unexpected)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, checkpoint_encoder(mae_run)["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_another_recorded_arch_or_shape_is_refused(mae_run):
    cfg = compose_config([*TINY, "encoder=vit_s", "encoder.kwargs.patch_size=4"])
    model = create_encoder(cfg.encoder, 32)
    init = OmegaConf.create({"checkpoint": str(mae_run / "checkpoints" / "last.ckpt")})
    with pytest.raises(ConfigError, match=r"encoder.arch=mim_vit_tiny_patch16.*patch_embed\.proj\.weight has shape"):
        load_encoder_weights(model, InitCheckpoint.read(init), cfg.encoder)
    with pytest.raises(ConfigError, match="init.kind=export"):
        InitCheckpoint.read(OmegaConf.create({**init, "kind": "export"}))


def test_bad_task_values_fail_before_training_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="batch_size=15"):
        FineTuneClassifier.check_config(finetune_config(tmp_path, "batch_size=15"))
    with pytest.raises(ConfigError, match=r"objective.layer_decay=1.5 must be in \(0, 1\]"):  # the schema's range
        validate(finetune_config(tmp_path, "objective.layer_decay=1.5"))
    pale = ["encoder=pale_t", *PALE_SMALL, "objective=linear", "dataset.img_size=32", "logger=csv", "num_workers=0"]
    with pytest.raises(ConfigError, match="objective.pool=cls"):
        run(compose_config([*pale, f"runs_dir={tmp_path}"], config_name="finetune"))


# ---- each task end to end on Fashion-MNIST ---------------------------------------------------------
@pytest.mark.slow
def test_classify_fine_tunes_every_weight_with_layer_decayed_lrs(tmp_path, mae_run):
    ckpt = mae_run / "checkpoints" / "last.ckpt"
    result = run(finetune_config(tmp_path, "objective=classify", f"init.checkpoint={ckpt}", "batch_size=16"))
    assert 0.0 <= result.metrics["val/top1"] <= result.metrics["val/top5"] <= 1.0
    report = json.loads((result.run_dir / "init_report.json").read_text())
    assert report["kind"] == "lightning" and report["missing"] == ["head.bias", "head.weight"]
    assert list((result.run_dir / "pictures").glob("confusion_step*.png"))
    assert {f"val_class/acc_{i}" for i in range(10)} <= set(json.loads((result.run_dir / "metrics.json").read_text()))

    saved = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    blocks_before = checkpoint_encoder(mae_run)["blocks.0.attn.qkv.weight"]
    assert not torch.equal(saved["state_dict"]["encoder.blocks.0.attn.qkv.weight"], blocks_before)  # all trained
    groups = saved["optimizer_states"][0]["param_groups"]
    peak = max(g["initial_lr"] for g in groups)
    depth = 2
    for g in groups:  # every group's lr is the peak lr times its layer's decay
        assert g["initial_lr"] == pytest.approx(peak * 0.75 ** (depth + 1 - g["layer"]))
    exported = load_file(str(result.exports["classifier"]))
    assert exported["head.weight"].shape == (10, 192) and "fc_norm.weight" in exported


@pytest.mark.slow
def test_linear_probe_trains_only_the_probe_on_frozen_features(tmp_path, mae_run):
    export = mae_run / "export" / "encoder.safetensors"
    overrides = ["objective=linear", "objective.pool=avg", f"init.checkpoint={export}", "objective.optim.name=lars"]
    result = run(finetune_config(tmp_path, *overrides))
    assert 0.0 <= result.metrics["val/top1"] <= 1.0
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    pretrained = load_file(str(export))
    for key, value in pretrained.items():  # the encoder did not move
        torch.testing.assert_close(state[f"encoder.{key}"], value)
    assert state["probe.0.running_mean"].abs().sum() > 0  # BatchNorm saw the features
    assert_export_reproduces(result.run_dir, result.exports, tmp_path / "again")
    assert "probe.0.weight" not in state  # affine=False


@pytest.mark.slow
def test_knn_task_reports_the_protocol_on_the_encoder_and_on_pixels(tmp_path, mae_run):
    ckpt = mae_run / "checkpoints" / "last.ckpt"
    result = run(finetune_config(tmp_path, "objective=knn", f"init.checkpoint={ckpt}"))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["knn/bank_size"] == 64 and metrics["knn/query_size"] == 32
    for key in ("knn/top1", "knn/pixels_top1"):
        assert 0.0 <= metrics[key] <= metrics[key.replace("top1", "top5")] <= 1.0
    assert metrics["knn/pixels_top1"] > 0.3  # 10 classes: raw pixels are far above chance on Fashion-MNIST
    assert_export_reproduces(result.run_dir, result.exports, tmp_path / "again")  # the encoder it evaluated


@pytest.mark.slow
def test_fine_tuning_rebuilds_the_encoder_the_checkpoint_records(tmp_path, mae_run, caplog):
    """No encoder overrides needed: the run rebuilds the checkpoint's 2-block, 4 px-patch ViT-Tiny and says so."""
    caplog.set_level(logging.INFO, logger="src.pipeline.fit")
    ckpt = mae_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        ["dataset.img_size=32", *FAST, "batch_size=16", "num_workers=0", "logger=csv", f"runs_dir={tmp_path}"]
        + ["objective=knn", f"init.checkpoint={ckpt}", "objective.pixels=false"],
        config_name="finetune",
    )
    assert cfg.encoder.name == "vit_b"  # the front door's default, which the checkpoint does not match
    result = run(cfg)
    assert "settled by KNNEvaluation.settle_config: encoder.arch 'mim_vit_base_patch16' -> 'mim_vit_tiny" in caplog.text
    saved = OmegaConf.load(result.run_dir / "config.yaml")
    assert saved.encoder.arch == "mim_vit_tiny_patch16" and saved.encoder.kwargs.depth == 2
    report = json.loads((result.run_dir / "init_report.json").read_text())
    assert report["unexpected"] == [] and report["missing"] == []
    cfg.init.encoder_from_checkpoint = False
    cfg.encoder = compose_config([], config_name="finetune").encoder
    with pytest.raises(ConfigError, match="encoder.arch=mim_vit_tiny_patch16 but encoder.arch=mim_vit_base_patch16"):
        run(cfg)
