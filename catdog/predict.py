"""`python -m catdog predict`: classify photos with the production model (or any .keras file)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catdog.config import RUN
from catdog.data.extract import IMAGE_SUFFIXES
from catdog.errors import ModelError
from catdog.layout import Layout


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    classes: list[str]
    origin: str  # "production", "last run's best" or "--model"


@dataclass(frozen=True)
class Prediction:
    path: Path
    label: str | None
    probability: float | None
    error: str | None = None


def choose_model(artifacts: Path, model: Path | None, classes: list[str] | None) -> ModelChoice:
    """The model to use: `--model`, else production, else the best model of the last run."""
    layout = Layout.at(artifacts)
    registry = layout.registry
    summary = layout.summary
    known_classes = classes
    if known_classes is None:
        for source in (registry, summary):
            if source.is_file():
                data = json.loads(source.read_text())
                known_classes = data.get("classes") or data.get("data", {}).get("classes")
                if known_classes:
                    break
    if model is not None:
        if not model.is_file():
            raise ModelError(f"--model {model}: no such file")
        chosen, origin = model, "--model"
    elif registry.is_file():
        chosen, origin = Path(json.loads(registry.read_text())["path"]), "production"
    elif summary.is_file():
        data = json.loads(summary.read_text())
        best = data.get("best_model")
        if not best:
            raise ModelError(f"{summary} names no best model; train one first or pass --model")
        chosen, origin = Path(data["models"][best]["path"]), "last run's best"
    else:
        raise ModelError(
            f"no production model in {layout.production_dir} and no run in {layout.root}; "
            "train one with `python flows/train_flow.py` or pass --model PATH"
        )
    if not known_classes:
        raise ModelError("cannot tell the class names; pass --classes cats,dogs")
    return ModelChoice(chosen, list(known_classes), origin)


def expand(inputs: list[Path]) -> Iterator[Path]:
    """Files as given; folders as every image file below them, sorted."""
    for item in inputs:
        if item.is_dir():
            yield from sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            yield item


def predict_files(choice: ModelChoice, files: list[Path], batch_size: int = 32) -> list[Prediction]:
    """Class and probability per file; an unreadable file gets an error, the rest go on."""

    from catdog.data.images import load_image
    from catdog.evaluation import load_model, predict_logits, softmax

    try:
        model = load_model(choice.path)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {choice.path}: {error}") from error
    size = int(model.input_shape[1])
    results: list[Prediction] = []
    readable: list[tuple[Path, np.ndarray]] = []
    for path in files:
        try:
            readable.append((path, load_image(path, size)))
        except (OSError, ValueError, SyntaxError) as error:
            results.append(Prediction(path, None, None, f"cannot read image: {error}"))
    for start in range(0, len(readable), batch_size):  # decoded a batch at a time
        chunk = readable[start : start + batch_size]
        probs = softmax(predict_logits(model, np.stack([image for _, image in chunk])))
        for (path, _), row in zip(chunk, probs, strict=True):
            index = int(np.argmax(row))
            results.append(Prediction(path, choice.classes[index], float(row[index])))
    order = {path: i for i, path in enumerate(files)}
    return sorted(results, key=lambda r: order[r.path])


def _write_rows(writer: Any, predictions: list[Prediction]) -> None:
    writer.writerow(["path", "class", "probability"])
    for item in predictions:
        if not item.error:
            writer.writerow([item.path, item.label, f"{item.probability:.4f}"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    parser.add_argument("--model", type=Path, help="a .keras file (default: production model)")
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path(os.environ.get("CATDOG_ARTIFACTS", RUN.artifacts)),
        help="artifacts folder to find the production model in (default ./artifacts)",
    )
    parser.add_argument("--classes", help="comma-separated class names, if the model has none")
    parser.add_argument("--csv", type=Path, help="write the predictions to this CSV file too")


def run(args: argparse.Namespace) -> int:
    classes = args.classes.split(",") if args.classes else None
    choice = choose_model(args.artifacts, args.model, classes)
    missing = [path for path in args.inputs if not path.exists()]
    for path in missing:
        print(f"error: {path}: no such file or folder", file=sys.stderr)
    files = list(expand([path for path in args.inputs if path.exists()]))
    print(f"model: {choice.path} ({choice.origin})", file=sys.stderr)
    predictions = predict_files(choice, files)
    for item in predictions:
        if item.error:
            print(f"error: {item.path}: {item.error}", file=sys.stderr)
    if any(path.is_dir() for path in args.inputs):  # a folder: a CSV table on stdout
        _write_rows(csv.writer(sys.stdout), predictions)
    else:
        for item in predictions:
            if not item.error:
                print(f"{item.path}\t{item.label}\t{item.probability:.4f}")
    if args.csv:
        from catdog.io import atomic_write_text

        table = io.StringIO()
        _write_rows(csv.writer(table), predictions)
        atomic_write_text(args.csv, table.getvalue())
    failed = bool(missing) or any(item.error for item in predictions)
    return 1 if failed else 0
