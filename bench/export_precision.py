"""What serving a bf16-trained model in float32 changes, per catalog model and seed.

    .venv/bin/python bench/export_precision.py [--seeds 1,2,3] [--epochs 5]
        [--finetune-epochs 10] [--max-images-per-class 100]

For each seed, one flow run trains every catalog model on the real data (`--no-export`), under
`auto` precision (mixed_bfloat16 where the CPU has native bf16, for the models the catalog
allows). Then, for each model's last epoch, on the run's test split: the trained model's
probabilities (as its evaluation computes them) against the float32 model its exports are made
from (`serving_model`), and the LiteRT export against that float32 model. Writes section
`export-precision` of bench/RESULTS.md and its raw figures in RESULTS.export-precision.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    REPO,
    RawLog,
    add_input_arguments,
    catdog_env,
    environment_markdown,
    log,
    measure_catdog,
    resolve_inputs,
    run_facts,
    table,
    write_section,
)
from catdog import catalog

# Run in a fresh process per seed: TensorFlow stays out of the bench's own process.
COMPARE = """
import json, sys
from pathlib import Path
import numpy as np
from catdog.evaluation import load_model, predict_logits, softmax
from catdog.export import TIE_MARGIN, compute_precision, export_model, near_ties, serving_model
from catdog.serving import litert_predictor, predict_in_batches

summary = json.loads(Path(sys.argv[1]).read_text())
root, scratch = Path(sys.argv[2]), Path(sys.argv[3])
arrays = {}
for used in summary["artifacts_used"]:
    if used.startswith("03_splits/arrays/"):
        record = json.loads((root / used / "record.json").read_text())
        arrays[int(record["image_size"])] = root / used
out = {}
for name, facts in summary["models"].items():
    # The last epoch: for model4_finetune the fine-tuned network even where its best epoch by
    # validation was one of model4's (then model.keras holds float32 weights).
    model = load_model(Path(facts["path"]).with_name("final.keras"))
    side = int(model.input_shape[1])
    images = np.load(arrays[side] / "test_x.npy", mmap_mode="r")
    labels = np.load(arrays[side] / "test_y.npy")
    trained = softmax(predict_logits(model, images)).astype(np.float32)
    served_model = serving_model(model)
    served = predict_in_batches(lambda x: np.asarray(served_model(x)), images)
    folder = scratch / name
    export_model(model, folder, summary["data"]["classes"])
    litert = predict_in_batches(litert_predictor(folder), images)
    changed = served.argmax(1) != trained.argmax(1)
    top = np.sort(trained, axis=1)
    gaps = (top[:, -1] - top[:, -2])[changed]
    out[name] = {
        "precision": compute_precision(model),
        "images": int(len(labels)),
        "max_difference": float(np.abs(served - trained).max()),
        "changed": int(changed.sum()),
        "changed_gaps": [round(float(g), 4) for g in gaps],
        "changed_outside_ties": int((changed & ~near_ties(trained, TIE_MARGIN)).sum()),
        "accuracy_trained": float((trained.argmax(1) == labels).mean()),
        "accuracy_served": float((served.argmax(1) == labels).mean()),
        "litert_max_difference": float(np.abs(litert - served).max()),
        "litert_changed": int((litert.argmax(1) != served.argmax(1)).sum()),
    }
print(json.dumps(out))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_input_arguments(parser)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--max-images-per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    resolve_inputs(args)
    return args


def measure_seed(args: argparse.Namespace, seed: int, work: Path) -> dict[str, Any]:
    artifacts = work / f"seed{seed}"
    command = [
        sys.executable,
        str(REPO / "flows" / "train_flow.py"),
        "--data",
        str(args.data),
        "--weights",
        args.weights,
        "--models",
        ",".join(catalog.MODEL_NAMES),
        "--epochs",
        str(args.epochs),
        "--finetune-epochs",
        str(args.finetune_epochs),
        "--max-images-per-class",
        str(args.max_images_per_class),
        "--seed",
        str(seed),
        "--no-export",
        "--keep-runs",
        "1",
        "--artifacts",
        str(artifacts),
    ]
    env = catdog_env(None, work / "prefect-home")
    run, summary = measure_catdog(
        command, work / f"seed{seed}.log", artifacts, timeout=3600, env=env
    )
    if summary is None:
        raise SystemExit(f"seed {seed}: the run failed: {run.error}")
    compared = subprocess.run(
        [sys.executable, "-c", COMPARE, artifacts / "summary.json", artifacts, work / "exports"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(compared.stdout.strip().splitlines()[-1])


def render(data: dict[str, Any]) -> str:
    rows = []
    for name in catalog.MODEL_NAMES:
        per_seed = [data["seeds"][seed][name] for seed in data["seeds"]]
        precision = {entry["precision"] for entry in per_seed}
        apart = [
            round(abs(e["accuracy_served"] - e["accuracy_trained"]) * e["images"]) for e in per_seed
        ]
        rows.append(
            [
                name,
                "/".join(sorted(precision)),
                " / ".join(f"{e['max_difference']:.3g}" for e in per_seed),
                " / ".join(str(e["changed"]) for e in per_seed),
                ", ".join(str(g) for e in per_seed for g in e["changed_gaps"]) or "-",
                " / ".join(
                    str(sum(g > data["tie_margin"] for g in e["changed_gaps"])) for e in per_seed
                ),
                " / ".join(str(a) for a in apart),
                " / ".join(f"{e['litert_max_difference']:.2g}" for e in per_seed),
            ]
        )
    images = next(iter(next(iter(data["seeds"].values())).values()))["images"]
    return "\n".join(
        [
            "## Serving a bf16-trained model in float32 (export-precision)",
            "",
            f"{data['date']}, commit {data['commit']}. `{data['command']}`",
            "",
            environment_markdown({"bf16 flags": data["bf16_flags"]}),
            "",
            f"Seeds {', '.join(data['seeds'])}; every catalog model trained by one flow run per "
            f"seed ({data['epochs']} epochs, fine-tuning {data['finetune_epochs']}, "
            f"{data['max_images_per_class']} images per class and split), scored on the "
            f"{images} test images, at each model's last epoch. Trained: the model under the "
            "precision it trained in; served: the float32 model its exports are made from. "
            "Per seed, separated by `/`:",
            "",
            table(
                [
                    "model",
                    "trained under",
                    "max |served - trained|",
                    "images in another class",
                    "their top-two gap (trained)",
                    f"outside ties (gap > {data['tie_margin']})",
                    "accuracy apart (images)",
                    "max |LiteRT - served|",
                ],
                rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    from catdog.export import TIE_MARGIN

    args = parse_args(argv)
    raw = RawLog(BENCH / "RESULTS.export-precision.json")
    raw.data = {
        **run_facts(),
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "max_images_per_class": args.max_images_per_class,
        "tie_margin": TIE_MARGIN,
        "seeds": {},
    }
    with tempfile.TemporaryDirectory(prefix="catdog-export-precision-") as work:
        for seed in (int(s) for s in args.seeds.split(",")):
            log(f"seed {seed}: training every model")
            raw.data["seeds"][str(seed)] = measure_seed(args, seed, Path(work))
            raw.save()
    write_section(args.out, "export-precision", render(raw.data), "Benchmark results")
    print(render(raw.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
