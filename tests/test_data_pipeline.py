"""The data pipeline: MAE's views made on the model's device (``dataset.device_transforms``) and its benchmark section.

The device path is run on the CPU device here: it must give the CPU batched path's views, sample for sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import compose_config
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf
from PIL import Image

import src.benchmarks.core as benchmark
import src.benchmarks.data as bench_data
from src.config import ConfigError
from src.data import EvalTransform, PretrainTransform, build_datamodule, load_fashion_mnist
from src.data.classification import ClassificationTrainTransform
from src.data.distributed import sample_seeds
from src.data.transforms import StoredImages
from src.encoders.loading import InitCheckpoint
from src.methods.mae import MAE

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
MEAN, STD = [0.286] * 3, [0.353] * 3


def fashion_cfg(**overrides: Any):
    return OmegaConf.merge(OmegaConf.load(CONF / "fashion_mnist.yaml"), overrides)


def first_batch(device_transforms: bool, crop_scale: tuple[float, float] | None) -> dict[str, torch.Tensor]:
    """The first training batch of the built-in set under ``tensor_transforms``; with ``device_transforms`` the
    loader's uint8 batch is moved to the CPU device and its views made there, as the data module's hook does."""
    cfg = fashion_cfg(img_size=32, train_limit=64, tensor_transforms=True, device_transforms=device_transforms)
    transform = PretrainTransform(32, cfg.mean, cfg.std, crop_scale=crop_scale)
    data = build_datamodule(cfg, transform, EvalTransform(32, cfg.mean, cfg.std), 16, 0, seed=3)
    batch = next(iter(data.train_dataloader()))
    if not device_transforms:
        return batch
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 28, 28)  # the images as stored
    return data.device_views(move_data_to_device(batch, torch.device("cpu")), batch["sample_seed"].tolist())


@pytest.mark.parametrize("crop_scale", [(0.2, 1.0), None], ids=["crops+flips", "flips"])
def test_device_views_equal_the_cpu_batched_path(crop_scale: tuple[float, float] | None) -> None:
    """Same samples, same seeds -> the same views, whether made in the loader or after the move."""
    on_cpu, on_device = first_batch(False, crop_scale), first_batch(True, crop_scale)
    assert on_device.keys() == on_cpu.keys()
    for key in ("sample_seed", "label", "skipped"):
        assert torch.equal(on_device[key], on_cpu[key]), key
    assert on_device["image"].shape == on_cpu["image"].shape == (16, 3, 32, 32)
    assert torch.allclose(on_device["image"], on_cpu["image"], atol=1e-6, rtol=0)


def test_each_view_is_drawn_from_its_own_seed() -> None:
    """A view depends on its image and seed only (not on its place in the batch), and the running stream is kept."""
    images = load_fashion_mnist(FMNIST_ROOT, "test")[0][:8]
    seeds = sample_seeds(0, 1, np.arange(8))
    transform = PretrainTransform(32, MEAN, STD)
    state = torch.get_rng_state()
    whole = transform.batch(images, seeds)
    assert torch.equal(torch.get_rng_state(), state)
    alone = torch.cat([transform.batch(images[i : i + 1], [seeds[i]]) for i in reversed(range(8))]).flip(0)
    assert torch.equal(whole, alone)
    assert not torch.equal(whole, transform.batch(images, seeds[1:] + seeds[:1]))
    stored = StoredImages()
    assert torch.equal(stored(Image.fromarray(images[0].numpy()))["image"], images[0])
    assert stored.batch(images, seeds) is images


def test_training_steps_get_the_views_from_the_hook(tiny_overrides: list[str]) -> None:
    """In a real fit, the step sees the CPU batched path's views: the data module's transfer hook made them."""
    cfg = compose_config([*tiny_overrides, "dataset.tensor_transforms=true", "dataset.device_transforms=true"])
    seen: list[dict[str, torch.Tensor]] = []

    class Keep(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
            seen.append(batch)

    data, model = MAE.build_data(cfg), MAE.from_config(cfg, InitCheckpoint())
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[Keep()],
    )
    trainer.fit(model, datamodule=data)
    cfg.dataset.device_transforms = False
    expected = MAE.build_data(cfg)  # the same run with its views made by the loader
    batch = next(iter(expected.train_dataloader()))
    assert torch.allclose(seen[0]["image"], batch["image"], atol=1e-6, rtol=0)
    assert torch.equal(seen[0]["mask_noise"], batch["mask_noise"])


def test_device_transforms_refusals_name_the_key() -> None:
    evaluate = EvalTransform(32, MEAN, STD)
    with pytest.raises(ConfigError, match=r"dataset\.device_transforms=true needs .* tensor_transforms=False"):
        build_datamodule(fashion_cfg(device_transforms=True), PretrainTransform(32, MEAN, STD), evaluate, 16, 0)
    folder = OmegaConf.merge(OmegaConf.load(CONF / "image_folder.yaml"), {"root": "/nowhere"})
    folder.merge_with({"tensor_transforms": True, "device_transforms": True})
    with pytest.raises(ConfigError, match=r"dataset\.device_transforms=true needs .* kind=image_folder"):
        build_datamodule(folder, PretrainTransform(32, MEAN, STD), evaluate, 16, 0)
    deit = ClassificationTrainTransform(32, MEAN, STD, "rand-m9-mstd0.5-inc1", (0.08, 1.0), 0.5, 0.4, 0.25)
    cfg = fashion_cfg(tensor_transforms=True, device_transforms=True)
    with pytest.raises(ConfigError, match=r"dataset\.device_transforms=true: .*\(ClassificationTrainTransform\)"):
        build_datamodule(cfg, deit, evaluate, 16, 0)


def test_data_pipeline_section_renders(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One row per source, every figure positive (tiny sizes, measured in-process)."""

    def in_process(setup: benchmark.StepSetup, args: Any) -> benchmark.Measurement:
        return benchmark.measure_in_process(setup, args.device, args.steps, args.warmup, args.threads)

    monkeypatch.setattr(benchmark, "measure", in_process)
    monkeypatch.setattr(bench_data, "PIPELINE_IMAGES", 48)
    threads = torch.get_num_threads()  # the one-process rows run torch with one thread, as a worker does
    argv = ["--sections", "data_pipeline", "--batch-size", "8", "--img-size", "32", "--device", "cpu"]
    try:
        benchmark.main([*argv, "--steps", "2", "--warmup", "0", "--repeats", "1", "--data-workers", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 8 |")]
    assert [row[1] for row in rows] == [label for label, _, _ in bench_data.SOURCES]
    assert all(float(value.strip(" *|").replace(",", "")) > 0 for row in rows for value in row[2:])
    assert "images/s, num_workers=1" in out
