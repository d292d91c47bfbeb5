"""`python -m src.export runs/<run_name> [--format weights|hf|onnx ...] [--checkpoint FILE] [--out DIR]
[--allow-pickle]`: re-export a run's weights, or export them in the formats other tools load.

Works for every kind of run: it rebuilds the run's method from the config the run saved (``config.yaml``),
loads the checkpoint (weights only) and writes the exports ``--format`` names (docs/exports.md):

- ``weights`` (the default): the method's exports (encoder in timm naming, classifiers, tokenizers, the official
  MAE/BEiT layouts). A run that trains nothing (kNN) re-exports the encoder it evaluated.
- ``hf``: the encoder as a Hugging Face Hub folder (``export/hf``), loaded back with
  ``timm.create_model("local-dir:...", pretrained=True)`` and compared before it is kept.
- ``onnx``: ``export/encoder.onnx`` (any batch), or a detection run's ``export/detector.onnx`` (one image of any
  size), each checked with onnxruntime against PyTorch; the max abs diff and the tolerance are printed.

The checkpoint is the one a resume would continue from: the readable one at the latest step, so an unreadable
``last.ckpt`` is passed over, with a warning, for ``last-previous.ckpt``.

A run folder is data, not code: every ``allow_pickle`` its recorded config holds is set to false, whoever wrote
the file. Only the person typing the command can let export unpickle the files that config names (a DALL-E
``encoder.pkl`` tokenizer, a teacher or init ``.pth``): ``--allow-pickle``. Checkpoints are never unpickled.
See docs/security.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from src.config import exit_on_user_error
from src.pipeline.export import FORMATS, export_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run folder, e.g. runs/mae-vit_b-fashion_mnist")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="default: the newest readable of RUN_DIR/checkpoints/"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/export")
    parser.add_argument(
        "--format", nargs="+", choices=FORMATS, default=["weights"], help="one or more (default: weights)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let torch unpickle the tokenizer, teacher or init files the run's config names (runs code from "
        "them: only for files you trust); never taken from the run folder",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")  # the checks of each hf and onnx export (the toolkit's lines only)
    logging.getLogger("src").setLevel(logging.INFO)
    with exit_on_user_error():
        exports = export_run(args.run_dir, args.checkpoint, args.out, args.allow_pickle, args.format)
        for name, path in exports.items():
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
