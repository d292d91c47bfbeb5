"""Front door: `python -m src.train_supervised [model.arch=resnet18] [dataset=...] [recipe=...]` (a DeiT teacher)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from src.config import exit_on_user_error, run_front_door
from src.schema import register_schemas


@hydra.main(version_base="1.3", config_path="../conf/supervised", config_name="supervised")
def main(cfg: DictConfig) -> None:
    from src.pipeline.fit import run, shown_config  # heavy imports after Hydra has parsed the command line
    from src.pipeline.summary import report, summary

    with exit_on_user_error():
        report(shown_config(cfg) if cfg.show_config else summary(run(cfg)))


if __name__ == "__main__":
    register_schemas()  # the YAML files name their schemas
    run_front_door(main)
