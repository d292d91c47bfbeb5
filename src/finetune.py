"""Front door: `python -m src.finetune task=classify|linear|knn init.checkpoint=PATH encoder=... [recipe=...]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from src.config import exit_on_config_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    from src.finetune_runner import finetune  # heavy imports after Hydra has parsed the command line
    from src.runner import summary

    with exit_on_config_error():
        result = finetune(cfg)
    print(summary(result))


if __name__ == "__main__":
    main()
