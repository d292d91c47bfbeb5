"""Pictures out of a run: figures drawn with matplotlib, and one call that hands a picture to every logger of the
run that can show it.

Figures are ``matplotlib.figure.Figure`` objects on their own Agg canvas, never pyplot's: no global figure list
that a long run would fill, no GUI backend picked from the environment, safe in any thread. A figure becomes an
(H, W, 3) uint8 array once, and that array is both the PNG in ``runs/<run>/pictures`` and what the loggers get.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from src.files import save_png

DPI = 100  # figure sizes are given in pixels: inches = pixels / DPI
MIN_SIDE = 150  # pixels: a 28 px Fashion-MNIST image is shown 6x, large enough to judge a reconstruction
GAP = 4  # white pixels between the images of a grid
TITLE_BAND, COLUMN_BAND, MARGIN = 36, 24, 8  # pixels above a grid for its title and its column titles
LEVEL_STYLES = (("tab:orange", "--"), ("tab:green", ":"), ("tab:red", "-."))  # baselines across a chart


def log_picture(trainer: L.Trainer, key: str, picture: np.ndarray, step: int | None = None) -> None:
    """``picture`` is (H, W, 3) uint8; W&B, TensorBoard and MLflow each get it under ``key`` at ``step``."""
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [picture], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, picture, global_step=step, dataformats="HWC")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, picture, key=key.replace("/", "."), step=step)


def new_figure(width: float, height: float, **kwargs) -> Figure:
    """A white figure of ``width`` x ``height`` pixels on its own Agg canvas (``kwargs``: Figure's, e.g. layout)."""
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white", **kwargs)
    FigureCanvasAgg(figure)
    return figure


def figure_pixels(figure: Figure) -> np.ndarray:
    """The figure rendered: (H, W, 3) uint8."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def save_picture(picture: np.ndarray, path: Path) -> Path:
    """An (H, W, 3) uint8 picture as a PNG, replaced in one step (a kill while writing keeps the previous one)."""
    return save_png(Image.fromarray(picture), path)


def side_by_side(pictures: Sequence[np.ndarray], gap: int = 16) -> np.ndarray:
    """(H, W, 3) uint8 pictures in one row, ``gap`` white pixels apart, shorter ones padded white at the bottom."""
    height = max(picture.shape[0] for picture in pictures)
    row = []
    for i, picture in enumerate(pictures):
        padded = np.full((height, picture.shape[1], 3), 255, dtype=np.uint8)
        padded[: picture.shape[0]] = picture
        row += [padded] if i == 0 else [np.full((height, gap, 3), 255, dtype=np.uint8), padded]
    return np.concatenate(row, axis=1)


def upscale(images: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """(..., H, W, C) images repeated by the smallest whole factor that makes their short side >= ``min_side``:
    nearest neighbours, so every model pixel stays a sharp square."""
    factor = max(1, math.ceil(min_side / min(images.shape[-3:-1])))
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2)


def image_grid(images: np.ndarray, column_titles: Sequence[str], title: str) -> Figure:
    """``images`` (rows, columns, H, W, 3) in [0, 1]: one titled column per view, upscaled (``upscale``).

    The pixels are placed on the canvas as they are (``figimage``), not drawn into axes: nothing is resampled on
    the way to the PNG, and a grid renders in half the time an axes per column takes.
    """
    images = upscale(np.clip(images, 0.0, 1.0))
    rows, columns, height, width = images.shape[:4]
    below = np.pad(images, ((0, 0), (0, 0), (0, GAP), (0, 0), (0, 0)), constant_values=1.0)  # white under each
    strip_height = rows * (height + GAP) - GAP
    fig_width = columns * width + (columns + 1) * MARGIN
    fig_height = TITLE_BAND + COLUMN_BAND + strip_height + MARGIN
    figure = new_figure(fig_width, fig_height)
    figure.suptitle(title, y=1 - 6 / fig_height, va="top", fontsize=13)
    for c, column_title in zip(range(columns), column_titles, strict=True):
        left = MARGIN + c * (width + MARGIN)
        figure.figimage(below[:, c].reshape(-1, width, 3)[:strip_height], xo=left, yo=MARGIN, origin="upper")
        middle, above = (left + width / 2) / fig_width, (MARGIN + strip_height + 6) / fig_height
        figure.text(middle, above, column_title, ha="center", va="bottom", fontsize=10)
    return figure


def line_chart(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    title: str,
    ylabel: str,
    levels: Mapping[str, float] | None = None,
) -> Figure:
    """Each curve's (step, value) points over the steps, and each level as a horizontal line across the chart."""
    figure = new_figure(800, 450)
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.11, top=0.92)  # fixed: half the time of a layout engine
    axes = figure.add_subplot()
    for label, points in curves.items():
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, label=label, marker="o" if len(points) <= 20 else None, linewidth=1.8)
    for (label, value), (color, style) in zip((levels or {}).items(), LEVEL_STYLES, strict=False):
        axes.axhline(value, linestyle=style, color=color, label=label)
    axes.set(xlabel="step", ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    if len(curves) + len(levels or {}) > 1:
        axes.legend()
    return figure
