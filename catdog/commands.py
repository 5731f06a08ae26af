"""The library's commands: `catdog predict`, `export`, `registry` and `cache`.

Each subcommand has an `_add_<name>` function that declares it and a `_run_<name>` function
that does it. Heavy modules (TensorFlow, the predictor) are imported inside the `_run_*`
functions only, so `--help` is instant and a broken or missing module fails only the
subcommand that needs it. None of them imports Prefect: `catdog/__main__.py` puts them beside
the flow's commands (run, serve, alerts).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from catdog.config import RUN

Handler = Callable[[argparse.Namespace, list[str]], int]


def _add_artifacts_option(parser: argparse.ArgumentParser, what: str = "artifacts folder") -> None:
    parser.add_argument(
        "--artifacts",
        default=os.environ.get("CATDOG_ARTIFACTS", RUN.artifacts),
        help=f"{what} (env CATDOG_ARTIFACTS; default ./{RUN.artifacts})",
    )


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


# ----------------------------------------------------------------------------- cache prune


def _add_cache(commands: Any) -> None:
    cache = commands.add_parser(
        "cache",
        help="manage the artifacts folder's stage outputs and Prefect cache",
        description="Manage the artifacts folder's stage outputs and Prefect cache.",
    )
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    prune = actions.add_parser(
        "prune",
        help="remove stage outputs and cache entries the last N runs do not use",
        description="Remove stage output folders, and Prefect cache-key and result files, "
        "that none of the last N finished runs used (as listed in their summary.json), and "
        "leftovers of crashed runs older than a day. production/ and the run reports are "
        "never touched; a removed stage is recomputed by the next run that needs it.",
    )
    _add_artifacts_option(prune)
    prune.add_argument(
        "--keep",
        type=_positive,
        default=RUN.keep_runs,
        metavar="N",
        help=f"keep what the last N finished runs used ({RUN.keep_runs})",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="only list what would be removed and freed"
    )
    prune.add_argument(
        "-q", "--quiet", action="store_true", help="print only the totals, not every path"
    )
    prune.set_defaults(handler=_run_cache_prune)


def _run_cache_prune(args: argparse.Namespace, extra: list[str]) -> int:
    from catdog.layout import Layout
    from catdog.prune import prune

    layout = Layout.at(args.artifacts)
    if layout.store is not None:  # a store it cannot use: one line, before anything
        layout.store.check(write=not args.dry_run)
    report = prune(layout.location, keep=args.keep, dry_run=args.dry_run)
    print(report.render(verbose=not args.quiet))
    return 0


# ----------------------------------------------------------------------------- registry


def _add_registry(commands: Any) -> None:
    registry = commands.add_parser(
        "registry",
        help="list the production model's history, or roll it back",
        description="List every promotion-gate decision on an artifacts folder (newest last), "
        "or, with `rollback`, make the model that the current production model replaced "
        "current again.",
    )
    registry.add_argument(
        "action", nargs="?", choices=["list", "rollback"], default="list", help="(list)"
    )
    _add_artifacts_option(registry)
    registry.set_defaults(handler=_run_registry)


def _run_registry(args: argparse.Namespace, extra: list[str]) -> int:
    from catdog import registry
    from catdog.layout import Layout
    from catdog.mirror import pull_production

    layout = Layout.at(args.artifacts)
    if layout.store is not None:  # a store it cannot use: one line, before anything
        layout.store.check(write=args.action == "rollback")
    if args.action == "rollback":
        print(registry.rollback(layout)["reason"])
        return 0
    pull_production(layout)
    recorded = registry.read(layout)
    if not recorded.history:
        print(f"no promotion decision recorded in {layout.registry}")
        return 0
    current = recorded.production.entry if recorded.production else None
    for number, entry in enumerate(recorded.history):
        mark = " (current)" if number == current else ""
        model = entry.get("model") or entry.get("candidate")
        epoch = entry.get("epoch") or entry.get("candidate_epoch")
        print(f"{number:4d}  {entry['time']}  {entry['action']:8s}  {model} epoch {epoch}{mark}")
        print(f"      {entry['reason']}")
    if current is None:
        print(
            f"no production model: none of these {len(recorded.history)} decisions promoted "
            "a model (`predict` and `export` use the last run's best model meanwhile)"
        )
    return 0


# ----------------------------------------------------------------------------- export


def _add_export(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="export a model for serving (TensorFlow SavedModel, LiteRT) and check it",
        description="Export a trained model (default: production) as a TensorFlow SavedModel "
        "(for TensorFlow Serving) and a LiteRT model (for ai-edge-litert, without TensorFlow), "
        "with serving.json; then load each in a fresh process and check that it gives the "
        "Keras model's probabilities on 32 generated images. Exit code 1 if a check fails.",
    )
    export.add_argument("--model", type=Path, help="a .keras file (default: production)")
    export.add_argument("--classes", help="comma-separated class names, if none are on record")
    export.add_argument(
        "--out", type=Path, default=Path("export"), help="the folder to write (./export)"
    )
    _add_artifacts_option(export, "artifacts folder to find production in")
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace, extra: list[str]) -> int:
    import shutil
    import tempfile

    import numpy as np

    from catdog.errors import CatdogError
    from catdog.evaluation import load_model, predict_logits, softmax
    from catdog.export import export_checked
    from catdog.io import replace_directory
    from catdog.predict import choose_model
    from catdog.serving import SERVING_FILE, ServingSpec

    classes = args.classes.split(",") if args.classes else None
    choice = choose_model(args.artifacts, args.model, classes, runtime="keras")
    out = args.out.resolve()
    if out.exists() and not (out / SERVING_FILE).is_file() and any(out.iterdir()):
        raise CatdogError(f"--out {out}: a folder that holds no export; give a new or empty one")
    model = load_model(choice.path)
    side = int(model.input_shape[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        images = np.random.default_rng(0).integers(0, 256, (32, side, side, 3), np.uint8)
        check_images = staged / "check-images.npy"  # the probe process reads them from here
        np.save(check_images, images)
        trained = softmax(predict_logits(model, images)).astype(np.float32)
        check = export_checked(model, staged, choice.classes, check_images, trained)
        check_images.unlink()
        spec = ServingSpec.load(staged)
        print(f"{choice.path} ({choice.origin}), {spec.precision}, {side}x{side}")
        print(f"check on {check.images} generated images: {check.reason()}")
        if not check.passed:
            print(
                f"error: the exports did not pass their check; {out} left as it was",
                file=sys.stderr,
            )
            return 1
        replace_directory(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"exported to {out}")
    return 0


# ----------------------------------------------------------------------------- predict
# The predictor lives in `catdog/predict.py`, which declares its own options:
#     def add_arguments(parser: argparse.ArgumentParser) -> None
#     def run(args: argparse.Namespace) -> int
# It is imported only when `predict` is asked for, so its imports (TensorFlow) cost nothing
# to the other commands and `catdog --help`.


def _add_predict(commands: Any) -> None:
    predict = commands.add_parser(
        "predict",
        help="classify images with the production model (see `predict --help`)",
        add_help=False,  # its options, --help included, are declared by catdog.predict
        prefix_chars="\0",  # hand every argument through, options included
    )
    predict.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace, extra: list[str]) -> int:
    from catdog import predict

    parser = argparse.ArgumentParser(
        prog="catdog predict",
        description=(predict.__doc__ or "").strip().splitlines()[0] if predict.__doc__ else None,
    )
    predict.add_arguments(parser)
    parsed = parser.parse_args(extra)
    return int(predict.run(parsed) or 0)


def add_library_commands(commands: Any) -> None:
    """Declare cache, registry, export and predict on the `catdog` command's sub-parsers."""
    _add_predict(commands)
    _add_export(commands)
    _add_registry(commands)
    _add_cache(commands)


def run_library_command(args: argparse.Namespace, extra: list[str], parser: Any) -> int:
    """Run the library command `args` was parsed for (its handler); returns the exit code.
    Bad input (a `CatdogError`) ends in one `error:` line and the error's exit code."""
    from catdog.errors import CatdogError

    if extra and args.handler is not _run_predict:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    try:
        return handler(args, extra)
    except CatdogError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
