"""Every figure renders and saves to a PNG; saving is atomic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from catdog import plots

RNG = np.random.default_rng(0)


def image(size: int = 16) -> np.ndarray:
    return RNG.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


HISTORY = {
    "accuracy": [0.5, 0.6, 0.7],
    "val_accuracy": [0.5, 0.55, 0.65],
    "loss": [0.7, 0.6, 0.5],
    "val_loss": [0.7, 0.65, 0.6],
}

FIGURES = {
    "sample_grid": lambda: plots.sample_grid(
        {"cats": [image() for _ in range(3)], "dogs": [image() for _ in range(2)]}
    ),
    "augmentation_preview": lambda: plots.augmentation_preview(
        image(), [image() for _ in range(6)]
    ),
    "augmentation_preview_float": lambda: plots.augmentation_preview(
        image().astype("float32"), [image().astype("float32")]
    ),
    "training_curves": lambda: plots.training_curves(HISTORY, "model1", baseline=0.5),
    "training_curves_no_val": lambda: plots.training_curves(
        {"accuracy": [0.5], "loss": [0.7]}, "model1", baseline=None
    ),
    "compare_models": lambda: plots.compare_models(
        {"model1": HISTORY, "model2": HISTORY}, baseline=0.5
    ),
    "confusion_matrix_figure": lambda: plots.confusion_matrix_figure(
        np.array([[40, 10], [5, 45]]), ["cats", "dogs"], "model1 on test"
    ),
    "confusion_matrix_zero": lambda: plots.confusion_matrix_figure(
        np.zeros((2, 2), dtype=int), ["cats", "dogs"], "empty"
    ),
    "misclassified_grid": lambda: plots.misclassified_grid(
        [image() for _ in range(5)], ["cats"] * 5, ["dogs"] * 5, [0.9, 0.8, 0.7, 0.6, 0.55]
    ),
    "misclassified_grid_empty": lambda: plots.misclassified_grid([], [], [], []),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_saves_as_png(name, tmp_path):
    fig = FIGURES[name]()
    path = plots.save_figure(fig, tmp_path / "sub" / f"{name}.png", dpi=50)
    with Image.open(path) as png:
        assert png.format == "PNG"
    # Only the figure itself: the temporary file was renamed, not left behind.
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [f"{name}.png"]


def test_size_follows_figsize_and_dpi(tmp_path):
    fig = plots.training_curves(HISTORY, "t", baseline=None)
    inches = fig.get_size_inches()
    path = plots.save_figure(fig, tmp_path / "curves.png", dpi=40)
    with Image.open(path) as png:
        assert png.size == (round(inches[0] * 40), round(inches[1] * 40))


def test_failed_save_leaves_nothing(tmp_path):
    fig = plots.training_curves(HISTORY, "t", baseline=None)
    with pytest.raises(ValueError):
        plots.save_figure(fig, tmp_path / "curves.notaformat")
    assert list(tmp_path.iterdir()) == []


def test_misclassified_grid_checks_lengths():
    with pytest.raises(ValueError, match="same length"):
        plots.misclassified_grid([image()], ["cats"], [], [0.9])


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_epoch_ticks_are_whole_numbers(epochs):
    history = {key: [0.5 + 0.01 * i for i in range(epochs)] for key in HISTORY}
    for fig in (plots.training_curves(history, "m"), plots.compare_models({"m": history})):
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)


def test_evaluation_figures_show_errors_only_when_there_are_some():
    from catdog.evaluation import score

    images = np.stack([image() for _ in range(4)])
    labels = np.array([0, 1, 0, 1])
    right = score(np.array([[2.0, 0], [0, 2.0], [2.0, 0], [0, 2.0]]), labels, ["cats", "dogs"])
    wrong = score(np.array([[0, 2.0], [0, 2.0], [2.0, 0], [0, 2.0]]), labels, ["cats", "dogs"])
    args = ("model1", HISTORY, 0.5)
    assert set(plots.evaluation_figures(*args, right, images, labels, ["cats", "dogs"])) == {
        "curves.png",
        "confusion_matrix.png",
    }
    assert "misclassified.png" in plots.evaluation_figures(
        *args, wrong, images, labels, ["cats", "dogs"]
    )
