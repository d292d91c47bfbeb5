"""Front door: `python -m src.train_supervised [model.arch=resnet18] [dataset=...] [recipe=...]` (a DeiT teacher)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from src.config import exit_on_config_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_supervised")
def main(cfg: DictConfig) -> None:
    from src.objectives.supervised import SupervisedClassifier  # heavy imports after Hydra has parsed the command line
    from src.runner import pretrain, summary

    with exit_on_config_error():
        result = pretrain(cfg, objective=SupervisedClassifier)
    if result.exports or result.checkpoint:
        print(summary(result))


if __name__ == "__main__":
    main()
