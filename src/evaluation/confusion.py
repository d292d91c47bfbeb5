"""A classifier's confusion matrix drawn as a picture (rows: true class, columns: predicted), and the callback
that saves it after each validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw

from src.figures import log_picture
from src.files import save_png

CELL = 28  # pixels per matrix cell, enough for a two-digit percentage in PIL's built-in font
MARGIN = 24


def confusion_picture(matrix: torch.Tensor) -> Image.Image:
    """Rows = true class, columns = predicted; each row normalised to percentages, darker = more."""
    counts = matrix.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = rates.shape[0]
    side = MARGIN + n * CELL + 1
    img = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN, 2), "predicted ->", fill="black")
    for i in range(n):
        draw.text((MARGIN + i * CELL + 8, 12), str(i), fill="black")
        draw.text((4, MARGIN + i * CELL + 8), str(i), fill="black")
        for j in range(n):
            value = float(rates[i, j])
            shade = int(255 * (1 - value))
            x0, y0 = MARGIN + j * CELL, MARGIN + i * CELL
            draw.rectangle((x0, y0, x0 + CELL, y0 + CELL), fill=(shade, shade, 255), outline=(200, 200, 200))
            if value >= 0.005:
                draw.text((x0 + 3, y0 + 8), f"{100 * value:.0f}", fill="white" if value > 0.5 else "black")
    return img


class ConfusionMatrixPicture(L.Callback):
    """Draws ``pl_module.last_confusion`` (set at the end of each validation epoch) as ``confusion_stepN.png``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.saved: list[Path] = []

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = getattr(pl_module, "last_confusion", None)
        if matrix is None:
            return
        picture = confusion_picture(matrix)
        path = save_png(picture, self.out_dir / f"confusion_step{trainer.global_step:07d}.png")
        self.saved.append(path)
        log_picture(trainer, "pictures/confusion", np.asarray(picture))
