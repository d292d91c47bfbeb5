"""Visual tokenizers: the VQ tokenizer trained on Fashion-MNIST, its codebook, and the DALL-E encoder loader."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from src.config import ConfigError, validate
from src.data.builtin import load_fashion_mnist
from src.data.transforms import EvalTransform
from src.methods.tokenizer import evaluate_tokenizer
from src.pipeline.fit import run
from src.tokenizers import DalleEncoder, VQTokenizer, codebook_usage, load_tokenizer, tokenizer_spec
from src.tokenizers.dalle import map_pixels
from tests.conftest import assert_export_reproduces, compose_config

FMNIST = "/usr/share/datasets/fashion-mnist"


# ---- the VQ tokenizer --------------------------------------------------------------------------
def test_codebook_usage_report() -> None:
    uniform = codebook_usage(torch.full((8,), 5))
    assert uniform["perplexity"] == pytest.approx(8) and uniform["dead_codes"] == 0
    one = codebook_usage(torch.tensor([0, 0, 9, 0]))
    assert one["perplexity"] == pytest.approx(1) and one["dead_codes"] == 3 and one["used_fraction"] == 0.25


def test_codebook_follows_the_mean_of_its_vectors_and_restarts_dead_codes() -> None:
    torch.manual_seed(0)
    vq = VQTokenizer(vocab_size=4, downsample=4, img_size=8, hidden=8, code_dim=2, ema_decay=0.0)
    z = torch.randn(1, 2, 4, 4)
    vq.update_codebook(z, torch.zeros(1, 4, 4, dtype=torch.long))  # first call: codebook from the data
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert all(any(torch.allclose(code, v) for v in flat) for code in vq.codebook)
    tokens = torch.tensor([0] * 8 + [1] * 8).view(1, 4, 4)
    restarted = vq.update_codebook(z, tokens)
    torch.testing.assert_close(vq.codebook[0], flat[:8].mean(0), atol=1e-4, rtol=1e-4)  # decay 0: the batch mean
    torch.testing.assert_close(vq.codebook[1], flat[8:].mean(0), atol=1e-4, rtol=1e-4)
    assert restarted == 2  # codes 2 and 3 were not used: back onto batch vectors
    assert all(any(torch.allclose(vq.codebook[c], v) for v in flat) for c in (2, 3))


def _metric_series(csv_path: Path, key: str) -> list[float]:
    with csv_path.open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def _unit_images(split: str, count: int) -> torch.Tensor:
    """The first ``count`` images of ``split`` as the report sees them: 16 px, [0, 1], 3 channels."""
    to_unit = EvalTransform(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return torch.stack(
        [to_unit(Image.fromarray(im.numpy()))["image"] for im in load_fashion_mnist(FMNIST, split)[0][:count]]
    )


@pytest.mark.slow
def test_tokenizer_training_lowers_reconstruction_loss_on_fashion_mnist(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            f"runs_dir={tmp_path}",
            "logger=csv",
            "num_workers=0",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.log_every_n_steps=1",
            "objective.vocab_size=64",
            "objective.downsample=4",
            "objective.img_size=16",
            "objective.hidden=64",
            "objective.optim.base_lr=4e-3",
            "objective.res_blocks=1",
            "dataset.train_limit=3072",
            "epochs=1",
            "dataset.knn_bank=32",
            "dataset.knn_queries=256",
            "batch_size=64",
            "report_images=256",
            "pictures.every_n_steps=16",
        ],
        config_name="tokenizer",
    )
    result = run(cfg)
    report = {k.removeprefix("tokenizer/"): v for k, v in result.metrics.items() if k.startswith("tokenizer/")}
    assert result.global_step == 48
    losses = _metric_series(result.run_dir / "csv" / "metrics.csv", "train/recon_loss")
    assert len(losses) >= 45
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5

    # Held out: better than the mean training image, the best a tokenizer carrying no information can do.
    test_images, train_images = _unit_images("test", 256), _unit_images("train", 1024)
    baseline = (test_images - train_images.mean(0)).pow(2).mean().item()
    assert report["recon_mse"] < 0.7 * baseline and report["images"] == 256
    assert report["perplexity"] > 4

    assert_export_reproduces(result.run_dir, result.exports, tmp_path / "again")
    usage = json.loads((result.run_dir / "usage.json").read_text())
    assert set(usage) >= {"perplexity", "dead_codes", "used_fraction", "recon_mse"}
    assert result.pictures is not None and list(result.pictures.glob("*.png"))

    # The exported files rebuild the trained tokenizer: frozen, same grid, same held-out quality.
    cfg = OmegaConf.create({"kind": "vq", "path": str(result.exports["tokenizer"])})
    assert tokenizer_spec(cfg)["downsample"] == 4
    loaded = load_tokenizer(cfg)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.tokenize(test_images[:2]).shape == (2, 4, 4)
    again = evaluate_tokenizer(loaded, [{"image": test_images}], 256)
    assert again["recon_mse"] == pytest.approx(report["recon_mse"], rel=1e-4)
    assert again["perplexity"] == pytest.approx(report["perplexity"], rel=1e-4)


def test_tokenizer_config_errors_name_the_key(tmp_path: Path) -> None:
    missing = OmegaConf.create({"kind": "vq", "path": str(tmp_path / "nope.safetensors")})
    with pytest.raises(ConfigError, match=r"objective.tokenizer.path=.*python -m src.train_tokenizer"):
        tokenizer_spec(missing)
    with pytest.raises(ConfigError, match=r"objective.tokenizer.kind='bpe' must be one of \('vq', 'dalle'\)"):
        validate(compose_config(["objective=beit", "objective.tokenizer.kind=bpe"]))  # the schema names the kinds
    with pytest.raises(ConfigError, match="objective.vocab_size"):
        run(compose_config([f"runs_dir={tmp_path}", "objective.vocab_size=1"], config_name="tokenizer"))


# ---- DALL-E ------------------------------------------------------------------------------------
def test_dalle_encoder_architecture() -> None:
    with torch.device("meta"):
        full = DalleEncoder()
    state = full.state_dict()
    assert state["blocks.input.w"].shape == (256, 3, 7, 7)
    assert state["blocks.group_1.block_1.res_path.conv_1.w"].shape == (64, 256, 3, 3)
    assert state["blocks.group_2.block_1.id_path.w"].shape == (512, 256, 1, 1)  # width changes: a 1x1 id path
    assert "blocks.group_1.block_1.id_path.w" not in state
    assert state["blocks.group_4.block_2.res_path.conv_4.w"].shape == (2048, 512, 1, 1)
    assert state["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    assert full.vocab_size == 8192 and full.downsample == 8 and full.img_size == 112
    assert full.blocks.group_1.block_1.post_gain == 1 / 64
    torch.testing.assert_close(map_pixels(torch.tensor([0.0, 1.0])), torch.tensor([0.1, 0.9]))

    small = DalleEncoder(n_hid=16, vocab_size=64).eval()
    images = torch.rand(2, 3, 112, 112)
    tokens = small.tokenize(images)
    assert tokens.shape == (2, 14, 14) and tokens.dtype == torch.long  # 112 px -> BEiT's 14 x 14
    torch.testing.assert_close(tokens, small.blocks(0.8 * images + 0.1).argmax(1))


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_dalle_loader_refuses_pickles_without_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "encoder.pkl"
    torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match=r"allow_pickle=true"):
        DalleEncoder.from_file(evil)
    assert not marker.exists()
    cfg = OmegaConf.create({"kind": "dalle", "path": str(evil), "allow_pickle": False})
    with pytest.raises(ConfigError, match="objective.tokenizer.allow_pickle"):
        load_tokenizer(cfg)
    assert not marker.exists()

    # A pickled module (the form of DALL-E's encoder.pkl) loads only with the opt-in.
    monkeypatch.setattr(DalleEncoder, "__init__", _small_dalle_init)
    module_file = tmp_path / "module.pkl"
    torch.save(DalleEncoder(), module_file)
    with pytest.raises(ValueError, match="unpickling runs code"):
        DalleEncoder.from_file(module_file)
    assert isinstance(DalleEncoder.from_file(module_file, allow_pickle=True), DalleEncoder)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(module_file, weights_only=True)


_full_init = DalleEncoder.__init__


def _small_dalle_init(self: DalleEncoder, **kwargs) -> None:
    _full_init(self, n_hid=16, vocab_size=64)


def test_dalle_loader_reads_state_dicts_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DalleEncoder, "__init__", _small_dalle_init)  # full size is 54M params: keep it light
    torch.manual_seed(0)
    source = DalleEncoder().eval()
    images = torch.rand(2, 3, 32, 32)
    expected = source.tokenize(images)
    torch.save(source.state_dict(), tmp_path / "encoder.pth")
    save_file(source.state_dict(), str(tmp_path / "encoder.safetensors"))
    for name in ("encoder.pth", "encoder.safetensors"):
        cfg = OmegaConf.create({"kind": "dalle", "path": str(tmp_path / name), "allow_pickle": False})
        loaded = load_tokenizer(cfg)
        torch.testing.assert_close(loaded.tokenize(images), expected)
        assert tokenizer_spec(cfg)["downsample"] == 8
    torch.save({"something": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="does not hold DALL-E encoder weights"):
        load_tokenizer(OmegaConf.create({"kind": "dalle", "path": str(tmp_path / "wrong.pth")}))
