"""BEiT: blockwise masking, the masked-token loss, the BEiT encoder and its checkpoints, real training runs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from src.config import ConfigError
from src.data.builtin import load_fashion_mnist
from src.encoders.base import FilterReport
from src.encoders.beit import SHARED_TABLE, checkpoint_filter_fn, shared_to_per_layer_rel_pos_bias
from src.figures import MARGIN
from src.files import load_state_dict_file
from src.methods.base import encoder_export_state
from src.methods.beit import BEiT, BeitTransform
from src.methods.masking import BlockwiseMaskGenerator, beit_mask_counts
from src.pipeline.fit import run
from src.tokenizers import VQTokenizer, save_tokenizer
from tests.conftest import TINY, compose_config

FMNIST = "/usr/share/datasets/fashion-mnist"
OPTIM = {"base_lr": 1.5e-3, "reference_batch": 2048, "betas": [0.9, 0.999], "weight_decay": 0.05, "min_lr": 1e-5}


# ---- blockwise masking -------------------------------------------------------------------------
def reference_mask_count(rng: random.Random, height: int, width: int, target: int, min_block: int) -> int:
    """The masking algorithm as the paper's code describes it, written out plainly with Python's random."""
    grid = [[False] * width for _ in range(height)]
    masked = 0
    while masked < target:
        budget = target - masked
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, budget)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < height and w < width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
                new = sum(not grid[i][j] for i, j in cells)
                if 0 < new <= budget:
                    for i, j in cells:
                        grid[i][j] = True
                    added = new
                    break
        if added == 0:
            break
        masked += added
    return masked


@pytest.mark.parametrize(("height", "width"), [(14, 14), (8, 8), (6, 10)])
def test_blockwise_statistics_match_the_reference(height: int, width: int) -> None:
    target, min_block = beit_mask_counts(height * width)
    if (height, width) == (14, 14):
        assert (target, min_block) == (75, 16)  # the paper's setting
    generator = BlockwiseMaskGenerator((height, width), target, min_block)
    rng, ref_rng = np.random.default_rng(0), random.Random(0)
    draws = 1500
    ours = []
    for _ in range(draws):
        mask, blocks = generator.sample_blocks(rng)
        union = np.zeros_like(mask)
        for b in blocks:
            assert b.top >= 0 and b.top + b.height <= height and b.left >= 0 and b.left + b.width <= width
            assert b.height < height and b.width < width and b.new >= 1
            union[b.top : b.top + b.height, b.left : b.left + b.width] = True
        assert (union == mask).all() and mask.sum() == sum(b.new for b in blocks)
        ours.append(int(mask.sum()))
    reference = [reference_mask_count(ref_rng, height, width, target, min_block) for _ in range(draws)]
    ours_arr, ref_arr = np.array(ours), np.array(reference)
    assert ours_arr.max() <= target and ref_arr.max() <= target
    stderr = math.sqrt(ours_arr.var() / draws + ref_arr.var() / draws)
    assert abs(ours_arr.mean() - ref_arr.mean()) < 4 * stderr + 1e-9, (ours_arr.mean(), ref_arr.mean())
    assert ours_arr.mean() > 0.8 * target  # blocks actually fill most of the budget


def test_blockwise_deterministic_under_a_seed() -> None:
    generator = BlockwiseMaskGenerator(14, 75)
    first = [generator(np.random.default_rng(7)) for _ in range(3)]
    again = [generator(np.random.default_rng(7)) for _ in range(3)]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    stream = np.random.default_rng(7)
    draws = [generator(stream) for _ in range(5)]
    assert any((draws[0] != d).any() for d in draws[1:])


def test_blockwise_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="num_masked"):
        BlockwiseMaskGenerator(4, 17)
    with pytest.raises(ValueError, match="min_block"):
        BlockwiseMaskGenerator(14, 10, min_block=16)


class _OneImage(Dataset):
    def __init__(self, transform: BeitTransform, length: int) -> None:
        self.img = Image.fromarray(load_fashion_mnist(FMNIST, "test")[0][0].numpy())
        self.transform, self.length = transform, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.transform(self.img)


def _worker_masks(dataset: Dataset, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")
    return [batch["mask"] for batch in loader]


def test_transform_views_and_per_worker_masks_are_seeded() -> None:
    """Same seed -> same masks in workers; two workers never share a stream, even after the parent drew one."""
    transform = BeitTransform(32, 16, [0.5] * 3, [0.5] * 3, BlockwiseMaskGenerator(8, 24, 5))
    sample = transform(Image.fromarray(np.zeros((28, 28), dtype=np.uint8)))  # the parent draws first
    assert sample["image"].shape == (3, 32, 32) and sample["tokenizer_image"].shape == (3, 16, 16)
    assert sample["mask"].dtype == torch.bool and sample["mask"].shape == (8, 8)
    assert sample["tokenizer_image"].min() >= 0 and sample["tokenizer_image"].max() <= 1
    dataset = _OneImage(transform, 8)
    run, rerun = _worker_masks(dataset, 3), _worker_masks(dataset, 3)
    assert all((a == b).all() for a, b in zip(run, rerun, strict=True))
    worker0, worker1 = torch.cat(run[0::2]), torch.cat(run[1::2])  # batches alternate between the workers
    assert (worker0 != worker1).any()
    assert any((a != b).any() for a, b in zip(run, _worker_masks(dataset, 4), strict=True))


# ---- the loss ----------------------------------------------------------------------------------
def _module(encoder: torch.nn.Module, img: int, target_patch: int, tokenizer_px: int) -> BEiT:
    torch.manual_seed(0)
    # No residual blocks: each token depends on its own cell's pixels only (used below).
    tokenizer = VQTokenizer(vocab_size=16, downsample=tokenizer_px, img_size=32, hidden=8, code_dim=4, res_blocks=0)
    return BEiT(encoder, tokenizer, img, OPTIM, batch_size=3, warmup_epochs=0, target_patch=target_patch).eval()


def _uneven_masks(grid: int) -> torch.Tensor:
    mask = torch.zeros(3, grid, grid, dtype=torch.bool)
    mask[0, 0, :2] = True  # 2 masked
    mask[1, 1:3, 1:4] = True  # 6 masked
    mask[2, grid - 1, grid - 1] = True  # 1 masked
    return mask


def test_loss_is_mean_cross_entropy_over_masked_tokens_vit() -> None:
    encoder = timm.create_model("mim_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, num_classes=0)
    module = _module(encoder, 32, 8, tokenizer_px=4)
    torch.manual_seed(1)
    batch = {"image": torch.randn(3, 3, 32, 32), "tokenizer_image": torch.rand(3, 3, 16, 16), "mask": _uneven_masks(4)}
    loss, extras = module.compute_loss(batch)

    with torch.no_grad():
        targets = module.tokenizer.tokenize(batch["tokenizer_image"]).flatten(1)
        latent = encoder.forward_mask_token(batch["image"], batch["mask"])[:, 1:]
        log_probs = F.log_softmax(latent @ module.lm_head.weight.T + module.lm_head.bias, dim=-1)
    per_token = [-log_probs[b, i, targets[b, i]] for b, i in batch["mask"].flatten(1).nonzero().tolist()]
    assert len(per_token) == 9
    torch.testing.assert_close(loss, torch.stack(per_token).mean())
    per_sample = [torch.stack(per_token[:2]).mean(), torch.stack(per_token[2:8]).mean(), per_token[8]]
    assert not torch.isclose(loss, torch.stack(per_sample).mean())  # averaged over tokens, not samples
    assert 0 <= extras["mim_accuracy"] <= 1

    # Unmasked cells' tokens do not enter the loss; a masked cell's token does.
    changed = batch["tokenizer_image"].clone()
    unmasked_cells = ~batch["mask"].repeat_interleave(4, 1).repeat_interleave(4, 2)
    changed[unmasked_cells.unsqueeze(1).expand_as(changed)] = torch.rand(int(unmasked_cells.sum()) * 3)
    assert (module.tokenizer.tokenize(changed) != module.tokenizer.tokenize(batch["tokenizer_image"])).any()
    torch.testing.assert_close(module.compute_loss({**batch, "tokenizer_image": changed})[0], loss)
    tokens = module.tokenizer.tokenize(batch["tokenizer_image"])
    b, r, c = (tokens != tokens[0, 0, 0]).nonzero()[0].tolist()  # a cell with another token
    moved = batch["tokenizer_image"].clone()
    moved[0, :, :4, :4] = moved[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]  # into masked cell (0, 0) of sample 0
    assert module.tokenizer.tokenize(moved)[0, 0, 0] == tokens[b, r, c]
    assert not torch.isclose(module.compute_loss({**batch, "tokenizer_image": moved})[0], loss)


def test_loss_with_pale_predicts_two_by_two_tokens_per_output() -> None:
    """Pale's stride-32 token (r, c) predicts 16 px targets (2r + i, 2c + j) with head slice i * 2 + j."""
    encoder = timm.create_model(
        "pale_tiny_224", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=0
    )
    module = _module(encoder, 64, 16, tokenizer_px=4)
    assert module.sub == 2 and module.target_grid == (4, 4)
    torch.manual_seed(2)
    batch = {"image": torch.randn(3, 3, 64, 64), "tokenizer_image": torch.rand(3, 3, 16, 16), "mask": _uneven_masks(4)}
    loss, _ = module.compute_loss(batch)
    with torch.no_grad():
        targets = module.tokenizer.tokenize(batch["tokenizer_image"])
        head = module.lm_head(encoder.forward_mask_token(batch["image"], batch["mask"]))  # (B, 2*2, 4 * vocab)
    terms = []
    for b, r, c in batch["mask"].nonzero().tolist():
        logits = head[b, (r // 2) * 2 + c // 2].view(4, 16)[(r % 2) * 2 + c % 2]
        terms.append(-F.log_softmax(logits, -1)[targets[b, r, c]])
    torch.testing.assert_close(loss, torch.stack(terms).mean())


# ---- the BEiT encoder ----------------------------------------------------------------------------
def test_beit_encoder_follows_the_paper() -> None:
    torch.manual_seed(0)
    model = timm.create_model("mim_beit_base_patch16", depth=3, num_classes=0)
    assert model.pos_embed is None and model.num_prefix_tokens == 1
    table = model.rel_pos_bias.relative_position_bias_table
    assert table.shape == ((2 * 14 - 1) ** 2 + 3, 12) and (table == 0).all()
    assert all(block.attn.relative_position_bias_table is None for block in model.blocks)
    attn = model.blocks[0].attn
    names = {n for n, _ in attn.named_parameters()}
    assert {"q_bias", "v_bias"} <= names and "k_bias" not in names
    assert all((block.gamma_1 == 0.1).all() and (block.gamma_2 == 0.1).all() for block in model.blocks)
    with torch.device("meta"):
        large = timm.create_model("mim_beit_large_patch16", depth=1, num_classes=0)
    assert large.blocks[0].init_values == 1e-5
    fc1 = model.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= 0.02 + 1e-7 and 0.01 < fc1.std() < 0.02  # truncated at +-std, as the official code
    stds = [block.attn.proj.weight.std().item() for block in model.blocks]
    for layer, std in enumerate(stds, start=1):
        assert std == pytest.approx(stds[0] / math.sqrt(layer), rel=0.03)  # divided by sqrt(2l)
    out = model.forward_mask_token(torch.randn(1, 3, 224, 224), torch.rand(1, 14, 14) < 0.4)
    assert out.shape == (1, 197, 768)


def test_official_timm_beit_checkpoints_load_strictly() -> None:
    with torch.device("meta"):
        official = timm.create_model("beit_base_patch16_224", pretrained=False)
        ours = timm.create_model(
            "mim_beit_base_patch16",
            num_classes=1000,
            global_pool="avg",
            use_rel_pos_bias=True,
            use_shared_rel_pos_bias=False,
            weight_init_style="timm",
        )
    state = official.state_dict()
    assert set(ours.state_dict()) - set(state) == {"mask_token"}  # every encoder owns one; exports drop it
    assert set(ours.filter_checkpoint(state, FilterReport())) == set(state)
    missing, unexpected = ours.load_state_dict(state, strict=False, assign=True)
    assert missing == ["mask_token"] and unexpected == []


def _small_beit(**kwargs) -> torch.nn.Module:
    sizes = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    return timm.create_model("mim_beit_tiny_patch16", **{**sizes, **kwargs})


def test_shared_table_remaps_to_per_layer_for_fine_tuning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = _small_beit().eval()
    with torch.no_grad():
        pretrained.rel_pos_bias.relative_position_bias_table.normal_()  # a trained-looking table
    state = encoder_export_state(pretrained)  # the export: no mask token
    per_layer = shared_to_per_layer_rel_pos_bias(state, depth=2)
    assert SHARED_TABLE not in per_layer
    torch.testing.assert_close(per_layer["blocks.1.attn.relative_position_bias_table"], state[SHARED_TABLE])

    # timm's own Beit with per-layer tables (the fine-tuning layout) computes the same features.
    timm_beit = timm.create_model(
        "beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, global_pool=""
    ).eval()
    timm_beit.reset_classifier(0)
    timm_beit.load_state_dict(per_layer, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_beit.forward_features(x), pretrained.forward_features(x))

    # The same through a file and the loader, into our encoder in the fine-tuning layout.
    path = tmp_path / "pretrained.pth"
    torch.save({"model": {**state, "rel_pos_bias.relative_position_index": torch.zeros(17, 17)}}, path)
    fine_tune = _small_beit(use_rel_pos_bias=True, use_shared_rel_pos_bias=False).eval()
    filtered = fine_tune.filter_checkpoint(load_state_dict_file(path), FilterReport())
    assert fine_tune.load_state_dict(filtered, strict=False).missing_keys == ["mask_token"]
    torch.testing.assert_close(fine_tune.forward_features(x), pretrained.forward_features(x))


def test_official_pretraining_layout_round_trips_through_the_module() -> None:
    """mask_token + lm_head at the top level, as in the released pretraining checkpoints."""
    encoder = _small_beit()
    module = _module(encoder, 32, 8, tokenizer_px=4)
    official = module.official_state_dict()
    assert {"mask_token", "lm_head.weight", SHARED_TABLE, "blocks.0.gamma_1", "norm.weight"} <= set(official)
    assert not any(k.startswith(("encoder.", "tokenizer.")) for k in official)
    other = _module(_small_beit(), 32, 8, tokenizer_px=4)
    other.load_official({**official, "rel_pos_bias.relative_position_index": torch.zeros(17, 17)}, strict=True)
    for key, value in official.items():
        torch.testing.assert_close(other.official_state_dict()[key], value)
    resized = checkpoint_filter_fn(official, _small_beit(img_size=64))
    assert resized[SHARED_TABLE].shape == ((2 * 8 - 1) ** 2 + 3, 2)  # timm resizes the table to the new grid


# ---- real runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tokenizer = VQTokenizer(vocab_size=32, downsample=4, img_size=32, hidden=16, code_dim=8, res_blocks=1)
    return save_tokenizer(tokenizer, tmp_path_factory.mktemp("tokenizer"))["tokenizer"]


def _beit_overrides(tmp_path: Path, tokenizer: Path, encoder: list[str]) -> list[str]:
    tiny = [o for o in TINY if not o.startswith(("encoder", "+encoder"))]
    return [*tiny, *encoder, "objective=beit", f"objective.tokenizer.path={tokenizer}", f"runs_dir={tmp_path}"]


VIT = ["encoder=vit_t", "encoder.kwargs.patch_size=4", "+encoder.kwargs.depth=2", "objective.target_patch=4"]
BEIT = ["encoder=beit_t", "encoder.kwargs.patch_size=4", "+encoder.kwargs.depth=2", "objective.target_patch=4"]
PALE = [
    "encoder=pale_t",
    "+encoder.kwargs.embed_dim=16",
    "+encoder.kwargs.depths=[1,1,1,1]",
    "+encoder.kwargs.num_heads=[2,2,2,2]",
]  # at 32 px: one stride-32 output token predicting the 2 x 2 grid of 16 px tokens


@pytest.mark.slow
@pytest.mark.parametrize("encoder", [VIT, BEIT, PALE], ids=["vit", "beit", "pale"])
def test_beit_training_runs(tmp_path: Path, tokenizer_file: Path, encoder: list[str]) -> None:
    overrides = _beit_overrides(tmp_path, tokenizer_file, encoder)
    result = run(compose_config([*overrides, "dataset.train_limit=32", "pictures.every_n_steps=1"]))
    assert result.global_step == 2  # 32 images / batch 16
    assert math.isfinite(result.metrics["train/loss"]) and 0 <= result.metrics["train/mim_accuracy"] <= 1
    assert result.exports["encoder"].is_file() and result.exports["beit_full"].is_file()
    assert result.pictures is not None
    picture = Image.open(sorted(result.pictures.glob("step*.png"))[-1])
    # 4 columns (input | mask | tokenizer recon | prediction) of 8 rows of 32 px images, each shown 5x
    assert picture.width == 4 * 160 + 5 * MARGIN and picture.height > 8 * 160
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    assert not any(k.startswith("tokenizer.") for k in checkpoint["state_dict"])
    if encoder is BEIT:
        per_layer = load_file(str(result.exports["encoder_per_layer"]))
        assert "blocks.1.attn.relative_position_bias_table" in per_layer and SHARED_TABLE not in per_layer
    if encoder is VIT:  # resume continues (the tokenizer is restored from its own file)
        resumed = run(compose_config([*overrides, "dataset.train_limit=32", "epochs=2", "resume_changes=[epochs]"]))
        assert resumed.global_step == 4


def test_missing_tokenizer_or_wrong_grid_fails_before_work(tmp_path: Path, tokenizer_file: Path) -> None:
    overrides = _beit_overrides(tmp_path, tokenizer_file, VIT)
    with pytest.raises(ConfigError, match=r"objective.tokenizer.path=.*python -m src.train_tokenizer"):
        run(compose_config([*overrides, f"objective.tokenizer.path={tmp_path / 'none.safetensors'}"]))
    with pytest.raises(ConfigError, match=r"objective.target_patch=16"):
        run(compose_config([*overrides, "objective.target_patch=16"]))
    with pytest.raises(ConfigError, match=r"objective.mask"):
        run(compose_config([*overrides, "objective.mask.num_patches=100"]))
    assert not list(tmp_path.iterdir())  # nothing was written: every check runs before data or model
