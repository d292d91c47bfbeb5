"""A released MIMDet detector (detectron2 names) in our detector: ``init.kind=mimdet`` and ``objective=detect_eval``.

The released files cannot be fetched here. ``tests/fixtures/mimdet/released_key_names.txt`` holds every entry of the
released ViT-B Mask R-CNN (name, shape, dtype): its names and shapes must fill a ViT-B detector built by the COCO
recipe exactly (on the meta device: nothing allocated). A state dict with the same names at a tiny size (the
fixture's widths, 2 blocks, Fashion-MNIST scenes' 10 classes) and random values is then loaded and evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, scenes_run

from src.config import ConfigError
from src.detection.released import BACKGROUND_SLOT, detector_state, our_name
from src.encoders.loading import InitCheckpoint, check_fit
from src.methods.detect import Detection
from src.pipeline.fit import prepare, run

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mimdet"
TINY_DEPTH = 2  # encoder and decoder blocks of the tiny variant
PARTS_OF_VIT_B = dict(ConvStem=14, ViT=147, decoder=55, FPN=48, RPN=8)
PARTS_OF_VIT_B |= {"box head": 26, "box predictor": 4, "mask head": 28}


def released_entries() -> dict[str, tuple[list[int], torch.dtype]]:
    """name -> (shape, dtype) of every entry of the released ViT-B detector."""
    entries = {}
    for line in (FIXTURE / "released_key_names.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, dtype, _ = line.split("\t")
            entries[name] = ([int(n) for n in shape.strip("[]").split(",") if n.strip()], getattr(torch, dtype))
    return entries


def tiny_config(tmp_path: Path, *overrides: str):
    return compose_config(tiny_overrides(tmp_path, *overrides), config_name="finetune")


def tiny_overrides(tmp_path: Path, *overrides: str) -> list[str]:
    """A MIMDet detector of the fixture's widths on Fashion-MNIST scenes (10 classes, masks), evaluated only."""
    return [
        *scenes_run(tmp_path),
        "logger=csv",
        "num_workers=0",
        "batch_size=2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "objective=detect_eval",
        "encoder=vit_t",
        "encoder.kwargs.patch_size=16",
        "+encoder.kwargs.embed_dim=48",
        f"+encoder.kwargs.depth={TINY_DEPTH}",
        "+encoder.kwargs.num_heads=3",
        "objective.decoder_heads=4",
        "objective.test_proposals=50",
        "objective.anchor_sizes=[8,16,32,64,128]",
        "init.kind=mimdet",
        *overrides,
    ]


def tiny_release(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The released names (blocks beyond ``TINY_DEPTH`` left out) at the tiny detector's sizes, random values.

    Shapes come from our tiny detector through the name mapping, less the background slots detectron2's
    predictors do not have; the full-size check below holds the mapping to the real shapes.
    """
    sizes = ["objective.decoder_depth=2", "objective.decoder_dim=32", "objective.fpn_channels=16"]
    cfg = tiny_config(tmp_path, *sizes, "objective.pretrain_img_size=224")
    ours = Detection.detector_from_config(cfg, InitCheckpoint())[0].state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, (_, dtype) in released_entries().items():
        parts = name.split(".")
        if any(p in ("blocks", "decoder_blocks") and int(parts[i + 1]) >= TINY_DEPTH for i, p in enumerate(parts)):
            continue
        ours_name = our_name(name)[0]
        if dtype == torch.int64:  # num_batches_tracked
            state[name] = torch.tensor(1000)
            continue
        shape = list(ours[ours_name].shape)
        shape[0] -= next((rows for prefix, rows in BACKGROUND_SLOT.items() if ours_name.startswith(prefix)), 0)
        if name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = 0.05 * torch.randn(shape, generator=generator)
    return state


def saved(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model": state, "iteration": 67499}, path)  # as detectron2's checkpointer writes it
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path]:
    folder = tmp_path_factory.mktemp("release")
    state = tiny_release(folder)
    return state, saved(state, folder / "mimdet_tiny.pth")


def test_every_entry_of_the_released_vit_b_detector_has_its_place_in_ours():
    """The recipe's ViT-B detector (meta device) takes the 330 released tensors by name, shape and dtype, and has
    nothing more than the background slots and the ViT parameters detection never runs."""
    entries = released_entries()
    assert len(entries) == 330
    state = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in entries.items()}
    cfg = compose_config(
        ["recipe=mimdet_vit_b_coco_3x", "dataset.root=/coco", "objective.pretrain_img_size=224"], config_name="finetune"
    )
    detector, _ = Detection.detector_from_config(cfg, InitCheckpoint(), device="meta")
    mapped, parts, unplaced = detector_state(state)
    assert unplaced == [] and parts == PARTS_OF_VIT_B
    unused = {f"backbone.encoder_input.{name}" for name in detector.backbone.encoder_input.unused_parameters()}
    check_fit({k: v for k, v in detector.state_dict().items() if k not in unused}, mapped, "the released ViT-B")
    assert {name.split(".")[-1] for name in unused} == {"cls_token", "mask_token", "weight", "bias"}
    slots = 1024 * 4 + 4 + 256 * 1 + 1  # bbox_pred's 4 background rows (weight, bias), the mask logits' one
    assert sum(v.numel() for v in mapped.values()) == sum(v.numel() for v in state.values()) + slots
    # what trains: the original's 124,753,488 (its key list's header), of which backbone + FPN 105,306,720
    assert sum(p.numel() for p in detector.parameters() if p.requires_grad) == 124_753_488 + slots
    assert sum(p.numel() for p in detector.backbone.parameters() if p.requires_grad) == 105_306_720


def test_a_released_detector_loads_whole_and_its_classes_land_in_torchvision_order(release, tmp_path, capsys):
    state, path = release
    settled = prepare(tiny_config(tmp_path, f"init.checkpoint={path}"))
    t = settled.cfg.objective  # its sizes are read from the file
    assert (t.table_size, t.decoder_dim, t.decoder_depth, t.fpn_channels, t.fpn_norm) == (800, 32, 2, 16, "syncbn")
    detector, report = Detection.detector_from_config(settled.cfg, settled.init)
    assert len(report.loaded) == len(state) and sum(report.parts.values()) == len(state)
    assert report.not_in_checkpoint == ["cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    ours = detector.state_dict()
    assert torch.equal(ours["backbone.encoder_input.encoder.pos_embed"], state["backbone.bottom_up.encoder.pos_embed"])
    assert torch.equal(
        ours["backbone.stem.proj.weight"], state["backbone.bottom_up.encoder.patch_embed.proj.3.3.weight"]
    )
    assert torch.equal(
        ours["backbone.fpn.layer_blocks.3.1.running_var"], state["backbone.fpn_output5.norm.running_var"]
    )
    assert torch.equal(ours["roi_heads.box_head.5.weight"], state["roi_heads.box_head.fc1.weight"])

    # class k of detectron2 (row k; background last) is label k + 1 here: the same probabilities, boxes and masks
    features = torch.randn(5, 1024)
    d2 = {key: state[f"roi_heads.box_predictor.{key}"] for key in ("cls_score.weight", "cls_score.bias")}
    d2_probs = (features @ d2["cls_score.weight"].T + d2["cls_score.bias"]).softmax(-1)
    detector.eval()
    with torch.no_grad():
        scores, deltas = detector.roi_heads.box_predictor(features)
    torch.testing.assert_close(scores.softmax(-1)[:, 1:], d2_probs[:, :-1])
    torch.testing.assert_close(scores.softmax(-1)[:, 0], d2_probs[:, -1])
    d2_deltas = (
        features @ state["roi_heads.box_predictor.bbox_pred.weight"].T + state["roi_heads.box_predictor.bbox_pred.bias"]
    )
    torch.testing.assert_close(deltas[:, 4:], d2_deltas)
    assert not deltas[:, :4].any()  # the background's box: never read
    logits = ours["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(logits[1:], state["roi_heads.mask_head.predictor.weight"]) and not logits[0].any()

    report.publish(tmp_path)
    said = capsys.readouterr().out
    assert f"loaded {len(state)} tensors, every one of the file, nothing left over: ConvStem 14" in said
    assert "background row moved first" in said


def test_detect_eval_evaluates_a_released_detector_and_trains_nothing(release, tmp_path, capsys):
    _, path = release
    result = run(tiny_config(tmp_path, f"init.checkpoint={path}"))
    assert result.global_step == 0 and result.checkpoint is None
    assert not (result.run_dir / "checkpoints").exists()
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert {"val/box/ap", "val/mask/ap"} <= set(metrics) and all(-1 <= metrics[k] <= 1 for k in metrics if "/ap" in k)
    report = json.loads((result.run_dir / "init_report.json").read_text())
    assert report["kind"] == "mimdet" and report["parts"]["ViT"] == 2 + 12 * TINY_DEPTH + 1
    assert "init: released MIMDet detector" in capsys.readouterr().out


def test_a_file_that_is_no_mimdet_detector_is_refused_before_work(tmp_path):
    mae = FIXTURE / "mae_checkpoint.pth"
    with pytest.raises(ConfigError, match=r"init.kind=mimdet but init.checkpoint=.*mae_checkpoint.pth is no MIMDet"):
        prepare(tiny_config(tmp_path, f"init.checkpoint={mae}"))


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (
            lambda state: state.update({"roi_heads.box_head.fc1.weight": torch.zeros(1024, 10)}),
            r"\(init.kind=mimdet\) does not fit this detector: roi_heads.box_head.5.weight has shape \(1024, 10\)",
        ),
        (
            lambda state: state.update({"roi_heads.box_head.fc2.weight": torch.zeros(1024, 1024)}),
            r"does not fit this detector: no place here for 1 \(roi_heads.box_head.fc2.weight\)",
        ),
        (
            lambda state: state.pop("backbone.bottom_up.encoder.norm.weight"),
            r"does not fit this detector: missing 1 \(backbone.encoder_input.encoder.norm.weight\)",
        ),
    ],
    ids=["shape", "unknown entry", "missing entry"],
)
def test_what_does_not_fit_is_refused_in_one_line_naming_the_key(release, tmp_path, change, refusal):
    state = dict(release[0])
    change(state)
    path = saved(state, tmp_path / "changed.pth")
    settled = prepare(tiny_config(tmp_path, f"init.checkpoint={path}"))
    with pytest.raises(ConfigError, match=refusal) as refused:
        settled.build()
    assert "\n" not in str(refused.value)


def test_other_data_another_start_or_another_method_are_refused(release, tmp_path):
    path = release[1]
    with pytest.raises(ConfigError, match="trained with dataset.num_classes=10, but dataset.num_classes=5"):
        prepare(tiny_config(tmp_path, f"init.checkpoint={path}", "dataset.num_classes=5"))
    mae = [f"init.checkpoint={FIXTURE / 'mae_checkpoint.pth'}", "init.kind=official", "objective.decoder_depth=2"]
    with pytest.raises(ConfigError, match="objective=detect_eval evaluates a trained detector, but init.kind=official"):
        prepare(tiny_config(tmp_path, *mae))
    classify = compose_config(["encoder=vit_t", f"init.checkpoint={path}", "init.kind=mimdet"], config_name="finetune")
    with pytest.raises(ConfigError, match="init.kind=mimdet is a whole detector"):
        prepare(classify).build()
