"""A classifier's confusion matrix as a figure (rows: true class, columns: predicted), and the callback that saves
it after each validation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure

from src.figures import figure_pixels, log_picture, new_figure, save_picture

WRITTEN_UP_TO = 20  # classes: up to this many, each cell says its percentage; beyond, the colours alone
NAMED_UP_TO = 60  # classes: up to this many, the axes name each class


def confusion_figure(matrix: torch.Tensor, class_names: Sequence[str] | None = None, step: int | None = None) -> Figure:
    """Each row normalised to percentages of its true class, darker = more; the diagonal is the per-class recall.

    ``class_names`` label the axes (class indices without them); a thousand classes still make a readable figure:
    the cell numbers and then the names give way to the colours alone.
    """
    counts = matrix.double().cpu()
    rates = 100 * counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = rates.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    side = min(max(0.5 * n + 3, 6), 20) * 100  # pixels
    figure = new_figure(side, side, layout="constrained")
    axes = figure.add_subplot()
    shown = axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=100)
    figure.colorbar(shown, ax=axes, shrink=0.8, label="% of the true class")
    if n <= WRITTEN_UP_TO:
        for i in range(n):
            for j in range(n):
                value = float(rates[i, j])
                if value >= 0.5:
                    color = "white" if value > 50 else "black"
                    axes.text(j, i, f"{value:.0f}", ha="center", va="center", color=color, fontsize=8)
    if n <= NAMED_UP_TO:
        axes.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
        axes.set_yticks(range(n), names)
    accuracy = 100 * counts.diagonal().sum() / counts.sum().clamp(min=1)
    at = f" at step {step}" if step is not None else ""
    axes.set(xlabel="predicted class", ylabel="true class", title=f"confusion matrix{at}: {accuracy:.1f}% correct")
    return figure


class ConfusionMatrixPicture(L.Callback):
    """Draws ``pl_module.last_confusion`` (set at the end of each validation epoch) as ``confusion_stepN.png``;
    the classes are named as given, else as the run's data module names them."""

    def __init__(self, out_dir: Path, class_names: Sequence[str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.class_names = class_names
        self.saved: list[Path] = []

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = getattr(pl_module, "last_confusion", None)
        if matrix is None:
            return
        names = self.class_names or getattr(trainer.datamodule, "class_names", None)
        picture = figure_pixels(confusion_figure(matrix, names, trainer.global_step))
        self.saved.append(save_picture(picture, self.out_dir / f"confusion_step{trainer.global_step:07d}.png"))
        log_picture(trainer, "pictures/confusion", picture)
