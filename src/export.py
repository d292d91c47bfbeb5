"""`python -m src.export runs/<run_name> [--checkpoint FILE] [--out DIR] [--allow-pickle]`: re-export a run's weights.

Works for every kind of run: it rebuilds the run's method from the config the run saved (``config.yaml``),
loads the checkpoint (weights only) and writes the method's exports (encoder in timm naming, classifiers,
tokenizers, the official MAE/BEiT layouts). A run that trains nothing (kNN) re-exports the encoder it evaluated.

The checkpoint is the one a resume would continue from: the readable one at the latest step, so an unreadable
``last.ckpt`` is passed over, with a warning, for ``last-previous.ckpt``.

A run folder is data, not code: every ``allow_pickle`` its recorded config holds is set to false, whoever wrote
the file. Only the person typing the command can let export unpickle the files that config names (a DALL-E
``encoder.pkl`` tokenizer, a teacher or init ``.pth``): ``--allow-pickle``. Checkpoints are never unpickled.
See docs/security.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from src.config import exit_on_user_error
from src.pipeline.export import export_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run folder, e.g. runs/mae-vit_b-fashion_mnist")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="default: the newest readable of RUN_DIR/checkpoints/"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/export")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let torch unpickle the tokenizer, teacher or init files the run's config names (runs code from "
        "them: only for files you trust); never taken from the run folder",
    )
    args = parser.parse_args(argv)
    with exit_on_user_error():
        for name, path in export_run(args.run_dir, args.checkpoint, args.out, args.allow_pickle).items():
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
