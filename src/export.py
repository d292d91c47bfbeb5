"""`python -m src.export runs/<run_name> [--checkpoint FILE] [--out DIR]`: re-export a run's weights.

Works for every kind of run: it rebuilds the run's method from the config the run saved (``config.yaml``),
loads the checkpoint (weights only) and writes the method's exports (encoder in timm naming, classifiers,
tokenizers, the official MAE/BEiT layouts). A run that trains nothing (kNN) re-exports the encoder it evaluated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from src.config import ConfigError, exit_on_user_error
from src.methods import method_class
from src.pipeline.run_folder import CONFIG_FILE


def export_run(run_dir: Path, checkpoint: Path | None = None, out_dir: Path | None = None) -> dict[str, Path]:
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{config_file} not found: is {run_dir} a run folder made by this toolkit?")
    cfg = OmegaConf.load(config_file)
    method = method_class(cfg.method)
    if method.fits:
        checkpoint = checkpoint or run_dir / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise ConfigError(f"checkpoint not found: {checkpoint}")
        if "init" in cfg:  # the checkpoint holds every trained weight: the run's init file need not exist any more
            cfg.init.kind, cfg.init.checkpoint = "random", None
    module = method.from_config(cfg)
    if method.fits:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        module.on_load_checkpoint({"state_dict": state})  # frozen parts (tokenizer, teacher) come from their files
        module.load_state_dict(state, strict=True)
    return module.export(out_dir or run_dir / "export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run folder, e.g. runs/mae-vit_b-fashion_mnist")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: RUN_DIR/checkpoints/last.ckpt")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/export")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        for name, path in export_run(args.run_dir, args.checkpoint, args.out).items():
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
