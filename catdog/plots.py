"""The report's figures. Each function returns a matplotlib Figure; `save_figure` writes it.

Figures are built with the object-oriented API (`matplotlib.figure.Figure`), never pyplot:
no GUI backend is needed, nothing is registered in pyplot's global figure list (so nothing
leaks when many figures are drawn), and drawing from worker threads is safe.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Headless: a server or CI run has no display. Figures below don't touch pyplot, but a caller
# that does gets a backend that works everywhere, unless it already chose one.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from catdog.arrays import Rows
from catdog.io import atomic_write_bytes

# A model's evaluation figures, by the report's name for each, and the files they are saved as.
EVALUATION_FIGURES = {
    "curves": "curves.png",
    "confusion": "confusion_matrix.png",
    "misclassified": "misclassified.png",
}

_PANEL_INCHES = 2.4  # width and height of one image panel
_CURVE_SIZE = (11.0, 4.2)  # two side-by-side metric panels


def _two_panels() -> tuple[Figure, tuple[Axes, Axes]]:
    """A figure of two side-by-side metric panels under a title."""
    # Spacing set by hand: the panels, their labels and the title are always alike, and a
    # layout engine measuring them took 40% of the figure's time (each model's evaluation, and
    # the report, draws one).
    fig = Figure(figsize=_CURVE_SIZE)
    ax_left, ax_right = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=0.13, wspace=0.22)
    return fig, (ax_left, ax_right)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    # Model inputs are float32 0..255; imshow reads floats as 0..1, so convert explicitly.
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _mosaic(
    rows: Sequence[Sequence[tuple[np.ndarray, str]]],
    title: str = "",
    fontsize: float = 9,
    panel_inches: float = _PANEL_INCHES,
    ncols: int = 1,
) -> Figure:
    """Rows of captioned images drawn in one Axes, each in a square cell of `panel_inches`.

    One Axes for all of them, not one each: an Axes costs its ticks and title layout even
    switched off, and a grid of 40 took a second and a half to draw, as long as the rest of
    the stage that draws it.
    """
    nrows = max(1, len(rows))
    ncols = max([ncols, *(len(row) for row in rows)])  # short rows leave blank cells
    title_inches = 0.4 if title else 0.0
    fig = Figure(figsize=(ncols * panel_inches, nrows * panel_inches + title_inches))
    ax = fig.add_axes((0.0, 0.0, 1.0, nrows * panel_inches / fig.get_figheight()))
    ax.axis("off")
    # A cell's caption takes its top, lines of `fontsize` points each; the image the rest.
    margin = 0.04
    for r, row in enumerate(rows):
        for c, (image, caption) in enumerate(row):
            lines = caption.count("\n") + 1
            top = margin + lines * fontsize * 1.25 / 72 / panel_inches
            array = _as_uint8(image)
            height, width = array.shape[:2]
            scale = min((1 - 2 * margin) / width, (1 - top - margin) / height)
            left = c + (1 - width * scale) / 2
            upper = r + top + (1 - top - margin - height * scale) / 2
            ax.imshow(
                array,
                cmap="gray" if array.ndim == 2 else None,
                vmin=0,
                vmax=255,
                extent=(left, left + width * scale, upper + height * scale, upper),
            )
            ax.text(c + 0.5, r + top - 0.01, caption, ha="center", va="bottom", fontsize=fontsize)
    # imshow sets the limits to its last image and an equal aspect; the cells stay square
    # because the figure's cells are.
    ax.set_xlim(0, ncols)
    ax.set_ylim(nrows, 0)
    ax.set_aspect("auto")
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 * title_inches / fig.get_figheight())
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Write `fig` atomically to `path` (format from the suffix, PNG if none) and close it.

    Args:
        fig: The figure; it is cleared afterwards and should not be reused.
        path: Destination file; its folder is created if missing.
        dpi: Resolution.

    Returns:
        `path`.
    """
    path = Path(path)
    buffer = io.BytesIO()
    kind = path.suffix.lstrip(".").lower() or "png"
    # zlib's fastest level: encoding was half of a figure's time at the default level, and
    # photo grids barely compress either way.
    options = {"pil_kwargs": {"compress_level": 1}} if kind == "png" else {}
    fig.savefig(buffer, format=kind, dpi=dpi, **options)
    atomic_write_bytes(path, buffer.getvalue())
    # A figure made through pyplot stays in pyplot's registry until closed; ours are not in
    # it, and clearing frees their artists either way.
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    fig.clear()
    return path


def sample_grid(images_by_class: Mapping[str, Sequence[np.ndarray]], ncols: int = 3) -> Figure:
    """A few training images per class, one row per class, each titled with its class.

    Args:
        images_by_class: Class name -> images (uint8 HxWx3); up to `ncols` are shown.
        ncols: Images per row (the blog shows 3 cats over 3 dogs).

    Returns:
        The figure.

    Raises:
        ValueError: No classes given or ncols < 1.
    """
    if not images_by_class or ncols < 1:
        raise ValueError("sample_grid needs at least one class and ncols >= 1")
    # A class with fewer images leaves blank cells.
    rows = [[(image, name) for image in images[:ncols]] for name, images in images_by_class.items()]
    return _mosaic(rows, ncols=ncols)


def augmentation_preview(image: np.ndarray, views: Sequence[np.ndarray]) -> Figure:
    """An image next to random augmented versions of it.

    Args:
        image: The original (uint8 HxWx3).
        views: Augmented draws of it (e.g. 6).

    Returns:
        The figure.
    """
    panels = [(image, "original")] + [(v, f"augmented {i + 1}") for i, v in enumerate(views)]
    ncols = min(4, len(panels))
    return _mosaic([panels[start : start + ncols] for start in range(0, len(panels), ncols)])


def _epochs(values: Sequence[float]) -> list[int]:
    return list(range(1, len(values) + 1))  # Keras counts epochs from 1 in its logs


def _epoch_axis(ax: Axes) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 2.5"


def training_curves(
    history: Mapping[str, Sequence[float]], title: str, baseline: float | None = None
) -> Figure:
    """Training and validation accuracy and loss per epoch, as in the blog.

    Args:
        history: Keras `History.history`: "accuracy", "val_accuracy", "loss", "val_loss"
            (missing keys are skipped).
        title: Figure title, e.g. the model name.
        baseline: Accuracy of always guessing the majority class, drawn dashed.

    Returns:
        The figure.
    """
    fig, (ax_acc, ax_loss) = _two_panels()
    for ax, metric, label in ((ax_acc, "accuracy", "Accuracy"), (ax_loss, "loss", "Loss")):
        for key, name in ((metric, "training"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                ax.plot(_epochs(values), values, marker="o", markersize=3, label=name)
        _epoch_axis(ax)
        ax.set_ylabel(label)
        ax.set_title(f"{label}")
        ax.grid(alpha=0.3)
    if baseline is not None:
        ax_acc.axhline(baseline, linestyle="--", color="gray", label=f"baseline {baseline:.3f}")
    for ax in (ax_acc, ax_loss):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    return fig


def compare_models(
    histories: Mapping[str, Mapping[str, Sequence[float]]], baseline: float | None = None
) -> Figure:
    """Validation accuracy and loss of several models on one figure.

    Args:
        histories: Model name -> Keras `History.history`.
        baseline: Majority-class accuracy, drawn dashed on the accuracy panel.

    Returns:
        The figure.
    """
    fig, (ax_acc, ax_loss) = _two_panels()
    for name, history in histories.items():
        for ax, key in ((ax_acc, "val_accuracy"), (ax_loss, "val_loss")):
            values = history.get(key)
            if values:
                ax.plot(_epochs(values), values, marker="o", markersize=3, label=name)
    if baseline is not None:
        ax_acc.axhline(baseline, linestyle="--", color="gray", label=f"baseline {baseline:.3f}")
    for ax, label in ((ax_acc, "Validation accuracy"), (ax_loss, "Validation loss")):
        _epoch_axis(ax)
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("Model comparison")
    return fig


def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """A confusion matrix as a heat map with the count in each cell.

    Args:
        cm: Square counts, rows true, columns predicted.
        class_names: Names in class-index order.
        title: Figure title.

    Returns:
        The figure.
    """
    matrix = np.asarray(cm)
    n = matrix.shape[0]
    side = max(3.5, 0.6 * n + 2.0)  # grow with the class count so labels stay legible
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    # White text on dark cells, black on light ones, so every count is readable.
    threshold = matrix.max() / 2 if matrix.size and matrix.max() > 0 else 0
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if count > threshold and threshold > 0 else "black"
        ax.text(col, row, f"{int(count)}", ha="center", va="center", color=color)
    return fig


def misclassified_grid(
    images: Sequence[np.ndarray],
    true_names: Sequence[str],
    pred_names: Sequence[str],
    probs: Sequence[float],
    ncols: int = 4,
) -> Figure:
    """Misclassified images, each titled with its true class, the prediction and its probability.

    Args:
        images: The images (uint8 HxWx3).
        true_names: True class name per image.
        pred_names: Predicted class name per image.
        probs: Probability the model gave its (wrong) prediction, per image.
        ncols: Images per row.

    Returns:
        The figure; a short note instead of images when there are none (a perfect model).

    Raises:
        ValueError: The sequences differ in length.
    """
    if not len(images) == len(true_names) == len(pred_names) == len(probs):
        raise ValueError("images, true_names, pred_names and probs must have the same length")
    if not images:
        fig = Figure(figsize=(4.0, 1.5), layout="constrained")
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        ax.axis("off")
        return fig
    ncols = max(1, min(ncols, len(images)))
    cells = [
        (image, f"true: {true}\npred: {pred} ({float(prob):.2f})")
        for image, true, pred, prob in zip(images, true_names, pred_names, probs, strict=True)
    ]
    return _mosaic([cells[start : start + ncols] for start in range(0, len(cells), ncols)])


def evaluation_figures(
    model: str,
    history: Mapping[str, Sequence[float]],
    baseline: float,
    metrics: Mapping[str, Any],
    images: Rows,
    labels: np.ndarray,
    class_names: Sequence[str],
    max_errors: int = 12,
) -> dict[str, Figure]:
    """A model's evaluation figures by file name: its training curves, its confusion matrix on
    the test split, and its most confident errors (when it made any).

    Args:
        model: The model's name, for titles.
        history: Its Keras-style training history.
        baseline: Majority-class accuracy, drawn on the curves.
        metrics: `catdog.evaluation.score` of the model on `images`.
        images: The test images (uint8).
        labels: Their true class indices.
        class_names: Names of the classes, in label order.
        max_errors: How many errors to show at most.
    """
    figures = {
        EVALUATION_FIGURES["curves"]: training_curves(history, model, baseline),
        EVALUATION_FIGURES["confusion"]: confusion_matrix_figure(
            np.asarray(metrics["confusion_matrix"]), class_names, f"{model}: test split"
        ),
    }
    worst = list(metrics["most_confident_errors"])[:max_errors]
    if worst:
        figures[EVALUATION_FIGURES["misclassified"]] = misclassified_grid(
            [images[i] for i in worst],
            [class_names[labels[i]] for i in worst],
            [class_names[metrics["predictions"][i]] for i in worst],
            [metrics["confidence"][i] for i in worst],
        )
    return figures


def property_histograms(
    values_by_split: Mapping[str, np.ndarray], names: Sequence[str], bins: int = 30
) -> Figure:
    """One small histogram per image property, every split overlaid (rows: images, columns:
    `names`)."""
    ncols = 4
    nrows = math.ceil(len(names) / ncols)
    # Spacing set by hand, not by a layout engine: constrained layout measured every tick
    # label twice and took 40% of the figure's time, for a grid whose labels are all alike.
    fig = Figure(figsize=(ncols * 2.8, nrows * 2.2))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fig.subplots_adjust(
        left=0.02,
        right=0.98,
        top=1 - 0.3 / (nrows * 2.2),
        bottom=0.3 / (nrows * 2.2),
        hspace=0.45,
        wspace=0.1,
    )
    for k, name in enumerate(names):
        ax = axes[k]
        everything = np.concatenate([v[:, k] for v in values_by_split.values() if len(v)])
        edges = np.histogram_bin_edges(everything, bins=bins) if everything.size else bins
        for split, values in values_by_split.items():
            if len(values):
                ax.hist(values[:, k], bins=edges, histtype="step", density=True, label=split)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    for ax in axes[len(names) :]:
        ax.remove()
    axes[0].legend(fontsize=7)
    return fig


def thumbnail_rows(rows: Sequence[Sequence[tuple[np.ndarray, str]]], title: str = "") -> Figure:
    """Rows of small captioned images (near-duplicate groups, suspect labels)."""
    # Thumbnails are at most 96 pixels a side: cells little larger than that keep them sharp
    # and the figure a third of the pixels to draw and encode.
    return _mosaic(rows, title, fontsize=7, panel_inches=1.7)
