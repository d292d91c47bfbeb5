"""The figures a run leaves for a reader, drawn from its CSV log: the loss and the lr over the steps, and the online
kNN accuracy against its two baselines (the untrained encoder, the raw pixels)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from src.figures import figure_pixels, line_chart, save_picture

log = logging.getLogger(__name__)

Points = list[tuple[int, float]]
LOSS, LR = "train/loss", "train/lr"
KNN, KNN_START, KNN_PIXELS = "knn/top1", "knn/start_top1", "knn/pixels_top1"  # as KNNMonitor logs them
CURVE_KEYS = (LOSS, LR, KNN, KNN_START, KNN_PIXELS)  # what ``run_figures`` draws from


def read_curves(csv_file: Path, keys: Sequence[str]) -> dict[str, Points]:
    """(step, value) of every finite entry of each of ``keys`` in a CSV metrics log, in step order.

    Rows that do not parse (a line cut by a kill, damage) are passed over with one warning that counts them:
    the figures of a run never cost the run its results.
    """
    points: dict[str, dict[int, float]] = {key: {} for key in keys}
    if not csv_file.is_file():
        return {key: [] for key in keys}
    unreadable = 0
    with csv_file.open(errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                try:
                    step = int(row.get("step"))
                except (TypeError, ValueError):
                    unreadable += 1
                    continue
                values = {key: _number(row.get(key)) for key in keys}
                unreadable += None in values.values()
                for key, value in values.items():
                    if value is not None and math.isfinite(value):
                        points[key][step] = value
        except csv.Error as e:
            log.warning("%s cannot be read past line %d (%s): the figures stop there", csv_file, reader.line_num, e)
    if unreadable:
        log.warning("%s: %d rows without a readable step or %s were passed over", csv_file, unreadable, ", ".join(keys))
    return {key: sorted(by_step.items()) for key, by_step in points.items()}


def _number(cell: object) -> float | None:
    """A CSV cell as a number: an empty cell (the key not logged at that step) is NaN, a damaged one None."""
    try:
        return float(cell or "nan")
    except (TypeError, ValueError):
        return None


def loss_figure(points: Points, key: str = LOSS) -> Figure:
    """The loss over the steps, its first and last values in the title: the change a reader looks for first."""
    (first_step, first), (last_step, last) = points[0], points[-1]
    title = f"{key}: {first:.4g} at step {first_step} → {last:.4g} at step {last_step}"
    return line_chart({key: points}, title, "loss")


def lr_figure(points: Points) -> Figure:
    """The lr the optimizer used at each step: the warm-up and decay as run, scaled to the global batch."""
    peak_step, peak = max(points, key=lambda point: point[1])
    return line_chart({LR: points}, f"learning rate: peak {peak:.3g} at step {peak_step}", "lr")


def knn_figure(points: Points, start: float, pixels: float) -> Figure:
    """kNN top-1 (percent) over the steps, with the untrained encoder's and the raw pixels' as levels: whether
    pretraining taught the encoder anything shows only against both."""
    last_step, last = points[-1]
    title = f"online kNN top-1: {100 * last:.1f}% at step {last_step}"
    title += f" (untrained {100 * start:.1f}%, raw pixels {100 * pixels:.1f}%)"
    return line_chart(
        {"encoder": [(step, 100 * value) for step, value in points]},
        title,
        "kNN top-1 (%)",
        {"untrained encoder (step 0)": 100 * start, "raw pixels": 100 * pixels},
    )


def run_figures(curves: dict[str, Points], out_dir: Path) -> dict[str, np.ndarray]:
    """Every figure ``curves`` (``read_curves`` of ``CURVE_KEYS``) has data for, by name ("loss", "lr", "knn");
    each saved as ``out_dir/<name>.png``."""
    figures = {}
    if curves[LOSS]:
        figures["loss"] = loss_figure(curves[LOSS])
    if curves[LR]:
        figures["lr"] = lr_figure(curves[LR])
    if curves[KNN] and curves[KNN_START] and curves[KNN_PIXELS]:
        figures["knn"] = knn_figure(curves[KNN], curves[KNN_START][-1][1], curves[KNN_PIXELS][-1][1])
    pictures = {name: figure_pixels(figure) for name, figure in figures.items()}
    for name, picture in pictures.items():
        save_picture(picture, out_dir / f"{name}.png")
    return pictures
