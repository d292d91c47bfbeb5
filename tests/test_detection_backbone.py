"""Detection backbones: ConvStem size, token sampling, position resizing, MAE decoder loading, FPN levels, DDP use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from timm.layers import resample_abs_pos_embed
from torch.nn.modules.batchnorm import _BatchNorm

from src.detection.backbone import (
    ConvStem,
    HierarchicalBackbone,
    MIMDetBackbone,
    MIMDetDecoder,
    PartialInputEncoder,
    build_backbone,
    decoder_state_from_mae,
    sample_tokens,
    valid_token_mask,
)
from src.detection.detector import build_detector
from src.encoders import create_encoder
from src.encoders.pos_embed import interpolate_pos_embed
from src.methods.global_norm import GlobalBatchNorm, use_global_batchnorm
from src.methods.mae import MAE

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoder"
OPTIM = {"base_lr": 1.5e-4, "reference_batch": 256, "betas": [0.9, 0.95], "weight_decay": 0.05}
LEVELS = ["0", "1", "2", "3", "pool"]


def encoder_config(name: str, **kwargs):
    """The project's encoder config with smaller sizes merged into its kwargs."""
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.kwargs = OmegaConf.merge(cfg.kwargs, kwargs)
    return cfg


def tiny_vit(img_size: int = 64):
    cfg = encoder_config("vit_t", patch_size=16, depth=2, embed_dim=64, num_heads=2, drop_path_rate=0.1)
    return create_encoder(cfg, img_size)


def tiny_backbone(**kwargs) -> MIMDetBackbone:
    defaults = dict(decoder_dim=128, decoder_depth=2, decoder_heads=4, out_channels=256)
    return MIMDetBackbone(tiny_vit(), **{**defaults, **kwargs})


def test_conv_stem_matches_the_papers_size_and_strides():
    assert sum(p.numel() for p in ConvStem(768).parameters()) == 4_079_712
    c2, c3, tokens = ConvStem(64)(torch.randn(2, 3, 96, 160))
    assert c2.shape == (2, 16, 24, 40)
    assert c3.shape == (2, 32, 12, 20)
    assert tokens.shape == (2, 64, 6, 10)


def test_sample_tokens_keeps_k_and_drops_padding_first():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        b, length = 6, int(torch.randint(4, 60, (1,), generator=gen))
        ratio = [0.25, 0.5, 0.7][trial % 3]
        valid = torch.rand(b, length, generator=gen) < torch.rand(b, 1, generator=gen)  # from almost none to all
        ids = sample_tokens(valid, ratio, generator=gen)
        k = int(length * ratio)
        assert ids.shape == (b, k)
        for i in range(b):
            kept = torch.zeros(length, dtype=torch.bool)
            kept[ids[i]] = True
            assert kept.sum() == k, "indices must be distinct"
            assert torch.all(ids[i][1:] > ids[i][:-1]), "sorted ascending"
            kept_padding = (kept & ~valid[i]).any()
            dropped_real = (~kept & valid[i]).any()
            assert not (kept_padding and dropped_real)
            assert (kept & valid[i]).sum() == min(k, int(valid[i].sum()))
    all_ids = sample_tokens(torch.ones(3, 10, dtype=torch.bool), 1.0)
    assert torch.equal(all_ids, torch.arange(10).expand(3, -1))
    with pytest.raises(ValueError, match="ratio"):
        sample_tokens(torch.ones(1, 4, dtype=torch.bool), 0.0)


def test_sample_tokens_is_uniform_over_real_tokens():
    valid = torch.ones(4000, 8, dtype=torch.bool)
    ids = sample_tokens(valid, 0.5, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(ids.flatten(), minlength=8).float() / 4000
    assert torch.allclose(counts, torch.full((8,), 0.5), atol=0.03)


def test_valid_token_mask_marks_tokens_whose_top_left_pixel_is_inside():
    mask = valid_token_mask([(100, 60), (128, 128), (16, 17)], (8, 8))
    assert mask[0].sum(0).max() == 7 and mask[0].sum(1).max() == 4  # rows 0..6 (96 < 100), cols 0..3 (48 < 60)
    assert mask[1].all()
    assert mask[2, 0, :2].all() and mask[2].sum() == 2


def test_interpolate_pos_embed_matches_timm_and_is_identity_on_the_same_grid():
    table = torch.randn(1, 4 * 5, 32)
    assert interpolate_pos_embed(table, (4, 5), (4, 5)) is table
    for dst in [(7, 12), (3, 2), (4, 9)]:
        ours = interpolate_pos_embed(table, (4, 5), dst)
        theirs = resample_abs_pos_embed(
            table, new_size=list(dst), old_size=[4, 5], num_prefix_tokens=0, antialias=False
        )
        assert ours.shape == (1, dst[0] * dst[1], 32)
        torch.testing.assert_close(ours, theirs)
    # a constant table stays constant (bicubic weights sum to one) and row-major order is kept
    rows = torch.arange(4.0).repeat_interleave(5).reshape(1, 20, 1)
    up = interpolate_pos_embed(rows, (4, 5), (4, 10)).reshape(4, 10)
    assert torch.allclose(up, torch.arange(4.0)[:, None].expand(4, 10))


def test_partial_input_encoder_samples_the_ratio_it_is_given():
    vit = tiny_vit()
    enc = PartialInputEncoder(vit)
    trainable = {name.split(".")[1] for name, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"blocks", "norm"}  # patch embedding, cls and mask tokens never run; sin-cos is fixed
    enc.eval()  # no drop path: the ratio is the call's, whatever the mode
    tokens, valid = torch.randn(2, 64, 6, 10), torch.ones(2, 6, 10, dtype=torch.bool)
    latent, ids = enc(tokens, valid, 0.25)
    assert latent.shape == (2, 15, 64) and ids.shape == (2, 15)
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    _, ids_seeded = enc(tokens, valid, 0.25, generators)
    assert torch.equal(ids_seeded, enc(tokens, valid, 0.25, [torch.Generator().manual_seed(s) for s in (1, 2)])[1])
    latent, ids = enc(tokens, valid)
    assert latent.shape == (2, 60, 64)
    assert torch.equal(ids, torch.arange(60).expand(2, -1))
    # eval over every token equals the ViT's own blocks + norm on the position-embedded grid
    pos = interpolate_pos_embed(vit.pos_embed[:, 1:], (4, 4), (6, 10))
    expected = vit.norm(vit.blocks(tokens.flatten(2).transpose(1, 2) + pos))
    torch.testing.assert_close(latent, expected)


def test_decoder_loads_the_first_blocks_of_a_real_mae():
    mae = MAE(tiny_vit(), 64, OPTIM, 4, 1, decoder_dim=32, decoder_depth=6, decoder_heads=4)
    state = mae.state_dict()
    decoder = MIMDetDecoder(64, 32, 4, 4, pos_grid=mae.out_grid)
    picked, loaded, not_found = decoder_state_from_mae(state, depth=4)
    assert not_found == []
    assert not any(name.startswith(("decoder_blocks.4.", "decoder_blocks.5.", "fill_proj")) for name in picked)
    result = decoder.load_state_dict(picked, strict=False)
    assert sorted(result.missing_keys) == ["fill_proj.bias", "fill_proj.weight"]
    assert result.unexpected_keys == []
    own = decoder.state_dict()
    assert set(loaded) == set(own) - {"fill_proj.weight", "fill_proj.bias"}
    for name in loaded:
        assert torch.equal(own[name], state[name]), name
    # an encoder-only checkpoint loads nothing, and says so
    encoder_only = {k: v for k, v in state.items() if k.startswith("encoder.")}
    picked, loaded, not_found = decoder_state_from_mae(encoder_only, depth=4)
    assert picked == {} and loaded == []
    assert "decoder_embed.weight" in not_found and "decoder_blocks.3.mlp.fc2.bias" in not_found


def test_decoder_puts_visible_latents_over_filled_positions():
    decoder = MIMDetDecoder(64, 32, 1, 4, pos_grid=(4, 4))
    stem = torch.randn(2, 64, 3, 4)
    ids = torch.tensor([[0, 5, 11], [2, 3, 7]])
    latent = torch.randn(2, 3, 64)
    tokens = decoder.assemble(latent, ids, stem)
    filled = decoder.fill_proj(stem.flatten(2).transpose(1, 2))
    visible = decoder.decoder_embed(latent)
    for b in range(2):
        others = [i for i in range(12) if i not in ids[b]]
        torch.testing.assert_close(tokens[b, ids[b]], visible[b])
        torch.testing.assert_close(tokens[b, others], filled[b, others])
    assert decoder(latent, ids, stem).shape == (2, 32, 3, 4)


def test_mimdet_backbone_levels_for_a_padded_non_square_batch():
    backbone = tiny_backbone()
    images = torch.randn(2, 3, 96, 160)
    sizes = [(96, 150), (70, 100)]
    for ratio in (0.5, 1.0):
        with torch.no_grad():
            out = backbone(images, sizes, ratio)
        assert list(out) == LEVELS
        strides = [4, 8, 16, 32, 64]
        for name, stride in zip(LEVELS, strides, strict=True):
            assert out[name].shape == (2, 256, -(-96 // stride), -(-160 // stride)), name  # P6: stride-2 subsample
            assert torch.isfinite(out[name]).all()
    assert backbone.out_channels == 256
    with pytest.raises(ValueError, match="100x160"):
        backbone(torch.randn(1, 3, 100, 160), [(100, 160)])


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_every_parameter_gets_a_gradient(ratio):
    backbone = tiny_backbone().train()
    out = backbone(torch.randn(2, 3, 64, 96), [(64, 96), (50, 70)], ratio)
    sum(level.float().pow(2).mean() for level in out.values()).backward()
    trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]
    assert "decoder.fill_proj.weight" in trainable and "encoder_input.encoder.blocks.0.attn.qkv.weight" in trainable
    assert [name for name, p in backbone.named_parameters() if p.requires_grad and p.grad is None] == []


def test_gradient_checkpointing_recomputes_stem_encoder_and_decoder_for_the_same_gradients():
    """The original's memory switch: each checkpointed part runs twice per step (forward, then again in backward)
    and the gradients are those of the plain run (drop path's draws replayed)."""
    images, sizes = torch.randn(2, 3, 64, 96), [(64, 96), (50, 70)]
    grads, calls = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        backbone = tiny_backbone().train()
        backbone.set_grad_checkpointing(recompute)
        parts = (backbone.stem.stages[1], backbone.encoder.blocks[0], backbone.decoder.decoder_blocks[1])
        counted = [0] * len(parts)
        for i, part in enumerate(parts):
            part.register_forward_pre_hook(lambda *_, i=i, seen=counted: seen.__setitem__(i, seen[i] + 1))
        torch.manual_seed(1)
        out = backbone(images, sizes, 0.5)
        sum(level.pow(2).mean() for level in out.values()).backward()
        grads.append({name: p.grad for name, p in backbone.named_parameters() if p.grad is not None})
        calls.append(counted)
    assert calls == [[1, 1, 1], [2, 2, 2]]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


@pytest.mark.parametrize(("norm", "biased"), [("syncbn", False), ("", True)])
def test_the_fpn_norm_follows_each_conv_and_every_batchnorm_goes_global(norm, biased):
    """MIMDet's FPN (BatchNorm after each conv, no conv bias) or torchvision's; with several processes the pipeline
    makes every BatchNorm of the detector, FPN and heads alike, one over the global batch (detectron2's SyncBN)."""
    backbone = tiny_backbone(fpn_norm=norm)
    convs = [m for m in backbone.fpn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and {conv.bias is not None for conv in convs} == {biased}
    norms = [m for m in backbone.fpn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == (0 if biased else 8)
    detector = build_detector(backbone, 3, True, [64], 64, 100, [0.0] * 3, [1.0] * 3)
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in detector.modules())
    assert batch_norms == len(norms) + 4 + 4  # box head and mask head: one after each of their 4 convs
    assert use_global_batchnorm(detector) == batch_norms
    assert {type(m) for m in detector.modules() if isinstance(m, _BatchNorm)} == {GlobalBatchNorm}
    with pytest.raises(ValueError, match="FPN norm must be one of"):
        tiny_backbone(fpn_norm="gn")


def test_layer_norm_eps_reaches_every_norm_of_the_vit_and_the_decoder():
    backbone = tiny_backbone(layer_norm_eps=1e-5)
    norms = [
        m for part in (backbone.encoder, backbone.decoder) for m in part.modules() if isinstance(m, torch.nn.LayerNorm)
    ]
    assert len(norms) == 2 * 2 + 1 + 2 * 2 + 1 and {m.eps for m in norms} == {1e-5}


def test_hierarchical_backbone_for_pale():
    cfg = encoder_config("pale_t", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 8], drop_path_rate=0.0)
    backbone = build_backbone(create_encoder(cfg, 64))
    assert isinstance(backbone, HierarchicalBackbone)
    out = backbone(torch.randn(2, 3, 64, 96), [(64, 96), (40, 30)])
    assert list(out) == LEVELS
    for name, stride in zip(LEVELS, [4, 8, 16, 32, 64], strict=True):
        assert out[name].shape == (2, 256, -(-64 // stride), -(-96 // stride)), name
    sum(level.pow(2).mean() for level in out.values()).backward()
    assert [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None] == []
    with pytest.raises(ValueError, match="samples no tokens"):
        backbone(torch.randn(1, 3, 64, 64), [(64, 64)], 0.5)


def test_build_backbone_picks_by_capability():
    vit = tiny_vit()
    backbone = build_backbone(vit, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    assert isinstance(backbone, MIMDetBackbone) and backbone.encoder is vit
    assert set(backbone.state_dict()) >= {f"encoder_input.encoder.{k}" for k in vit.state_dict()}
    beit = create_encoder(encoder_config("beit_t", depth=2), 64)
    with pytest.raises(ValueError, match="strides"):
        build_backbone(beit)
    with pytest.raises(ValueError, match="Linear"):
        build_backbone(torch.nn.Linear(2, 2))


def test_fpn_gets_stem_maps_c4_and_its_max_pool():
    backbone = tiny_backbone().eval()
    seen = {}
    backbone.fpn.register_forward_pre_hook(lambda _, args: seen.update(args[0]))
    with torch.no_grad():
        backbone(torch.randn(1, 3, 64, 96), [(64, 96)])
    assert [seen[k].shape[1] for k in "0123"] == [16, 32, 128, 128]
    torch.testing.assert_close(seen["3"], seen["2"].reshape(1, 128, 2, 2, 3, 2).amax(dim=(3, 5)))


def attributes(model: torch.nn.Module) -> dict[tuple[str, str], object]:
    """Every plain attribute of every submodule: what a call could leave changed.

    Values for plain data and lists of tensors (torchvision's anchor generator rebinds its cell anchors to equal
    tensors on every call), identities for every other object.
    """

    def seen_as(value: object) -> object:
        if isinstance(value, (int, float, str, bool, type(None), tuple)):
            return value
        if isinstance(value, list) and value and all(isinstance(item, torch.Tensor) for item in value):
            return [item.tolist() for item in value]
        return id(value)

    return {
        (name, key): seen_as(value) for name, module in model.named_modules() for key, value in vars(module).items()
    }


def test_the_detector_takes_ratio_and_seeds_per_call_and_leaves_no_attribute_changed():
    torch.manual_seed(0)
    heads = dict(anchor_sizes=(8, 16, 32, 64, 128), roi_samples=16, test_proposals=20)
    detector = build_detector(
        tiny_backbone(out_channels=32), 3, True, [64, 96], 96, 160, [0.5] * 3, [0.25] * 3, **heads
    )
    images = [torch.rand(3, 70, 90), torch.rand(3, 64, 64)]
    masks = [torch.ones(1, *image.shape[-2:], dtype=torch.uint8) for image in images]
    box = torch.tensor([[5.0, 6.0, 40.0, 50.0]])
    targets = [{"boxes": box, "labels": torch.tensor([1]), "masks": mask} for mask in masks]
    kept = []  # (tokens the encoder saw, tokens of the grid) per call
    decoder = detector.backbone.decoder
    decoder.register_forward_pre_hook(lambda _, args: kept.append((args[1].shape[1], args[2][0, 0].numel())))
    detector.eval()
    with torch.no_grad():
        detector(images)  # torchvision's pooler caches its scales on its first call
    before = attributes(detector)
    detector.train()
    losses = {}
    for ratio in (0.25, 1.0, 0.25):
        torch.manual_seed(1)  # drop path's draws
        out = detector(images, targets, ratio=ratio, seeds=[7, 8])
        first_at_ratio = losses.setdefault(ratio, out)
        assert all(torch.equal(out[k], v) for k, v in first_at_ratio.items())  # same seeds: same sizes and samples
    assert losses[0.25]["loss_classifier"] != losses[1.0]["loss_classifier"]
    with pytest.raises(ValueError, match="ratio"):
        detector(images, targets, ratio=0.0, seeds=[7, 8])  # fails inside the call, after the draws were handed out
    detector.eval()
    with torch.no_grad():
        full = detector(images)
        detector(images, ratio=0.5)
        again = detector(images)
    assert attributes(detector) == before  # nothing a call sets outlives it, a failed call's included
    ratios = [1.0, 0.25, 1.0, 0.25, 1.0, 0.5, 1.0]
    assert [k for k, _ in kept] == [int(tokens * ratio) for (_, tokens), ratio in zip(kept, ratios, strict=True)]
    for ours, theirs in zip(full, again, strict=True):  # evaluating at 0.5 left the next call as it was
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
