"""Exports other tools load (docs/exports.md): a Hub folder timm loads through ``local-dir:``, ONNX files of the encoder
and the detector that onnxruntime runs as PyTorch does, each checked by the export itself before it is kept.

A real (tiny) MAE run makes the encoder; the detector is MIMDet's on a 2-block ViT, run on real Fashion-MNIST scenes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from conftest import TINY, compose_config, in_process
from omegaconf import OmegaConf
from test_detection import PALE_SMALL, built, detect_config, detect_overrides

from src.config import ConfigError, validate
from src.detection.data import CocoDataModule
from src.encoders import create_encoder
from src.pipeline.export import export_run, write_formats
from src.pipeline.fit import run
from src.pipeline.onnx_export import TOLERANCE, ExportMismatch

LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2", "knn=null"]


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    """A real (tiny) MAE pretraining run: 2 steps of a 2-block ViT-T with 4 px patches at 32 px, asked for the
    Hub folder and the ONNX encoder at its end."""
    runs = tmp_path_factory.mktemp("mae")
    overrides = [
        *TINY,
        *LIGHT,
        "dataset.train_limit=32",
        f"runs_dir={runs}",
        "run_name=mae",
        "export_formats=[hf,onnx]",
    ]
    return run(compose_config(overrides)).run_dir


def test_a_run_asked_for_export_formats_writes_them_at_its_end(mae_run):
    exports = json.loads((mae_run / "finished.json").read_text())["exports"]
    assert exports == {
        "encoder": "export/encoder.safetensors",
        "mae_full": "export/mae_full_official.pth",
        "hf": "export/hf",
        "encoder_onnx": "export/encoder.onnx",
    }
    assert (mae_run / "export" / "hf" / "config.json").is_file() and (mae_run / "export" / "encoder.onnx").is_file()


def run_encoder(run_dir: Path) -> torch.nn.Module:
    """The encoder of the run's last checkpoint, rebuilt from its recorded config (what the run trained)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    encoder = create_encoder(cfg.encoder, cfg.dataset.img_size)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
    return encoder.eval()


def assert_close(name: str, got: np.ndarray, want: torch.Tensor) -> None:
    """onnxruntime's output against PyTorch's within the export's own tolerance (``TOLERANCE`` x the output's scale)."""
    want = want.detach().numpy()
    assert got.shape == want.shape, name
    assert np.abs(got - want).max(initial=0.0) <= TOLERANCE * max(1.0, np.abs(want).max(initial=0.0)), name


def test_hf_folder_loads_through_timm_local_dir_with_the_runs_features(mae_run, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level("INFO", logger="src")
    said = in_process("src.export", [str(mae_run), "--format", "hf", "--out", str(tmp_path)], capsys, monkeypatch)
    assert said.returncode == 0, said.stderr
    folder = tmp_path / "hf"
    assert f"hf: {folder}" in said.stdout
    assert "features max abs diff 0" in caplog.text  # the export loaded the folder back and compared
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "mim_vit_tiny_patch16"
    assert {"patch_size": 4, "depth": 2, "img_size": [32, 32]}.items() <= config["model_args"].items()
    data = config["pretrained_cfg"]  # the run's evaluation view, for timm.data.create_transform
    assert data["mean"] == list(OmegaConf.load(mae_run / "config.yaml").dataset.mean)
    assert data["input_size"] == [3, 32, 32] and data["crop_pct"] == 1.0

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # the arch: registered by src.encoders
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), run_encoder(mae_run).forward_features(images))  # diff 0


def test_onnx_encoder_runs_any_batch_as_pytorch_does(mae_run, tmp_path):
    exports = export_run(mae_run, out_dir=tmp_path, formats=["onnx"])
    assert exports == {"encoder_onnx": tmp_path / "encoder.onnx"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx"]  # nothing left of its check
    graph = onnx.load(str(exports["encoder_onnx"]))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch
    runtime = onnxruntime.InferenceSession(str(exports["encoder_onnx"]), providers=["CPUExecutionProvider"])
    encoder = run_encoder(mae_run)
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        features, output = runtime.run(["features", "output"], {"images": images.numpy()})
        with torch.no_grad():
            assert_close("features", features, encoder.forward_features(images))
            assert_close("output", output, encoder(images))


@pytest.fixture(scope="module")
def detection(tmp_path_factory):
    """MIMDet's Mask R-CNN on a 2-block ViT-T (its weights as built), and its config: what ``write_formats`` gets at
    the end of a detection run."""
    cfg = detect_config(tmp_path_factory.mktemp("detect"))
    return built(cfg).eval(), cfg


def real_scene_crops(cfg) -> list[torch.Tensor]:
    """Two validation scenes (real Fashion-MNIST garments) cut to different sizes and aspects."""
    data = CocoDataModule(cfg.dataset, cfg.batch_size, 0)
    images = next(iter(data.val_dataloader()))["images"]
    return [images[0][:, :96, :72], images[1][:, :64, :96]]


def test_onnx_detector_runs_any_image_size_as_pytorch_does(detection, tmp_path):
    module, cfg = detection
    exports = write_formats(module, cfg, ["onnx"], tmp_path)
    assert exports == {"detector_onnx": tmp_path / "detector.onnx"}
    runtime = onnxruntime.InferenceSession(str(exports["detector_onnx"]), providers=["CPUExecutionProvider"])
    names = ["boxes", "scores", "labels", "masks"]
    for image in real_scene_crops(cfg):
        found = dict(zip(names, runtime.run(names, {"image": image.numpy()}), strict=True))
        with torch.no_grad():
            want = module([image])[0]  # the evaluation path: every token, in eval mode
        assert len(want["boxes"]) > 0 and found["masks"].shape[-2:] == image.shape[-2:]
        assert np.array_equal(found["labels"], want["labels"].numpy())
        for name in ("boxes", "scores", "masks"):
            assert_close(name, found[name], want[name])


def test_a_detector_the_file_cannot_follow_is_refused_and_leaves_nothing(tmp_path):
    """Pale's window padding is Python arithmetic on the traced size, which the TorchScript exporter records as
    constants: the file fails on the second image size, so the export is refused and no file is kept."""
    vit = [o for o in detect_overrides(tmp_path) if not o.startswith(("encoder", "+encoder"))]
    cfg = compose_config([*vit, "encoder=pale_t", *PALE_SMALL, "objective.pretrain_img_size=64"], "finetune")
    module = built(cfg).eval()
    with pytest.raises(ExportMismatch, match="onnxruntime cannot run the exported file on an image of 144x96"):
        write_formats(module, cfg, ["onnx"], tmp_path / "export")
    assert list((tmp_path / "export").iterdir()) == []
    with pytest.raises(ConfigError, match="--format hf: a detection run's model is the detector"):
        write_formats(module, cfg, ["hf"], tmp_path / "export")


def test_export_formats_are_checked_in_the_config():
    cfg = compose_config([*TINY, "export_formats=[hf,pdf]"])
    with pytest.raises(ConfigError, match=r"export_formats=\['hf', 'pdf'\] each must be one of \('hf', 'onnx'\)"):
        validate(cfg)
