"""The figures a run leaves: reconstruction grids, the loss, lr and kNN curves, the confusion matrix; drawn from a
real tiny run and real Fashion-MNIST images, checked on the Figure objects and on the PNGs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import TINY, compose_config
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torchmetrics.classification import MulticlassConfusionMatrix

from src.data.builtin import CLASS_NAMES, load_fashion_mnist
from src.evaluation.confusion import NAMED_UP_TO, confusion_figure
from src.figures import GAP, MIN_SIDE, figure_pixels, image_grid, side_by_side, upscale
from src.pipeline.callbacks import PictureLogger
from src.pipeline.fit import run
from src.pipeline.loggers import AppendingCSVLogger
from src.pipeline.report import (
    CURVE_KEYS,
    KNN,
    KNN_PIXELS,
    KNN_START,
    LR,
    knn_figure,
    loss_figure,
    lr_figure,
    read_curves,
)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
GARMENTS = list(CLASS_NAMES["fashion_mnist"])
MAE_LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"]
# 4 steps of 16 images, a picture every 2, every step logged, kNN before and after
SHORT = ["dataset.train_limit=32", "epochs=2", "warmup_epochs=1", "pictures.every_n_steps=2"]
SHORT += ["trainer.log_every_n_steps=1", "checkpoint_every_n_steps=1000", "export=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("figures")
    result = run(compose_config([*TINY, *MAE_LIGHT, *SHORT, f"runs_dir={runs}", "run_name=figures"]))
    return result.run_dir


def fashion_mnist(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(FASHION_MNIST, "test")
    return images[:count], labels[:count]


# ---- a run's figures on disk ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_leaves_its_figures_large_enough_to_judge(tiny_run: Path) -> None:
    pictures = tiny_run / "pictures"
    names = {path.name for path in pictures.glob("*.png")}
    steps = ["step0000000.png", "step0000002.png", "step0000004.png"]
    assert names == {"first_and_last.png", "loss.png", "lr.png", "knn.png", *steps}
    step = np.asarray(Image.open(pictures / steps[-1]))
    images, views = 8, 3  # pictures.num_images; original | masked input | reconstruction
    assert step.shape[0] >= images * MIN_SIDE and step.shape[1] >= views * MIN_SIDE  # 32 px images shown 5x
    first, last = (np.asarray(Image.open(pictures / name)) for name in (steps[0], steps[-1]))
    both = np.asarray(Image.open(pictures / "first_and_last.png"))
    assert both.shape == (first.shape[0], first.shape[1] + 16 + last.shape[1], 3)
    assert np.array_equal(both[:, : first.shape[1]], first) and np.array_equal(both[:, -last.shape[1] :], last)
    for name in ("loss.png", "lr.png", "knn.png"):
        assert Image.open(pictures / name).size == (800, 450)


@pytest.mark.slow
def test_the_curves_hold_what_the_run_logged(tiny_run: Path) -> None:
    curves = read_curves(tiny_run / "csv" / "metrics.csv", CURVE_KEYS)
    assert [step for step, _ in curves[KNN]] == [0, 2, 4]  # before training and after each epoch
    knn = knn_figure(curves[KNN], curves[KNN_START][-1][1], curves[KNN_PIXELS][-1][1]).axes[0]
    encoder, untrained, pixels = knn.get_lines()
    assert list(encoder.get_xdata()) == [0, 2, 4]
    assert np.allclose(encoder.get_ydata(), [100 * value for _, value in curves[KNN]])
    assert np.allclose(untrained.get_ydata(), 100 * curves[KNN_START][-1][1])  # a level across the chart
    assert np.allclose(pixels.get_ydata(), 100 * curves[KNN_PIXELS][-1][1])
    assert [line.get_label() for line in knn.get_lines()] == ["encoder", "untrained encoder (step 0)", "raw pixels"]
    assert (knn.get_xlabel(), knn.get_ylabel()) == ("step", "kNN top-1 (%)")
    assert knn.get_legend() is not None

    loss = loss_figure(curves["train/loss"]).axes[0]
    (first_step, first), (last_step, last) = curves["train/loss"][0], curves["train/loss"][-1]
    assert loss.get_title() == f"train/loss: {first:.4g} at step {first_step} → {last:.4g} at step {last_step}"
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("step", "loss")
    lr = lr_figure(curves[LR]).axes[0]
    assert (lr.get_xlabel(), lr.get_ylabel()) == ("step", "lr") and lr.get_title().startswith("learning rate: peak")
    assert len(lr.get_lines()[0].get_xdata()) == 4  # the lr of every step


@pytest.mark.slow
def test_the_end_of_training_hands_each_figure_and_the_knn_chart_to_wandb(
    tiny_run: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    logged = []
    monkeypatch.setattr(wandb_logger, "log_metrics", lambda metrics, step: logged.append((metrics, step)))
    csv_logger = AppendingCSVLogger(save_dir=str(tiny_run), name="csv", version="")  # the run's own history
    trainer = SimpleNamespace(loggers=[csv_logger, wandb_logger], global_step=4)
    pictures = PictureLogger(tmp_path / "pictures")
    pictures.draw_curves(trainer)
    assert set(pictures.curves) == {"loss", "lr", "knn"} and all(path.is_file() for path in pictures.curves.values())
    by_key = {key: value for metrics, step in logged for key, value in metrics.items() if step == 4}
    assert {"pictures/loss", "pictures/lr", "pictures/knn", "knn/top1_with_baselines"} == set(by_key)
    assert by_key["pictures/knn"][0].image.size == (800, 450)
    chart = by_key["knn/top1_with_baselines"]
    series = {(row[1], row[0]): row[2] for row in chart.table.data}  # (line, step) -> value
    curves = read_curves(tiny_run / "csv" / "metrics.csv", CURVE_KEYS)
    assert {(line, step) for line, step in series} == {
        (line, step) for line in ("encoder", "untrained encoder (step 0)", "raw pixels") for step in (0, 2, 4)
    }
    assert series[("encoder", 4)] == curves[KNN][-1][1] and series[("raw pixels", 2)] == curves[KNN_PIXELS][-1][1]


# ---- the figures themselves, from real images ---------------------------------------------------------------
def test_a_grid_shows_every_image_pixel_for_pixel_under_its_column_title() -> None:
    images, _ = fashion_mnist(3)
    views = torch.stack([images, 255 - images, images.flip(-1)], dim=1)  # (3 images, 3 views, 28, 28)
    grid = (views[..., None].expand(-1, -1, -1, -1, 3).float() / 255).numpy()
    figure = image_grid(grid, ["original", "inverted", "mirrored"], "step 7")
    assert figure.get_suptitle() == "step 7"
    pixels = figure_pixels(figure)
    side = 6 * 28  # 28 px shown 6x: the smallest whole factor that reaches MIN_SIDE
    assert side >= MIN_SIDE > 5 * 28 and upscale(grid).shape[-3:-1] == (side, side)
    titles = {text.get_text(): text.get_position()[0] * pixels.shape[1] for text in figure.texts}
    for column, (image, name) in enumerate(zip(figure.images, ["original", "inverted", "mirrored"], strict=True)):
        top = pixels.shape[0] - image.oy - image.get_array().shape[0]  # figimage counts from the bottom
        assert image.ox < titles[name] < image.ox + side  # the title is above its own column
        for row in range(3):  # not resampled: each model pixel a sharp 6x6 square
            drawn = pixels[top + row * (side + GAP) :][:side, image.ox : image.ox + side]
            assert np.array_equal(drawn, np.round(upscale(grid[row, column]) * 255).astype(np.uint8))


def test_side_by_side_pads_the_shorter_picture_white() -> None:
    images, _ = fashion_mnist(2)
    tall, short = (np.repeat(images[i].numpy()[..., None], 3, axis=-1) for i in (0, 1))
    row = side_by_side([tall, short[:20]], gap=4)
    assert row.shape == (28, 28 + 4 + 28, 3)
    assert np.array_equal(row[:, :28], tall) and np.array_equal(row[:20, 32:], short[:20])
    assert (row[20:, 32:] == 255).all() and (row[:, 28:32] == 255).all()


def test_the_confusion_matrix_names_each_class_and_reads_as_percentages() -> None:
    """A nearest-class-mean classifier on raw Fashion-MNIST pixels: a real confusion between garments."""
    images, labels = fashion_mnist(600)
    flat = images.flatten(1).float() / 255
    means = torch.stack([flat[:300][labels[:300] == c].mean(0) for c in range(10)])
    predicted = torch.cdist(flat[300:], means).argmin(1)
    matrix = MulticlassConfusionMatrix(10)(predicted, labels[300:])
    figure = confusion_figure(matrix, GARMENTS, step=12)
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == GARMENTS
    assert [label.get_text() for label in axes.get_yticklabels()] == GARMENTS
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted class", "true class")
    accuracy = 100 * (predicted == labels[300:]).float().mean()
    assert axes.get_title() == f"confusion matrix at step 12: {accuracy:.1f}% correct"
    rates = 100 * matrix / matrix.sum(1, keepdim=True)
    assert len(axes.texts) == int((rates >= 0.5).sum())  # every cell that holds anything says its percentage
    trouser = [text.get_text() for text in axes.texts if text.get_position() == (1, 1)]
    assert trouser == [f"{float(rates[1, 1]):.0f}"]
    assert figure_pixels(figure).shape == (800, 800, 3)


def test_a_confusion_matrix_of_many_classes_stays_one_readable_figure() -> None:
    predicted, truth = torch.randint(0, 300, (2, 3000), generator=torch.Generator().manual_seed(0))
    figure = confusion_figure(MulticlassConfusionMatrix(300)(predicted, truth))
    axes = figure.axes[0]
    assert not axes.texts and NAMED_UP_TO < 300 and len(axes.get_xticklabels()) < 20  # matplotlib's own ticks
    assert figure_pixels(figure).shape == (2000, 2000, 3)


def test_figures_leave_nothing_in_pyplot() -> None:
    """Figures are drawn on their own canvases: a long run never fills pyplot's list of open figures."""
    images, _ = fashion_mnist(2)
    grid = (images[:, None, ..., None].expand(-1, 1, -1, -1, 3).float() / 255).numpy()
    figure_pixels(image_grid(grid, ["original"], "step 0"))
    figure_pixels(loss_figure([(0, 1.0), (5, 0.5)]))
    figure_pixels(confusion_figure(torch.eye(3, dtype=torch.long)))
    assert plt.get_fignums() == []
