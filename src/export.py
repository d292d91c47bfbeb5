"""`python -m src.export runs/<run_name> [--checkpoint FILE] [--out DIR]`: re-export a run's weights.

Rebuilds the objective from the run's saved Hydra config, loads the checkpoint (weights only), and
writes the encoder in timm naming (safetensors) plus the objective's own formats (MAE: the full
model with its decoder in the official names).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from src.objectives import objective_class


def export_run(run_dir: Path, checkpoint: Path | None = None, out_dir: Path | None = None) -> dict[str, Path]:
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a run folder made by src.pretrain?")
    checkpoint = checkpoint or run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    cfg = OmegaConf.load(config_file)
    module = objective_class(cfg.objective.name).from_config(cfg)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state, strict=True)
    return module.export(out_dir or run_dir / "export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run folder, e.g. runs/mae-vit_b-fashion_mnist")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: RUN_DIR/checkpoints/last.ckpt")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/export")
    args = parser.parse_args(argv)
    for name, path in export_run(args.run_dir, args.checkpoint, args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
