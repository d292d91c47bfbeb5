"""Our MIMDet backbone against the original code's own outputs (tests/fixtures/mimdet, README there).

The backbone is built as a fine-tune run builds it (``Detection.backbone_from_config`` on the settled config, the
MAE checkpoint read by the run's init path), at the fixture's sizes; the parts MIMDet starts at random (ConvStem,
fill-in projection, FPN) take the original's values, and the token noise is the original's. Then C2..C5 and P2..P6
must agree to float32 rounding: a relative 3e-6, which the original's own deviations (LayerNorm eps 1e-6: about
1e-5; the position tables resized in one step: about 4e-3) exceed.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import compose_config, scenes_run
from safetensors.torch import load_file

from src.detection.backbone import MIMDetBackbone, sample_tokens
from src.detection.released import detector_state
from src.methods.detect import Detection
from src.pipeline.fit import prepare

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mimdet"
TOLERANCE = 3e-6  # relative: max |ours - original| / max |original| per level
LEVELS = {"c2": "0", "c3": "1", "c4": "2", "c5": "3"}  # the FPN's inputs, by its names
PYRAMID = {"p2": "0", "p3": "1", "p4": "2", "p5": "3", "p6": "pool"}  # the FPN's outputs
RANDOM_BY_DESIGN = ("stem.", "decoder.fill_proj.", "fpn.")  # what the original starts at (seeded) random


def fixture_overrides(tmp_path: Path, *overrides: str) -> list[str]:
    """A detection run of the fixture's sizes from its MAE checkpoint (official layout), FPN without a norm."""
    return [
        *scenes_run(tmp_path),
        "logger=csv",
        "objective=detect",
        "encoder=vit_t",
        "encoder.kwargs.patch_size=16",
        "+encoder.kwargs.embed_dim=48",
        "+encoder.kwargs.depth=2",
        "+encoder.kwargs.num_heads=3",
        f"init.checkpoint={FIXTURE / 'mae_checkpoint.pth'}",
        "init.kind=official",
        "objective.decoder_depth=2",
        "objective.decoder_heads=4",
        "objective.fpn_channels=16",
        "objective.fpn_norm=",
        *overrides,
    ]


def official_backbone_state() -> dict[str, torch.Tensor]:
    """The original's backbone + FPN state dict after its own loading, in our names (under ``backbone.``)."""
    state, _, unplaced = detector_state(load_file(str(FIXTURE / "official_state_dict.safetensors")))
    assert not unplaced
    return {name.removeprefix("backbone."): value for name, value in state.items()}


def our_backbone(tmp_path: Path, *overrides: str) -> MIMDetBackbone:
    """Built through task=detect's path, then the original's random-by-design parts put in."""
    settled = prepare(compose_config(fixture_overrides(tmp_path, *overrides), config_name="finetune"))
    backbone, _ = Detection.backbone_from_config(settled.cfg, settled.init)
    random_parts = {k: v for k, v in official_backbone_state().items() if k.startswith(RANDOM_BY_DESIGN)}
    assert not backbone.load_state_dict(random_parts, strict=False).unexpected_keys
    return backbone.eval()


def relative_deviations(backbone: MIMDetBackbone, ratio: float) -> dict[str, float]:
    """max |ours - original| / max |original| of every level, fed the fixture's images and token noise."""
    inputs = torch.load(FIXTURE / "inputs.pt", weights_only=True)
    expected = torch.load(FIXTURE / f"outputs_ratio{ratio}.pt", weights_only=True)
    seen: OrderedDict[str, torch.Tensor] = OrderedDict()
    hook = backbone.fpn.register_forward_pre_hook(lambda module, args: seen.update(args[0]))
    noise = torch.Generator().manual_seed(inputs["noise_seed"])  # both images draw in turn: torch.rand(2, 80)
    with torch.no_grad():
        pyramid = backbone(inputs["images"], inputs["image_sizes"], ratio, [noise, noise])
    hook.remove()
    ours = {name: seen[key] for name, key in LEVELS.items()} | {name: pyramid[key] for name, key in PYRAMID.items()}
    return {name: float((ours[name] - ref).abs().max() / ref.abs().max()) for name, ref in expected.items()}


@pytest.fixture(scope="module")
def faithful(tmp_path_factory: pytest.TempPathFactory) -> MIMDetBackbone:
    return our_backbone(tmp_path_factory.mktemp("fixture"))


def test_the_loaded_state_is_the_originals(faithful):
    """Every tensor the original loaded from the MAE (the 50x50 tables resized from 14x14 included) is ours, bit
    for bit; what we have beyond it is the ViT's own patch embedding and tokens, which detection never runs."""
    official = official_backbone_state()
    ours = faithful.state_dict()
    assert ours["encoder_input.encoder.pos_embed"].shape == (1, 2501, 48)
    assert ours["decoder.decoder_pos_embed"].shape == (1, 2501, 32)
    for name, value in official.items():
        assert torch.equal(ours[name], value), name
    only_ours = {name.removeprefix("encoder_input.encoder.") for name in set(ours) - set(official)}
    assert only_ours == {"cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert {name.removeprefix("encoder.") for name in faithful.encoder_input.unused_parameters()} == only_ours


def test_the_token_sample_keeps_the_originals_tokens():
    inputs = torch.load(FIXTURE / "inputs.pt", weights_only=True)
    noise = torch.Generator().manual_seed(inputs["noise_seed"])
    kept = sample_tokens(~inputs["padding_mask"], 0.5, noise)
    assert torch.equal(kept, inputs["kept_sorted_ratio0.5"])


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_c2_to_p6_match_the_original_code(faithful, ratio):
    deviations = relative_deviations(faithful, ratio)
    assert set(deviations) == set(LEVELS) | set(PYRAMID)
    assert max(deviations.values()) < TOLERANCE, deviations


@pytest.mark.parametrize(
    ("override", "at_least"),
    [("objective.layer_norm_eps=1e-6", TOLERANCE), ("objective.table_size=null", 1e-3)],
    ids=["timm's LayerNorm eps", "tables resized in one step"],
)
def test_the_tolerance_catches_each_deviation_the_original_does_not_have(tmp_path, override, at_least):
    deviations = relative_deviations(our_backbone(tmp_path, override), 0.5)
    assert deviations["c2"] == deviations["c3"] == 0.0  # the ConvStem is untouched by either
    assert max(deviations.values()) > at_least, deviations
