"""Pale Transformer: PS-Attention against a naive masked global attention, counts, timm and masking contracts."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch.utils.flop_counter import FlopCounterMode

import src.encoders.pale as pale
from src.encoders.pale import (
    PaleAttention,
    PaleTransformer,
    masked_global_attention,
    pale_column_attention,
    pale_row_attention,
    pale_rule_mask,
)

# embed 32, depths 1/1/2/1: every code path of the full model at a fraction of the cost
TINY = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), drop_path_rate=0.0)


def naive_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, pale_size: int, axis: str):
    """Global attention over all H*W real tokens, masked by the pale rule (G = ceil(n / s) groups)."""
    batch, height, width, chans = q.shape
    head_dim = chans // num_heads
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coord = (rows if axis == "row" else cols).flatten()
    groups = math.ceil((height if axis == "row" else width) / pale_size)
    allowed = coord[:, None] % groups == coord[None, :] % groups

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, height * width, num_heads, head_dim).transpose(1, 2)

    logits = heads(q) @ heads(k).transpose(-1, -2) * head_dim**-0.5
    attn = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (attn @ heads(v)).transpose(1, 2).reshape(batch, height, width, chans)


# (H, W, pale size): square and non-square divisible, padded on both axes (10 -> 3 groups of 4, 13 -> 4 of 4),
# map smaller than the pale (full attention), padded with 7 (25 -> 4 groups of 7, 11 -> 2 of 6)
SIZES = [(14, 14, 7), (14, 21, 7), (10, 13, 4), (3, 5, 7), (25, 11, 7)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize(("height", "width", "pale_size"), SIZES)
def test_branch_matches_naive_forward_and_backward(
    axis: str, height: int, width: int, pale_size: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    num_heads = 2
    qkv = [torch.randn(2, height, width, 8, dtype=dtype, requires_grad=True) for _ in range(3)]
    fast_fn = pale_row_attention if axis == "row" else pale_column_attention
    fast = fast_fn(*qkv, num_heads, pale_size)
    ref = naive_branch(*qkv, num_heads, pale_size, axis)
    torch.testing.assert_close(fast, ref)
    upstream = torch.randn_like(ref)
    grads_fast = torch.autograd.grad(fast, qkv, upstream)
    grads_ref = torch.autograd.grad(ref, qkv, upstream)
    for got, want in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(got, want)


def test_attention_module_is_two_branches_then_projection() -> None:
    """Channel halves, half the heads each, on non-contiguous slices of q/k/v; padded on both axes."""
    torch.manual_seed(0)
    attn = PaleAttention(dim=16, num_heads=4, pale_size=3, qkv_norm="layernorm", qkv_bias=True).double()
    x = torch.randn(2, 8, 10, 16, dtype=torch.float64)
    xc = x.permute(0, 3, 1, 2)
    q, k, v = attn.q(xc), attn.k(xc), attn.v(xc)
    rows = naive_branch(q[..., :8], k[..., :8], v[..., :8], 2, 3, "row")
    cols = naive_branch(q[..., 8:], k[..., 8:], v[..., 8:], 2, 3, "column")
    torch.testing.assert_close(attn(x), attn.proj(torch.cat([rows, cols], dim=-1)))


def test_pale_groups_clamp_and_pad() -> None:
    assert pale.pale_groups(56, 7) == (8, 7)
    assert pale.pale_groups(7, 7) == (1, 7)  # stage 4 at 224: full attention
    assert pale.pale_groups(2, 7) == (1, 2)  # 2x2 stage 4 at 64 px: clamped, no padding to 7
    assert pale.pale_groups(25, 7) == (4, 7)  # 3 padded rows
    assert pale.pale_groups(15, 7) == (3, 5)  # same groups as padding to 21, without the padding


@pytest.mark.parametrize(
    ("name", "params_m", "gmacs"),
    [("pale_tiny_224", 21.8, 4.20), ("pale_small_224", 48.3, 8.98), ("pale_base_224", 85.4, 15.53)],
)
def test_param_and_mac_counts(name: str, params_m: float, gmacs: float) -> None:
    """Spec counts within 1%, MACs = FLOPs / 2 from FlopCounterMode (counts SDPA) on meta tensors."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
        x = torch.empty(1, 3, 224, 224)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert params / 1e6 == pytest.approx(params_m, rel=0.01)
    assert counter.get_total_flops() / 2e9 == pytest.approx(gmacs, rel=0.01)


def test_heads_must_be_even() -> None:
    with pytest.raises(ValueError, match="even head count"):
        PaleTransformer(embed_dim=32, depths=(1,), num_heads=(3,))


def test_unknown_qkv_norm_is_rejected() -> None:
    with pytest.raises(ValueError, match="qkv_norm"):
        PaleTransformer(**TINY, qkv_norm="groupnorm")


@pytest.mark.parametrize("qkv_norm", ["layernorm", "batchnorm"])
def test_create_forward_backward(qkv_norm: str) -> None:
    model = timm.create_model("pale_tiny_224", num_classes=10, qkv_norm=qkv_norm, **TINY)
    assert isinstance(model, PaleTransformer)
    assert isinstance(model.stages[0].blocks[0].attn.q.norm, pale.QKV_NORMS[qkv_norm])
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads.pop("mask_token") is None  # used only by forward_mask_token
    assert all(g is not None for g in grads.values())
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_drop_path_schedule_is_linear() -> None:
    model = timm.create_model("pale_tiny_224", **dict(TINY, drop_path_rate=0.3))
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])


def test_variant_default_drop_path() -> None:
    with torch.device("meta"):
        for name, rate in [("pale_tiny_224", 0.2), ("pale_small_224", 0.4), ("pale_base_224", 0.5)]:
            model = timm.create_model(name)
            assert model.stages[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(rate)


@pytest.mark.parametrize(("height", "width"), [(224, 224), (96, 160), (100, 132)])
def test_any_input_size(height: int, width: int) -> None:
    """Convs with padding k // 2 shrink maps to ceil(n / stride); attention pads what the pale does not divide."""
    model = timm.create_model("pale_tiny_224", num_classes=0, **TINY).eval()
    x = torch.randn(1, 3, height, width)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model(x)
    assert feats.shape == (1, math.ceil(height / 32), math.ceil(width / 32), 256)
    assert pooled.shape == (1, 256)  # num_classes=0: Identity head, pooled pre-logits
    assert torch.isfinite(feats).all()


def test_forward_features_head_and_intermediates() -> None:
    model = timm.create_model("pale_tiny_224", num_classes=5, **TINY).eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 3, 5, 256)  # NHWC, like timm's Swin
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(dim=(1, 2)))
        torch.testing.assert_close(model.forward_head(feats), model(x))
        final, inter = model.forward_intermediates(x)
        assert [t.shape for t in inter] == [
            (2, 32, 24, 40),
            (2, 64, 12, 20),
            (2, 128, 6, 10),
            (2, 256, 3, 5),
        ]  # NCHW at strides 4/8/16/32
        torch.testing.assert_close(final, feats)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        assert len(normed) == 1
        torch.testing.assert_close(normed[0], feats.permute(0, 3, 1, 2))
        nhwc = model.forward_intermediates(x, indices=[0, 2], output_fmt="NHWC", intermediates_only=True)
        assert [t.shape for t in nhwc] == [(2, 24, 40, 32), (2, 6, 10, 128)]
        _, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early[0], inter[1])


def test_features_only() -> None:
    model = timm.create_model("pale_tiny_224", features_only=True, out_indices=(1, 3), **TINY).eval()
    assert model.feature_info.channels() == [64, 256]
    assert model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [t.shape for t in feats] == [(1, 64, 8, 8), (1, 256, 2, 2)]


def test_reset_classifier() -> None:
    model = timm.create_model("pale_tiny_224", **TINY)
    assert model.get_classifier().out_features == 1000
    model.reset_classifier(0)
    assert isinstance(model.head, torch.nn.Identity)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    model.reset_classifier(7, global_pool="avg")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(7, global_pool="max")


def test_no_weight_decay_group_matcher_and_layer_decay() -> None:
    model = timm.create_model("pale_tiny_224", **TINY)
    assert "mask_token" in model.no_weight_decay()
    # stem + mask token, then 4 stages or 5 blocks (a downsample joins its stage's first block), then the rest
    for coarse, num_groups in [(True, 1 + 4 + 1), (False, 1 + 5 + 1)]:
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=coarse))
        assert len(groups) == num_groups
        assert sum(len(names) for names in groups.values()) == len(list(model.parameters()))
        assert "mask_token" in groups[min(groups)]  # mask token decays like the stem
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = {group["lr_scale"] for group in optimizer.param_groups}
    assert len(scales) == 1 + 5 + 1  # stem, one per block, head: block-wise decay
    no_decay = [g for g in optimizer.param_groups if any(p is model.mask_token for p in g["params"])]
    assert no_decay[0]["weight_decay"] == 0.0


def test_grad_checkpointing_same_output_and_grads() -> None:
    torch.manual_seed(0)
    model = timm.create_model("pale_tiny_224", num_classes=3, **TINY)
    x = torch.randn(2, 3, 64, 96)
    model.mask_token.requires_grad_(False)  # used only by forward_mask_token
    model(x).square().sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    ref_out = model(x)
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref_out)
    for p, ref in zip([p for p in model.parameters() if p.requires_grad], ref_grads, strict=True):
        torch.testing.assert_close(p.grad, ref)


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    """fullgraph=True: no graph breaks; aot_eager traces forward and backward without C++ codegen time."""
    torch.manual_seed(0)
    model = timm.create_model("pale_tiny_224", num_classes=3, **TINY)
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()


def test_grid_size_and_interface() -> None:
    model = timm.create_model("pale_tiny_224", **TINY)
    assert (model.patch_size, model.num_features, model.num_prefix_tokens) == (32, 256, 0)
    assert not model.supports_token_drop
    assert model.grid_size(224) == (7, 7)
    assert model.grid_size((96, 160)) == (3, 5)
    with pytest.raises(NotImplementedError):
        model.forward_visible(torch.randn(1, 3, 64, 64), torch.zeros(1, 2, dtype=torch.long))


def test_forward_pooled() -> None:
    model = timm.create_model("pale_tiny_224", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_pooled(x), model.forward_features(x).mean(dim=(1, 2)))


@pytest.mark.parametrize(("height", "width", "cell"), [(64, 96, 4), (64, 96, 16), (64, 96, 32), (100, 132, 4)])
def test_mask_token_path(height: int, width: int, cell: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("pale_tiny_224", **TINY).eval()
    x = torch.randn(2, 3, height, width)
    mask = torch.zeros(2, height // cell, width // cell, dtype=torch.bool)
    with torch.no_grad():
        unmasked = model.forward_mask_token(x, mask)
        torch.testing.assert_close(unmasked, model.forward_features(x).flatten(1, 2))  # row-major (B, L, D)
        assert unmasked.shape == (2, math.ceil(height / 32) * math.ceil(width / 32), 256)
        mask[0, 0, 0] = True
        partly = model.forward_mask_token(x, mask)
        assert not torch.allclose(partly[0], unmasked[0])  # a masked patch changes the output
        torch.testing.assert_close(partly[1], unmasked[1])  # per sample: the other image is untouched
        full = torch.ones_like(mask)
        a = model.forward_mask_token(x, full)
        b = model.forward_mask_token(torch.randn_like(x), full)
        torch.testing.assert_close(a, b)  # nothing of the image survives a full mask


def test_mask_token_gets_gradient() -> None:
    model = timm.create_model("pale_tiny_224", **TINY)
    mask = torch.rand(2, 4, 4) < 0.5
    model.forward_mask_token(torch.randn(2, 3, 64, 64), mask).sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.mask_token.std() < 0.1  # trunc-normal(0.02) init


def test_mask_errors() -> None:
    model = timm.create_model("pale_tiny_224", **TINY)
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="bool"):
        model.forward_mask_token(x, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="bool"):
        model.forward_mask_token(x, torch.zeros(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="tile"):
        model.forward_mask_token(x, torch.zeros(2, 5, 5, dtype=torch.bool))  # does not divide 64
    with pytest.raises(ValueError, match="tile"):
        model.forward_mask_token(x, torch.zeros(2, 32, 32, dtype=torch.bool))  # 2 px cells < 4 px stem


def test_reference_form_computes_the_same_attention() -> None:
    """The reference form (the pale rule as a mask over global attention; the benchmark's baseline) equals the
    parallel PS-Attention, padded sizes included."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 12, 8, dtype=torch.float64) for _ in range(3))
    for axis, fast in [("row", pale_row_attention), ("column", pale_column_attention)]:
        mask = pale_rule_mask(9, 12, 4, axis, torch.device("cpu"))
        torch.testing.assert_close(masked_global_attention(q, k, v, 2, mask), fast(q, k, v, 2, 4))
