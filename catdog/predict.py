"""`python -m catdog predict`: classify photos with the production model (or any model), through
its LiteRT export where it has one (no TensorFlow import), else through Keras."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catdog.config import RUN
from catdog.data.extract import IMAGE_SUFFIXES
from catdog.errors import ModelError
from catdog.layout import MODEL_FILE, RECORD_FILE, STAGE_DIRS, SUMMARY_FILE, Layout
from catdog.mirror import fetch_output, pull_production
from catdog.registry import Production, archive_path
from catdog.registry import read as read_registry
from catdog.serving import SERVING_FILE, ServingSpec

RUNTIMES = ("auto", "litert", "keras")


@dataclass(frozen=True)
class ModelChoice:
    path: Path  # a .keras file (runtime "keras") or an export folder (runtime "litert")
    classes: list[str]
    origin: str  # "production", "--model", or why the last run's best (no production yet)
    runtime: str  # "keras" or "litert"


@dataclass(frozen=True)
class Prediction:
    path: Path
    label: str | None
    probability: float | None
    error: str | None = None


def _is_export(path: Path) -> bool:
    return (path / SERVING_FILE).is_file()


def choose_model(
    artifacts: str | Path, model: Path | None, classes: list[str] | None, runtime: str = "auto"
) -> ModelChoice:
    """The model to use and how: `--model` (a .keras file or an export folder), else
    production, else the best model of the last run; its LiteRT export where there is one
    (no TensorFlow import), unless `runtime` says "keras".

    Raises:
        ModelError: No model, no class names, or no export for `runtime` "litert".
    """
    layout = Layout.at(artifacts)
    if layout.store is not None:  # a store it cannot use: one line, before anything
        layout.store.check(write=False)
    pull_production(layout)
    summary = layout.summary
    production = read_registry(layout).production
    if layout.store is not None and production is None and model is None:
        layout.store.download(SUMMARY_FILE, summary)  # the last run's, from whichever host
    export: Path | None = None
    if model is not None:
        if not model.exists():
            raise ModelError(f"--model {model}: no such file or folder")
        chosen, origin = model, "--model"
        if model.is_dir():
            if not _is_export(model):
                raise ModelError(f"--model {model}: a folder, but no export ({SERVING_FILE})")
            export = model
    elif production is not None:
        chosen, origin = archive_path(layout, production), "production"
        # The archived export the registry names (production/export/ is a copy for people).
        if production.exports and _is_export(layout.root / production.exports):
            export = layout.root / production.exports
    elif summary.is_file():
        data = json.loads(summary.read_text())
        best = data.get("best_model")
        if not best:
            raise ModelError(f"{summary} names no best model; train one first or pass --model")
        chosen = Path(data["models"][best]["path"])
        if layout.store is not None:  # that path is the running host's: this host's copy
            chosen = _fetched_model(layout, data, best)
        origin = f"no production model in {layout.production_dir} yet, so the last run's best"
    else:
        raise ModelError(
            f"no production model in {layout.production_dir} and no run in {layout.root}; "
            "train one with `catdog run` or pass --model PATH"
        )
    if runtime == "litert" and export is None:
        raise ModelError(
            f"--runtime litert: {chosen} has no LiteRT export; make one with "
            "`python -m catdog export`, or use --runtime keras"
        )
    if export is not None and runtime != "keras":
        spec = ServingSpec.load(export)
        return ModelChoice(export, classes or spec.classes, origin, "litert")
    if chosen.is_dir():
        raise ModelError(f"--model {chosen}: an export; --runtime keras needs a .keras file")
    known = classes or _classes_on_record(layout, production)
    if not known:
        raise ModelError("cannot tell the class names; pass --classes cats,dogs")
    return ModelChoice(chosen, known, origin, "keras")


def _fetched_model(layout: Layout, summary: dict[str, Any], name: str) -> Path:
    """Model `name` of the run `summary` describes, in this host's copy of the store (its
    training output fetched, checked, where this host lacks it)."""
    prefix = f"{STAGE_DIRS['train']}/{name}/"
    trained = next(
        (used for used in summary.get("artifacts_used", []) if used.startswith(prefix)), None
    )
    if trained is None:
        raise ModelError(f"the last run's summary names no training output of {name}")
    folder = layout.root / trained
    if not (folder / RECORD_FILE).is_file() and not fetch_output(layout, folder):
        raise ModelError(
            f"{name}'s training output {trained} is not in the store {layout.location}; "
            "train again or pass --model"
        )
    return folder / MODEL_FILE


def _classes_on_record(layout: Layout, production: Production | None) -> list[str] | None:
    if production is not None:
        return list(production.classes)
    if layout.summary.is_file():
        found = json.loads(layout.summary.read_text()).get("data", {}).get("classes")
        if found:
            return list(found)
    return None


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

    probabilities, size = _probabilities(choice)
    results: list[Prediction] = []
    readable: list[tuple[Path, np.ndarray]] = []
    for path in files:
        try:
            readable.append((path, load_image(path, size)))
        except (OSError, ValueError, SyntaxError) as error:
            results.append(Prediction(path, None, None, f"cannot read image: {error}"))
    for start in range(0, len(readable), batch_size):  # decoded a batch at a time
        chunk = readable[start : start + batch_size]
        probs = probabilities(np.stack([image for _, image in chunk]).astype(np.float32))
        for (path, _), row in zip(chunk, probs, strict=True):
            index = int(np.argmax(row))
            results.append(Prediction(path, choice.classes[index], float(row[index])))
    order = {path: i for i, path in enumerate(files)}
    return sorted(results, key=lambda r: order[r.path])


def _probabilities(choice: ModelChoice) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """The chosen model as images -> probabilities, and its input side."""
    if choice.runtime == "litert":
        from catdog.serving import litert_predictor

        return litert_predictor(choice.path), ServingSpec.load(choice.path).image_size
    from catdog.evaluation import load_model, predict_logits, softmax

    try:
        model = load_model(choice.path)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {choice.path}: {error}") from error
    return (lambda images: softmax(predict_logits(model, images))), int(model.input_shape[1])


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
        default=os.environ.get("CATDOG_ARTIFACTS", RUN.artifacts),
        help="artifacts folder, or object store URL (s3://bucket/prefix), to find the "
        "production model in (default ./artifacts)",
    )
    parser.add_argument("--classes", help="comma-separated class names, if the model has none")
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="auto: the LiteRT export where the model has one (no TensorFlow), else Keras",
    )
    parser.add_argument("--csv", type=Path, help="write the predictions to this CSV file too")


def run(args: argparse.Namespace) -> int:
    classes = args.classes.split(",") if args.classes else None
    choice = choose_model(args.artifacts, args.model, classes, args.runtime)
    missing = [path for path in args.inputs if not path.exists()]
    for path in missing:
        print(f"error: {path}: no such file or folder", file=sys.stderr)
    files = list(expand([path for path in args.inputs if path.exists()]))
    print(f"model: {choice.path} ({choice.origin}, {choice.runtime})", file=sys.stderr)
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
