"""A classifier's confusion matrix drawn as a picture (rows: true class, columns: predicted)."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

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
