"""Front door: `python -m src.pretrain objective=mae encoder=vit_b [dataset=...] [recipe=...]`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from src.config import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    from src.runner import pretrain, summary  # heavy imports after Hydra has parsed the command line

    try:
        result = pretrain(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if result.exports or result.checkpoint:
        print(summary(result))


if __name__ == "__main__":
    main()
