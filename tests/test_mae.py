"""MAE pieces against independent computations: masking, sin-cos, patchify, norm_pix, loss, lr, official names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import src.encoders  # noqa: F401  (registers encoders)
from src.encoders.pos_embed import sincos_2d
from src.methods.mae import MAE, masked_mse, normalize_patches, patchify, unpatchify
from src.methods.masking import num_kept, random_masking
from src.methods.optim import scaled_lr, warmup_cosine, weight_decay_groups

OPTIM = {"base_lr": 1.5e-4, "reference_batch": 256, "betas": [0.9, 0.95], "weight_decay": 0.05}


def tiny_mae(**kwargs) -> MAE:
    encoder = timm.create_model("mim_vit_tiny_patch16", img_size=32, patch_size=4, depth=2, num_classes=0)
    defaults = dict(decoder_dim=64, decoder_depth=1, decoder_heads=4)
    return MAE(encoder, 32, OPTIM, batch_size=4, warmup_epochs=1, **{**defaults, **kwargs})


def test_masking_keeps_the_papers_count_and_restores_order():
    assert num_kept(196, 0.75) == 49
    m = random_masking(8, 196, 0.75)
    assert m.ids_keep.shape == (8, 49)
    assert torch.equal(m.mask.sum(1), torch.full((8,), 147.0))
    # the mask agrees with the kept ids: kept positions are 0, all others 1
    for b in range(8):
        expected = torch.ones(196)
        expected[m.ids_keep[b]] = 0
        assert torch.equal(m.mask[b], expected)
    # ids_restore undoes the shuffle: shuffled order gathered back with it is the identity
    ids_shuffle = torch.argsort(m.ids_restore, dim=1)
    restored = torch.gather(ids_shuffle, 1, m.ids_restore)
    assert torch.equal(restored, torch.arange(196).expand(8, -1))


def test_masking_with_given_noise_keeps_the_smallest():
    noise = torch.rand(3, 16)
    m = random_masking(3, 16, 0.75, noise=noise)
    expected = torch.topk(noise, 4, dim=1, largest=False).indices.sort(dim=1).values
    assert torch.equal(m.ids_keep.sort(dim=1).values, expected)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 4, 1.5)


def _official_sincos(dim: int, size: int) -> np.ndarray:
    """The official MAE recipe, written out independently with numpy (meshgrid(w, h), [sin|cos] per axis)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), axis=0)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_matches_the_official_layout():
    ours = sincos_2d(64, (7, 7), num_prefix_tokens=1).numpy()
    np.testing.assert_allclose(ours, _official_sincos(64, 7), atol=1e-6)
    # the first half encodes the column: tokens in the same column share it
    table = sincos_2d(32, (3, 5))
    assert torch.allclose(table[0, :16], table[5, :16]) and not torch.allclose(table[0, 16:], table[5, 16:])


def test_patchify_order_and_inverse():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch (row 1, col 2), pixel (r=3, c=1), channel 2 sits at index (3*4 + 1)*3 + 2
    assert patches[1, 1 * 3 + 2, (3 * 4 + 1) * 3 + 2] == images[1, 2, 4 + 3, 8 + 1]
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)


def test_norm_pix_uses_unbiased_variance():
    target = torch.randn(2, 5, 12)
    expected = (target - target.mean(-1, keepdim=True)) / torch.sqrt(
        ((target - target.mean(-1, keepdim=True)) ** 2).sum(-1, keepdim=True) / 11 + 1e-6
    )
    torch.testing.assert_close(normalize_patches(target), expected)


def test_loss_only_on_removed_patches_matches_an_explicit_loop():
    pred, target = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.float)
    total, count = 0.0, 0
    for b in range(2):
        for i in range(6):
            if mask[b, i]:
                total += sum((pred[b, i, j] - target[b, i, j]).item() ** 2 for j in range(5)) / 5
                count += 1
    assert masked_mse(pred, target, mask).item() == pytest.approx(total / count, rel=1e-5)


def test_module_loss_is_the_masked_mse_of_normalised_patches():
    torch.manual_seed(0)
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    loss, _ = model.compute_loss({"image": images}, noise=noise)
    pred, mask = model.encode_and_decode(images, noise)
    assert mask.sum() == 2 * 48  # 16 of 64 kept per image
    target = normalize_patches(patchify(images, 4))
    assert loss.item() == pytest.approx(masked_mse(pred, target, mask).item(), rel=1e-5)
    # predictions at kept patches do not enter the loss
    changed = pred.clone()
    changed[mask == 0] += 100.0
    assert masked_mse(changed, target, mask).item() == pytest.approx(loss.item(), rel=1e-5)


def test_lr_scaling_and_schedule():
    assert scaled_lr(1.5e-4, 4096, 256) == pytest.approx(2.4e-3)  # the paper's effective lr
    assert warmup_cosine(0, 10, 110) == 0.0
    assert warmup_cosine(5, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_weight_decay_exempts_biases_and_1d_params():
    model = tiny_mae()
    decay, no_decay = weight_decay_groups(model.named_parameters(), 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in no_decay["params"])
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p is not model.decoder_pos_embed for p in decay["params"] + no_decay["params"])  # frozen


def official_mae_vit_b_keys() -> set[str]:
    """The official MAE ViT-B/16 release's state-dict names, written out from its published layout."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"]
    block += ["norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(12) for k in block}
    keys |= {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(8) for k in block}
    keys |= {"decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    return keys


def test_official_mae_names_round_trip_strictly():
    encoder = timm.create_model("mim_vit_base_patch16", img_size=224, num_classes=0)
    model = MAE(encoder, 224, OPTIM, batch_size=4, warmup_epochs=1)
    official = model.official_state_dict()
    assert set(official) == official_mae_vit_b_keys()
    assert official["pos_embed"].shape == (1, 197, 768)
    assert official["decoder_pos_embed"].shape == (1, 197, 512)
    assert official["decoder_pred.weight"].shape == (16 * 16 * 3, 512)
    fresh = MAE(timm.create_model("mim_vit_base_patch16", img_size=224, num_classes=0), 224, OPTIM, 4, 1)
    fresh.load_official(official, strict=True)
    assert torch.equal(fresh.encoder.blocks[3].attn.qkv.weight, encoder.blocks[3].attn.qkv.weight)
    assert torch.equal(fresh.decoder_blocks[7].mlp.fc2.weight, model.decoder_blocks[7].mlp.fc2.weight)


def test_mae_init_follows_the_official_recipe():
    model = tiny_mae()
    enc = model.encoder
    w = enc.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))  # xavier on the flattened (D, 3*p*p) view
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(enc.blocks[0].attn.qkv.bias == 0)
    assert 0.01 < enc.cls_token.std() < 0.03 and 0.01 < model.mask_token.std() < 0.03
    assert not enc.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_attention_runs_through_fused_sdpa(monkeypatch):
    model = tiny_mae()
    blocks = [*model.encoder.blocks, *model.decoder_blocks]
    assert all(block.attn.fused_attn for block in blocks)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    model.compute_loss({"image": torch.randn(1, 3, 32, 32)})
    assert len(calls) == len(blocks)


def test_full_input_path_encodes_mask_tokens_and_keeps_the_loss_on_removed_patches():
    encoder = timm.create_model("mim_vit_tiny_patch16", img_size=32, patch_size=4, depth=2, num_classes=0)
    model = MAE(encoder, 32, OPTIM, 4, 1, decoder_dim=64, decoder_depth=1, decoder_heads=4, token_drop=False)
    assert not model.token_drop and model.decoder_prefix == 0
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    pred, mask = model.encode_and_decode(images, noise)
    assert pred.shape == (2, 64, 48) and mask.sum() == 96
    loss, _ = model.compute_loss({"image": images}, noise=noise)
    loss.backward()
    assert encoder.mask_token.grad is not None and encoder.mask_token.grad.abs().sum() > 0
