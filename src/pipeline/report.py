"""Pictures a run leaves for a reader: its loss curve, and its first and last pictures side by side.

Drawn with PIL (already a dependency through torchvision), so no plotting library is needed.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw

from src.files import save_png

log = logging.getLogger(__name__)

WIDTH, HEIGHT, MARGIN = 640, 360, 48
INK, GRID, LINE = (40, 40, 40), (220, 220, 220), (31, 119, 180)


def read_curve(csv_file: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every finite ``key`` entry in a CSV metrics log, in step order.

    Rows that do not parse (a line cut by a kill, damage) are passed over with one warning that counts them:
    the picture of a run never costs the run its results.
    """
    if not csv_file.is_file():
        return []
    points, unreadable = {}, 0
    with csv_file.open(errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                try:
                    step, value = int(row.get("step")), float(row.get(key) or "nan")
                except (TypeError, ValueError):
                    unreadable += 1
                    continue
                if math.isfinite(value):
                    points[step] = value
        except csv.Error as e:
            log.warning("%s cannot be read past line %d (%s): the loss curve stops there", csv_file, reader.line_num, e)
    if unreadable:
        log.warning("%s: %d rows without a readable step or %s were passed over", csv_file, unreadable, key)
    return sorted(points.items())


def draw_curve(points: list[tuple[int, float]], title: str, out: Path) -> Path:
    """A line chart of ``points`` with its step and value ranges written on the axes."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    (x0, y0), (x1, y1) = (MARGIN, MARGIN // 2), (WIDTH - MARGIN // 2, HEIGHT - MARGIN)
    steps, values = [s for s, _ in points], [v for _, v in points]
    low, high = min(values), max(values)
    span_x, span_y = max(steps[-1] - steps[0], 1), (high - low) or 1.0

    def at(step: int, value: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * (step - steps[0]) / span_x, y1 - (y1 - y0) * (value - low) / span_y

    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y1 - (y1 - y0) * fraction
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((4, y - 6), f"{low + span_y * fraction:.3g}", fill=INK)
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    if len(points) > 1:
        draw.line([at(s, v) for s, v in points], fill=LINE, width=2)
    else:
        cx, cy = at(*points[0])
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=LINE)
    draw.text((x0, y1 + 8), f"step {steps[0]}", fill=INK)
    draw.text((x1 - 70, y1 + 8), f"step {steps[-1]}", fill=INK)
    draw.text((x0 + 8, y0 + 6), title, fill=INK)
    return save_png(image, out)


def loss_curve(csv_file: Path, out: Path, key: str = "train/loss") -> Path | None:
    """Draw ``key`` over the steps of the run's CSV log; None when it logged no such value."""
    points = read_curve(csv_file, key)
    if not points:
        return None
    first, last = points[0][1], points[-1][1]
    return draw_curve(points, f"{key}: {first:.4g} at step {points[0][0]} -> {last:.4g} at step {points[-1][0]}", out)


def side_by_side(first: Path, last: Path, out: Path) -> Path:
    """Two pictures next to each other, each captioned with its file's step (``stepNNNNNNN.png``)."""
    images = [Image.open(path).convert("RGB") for path in (first, last)]
    caption = 18
    width = sum(image.width for image in images) + 16
    canvas = Image.new("RGB", (width, max(image.height for image in images) + caption), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for path, image in zip((first, last), images, strict=True):
        draw.text((x + 2, 3), f"step {int(path.stem.removeprefix('step'))}", fill=INK)
        canvas.paste(image, (x, caption))
        x += image.width + 16
    return save_png(canvas, out)
