"""Every registered encoder honours the same contract (in the manner of timm's tests/test_models.py).

Masked-input interface (forward_visible, forward_mask_token, forward_pooled; encode_tokens and its
parameters for the flat token encoders), timm's model contract
(features_only, forward_intermediates, group_matcher, no_weight_decay, gradient checkpointing), and the
export: encoder weights without the mask token that timm loads strictly, into timm's own counterpart model
where one exists and into our registered arch through timm's pretrained-file path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import group_parameters, model_entrypoint

import src.encoders  # noqa: F401  (registers every family with timm)
from src.encoders.base import MaskedEncoder
from src.encoders.pos_embed import interpolate_pos_embed
from src.methods.base import encoder_export_state

# every arch the toolkit registers with timm (whatever its name), none of timm's own
ENCODERS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("src.encoders."))
SMALL_TOKENS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
SMALL_PALE = dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), drop_path_rate=0.0)
# timm's own model with the same weights layout, for a strict load of our export
TIMM_TWIN = {
    "vit": ("vit_base_patch16_224", {}),
    "vit_distilled": ("deit_base_distilled_patch16_224", {}),
    "beit": (
        "beit_base_patch16_224",
        dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool=""),
    ),
}


def family(name: str) -> str:
    if name.startswith("pale_"):
        return "pale"
    kind = "beit" if name.startswith("mim_beit") else "vit"
    return f"{kind}_distilled" if name.endswith("_distilled") else kind


def small_kwargs(name: str) -> dict:
    return dict(SMALL_PALE) if family(name) == "pale" else dict(SMALL_TOKENS)


def build(name: str, **kwargs) -> MaskedEncoder:
    torch.manual_seed(0)
    return timm.create_model(name, **{"num_classes": 0, **small_kwargs(name), **kwargs})


def test_every_family_is_registered() -> None:
    assert {family(n) for n in ENCODERS} == {"vit", "vit_distilled", "beit", "pale"}
    assert len(ENCODERS) == 5 + 5 + 3 + 3


def test_the_contract_is_enforced() -> None:
    class Incomplete(MaskedEncoder):
        patch_size, num_features = 16, 8

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


@pytest.mark.parametrize("name", ENCODERS)
def test_masked_input_interface(name: str) -> None:
    model = build(name).eval()
    size = small_kwargs(name)["img_size"]
    x = torch.randn(2, 3, size, size)
    rows, cols = model.grid_size(size)
    tokens = model.num_prefix_tokens + rows * cols
    with torch.no_grad():
        assert model.forward_pooled(x).shape == (2, model.num_features)
        mask_grid = (rows, cols) if family(name) != "pale" else (size // 16, size // 16)
        nothing = torch.zeros(2, *mask_grid, dtype=torch.bool)
        unmasked = model.forward_mask_token(x, nothing)
        assert unmasked.shape == (2, tokens, model.num_features)
        masked = model.forward_mask_token(x, ~nothing)
        assert not torch.allclose(masked, unmasked)  # the mask token replaced the patches
        assert torch.allclose(model.forward_mask_token(torch.randn_like(x), ~nothing), masked)  # nothing of x left
        if model.supports_token_drop:
            keep = torch.tensor([[0, 3], [5, 1]])
            assert model.forward_visible(x, keep).shape == (2, model.num_prefix_tokens + 2, model.num_features)
        else:
            with pytest.raises(NotImplementedError):
                model.forward_visible(x, torch.zeros(2, 1, dtype=torch.long))


# one arch of each flat token family: the sizes share one code path
TOKEN_FAMILIES = sorted({family(name): name for name in ENCODERS if family(name) != "pale"}.values())


@pytest.mark.parametrize("name", [n for n in TOKEN_FAMILIES if family(n) != "beit"])
def test_encode_tokens_is_what_forward_visible_runs(name: str) -> None:
    """One encoding path: forward_visible is the patch embedding + encode_tokens, and another grid only resizes
    the position table (what detection's ConvStem tokens go through, without the prefix tokens)."""
    model = build(name).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 3, 9], [5, 1, 15]])
    with torch.no_grad():
        patches = model.patch_embed(x)
        assert torch.equal(model.encode_tokens(patches, model.patch_grid, keep), model.forward_visible(x, keep))
        assert torch.equal(model.encode_tokens(patches, model.patch_grid), model.forward_features(x))
        tokens = torch.randn(2, 6 * 10, model.num_features)
        bare = model.encode_tokens(tokens, (6, 10), prefix=False)
        assert bare.shape == (2, 60, model.num_features)
        table = interpolate_pos_embed(model.pos_embed[:, model.num_prefix_tokens :], model.patch_grid, (6, 10))
        torch.testing.assert_close(bare, model.norm(model.blocks(tokens + table)))


@pytest.mark.parametrize("name", TOKEN_FAMILIES)
@pytest.mark.parametrize("prefix", [True, False])
def test_token_parameters_are_exactly_what_encode_tokens_trains(name: str, prefix: bool) -> None:
    model = build(name, pos_embed_type="learn") if family(name).startswith("vit") else build(name)
    grid = model.patch_grid
    tokens = torch.randn(2, grid[0] * grid[1], model.num_features)
    if family(name) == "beit" and not prefix:
        with pytest.raises(ValueError, match="cls token"):
            model.encode_tokens(tokens, grid, prefix=False)
        with pytest.raises(ValueError, match="cls token"):
            model.token_parameters(prefix=False)
        return
    model.encode_tokens(tokens, grid, prefix=prefix).square().sum().backward()
    listed = {id(p) for p in model.token_parameters(prefix)}
    assert {id(p) for p in model.parameters() if p.grad is not None} == listed


def test_beit_refuses_what_its_relative_position_bias_cannot_place() -> None:
    model = build("mim_beit_tiny_patch16")
    tokens = torch.randn(1, 16, model.num_features)
    with pytest.raises(NotImplementedError, match="cannot drop tokens"):
        model.encode_tokens(tokens, model.patch_grid, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\(4, 4\) patch grid .* not a \(2, 8\) grid"):
        model.encode_tokens(tokens, (2, 8))


@pytest.mark.parametrize("name", ENCODERS)
def test_features_only_and_intermediates(name: str) -> None:
    size = small_kwargs(name)["img_size"]
    x = torch.randn(1, 3, size, size)
    indices = (0, 1, 2, 3) if family(name) == "pale" else (0, 1)
    features = timm.create_model(name, features_only=True, out_indices=indices, **small_kwargs(name))
    maps = features(x)
    assert len(maps) == len(indices) and [m.shape[1] for m in maps] == features.feature_info.channels()
    assert all(m.ndim == 4 for m in maps)  # NCHW maps: what detection necks take
    model = build(name)
    last = model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
    assert last.shape[:2] == (1, model.num_features)


@pytest.mark.parametrize("name", ENCODERS)
def test_group_matcher_and_no_weight_decay(name: str) -> None:
    model = build(name)
    groups = group_parameters(model, model.group_matcher(coarse=False))
    assert sum(len(names) for names in groups.values()) == len(list(model.parameters()))  # every parameter placed
    assert "mask_token" in model.no_weight_decay()


@pytest.mark.parametrize("name", ENCODERS)
def test_gradient_checkpointing_changes_nothing(name: str) -> None:
    model = build(name, num_classes=3)
    model.mask_token.requires_grad_(False)  # used only by forward_mask_token
    size = small_kwargs(name)["img_size"]
    x = torch.randn(2, 3, size, size)
    model.train()
    torch.manual_seed(1)
    model(x).square().sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    model(x).square().sum().backward()
    assert reference.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in reference:
            torch.testing.assert_close(p.grad, reference[n], msg=n)


@pytest.mark.parametrize("name", ENCODERS)
def test_export_loads_strictly_with_timm(name: str, tmp_path: Path) -> None:
    model = build(name).eval()
    state = encoder_export_state(model)
    assert "mask_token" not in state
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    size = small_kwargs(name)["img_size"]
    x = torch.randn(1, 3, size, size)

    # our registered arch, through timm's own (strict) pretrained-file path and the family's filter
    again = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0, **small_kwargs(name)
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(x), model.forward_features(x))
    if family(name) in TIMM_TWIN:  # and timm's own model of the family
        twin_name, layout = TIMM_TWIN[family(name)]
        twin = timm.create_model(twin_name, num_classes=0, **small_kwargs(name), **layout).eval()
        twin.load_state_dict(state, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(twin.forward_features(x), model.forward_features(x))
