"""Benchmark catdog against the blog's recipe: time, accuracy, memory, caching and scaling.

    python bench/run.py --data ../shared/data/cats_and_dogs_filtered.zip \
        --weights ../shared/weights/mobilenet_v2_1.0_224_no_top.h5 \
        [--epochs 20] [--models model1,model4] [--out bench/RESULTS.md]
    ... --fractions 0.25,0.5,1 --epochs 3 --models model1     (scaling with the training set)
    ... --full-flow --epochs 20                                (default 4-model flow + cached)
    ... --cold-flow --epochs 20                   (blog's four models vs the default flow, cold)
    ... --runners --epochs 3                      (the default flow, sequential vs --runner dask)
    python bench/run.py --from-json bench/RESULTS.comparison.json  (re-render a section)

Comparison mode alternates, per model: (a) the blog's recipe (bench/blog_recipe.py), (b) catdog's
flow on a fresh artifacts folder, (c) the same catdog command again, fully cached. Every
measurement is its own subprocess, so its peak memory is its own; a failed one is recorded in
the table and the run goes on. Each mode writes its own section of the Markdown file (and the
raw numbers to `<out>.<mode>.json`), keeping the sections other modes wrote.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.blog_recipe import BLOG_MODELS
from bench.common import (
    BENCH,
    RawLog,
    Run,
    add_from_json_argument,
    bf16_flags,
    catdog_env,
    command_line,
    environment_markdown,
    feature_seconds,
    flow_script,
    fmt,
    fmt_gib,
    keep_logs,
    log,
    measure,
    measure_catdog,
    median_after_first,
    now,
    own_epoch_seconds,
    ratio,
    snapshot_facts,
    snapshot_sources,
    table,
    verdict,
    write_section,
)
from catdog import catalog

TITLE = "catdog benchmark results"
CATDOG_MODELS = catalog.MODEL_NAMES


# ----------------------------------------------------------------------------- settings


def _models(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in CATDOG_MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s): {', '.join(unknown) or 'none'}")
    return names


def _fractions(value: str) -> list[float]:
    try:
        fractions = [float(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError("fractions must lie in (0, 1]")
    return sorted(fractions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", type=Path, help="cats_and_dogs_filtered.zip (required)")
    parser.add_argument("--weights", help="MobileNetV2 no-top .h5 or imagenet (required)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per model (20)")
    parser.add_argument("--models", type=_models, default=["model1", "model4"])
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument(
        "--fractions",
        type=_fractions,
        default=None,
        help="scaling mode: catdog on these fractions of the training set",
    )
    parser.add_argument(
        "--full-per-class",
        type=int,
        default=1000,
        help="training images per class of the full set (fraction 1 = this cap; 1000)",
    )
    parser.add_argument(
        "--full-flow",
        action="store_true",
        help="full-flow mode: the default flow (no --models), first run and cached rerun",
    )
    parser.add_argument(
        "--cold-flow",
        action="store_true",
        help="cold-flow mode: the blog's model1-model4, then catdog's default flow on fresh "
        "artifacts (alternating per --repeats round); wall-time ratio and accuracies",
    )
    parser.add_argument(
        "--split-blog",
        action="store_true",
        help="cold-flow: the blog's model1-model2 before catdog's run and model3-model4 after "
        "it, so that drift over the round weighs on both sides",
    )
    parser.add_argument(
        "--profiled-epochs",
        type=Path,
        default=None,
        metavar="RAW_JSON",
        help="cold-flow: bench/studies/epoch_profile.py's raw JSON, measured on this machine; "
        "catdog's model2 and model3 epochs are held to within 1.2x of its epochs",
    )
    parser.add_argument(
        "--runners",
        action="store_true",
        help="runners mode: the default flow cold on the sequential runner, then with "
        "--runner dask --workers 2 (alternating per --repeats round); wall ratio, accuracies",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternating rounds (1); scaling takes each fraction's fastest round",
    )
    parser.add_argument(
        "--reuse-blog",
        type=Path,
        default=None,
        metavar="RAW_JSON",
        help="comparison: take the blog measurements from an earlier run's raw JSON "
        "(the blog's code does not change) and measure only catdog",
    )
    parser.add_argument(
        "--reuse-blog-models",
        type=_models,
        default=None,
        help="with --reuse-blog: reuse only these models' blog runs (default: all)",
    )
    parser.add_argument(
        "--catdog-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every catdog command (repeatable; for quick checks, e.g. "
        "--catdog-arg=--max-images-per-class --catdog-arg=20)",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run catdog from the checkout instead of a copy of its sources taken at start",
    )
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="per measurement, s")
    parser.add_argument(
        "--retries", type=int, default=1, help="new tries of a failed catdog run (1)"
    )
    parser.add_argument(
        "--shared-prefect-home",
        action="store_true",
        help="run catdog with the user's PREFECT_HOME (default: one private to this benchmark)",
    )
    parser.add_argument(
        "--section",
        default=None,
        help="name of the section of --out to write (default: the mode)",
    )
    add_from_json_argument(parser)
    args = parser.parse_args(argv)
    if args.from_json:
        return args
    if args.data is None or args.weights is None:
        parser.error("--data and --weights are required")
    args.data = args.data.expanduser().resolve()
    if args.weights not in ("imagenet", "none"):
        args.weights = str(Path(args.weights).expanduser().resolve())
    return args


class Bench:
    """The work folder, the catdog sources under test and the measurement helpers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="catdog-bench-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.source: Path | None = None
        self.snapshot: dict[str, Any] = {}
        if not args.no_snapshot:
            self.source = self.work / "src"
            shutil.rmtree(self.source, ignore_errors=True)
            self.snapshot = snapshot_sources(self.source)
        self.counter = 0
        # One Prefect home for this benchmark's catdog runs: the first run creates its database.
        self.prefect_home = None if args.shared_prefect_home else self.work / "prefect-home"
        log(f"work folder {self.work}")

    def _next(self, label: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:02d}-{label}"

    def blog(self, model: str, epochs: int, data_dir: Path) -> dict[str, Any]:
        """(a) The blog's recipe in its own process."""
        folder = self._next(f"blog-{model}")
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "result.json"
        command = [
            sys.executable,
            str(BENCH / "blog_recipe.py"),
            "--data-dir",
            str(data_dir),
            "--model",
            model,
            "--epochs",
            str(epochs),
            "--weights",
            self.args.weights,
            "--seed",
            str(self.args.seed),
            "--out",
            str(out),
        ]
        log(f"blog {model}, {epochs} epochs ...")
        run = measure(command, folder / "log.txt", timeout=self.args.timeout)
        result = _load(out) if run.error is None else None
        if run.error is None and result is None:
            run.error = f"no result file {out}"
        log(f"blog {model}: {run.wall_seconds:.0f} s wall" + _err(run))
        return {"kind": "blog", "model": model, "run": run.to_json(), "result": result}

    def catdog(
        self,
        models: list[str] | None,
        epochs: int,
        artifacts: Path | None = None,
        *,
        label: str,
        extra: list[str] = (),  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """(b)/(c) catdog's flow; a fresh artifacts folder unless one is given (cached rerun).

        A failed run (not a timeout) is tried again up to --retries times, a first run on a
        fresh artifacts folder (resuming the failed one's training would not time a whole
        run); the failed attempts are kept in the entry.
        """
        failed: list[dict[str, Any]] = []
        while True:
            entry = self._catdog_once(models, epochs, artifacts, label=label, extra=extra)
            run = entry["run"]
            if not run["error"] or run["timed_out"] or len(failed) >= self.args.retries:
                return {**entry, "failed_attempts": failed}
            failed.append({"run": run, "artifacts": entry["artifacts"]})
            log(f"catdog {label}: retrying after the failure above")

    def _catdog_once(
        self,
        models: list[str] | None,
        epochs: int,
        artifacts: Path | None,
        *,
        label: str,
        extra: list[str],
    ) -> dict[str, Any]:
        folder = self._next(label)
        folder.mkdir(parents=True, exist_ok=True)
        artifacts = artifacts or folder / "artifacts"
        command = [
            sys.executable,
            str(flow_script(self.source)),
            "--data",
            str(self.args.data),
            "--epochs",
            str(epochs),
            "--weights",
            self.args.weights,
            "--seed",
            str(self.args.seed),
            "--artifacts",
            str(artifacts),
            *(["--models", ",".join(models)] if models else []),
            *self.args.catdog_arg,
            *extra,
        ]
        log(f"catdog {label} ({','.join(models or ['default'])}, {epochs} epochs) ...")
        run, summary = measure_catdog(
            command,
            folder / "log.txt",
            artifacts,
            timeout=self.args.timeout,
            env=catdog_env(self.source, self.prefect_home),
        )
        log(f"catdog {label}: {run.wall_seconds:.0f} s wall" + _err(run))
        return {
            "kind": label,
            "models": models,
            "artifacts": str(artifacts),
            "run": run.to_json(),
            "summary": _slim(summary),
            "feature_seconds": feature_seconds(folder / "log.txt"),
        }


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _err(run: Run) -> str:
    return f" -- ERROR {run.error}" if run.error else ""


def _slim(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the tables need from summary.json (drops confusion matrices and paths)."""
    if summary is None:
        return None
    keep = (
        "epochs",
        "history",
        "epoch_seconds",
        "test_accuracy",
        "train_seconds",
        "trainable_params",
        "total_params",
        "best_epoch",
        "worker",
    )
    return {
        "models": {
            name: {k: model.get(k) for k in keep} for name, model in summary["models"].items()
        },
        "tasks": summary.get("tasks", {}),
        "counts": summary.get("data", {}).get("counts", {}),
        "best_model": summary.get("best_model"),
    }


# ----------------------------------------------------------------------------- figures


def _epoch_stats(seconds: list[float]) -> tuple[float | None, float | None]:
    """(median, min) of epochs 2..N; epoch 1 alone when there is only one."""
    rest = seconds[1:] if len(seconds) > 1 else seconds
    return median_after_first(seconds), (min(rest) if rest else None)


def _figures(
    run: dict[str, Any], record: dict[str, Any], trained_s: float | None, error: str | None
) -> dict[str, Any]:
    """The table's figures from a run and a model's record (blog result or summary.json entry),
    which share the keys history, epoch_seconds, test_accuracy and the parameter counts."""
    val = (record.get("history") or {}).get("val_accuracy") or []
    epoch_median, epoch_min = _epoch_stats(record.get("epoch_seconds") or [])
    return {
        "epoch_s": epoch_median,
        "epoch_min_s": epoch_min,
        "trained_s": trained_s,
        "wall_s": run["wall_seconds"],
        "cpu_s": run.get("cpu_seconds"),
        "val_acc": val[-1] if val else None,
        "val_acc_last5": sum(val[-5:]) / len(val[-5:]) if val else None,
        "test_acc": record.get("test_accuracy"),
        "peak": run["peak_bytes"],
        "others": run.get("others_cores"),
        "params": (record.get("trainable_params"), record.get("total_params")),
        "error": error,
    }


def blog_figures(entry: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch times, time to a trained model, accuracies and memory of a blog run."""
    result = entry.get("result") or {}
    return _figures(entry["run"], result, result.get("total_seconds"), entry["run"]["error"])


def catdog_figures(entry: dict[str, Any], model: str) -> dict[str, Any]:
    """The same figures for one model of a catdog run."""
    run = entry["run"]
    summary = entry.get("summary") or {}
    record = summary.get("models", {}).get(model) or {}
    error = run["error"] or (None if record or not summary else f"{model} not in summary")
    return _figures(run, record, record.get("train_seconds"), error)


def task_states(entry: dict[str, Any]) -> str:
    """'12/12 Cached' style tally of a run's task states."""
    states = list(((entry.get("summary") or {}).get("tasks") or {}).values())
    if not states:
        return "–"
    tally: dict[str, int] = {}
    for state in states:
        tally[state] = tally.get(state, 0) + 1
    return ", ".join(f"{n}/{len(states)} {state}" for state, n in sorted(tally.items()))


def retries_note(entry: dict[str, Any] | None) -> list[str]:
    """A line per failed attempt that was tried again, if any."""
    return [
        f"- note: an earlier try of this catdog run failed and was run again on fresh "
        f"artifacts: {attempt['run']['error']}"
        for attempt in (entry or {}).get("failed_attempts") or []
    ]


def _pct(value: float | None) -> str:
    return fmt(None if value is None else 100 * value, 1, "%")


COMPARISON_HEADER = [
    "run",
    "epoch (median 2..N)",
    "epoch (min 2..N)",
    "time to trained model",
    "command wall",
    "command CPU time",
    "val acc (last epoch)",
    "val acc (mean last 5)",
    "test acc",
    "peak memory",
    "other processes' CPU (cores)",
]


def _row(label: str, f: dict[str, Any]) -> list[str]:
    if f["error"]:
        blanks = [""] * (len(COMPARISON_HEADER) - 3)
        return [label, f"error: {f['error']}", *blanks, fmt(f["others"], 2)]
    return [
        label,
        fmt(f["epoch_s"], 2, " s"),
        fmt(f["epoch_min_s"], 2, " s"),
        fmt(f["trained_s"], 1, " s"),
        fmt(f["wall_s"], 1, " s"),
        fmt(f["cpu_s"], 1, " s"),
        _pct(f["val_acc"]),
        _pct(f["val_acc_last5"]),
        _pct(f["test_acc"]),
        fmt_gib(f["peak"]),
        fmt(f["others"], 2),
    ]


def _cached_row(run: dict[str, Any]) -> list[str]:
    wall = fmt(run["wall_seconds"], 1, " s")
    if run["error"]:
        wall += f" error: {run['error']}"
    return [
        "catdog (fully cached rerun)",
        "",
        "",
        "",
        wall,
        fmt(run.get("cpu_seconds"), 1, " s"),
        "",
        "",
        "",
        fmt_gib(run["peak_bytes"]),
        fmt(run.get("others_cores"), 2),
    ]


def _reused_blog_note(data: dict[str, Any]) -> list[str]:
    """Where the blog's figures come from when this run did not measure them (--reuse-blog)."""
    reused = data.get("reused_blog")
    if not reused:
        return []
    return [
        "",
        f"Blog figures marked 'reused' were not measured in this run: they come from "
        f"`{reused['from']}` (measured {reused['measured']}, {reused['epochs']} epochs); "
        "the blog's code is fixed, catdog's changed in between. Compare its 'other "
        "processes' CPU' with catdog's: contention differed.",
    ]


def _header_lines(data: dict[str, Any], title: str) -> list[str]:
    return [
        f"## {title} ({data.get('finished') or now()})",
        "",
        data["environment"],
        f"- command: `{data['command']}`",
        "",
    ]


# ----------------------------------------------------------------------------- modes


def comparison(bench: Bench, raw: RawLog) -> None:
    """Blog vs catdog vs cached catdog, alternating, per model, each its own process."""
    args = bench.args
    from blog_recipe import extract_zip

    log("extracting the archive for the blog recipe (not timed) ...")
    data_dir = extract_zip(args.data, bench.work / "blog-data")
    entries: list[dict[str, Any]] = []
    raw.data["measurements"] = entries
    earlier: list[dict[str, Any]] = []
    if args.reuse_blog:
        earlier_data = json.loads(args.reuse_blog.read_text())
        earlier = [e for e in earlier_data.get("measurements", []) if e["kind"] == "blog"]
        raw.data["reused_blog"] = {
            "from": str(args.reuse_blog),
            "measured": earlier_data.get("finished") or earlier_data.get("started"),
            "epochs": (earlier_data.get("args") or {}).get("epochs"),
        }
    for round_ in range(args.repeats):
        for model in args.models:
            wanted = args.reuse_blog_models is None or model in args.reuse_blog_models
            reused = [e for e in earlier if e["model"] == model] if wanted else []
            if reused:
                old = reused[round_ % len(reused)]
                entries.append({**old, "round": round_, "reused": True})
            elif model in BLOG_MODELS:
                entries.append({"round": round_, **bench.blog(model, args.epochs, data_dir)})
                raw.save()
            first = bench.catdog([model], args.epochs, label=f"catdog-{model}")
            entries.append({"round": round_, "model": model, **first})
            raw.save()
            cached = bench.catdog(
                [model], args.epochs, Path(first["artifacts"]), label=f"catdog-cached-{model}"
            )
            entries.append({"round": round_, "model": model, **cached})
            raw.save()


def render_comparison(data: dict[str, Any]) -> str:
    """The comparison section from the raw measurements."""
    settings = data["args"]
    epochs, repeats = settings["epochs"], settings["repeats"]
    entries = data.get("measurements") or []
    parts: list[str] = []
    checks: list[list[str]] = []
    for model in settings["models"]:
        for round_ in range(repeats):
            pick = [e for e in entries if e.get("round") == round_ and e.get("model") == model]
            blog = next((e for e in pick if e["kind"] == "blog"), None)
            first = next((e for e in pick if e["kind"] == f"catdog-{model}"), None)
            cached = next((e for e in pick if e["kind"] == f"catdog-cached-{model}"), None)
            b = blog_figures(blog) if blog else None
            c = catdog_figures(first, model) if first else None
            rows = []
            if b:
                rows.append(
                    _row("blog recipe" + (" (reused, see below)" if blog.get("reused") else ""), b)
                )
            if c:
                rows.append(_row("catdog (fresh artifacts)", c))
            if cached:
                rows.append(_cached_row(cached["run"]))
            label = f" (round {round_ + 1})" if repeats > 1 else ""
            lines = [f"### {model}{label}", "", table(COMPARISON_HEADER, rows), ""]
            ok_b = b is not None and not b["error"]
            ok_c = c is not None and not c["error"]
            if ok_b and ok_c:
                r_epoch = ratio(c["epoch_s"], b["epoch_s"])
                r_min = ratio(c["epoch_min_s"], b["epoch_min_s"])
                r_trained = ratio(c["trained_s"], b["trained_s"])
                r_wall = ratio(c["wall_s"], b["wall_s"])
                r_cpu = ratio(c["cpu_s"], b["cpu_s"])
                r_mem = ratio(c["peak"], b["peak"])
                d_val = (c["val_acc"] - b["val_acc"]) * 100
                d_val5 = (c["val_acc_last5"] - b["val_acc_last5"]) * 100
                what = (
                    "decoding and feature extraction"
                    if catalog.spec(model).trains_on_features
                    else "decoding"
                )
                if first.get("feature_seconds") is not None:
                    lines.append(
                        f"- catdog's MobileNetV2 feature extraction (in its time to a trained "
                        f"model): {first['feature_seconds']:.0f} s"
                    )
                lines += [
                    f"- catdog/blog per-epoch time: **{fmt(r_epoch, 3)}x** (median), "
                    f"{fmt(r_min, 3)}x (fastest epoch)",
                    f"- catdog/blog time to {epochs} trained epochs (catdog's `train_seconds`, "
                    f"which includes {what}, vs the blog's load + build + fit): "
                    f"**{fmt(r_trained, 3)}x**",
                    f"- catdog/blog command wall (catdog's whole flow: Prefect start-up, copy, "
                    f"extract, manifest, plots, evaluation, report): {fmt(r_wall, 3)}x; "
                    f"command CPU time: {fmt(r_cpu, 3)}x (less sensitive to other load)",
                    f"- catdog/blog peak memory: {fmt(r_mem, 2)}x",
                    f"- validation accuracy, catdog − blog: {d_val:+.1f} points at the last "
                    f"epoch, {d_val5:+.1f} points over the last 5 epochs",
                ]
                if model == "model1":
                    ok = r_epoch is not None and r_epoch <= 0.6 and abs(d_val) <= 2.0
                    checks.append(
                        [
                            f"model1 per-epoch ≤ 0.6x blog at equal val acc (±2 points){label}",
                            f"{fmt(r_epoch, 3)}x (fastest epochs {fmt(r_min, 3)}x), "
                            f"Δval {d_val:+.1f} points (last 5: {d_val5:+.1f})",
                            verdict(ok),
                        ]
                    )
                if model == "model4":
                    ok = (
                        r_trained is not None and r_trained <= 0.15 and (c["test_acc"] or 0) >= 0.97
                    )
                    checks.append(
                        [
                            f"model4 time to {epochs} trained epochs ≤ 0.15x blog, "
                            f"test acc ≥ 0.97{label}",
                            f"{fmt(r_trained, 3)}x, test acc {_pct(c['test_acc'])}",
                            verdict(ok),
                        ]
                    )
            if ok_c and cached and not cached["run"]["error"]:
                r_cache = ratio(cached["run"]["wall_seconds"], first["run"]["wall_seconds"])
                lines.append(
                    f"- cached rerun / first run wall: **{fmt(r_cache, 3)}x** "
                    f"(task states of the rerun: {task_states(cached)})"
                )
                # The ≤ 0.05x target is the default flow's (`--full-flow`, bench/assignment.py);
                # a one-model flow's first run is short, so its ratio is shown, not judged.
                checks.append(
                    [
                        f"cached rerun / first run, {model} alone (the target is the "
                        f"default flow's){label}",
                        f"{fmt(r_cache, 3)}x",
                        verdict(None),
                    ]
                )
            lines += retries_note(first) + retries_note(cached)
            if ok_c:
                trainable, total = c["params"]
                lines.append(f"- catdog params: {trainable:,} trainable of {total:,}")
            parts.append("\n".join(lines) + "\n")
    body = [
        *_header_lines(data, f"Blog recipe vs catdog, {epochs} epochs"),
        "Per model, alternating, each in its own process: the blog's code "
        "(`bench/blog_recipe.py`: `image_dataset_from_directory`, JPEGs decoded every epoch, "
        "model4 through the frozen MobileNetV2 every epoch), catdog's flow on fresh artifacts, "
        "then the same catdog command again (fully cached). Epoch times are the median (and "
        "the minimum) of epochs 2..N. 'Time to trained model': blog = load datasets + build + "
        "fit; catdog = the model's `train_seconds` in summary.json (training plus the decode "
        "stage, plus feature extraction for model4). 'Command wall' is the whole process, "
        "timed by the parent; 'command CPU time' its user + system CPU. Peak memory is the "
        "larger of the child's ru_maxrss and the sampled sum of its process tree's RSS. "
        "'Other processes' CPU' is the average number of cores other work on the machine "
        "used meanwhile (2 cores in all): above ~0.2, timings are inflated by contention. "
        "The blog's validation set is 808 images (26 of 32 batches, reshuffled every epoch, "
        "so its test/validation cut moves each epoch), catdog's 800 fixed images; blog test "
        "= 6 batches (192 images), catdog test = 200 fixed images. catdog runs with a "
        "Prefect home private to the benchmark (unless --shared-prefect-home), whose "
        "database the first catdog run creates.",
        "",
        *parts,
    ]
    body += _reused_blog_note(data)
    if checks:
        body += ["", "### Targets", "", table(["target", "measured", "verdict"], checks)]
    return "\n".join(body)


def scaling(bench: Bench, raw: RawLog) -> None:
    """catdog on growing fractions of the training set, each on fresh artifacts."""
    args = bench.args
    entries: list[dict[str, Any]] = []
    raw.data["measurements"] = entries
    for round_ in range(args.repeats):
        for fraction in args.fractions:
            cap = max(2, round(fraction * args.full_per_class))
            entry = bench.catdog(
                args.models,
                args.epochs,
                label=f"scaling-{fraction:g}",
                extra=["--max-images-per-class", str(cap)],
            )
            entries.append({"round": round_, "fraction": fraction, "cap": cap, **entry})
            raw.save()


def render_scaling(data: dict[str, Any]) -> str:
    """The scaling section: time and memory per fraction, and their growth."""
    settings = data["args"]
    header = [
        "round",
        "fraction",
        "cap/class",
        "train imgs",
        "val imgs",
        "model",
        "time to trained model",
        "per train image",
        "epoch (median)",
        "epoch per train image",
        "command wall",
        "command CPU time",
        "peak memory",
        "val acc",
        "other processes' CPU (cores)",
    ]
    rows: list[list[str]] = []
    # Per model and training-set size, every round's (time to trained model, epoch, peak).
    series: dict[str, dict[int, list[tuple[float, float, int]]]] = {}
    for entry in data.get("measurements") or []:
        counts = (entry.get("summary") or {}).get("counts") or {}
        n_train = sum((counts.get("train") or {}).values())
        n_val = sum((counts.get("validation") or {}).values())
        if entry["run"]["error"]:
            error = f"error: {entry['run']['error']}"
            blanks = [""] * (len(header) - 7)
            where = [str(entry.get("round", 0) + 1), f"{entry['fraction']:g}", str(entry["cap"])]
            rows.append([*where, "", "", "", error, *blanks])
            continue
        for model in settings["models"]:
            f = catdog_figures(entry, model)
            per_image = ratio(f["trained_s"], n_train)
            per_epoch_image = ratio(f["epoch_s"], n_train)
            series.setdefault(model, {}).setdefault(n_train, []).append(
                (f["trained_s"] or 0.0, f["epoch_s"] or 0.0, entry["run"]["peak_bytes"])
            )
            rows.append(
                [
                    str(entry.get("round", 0) + 1),
                    f"{entry['fraction']:g}",
                    str(entry["cap"]),
                    str(n_train),
                    str(n_val),
                    model,
                    fmt(f["trained_s"], 1, " s"),
                    fmt(None if per_image is None else per_image * 1000, 1, " ms"),
                    fmt(f["epoch_s"], 2, " s"),
                    fmt(None if per_epoch_image is None else per_epoch_image * 1000, 2, " ms"),
                    fmt(f["wall_s"], 1, " s"),
                    fmt(f["cpu_s"], 1, " s"),
                    fmt_gib(entry["run"]["peak_bytes"]),
                    _pct(f["val_acc"]),
                    fmt(f["others"], 2),
                ]
            )
    growth: list[str] = []
    for model, by_size in series.items():
        # Each size's best round: contention from other work only ever adds time.
        points = [
            (n, min(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs))
            for n, runs in sorted(by_size.items())
        ]
        base_n, base_t, base_e, base_m = points[0]
        worst_t = worst_m = 0.0
        for n, t, e, m in points[1:]:
            scale = n / base_n
            grow_t = (t / base_t) / scale if base_t else float("nan")
            grow_m = (m / base_m) / scale if base_m else float("nan")
            worst_t, worst_m = max(worst_t, grow_t), max(worst_m, grow_m)
            growth.append(
                f"- {model}: ×{scale:.2f} training images → time to trained model "
                f"×{t / base_t:.2f}, epoch ×{e / base_e:.2f}, peak memory ×{m / base_m:.2f} "
                f"(growth / data growth: time {grow_t:.2f}, memory {grow_m:.2f}; "
                "≤ 1 is linear or better)"
            )
        holds = worst_t <= 1.05 and worst_m <= 1.05 if len(points) > 1 else None
        growth.append(
            f"- {model}: cost grows no faster than linearly with the training-set fraction: "
            f"{verdict(holds)} (largest growth / data growth: time {worst_t:.2f}, memory "
            f"{worst_m:.2f}; 5% tolerance for timing noise)"
        )
    body = [
        *_header_lines(data, f"Scaling with the training-set size, {settings['epochs']} epochs"),
        "catdog on fresh artifacts with `--max-images-per-class` = fraction × "
        f"{settings['full_per_class']}. The cap applies to every (split, class), so the "
        "validation split (at most 400 per class: the rest of validation/ is test) shrinks "
        "with small caps too. 'Time to trained model' is `train_seconds` (training + decode); "
        "per-image figures divide by the training images (an epoch also validates, on a "
        "validation split that does not grow past 800 images, and a training image costs "
        "about three validation images: forward and backward). With several rounds, growth "
        "is judged on each size's fastest round.",
        "",
        table(header, rows),
        "",
        *growth,
        *[line for entry in data.get("measurements") or [] for line in retries_note(entry)],
    ]
    return "\n".join(body)


def full_flow(bench: Bench, raw: RawLog) -> None:
    """The default flow (all default models): first run and fully cached rerun."""
    args = bench.args
    first = bench.catdog(None, args.epochs, label="full-flow")
    raw.data["first"] = first
    raw.save()
    cached = bench.catdog(None, args.epochs, Path(first["artifacts"]), label="full-flow-cached")
    raw.data["cached"] = cached
    raw.save()


def render_full_flow(data: dict[str, Any]) -> str:
    """The full-flow section: per-model figures, cached/first ratio, peak memory."""
    first, cached = data["first"], data.get("cached") or {"run": None}
    rows: list[list[str]] = []
    for name in ((first.get("summary") or {}).get("models")) or {}:
        f = catdog_figures(first, name)
        rows.append(
            [
                name,
                fmt(f["epoch_s"], 2, " s"),
                fmt(f["trained_s"], 1, " s"),
                _pct(f["val_acc"]),
                _pct(f["test_acc"]),
                f"{f['params'][0]:,} / {f['params'][1]:,}",
            ]
        )
    run1, run2 = first["run"], cached["run"]
    r_cache = None
    if run2 and not run1["error"] and not run2["error"]:
        r_cache = ratio(run2["wall_seconds"], run1["wall_seconds"])
    peak = run1["peak_bytes"]
    header = ["model", "epoch (median 2..N)", "train_seconds", "val acc (last)", "test acc"]
    lines = [
        *_header_lines(data, f"Full default flow, {data['args']['epochs']} epochs"),
        table([*header, "params (trainable / total)"], rows)
        if rows
        else f"first run failed: {run1['error']}",
        "",
        f"- first run wall: {fmt(run1['wall_seconds'], 1, ' s')}, CPU time "
        f"{fmt(run1.get('cpu_seconds'), 1, ' s')}, other processes' CPU meanwhile "
        f"{fmt(run1.get('others_cores'), 2)} cores"
        + (f" (error: {run1['error']})" if run1["error"] else ""),
    ]
    if run2:
        lines += [
            f"- fully cached rerun wall: {fmt(run2['wall_seconds'], 1, ' s')}"
            + (f" (error: {run2['error']})" if run2["error"] else "")
            + f"; task states: {task_states(cached)}",
            f"- cached / first: **{fmt(r_cache, 4)}x** → target ≤ 0.05x: "
            f"{verdict(None if r_cache is None else r_cache <= 0.05)}",
        ]
    lines.append(
        f"- peak memory of the first run: **{fmt_gib(peak)}** (largest process "
        f"{fmt_gib(run1['max_rss_bytes'])}, sampled process-tree sum "
        f"{fmt_gib(run1['tree_rss_bytes'])}) → target ≤ 3 GB: "
        f"{verdict(None if not peak else peak <= 3e9)}"
    )
    if run2:
        lines.append(f"- peak memory of the cached rerun: {fmt_gib(run2['peak_bytes'])}")
    lines += retries_note(first) + retries_note(cached)
    return "\n".join(lines)


def cold_flow(bench: Bench, raw: RawLog) -> None:
    """The blog's four models, then catdog's default flow on fresh artifacts, per round."""
    args = bench.args
    from blog_recipe import extract_zip

    log("extracting the archive for the blog recipe (not timed) ...")
    data_dir = extract_zip(args.data, bench.work / "blog-data")
    raw.data["cpu_flags"] = bf16_flags()
    rounds: list[dict[str, Any]] = []
    raw.data["rounds"] = rounds
    earlier: list[dict[str, Any]] = []
    if args.reuse_blog:  # the blog's code does not change: catdog alone against its figures
        earlier_data = json.loads(args.reuse_blog.read_text())
        earlier = [round_["blog"] for round_ in earlier_data.get("rounds", [])]
        raw.data["reused_blog"] = {
            "from": str(args.reuse_blog),
            "measured": earlier_data.get("finished") or earlier_data.get("started"),
            "epochs": (earlier_data.get("args") or {}).get("epochs"),
        }
    if args.profiled_epochs:
        raw.data["profiled_epochs"] = json.loads(args.profiled_epochs.read_text())
    # With --split-blog, the blog's first half runs before catdog's run and the rest after it.
    before = BLOG_MODELS[: len(BLOG_MODELS) // 2] if args.split_blog else BLOG_MODELS
    for index in range(args.repeats):
        if earlier:
            blog = [{**entry, "reused": True} for entry in earlier[index % len(earlier)]]
        else:
            blog = [bench.blog(model, args.epochs, data_dir) for model in before]
        rounds.append({"blog": blog})
        raw.save()
        rounds[-1]["catdog"] = bench.catdog(None, args.epochs, label="cold-flow")
        raw.save()
        if not earlier and len(before) < len(BLOG_MODELS):
            blog += [
                bench.blog(model, args.epochs, data_dir) for model in BLOG_MODELS[len(before) :]
            ]
            raw.save()


def render_cold_flow(data: dict[str, Any]) -> str:
    """Per round: each model's blog and catdog figures, then the whole-run wall ratio."""
    epochs = data["args"]["epochs"]
    # cpu_flags lists the flags found ("avx512f, avx512_bf16"), or names them after "none of".
    flags = data.get("cpu_flags", "")
    native = not flags.startswith("none") and bool(
        set(flags.split(", ")) & {"avx512_bf16", "amx_bf16"}
    )
    # `--catdog-arg=--precision --catdog-arg=float32` measures, on a bf16 CPU, catdog as it
    # runs where bf16 is not native: the verdict is then that class's.
    extra = data["args"].get("catdog_arg") or []
    forced = next((extra[i + 1] for i, arg in enumerate(extra[:-1]) if arg == "--precision"), None)
    bf16_used = native and forced in (None, "auto", "mixed_bfloat16")
    target = 0.4 if bf16_used else 0.65
    lines = [
        *_header_lines(
            data, f"The default flow cold against the blog's four models, {epochs} epochs"
        ),
        f"- CPU flags: {data.get('cpu_flags')} (bf16 native: {'yes' if native else 'no'}"
        + (f"; catdog forced to --precision {forced}" if forced else "")
        + f"; bf16 used: {'yes' if bf16_used else 'no'}; target ≤ {target}x)",
        "",
        "Per round, each in its own process: the blog's recipe for model1-model4 "
        "(`bench/blog_recipe.py`), one after another, then catdog's default flow "
        "(`python flows/train_flow.py`, no `--models`) on fresh artifacts. The blog's wall is "
        "the sum of its four processes; catdog's is its one process, everything included "
        "(extract, manifest, decode, features, four trainings, evaluations, report).",
        *(
            [
                "With --split-blog, the blog's model1 and model2 run before catdog's flow and its "
                "model3 and model4 after it, so that drift over a round weighs on both sides.",
            ]
            if data["args"].get("split_blog")
            else []
        ),
        "",
    ]
    checks = []
    walls = []
    profiled = _profiled_epochs(data.get("profiled_epochs"))
    for number, round_ in enumerate(data.get("rounds", []), 1):
        blog, cold = round_["blog"], round_.get("catdog")
        rows = []
        all_better = True
        for entry in blog:
            b = blog_figures(entry)
            c = catdog_figures(cold, entry["model"]) if cold else None
            better = bool(
                c
                and not c["error"]
                and not b["error"]
                and (c["val_acc"] or 0) >= (b["val_acc"] or 0) - 0.01
            )
            all_better &= better
            rows.append(
                [
                    entry["model"] + (" (blog reused)" if entry.get("reused") else ""),
                    fmt(b["wall_s"], 1, " s"),
                    _pct(b["val_acc"]),
                    _pct(b["test_acc"]),
                    "" if c is None else fmt(c["trained_s"], 1, " s"),
                    "" if c is None else _pct(c["val_acc"]),
                    "" if c is None else _pct(c["test_acc"]),
                ]
            )
        header = [
            "model",
            "blog wall",
            "blog val acc (last)",
            "blog test acc",
            "catdog train_seconds",
            "catdog val acc (last)",
            "catdog test acc",
        ]
        blog_wall = sum(e["run"]["wall_seconds"] for e in blog)
        catdog_wall = cold["run"]["wall_seconds"] if cold and not cold["run"]["error"] else None
        r_wall = ratio(catdog_wall, blog_wall)
        lines += [
            f"### Round {number}",
            "",
            table(header, rows),
            "",
            f"- blog, four models: {blog_wall:.0f} s wall; catdog's default flow: "
            f"{fmt(catdog_wall, 0, ' s')} wall → **{fmt(r_wall, 3)}x**",
            "- other processes' CPU meanwhile (cores): blog "
            + ", ".join(fmt(e["run"].get("others_cores"), 2) for e in blog)
            + f"; catdog {fmt(cold['run'].get('others_cores') if cold else None, 2)}",
            "",
        ]
        if r_wall is not None:
            walls.append(r_wall)
        epoch_rows, epoch_checks = _epoch_rows(number, blog, cold, profiled)
        if epoch_rows:
            lines += [
                "Epochs 2-N of each model (epoch 1 carries tracing and warm-up)"
                + (
                    f"; profiled: the median epoch of `bench/studies/epoch_profile.py` "
                    f"({profiled['measured']})"
                    if profiled
                    else ""
                )
                + ":",
                "",
                table(
                    [
                        "model",
                        "blog median",
                        "catdog median",
                        "catdog slowest",
                        "profiled",
                        "slowest / profiled",
                    ],
                    epoch_rows,
                ),
                "",
            ]
        checks += epoch_checks
        checks.append(
            [
                f"round {number}: catdog's cold default flow ≤ {target}x the blog's four models, "
                "every model's last-epoch validation accuracy at least the blog's (−1 point)",
                f"{fmt(r_wall, 3)}x; accuracy {'holds' if all_better else 'does not hold'}",
                verdict(r_wall is not None and r_wall <= target and all_better),
            ]
        )
    if len(walls) > 1:
        lines += [
            f"- across {len(walls)} rounds: catdog / blog {min(walls):.3f}x to {max(walls):.3f}x "
            f"(spread {max(walls) - min(walls):.3f})",
        ]
    lines += _reused_blog_note(data)
    lines += ["", "### Targets", "", table(["target", "measured", "verdict"], checks)]
    return "\n".join(lines)


# The models whose epochs the epoch profile times, and how far a flow's epochs may stray.
PROFILED_MODELS = ("model2", "model3")
PROFILED_EPOCH_LIMIT = 1.2


def _profiled_epochs(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each profiled model's median epoch as catdog builds it, from the profile's raw JSON."""
    if not raw:
        return None
    medians = {
        name: float(median(epoch["wall"] for epoch in raw["epochs"][f"{name} after"]))
        for name in PROFILED_MODELS
        if raw["epochs"].get(f"{name} after")
    }
    return {"measured": raw.get("finished") or raw.get("started") or "?", "medians": medians}


def _epoch_rows(
    number: int,
    blog: list[dict[str, Any]],
    cold: dict[str, Any] | None,
    profiled: dict[str, Any] | None,
) -> tuple[list[list[str]], list[list[str]]]:
    """Per model: the blog's and catdog's epochs; targets for the profiled models."""
    models = ((cold or {}).get("summary") or {}).get("models") or {}
    rows, checks = [], []
    for entry in blog:
        name = entry["model"]
        if name not in models or catalog.spec(name).trains_on_features:
            continue
        own = own_epoch_seconds(models, name)[1:]
        blog_seconds = ((entry.get("result") or {}).get("epoch_seconds") or [])[1:]
        reference = (profiled or {}).get("medians", {}).get(name)
        slowest = max(own) if own else None
        rows.append(
            [
                name,
                fmt(median(blog_seconds) if blog_seconds else None, 2, " s"),
                fmt(median(own) if own else None, 2, " s"),
                fmt(slowest, 2, " s"),
                fmt(reference, 2, " s"),
                fmt(ratio(slowest, reference), 2, "x"),
            ]
        )
        if reference and own:  # the slowest epoch is never under the median: it decides
            checks.append(
                [
                    f"round {number}: {name}'s epochs, median and slowest, within "
                    f"{PROFILED_EPOCH_LIMIT}x the profiled epoch",
                    f"median {median(own) / reference:.2f}x, slowest {slowest / reference:.2f}x",
                    verdict(slowest / reference <= PROFILED_EPOCH_LIMIT),
                ]
            )
    return rows, checks


def runners(bench: Bench, raw: RawLog) -> None:
    """The default flow on fresh artifacts: sequential, then on a two-worker Dask cluster."""
    rounds: list[dict[str, Any]] = []
    raw.data["rounds"] = rounds
    for _ in range(bench.args.repeats):
        rounds.append({"sequential": bench.catdog(None, bench.args.epochs, label="sequential")})
        raw.save()
        rounds[-1]["dask"] = bench.catdog(
            None, bench.args.epochs, label="dask", extra=["--runner", "dask", "--workers", "2"]
        )
        raw.save()


def render_runners(data: dict[str, Any]) -> str:
    """Per round: each model's time and accuracies on both runners, and the wall ratio."""
    epochs = data["args"]["epochs"]
    lines = [
        *_header_lines(data, f"The default flow, sequential against Dask, {epochs} epochs"),
        "Per round, each in its own process on fresh artifacts: `python flows/train_flow.py` "
        "(no `--models`), then the same with `--runner dask --workers 2` (a temporary local "
        "cluster of two worker processes, one TensorFlow thread each on this two-core "
        "machine). Walls include everything: start-up, data stages, features, training, "
        "evaluation, the report, and the cluster's start and stop.",
        "",
    ]
    header = ["model", "runner", "train_seconds", "val acc (last)", "test acc", "worker pid"]
    for number, round_ in enumerate(data.get("rounds", []), 1):
        rows = []
        walls = {}
        for runner in ("sequential", "dask"):
            entry = round_.get(runner)
            if not entry:
                continue
            walls[runner] = None if entry["run"]["error"] else entry["run"]["wall_seconds"]
            models = ((entry.get("summary") or {}).get("models")) or {}
            for model, record in models.items():
                figures = catdog_figures(entry, model)
                rows.append(
                    [
                        model,
                        runner,
                        fmt(figures["trained_s"], 1, " s"),
                        _pct(figures["val_acc"]),
                        _pct(figures["test_acc"]),
                        str((record.get("worker") or {}).get("pid", "–")),
                    ]
                )
        rows.sort(key=lambda row: (row[0], row[1] != "sequential"))
        # Summaries slimmed before they kept the worker have no pid to show.
        shown = header if any(row[-1] != "–" for row in rows) else header[:-1]
        lines += [
            f"### Round {number}",
            "",
            table(shown, [row[: len(shown)] for row in rows]),
            "",
            f"- wall: sequential {fmt(walls.get('sequential'), 0, ' s')}, dask "
            f"{fmt(walls.get('dask'), 0, ' s')} → **"
            f"{fmt(ratio(walls.get('dask'), walls.get('sequential')), 3)}x**",
            "",
        ]
    return "\n".join(lines)


MODES = {
    "comparison": (comparison, render_comparison),
    "scaling": (scaling, render_scaling),
    "full-flow": (full_flow, render_full_flow),
    "cold-flow": (cold_flow, render_cold_flow),
    "runners": (runners, render_runners),
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        body = MODES[data["mode"]][1](data)
        write_section(args.out, args.section or data["mode"], body, TITLE)
        log(f"re-rendered {args.out} (section {data['mode']}) from {args.from_json}")
        print(body)
        return 0
    bench = Bench(args)
    mode = (
        "runners"
        if args.runners
        else "cold-flow"
        if args.cold_flow
        else "full-flow"
        if args.full_flow
        else ("scaling" if args.fractions else "comparison")
    )
    raw = RawLog(args.out.with_suffix(f".{args.section or mode}.json"))
    raw.data.update(
        command=command_line(),
        mode=mode,
        started=now(),
        snapshot=bench.snapshot,
        environment=environment_markdown(snapshot_facts(bench.snapshot)),
        args={
            "epochs": args.epochs,
            "models": args.models,
            "repeats": args.repeats,
            "fractions": args.fractions,
            "full_per_class": args.full_per_class,
            "seed": args.seed,
            "catdog_arg": args.catdog_arg,
            "split_blog": args.split_blog,
        },
    )
    try:
        MODES[mode][0](bench, raw)
        raw.data["finished"] = now()
        raw.save()
        body = MODES[mode][1](raw.data)
        write_section(args.out, args.section or mode, body, TITLE)
        log(f"wrote {args.out} (section {mode}) and {raw.path}")
    finally:
        kept = keep_logs(bench.work, mode)
        if kept:
            log(f"logs kept in {kept}")
        if not args.keep and args.workdir is None:
            shutil.rmtree(bench.work, ignore_errors=True)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
