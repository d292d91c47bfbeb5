"""One truth for the config: a run's config is settled once (composition, then its method), and that config is the
one it checks, records (config.yaml) and shows (``show_config=true``); its init checkpoint is read once.

The checkpoint here is an MAE module saved the way Lightning saves it (no training needed): a 2-block ViT-Tiny
with 4 px patches at 32 px and a 2-block, 32-wide MAE decoder, which is not the front door's ``encoder=vit_b``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import CONF, SCENES, SMALL_HEADS, TINY, compose_config, in_process
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from src.encoders.loading import InitCheckpoint
from src.methods.mae import MAE
from src.pipeline.fit import prepare, run, shown_config

MAE_DECODER = ["objective.decoder_dim=32", "objective.decoder_depth=2", "objective.decoder_heads=2"]
DETECTION = ["objective=detect", *SCENES, "objective.decoder_depth=2", *SMALL_HEADS, "batch_size=4", "num_workers=0"]
DETECTION += ["logger=csv", "trainer.accelerator=cpu", "trainer.devices=1", "warmup_epochs=0"]


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory) -> Path:
    """An MAE module saved as a Lightning checkpoint, with the hyper-parameters and encoder config a run records."""
    cfg = compose_config([*TINY, *MAE_DECODER])
    module = MAE.from_config(cfg, InitCheckpoint())
    hparams = {**module.hparams, "encoder_config": OmegaConf.to_container(cfg.encoder, resolve=True)}
    path = tmp_path_factory.mktemp("mae") / "last.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__, "hyper_parameters": hparams},
        path,
    )
    return path


def test_the_shown_config_holds_the_checkpoints_encoder_and_is_what_the_run_records(tmp_path, mae_checkpoint):
    overrides = ["dataset.img_size=32", "dataset.knn_bank=64", "dataset.knn_queries=32", "batch_size=16"]
    overrides += ["num_workers=0", "logger=csv", "trainer.accelerator=cpu", "trainer.devices=1", f"runs_dir={tmp_path}"]
    overrides += ["objective=knn", f"init.checkpoint={mae_checkpoint}", "objective.pixels=false"]
    cfg = compose_config(overrides, config_name="finetune")
    shown = shown_config(cfg)
    assert not list(tmp_path.iterdir())  # shown, nothing written: no run folder, no lock
    assert cfg.encoder.name == "vit_b"  # the composed config is never changed
    assert "# settled by KNNEvaluation.settle_config: encoder.arch 'mim_vit_base_patch16' -> 'mim_vit_tiny" in shown
    settled = yaml.safe_load(shown)
    assert settled["encoder"]["arch"] == "mim_vit_tiny_patch16" and settled["encoder"]["kwargs"]["depth"] == 2
    assert settled["run_name"] == "knn-vit_t-fashion_mnist" and "show_config" not in settled

    result = run(cfg)
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text()) == settled


def test_detection_settles_its_sizes_from_the_checkpoint_and_else_from_maes(tmp_path, mae_checkpoint):
    overrides = [*DETECTION, f"runs_dir={tmp_path}", f"dataset.root={tmp_path}/scenes"]
    settled = prepare(compose_config([*overrides, f"init.checkpoint={mae_checkpoint}"], "finetune")).cfg
    assert settled.encoder.kwargs.patch_size == 4 and settled.encoder.kwargs.depth == 2  # the checkpoint's encoder
    o = settled.objective
    assert (o.pretrain_img_size, o.decoder_dim, o.decoder_heads) == (32, 32, 2)  # what its MAE recorded
    assert settled.trainer.check_val_every_n_epoch == o.eval_every_n_epochs
    random = prepare(compose_config([*overrides, "encoder=vit_t", "encoder.kwargs.patch_size=4"], "finetune")).cfg
    assert random.objective.pretrain_img_size == 224  # MAE's pretraining size, the size MIMDet's encoders start at


@pytest.mark.slow
def test_a_detection_run_reads_its_init_checkpoint_once(tmp_path, mae_checkpoint, monkeypatch):
    """Settling, the checks, the encoder, the MAE decoder and the report share one memory-mapped read."""
    reads = []
    load = torch.load

    def counted(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f) == mae_checkpoint:
            reads.append(kwargs.get("mmap"))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    overrides = [*DETECTION, f"runs_dir={tmp_path}", f"dataset.root={tmp_path}/scenes", "trainer.max_steps=1"]
    result = run(compose_config([*overrides, f"init.checkpoint={mae_checkpoint}"], config_name="finetune"))
    assert result.global_step == 1 and (result.run_dir / "init_report.json").is_file()
    assert reads == [True]


def test_combo_is_picked_by_itself_named_with_its_values_and_not_offered_as_a_choice():
    with initialize_config_dir(config_dir=str(CONF / "pretrain"), version_base="1.3"):
        cfg = compose("pretrain", overrides=["dataset.img_size=64"], return_hydra_config=True)
        listed = cfg.hydra.help.template  # --help's group list (src/config.py: user_choices)
    assert "\nencoder: beit_b, beit_l" in listed and "\nrecipe: " in listed and "combo" not in listed
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]  # as a front door's main receives it
        notes = prepare(cfg).notes
    finally:
        HydraConfig.instance().cfg = None
    said = "combo/mae_vit_b_fashion_mnist.yaml sets encoder.kwargs.patch_size=8, dataset.img_size=64 (set elsewhere; "
    assert notes[0].startswith("picked by itself: ") and said + "the file's 32)" in notes[0]


def test_the_demo_shows_the_sizes_it_chose_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """The front door's show_config=true: the settled YAML (the combo's sizes) and a comment naming the combo."""
    demo = ["objective=mae", "encoder=vit_b", "show_config=true", f"runs_dir={tmp_path}/runs"]
    done = in_process("src.pretrain", demo, capsys, monkeypatch)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "# picked by itself: conf/pretrain/combo/mae_vit_b_fashion_mnist.yaml sets encoder.kwargs.patch_size=8"
        in done.stdout
    )
    shown = yaml.safe_load(done.stdout)
    assert shown["dataset"]["img_size"] == 32 and shown["encoder"]["kwargs"]["patch_size"] == 8
    assert shown["encoder"]["arch"] == "mim_vit_base_patch16" and not (tmp_path / "runs").exists()
