"""Front door: `python -m src.train_tokenizer [dataset=...] [tokenizer.vocab_size=...] [recipe=...]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from src.config import exit_on_config_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="tokenizer")
def main(cfg: DictConfig) -> None:
    from src.runner import summary  # heavy imports after Hydra has parsed the command line
    from src.tokenizers.train import train_tokenizer

    with exit_on_config_error():
        result, report = train_tokenizer(cfg)
    print(summary(result))
    if report:
        print(
            f"  codebook   : perplexity {report['perplexity']:.1f} of {cfg.tokenizer.vocab_size}, "
            f"{report['dead_codes']:.0f} dead codes, held-out recon MSE {report['recon_mse']:.4f} "
            f"({report['images']:.0f} images; {result.run_dir / 'usage.json'})"
        )


if __name__ == "__main__":
    main()
