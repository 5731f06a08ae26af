"""Data checks: near-duplicates kept to one split, drift against production's data, suspect
labels, and what `--on-data-issue` does with a failed check."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog.data import probe, quality
from catdog.data.records import SPLITS, ImageEntry, Manifest
from catdog.data.split import split_manifest
from tests.conftest import REAL_WEIGHTS, REPO, api_env, make_dataset, run_flow, zip_folder


def smooth_image(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A photo-like image: random shapes at low frequency, so copies keep their look."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, int) + noise, 0, 255).astype(np.uint8))


def copies(image: Image.Image) -> dict[str, Image.Image]:
    """The ways a dataset gets a second copy of an image."""
    w, h = image.size
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=50)
    return {
        "resized": image.resize((w // 2, h // 2)),
        "reencoded": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
        "cropped": image.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
    }


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=92)
    return path


# ----------------------------------------------------------------------------- near-duplicates


def test_resized_reencoded_and_cropped_copies_are_grouped_and_nothing_else(tmp_path):
    paths = []
    for seed in range(12):
        original = smooth_image(seed)
        paths.append(save(original, tmp_path / f"{seed}.jpg").name)
        for kind, copy in copies(original).items():
            paths.append(save(copy, tmp_path / f"{seed}-{kind}.jpg").name)
    for seed in range(100, 140):  # distinct images, no copies
        paths.append(save(smooth_image(seed), tmp_path / f"{seed}.jpg").name)
    inspection = quality.inspect_images(tmp_path, paths)
    groups = quality.near_duplicate_groups(inspection.hashes, quality.NEAR_DUPLICATE_BITS)
    found = sorted(sorted(paths[i] for i in group) for group in groups)
    expected = sorted(
        sorted([f"{s}.jpg", f"{s}-resized.jpg", f"{s}-reencoded.jpg", f"{s}-cropped.jpg"])
        for s in range(12)
    )
    assert found == expected


def test_grouping_is_transitive_and_indices_come_back_sorted():
    base = 0xF0F0F0F0F0F0F0F0
    hashes = np.array([[base, 0, 0], [base ^ 0b111, 0, 0], [base ^ 0b111000000, 0, 0]], np.uint64)
    # 0-1: 3 bits, 1-2: 6 bits, 0-2: 3 bits; a threshold of 3 links all three through 0.
    assert quality.near_duplicate_groups(hashes, 3) == [[0, 1, 2]]
    assert quality.near_duplicate_groups(hashes, 2) == []
    assert quality.near_duplicate_groups(np.zeros((0, 3), np.uint64), 8) == []


def entry(path: str, class_name: str, source: str | None) -> ImageEntry:
    import hashlib

    return ImageEntry(
        path=path,
        label=("cats", "dogs").index(class_name),
        class_name=class_name,
        sha256=hashlib.sha256(path.encode()).hexdigest(),
        source_split=source,
    )


def flat_manifest(per_class: int) -> Manifest:
    images = [entry(f"{c}/{i}.jpg", c, None) for c in ("cats", "dogs") for i in range(per_class)]
    return Manifest("/x", "single_root", ("cats", "dogs"), tuple(images))


@pytest.mark.parametrize("seed", range(6))
def test_where_catdog_splits_a_group_moves_as_one_unit(seed):
    manifest = flat_manifest(40)
    groups = [[f"cats/{i}.jpg", f"cats/{i + 1}.jpg", f"dogs/{i}.jpg"] for i in range(0, 40, 4)]
    plain = split_manifest(manifest, seed=seed)
    kept = split_manifest(manifest, seed=seed, near_duplicates=groups)
    where = {e.path: e.split for e in kept.images}
    before = {e.path: e.split for e in plain.images}
    for group in groups:  # all in the earliest split any of them was in: never gathered in test
        earliest = min((before[p] for p in group), key=SPLITS.index)
        assert {where[p] for p in group} == {earliest}
    straddled = [g for g in groups if len({e.split for e in plain.images if e.path in g}) > 1]
    assert straddled, "the groups must straddle splits without the rule, or this test is vacuous"
    # Only grouped images moved; every other image kept its split.
    grouped = {p for group in groups for p in group}
    assert all(e.split == where[e.path] for e in plain.images if e.path not in grouped)
    assert len(kept.images) == len(manifest.images)


def test_a_move_that_would_empty_a_split_of_a_class_is_not_made():
    manifest = flat_manifest(3)  # one image per split and class
    plain = split_manifest(manifest, seed=0)
    cats = {e.split: e.path for e in plain.images if e.class_name == "cats"}
    kept = split_manifest(manifest, seed=0, near_duplicates=[[cats["train"], cats["test"]]])
    assert {e.path: e.split for e in kept.images} == {e.path: e.split for e in plain.images}


def test_where_the_folders_split_copies_of_training_images_are_left_out():
    images = [entry(f"train/cats/{i}.jpg", "cats", "train") for i in range(6)]
    images += [entry(f"train/dogs/{i}.jpg", "dogs", "train") for i in range(6)]
    images += [entry(f"validation/cats/{i}.jpg", "cats", "validation") for i in range(10)]
    images += [entry(f"validation/dogs/{i}.jpg", "dogs", "validation") for i in range(10)]
    manifest = Manifest("/x", "train_validation", ("cats", "dogs"), tuple(images))
    groups = [
        ["train/cats/0.jpg", "validation/cats/0.jpg", "validation/cats/1.jpg"],
        ["validation/dogs/0.jpg", "validation/dogs/1.jpg", "validation/dogs/2.jpg"],
    ]
    result = split_manifest(manifest, seed=3, near_duplicates=groups)
    where = {e.path: e.split for e in result.images}
    assert where["train/cats/0.jpg"] == "train"
    assert "validation/cats/0.jpg" not in where and "validation/cats/1.jpg" not in where
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons["validation/cats/1.jpg"] == "near-duplicate of train/cats/0.jpg (train)"
    # Copies that are all in validation/ stay together, in validation or in test.
    assert len({where[p] for p in groups[1]}) == 1


# ----------------------------------------------------------------------------- drift checks


def test_class_balance_fails_when_a_class_halves_and_passes_when_unchanged():
    assert quality.class_balance({"cats": 1000, "dogs": 1000}, {"cats": 1000, "dogs": 1000}).passed
    assert quality.class_balance({"cats": 1000, "dogs": 1000}, {"cats": 990, "dogs": 1010}).passed
    halved = quality.class_balance({"cats": 1000, "dogs": 1000}, {"cats": 1000, "dogs": 500})
    assert not halved.passed and halved.statistic == pytest.approx(1 / 6, abs=1e-3)
    assert "dogs 50.0% -> 33.3%" in halved.detail
    # Few images: a big swing in shares that chance explains is not an alarm.
    assert quality.class_balance({"cats": 6, "dogs": 6}, {"cats": 6, "dogs": 3}).passed


def test_chi_square_and_ks_p_values_match_known_values():
    assert quality.chi_square_p_value(3.841, 1) == pytest.approx(0.05, abs=1e-3)
    assert quality.chi_square_p_value(9.488, 4) == pytest.approx(0.05, abs=1e-3)
    assert quality.chi_square_p_value(30.0, 2) == pytest.approx(np.exp(-15), rel=1e-6)
    rng = np.random.default_rng(0)
    same = quality.ks_test(rng.normal(size=500), rng.normal(size=500))
    moved = quality.ks_test(rng.normal(size=500), rng.normal(0.5, 1, size=500))
    assert same[1] > 0.01 and moved[1] < 1e-4 and moved[0] > 0.15


def write_images(folder: Path, count: int, seed: int, *, gray=False, scale=1.0) -> list[str]:
    names = []
    for i in range(count):
        image = smooth_image(seed * 1000 + i, (int(160 * scale), int(120 * scale)))
        if gray:
            image = image.convert("L").convert("RGB")
        names.append(save(image, folder / f"{seed}-{i}.jpg").name)
    return names


def test_grayscale_and_quarter_size_images_fail_the_property_checks(tmp_path):
    reference = quality.inspect_images(tmp_path, write_images(tmp_path, 150, 1)).values
    same = quality.inspect_images(tmp_path, write_images(tmp_path, 150, 2)).values
    gray = quality.inspect_images(tmp_path, write_images(tmp_path, 150, 3, gray=True)).values
    small = quality.inspect_images(tmp_path, write_images(tmp_path, 150, 4, scale=0.25)).values
    index = {name: k for k, name in enumerate(quality.PROPERTIES)}

    def failed(current: np.ndarray) -> set[str]:
        return {
            name
            for name, k in index.items()
            if not quality.property_drift(name, reference[:, k], current[:, k]).passed
        }

    assert failed(same) == set()
    assert "saturation" in failed(gray)
    assert {"width", "height", "file_kb"} <= failed(small)


def test_embedding_drift_fails_for_shifted_features_only():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 64))
    assert quality.embedding_drift(reference, rng.normal(size=(300, 64)), seed=1).passed
    shifted = rng.normal(size=(300, 64)) + np.r_[np.full(8, 0.8), np.zeros(56)]
    check = quality.embedding_drift(reference, shifted, seed=1)
    assert not check.passed and check.statistic > check.threshold


def test_the_probe_puts_moved_labels_at_the_top():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 256)) * 1.5
    labels = np.repeat([0, 1], 200)
    features = centres[labels] + rng.normal(size=(400, 256)) * 2.0
    moved = rng.choice(np.flatnonzero(labels == 0), 40, replace=False)  # a fifth of one class
    given = labels.copy()
    given[moved] = 1
    probability = probe.out_of_fold_label_probability(features, given, 2, seed=0)
    top = np.argsort(probability)[: len(moved)]
    assert len(set(top) & set(moved)) >= 0.8 * len(moved)


# ----------------------------------------------------------------------------- through the flow


def dataset_with_copies(root: Path) -> tuple[Path, list[str]]:
    """The tiny official layout, with copies of three training images in validation/."""
    make_dataset(root)
    copied = []
    for i in range(3):
        original = smooth_image(500 + i, (48, 36))
        save(original, root / "train" / "cats" / f"photo{i}.jpg")
        kind, copy = list(copies(original).items())[i]
        copied.append(f"validation/cats/photo{i}-{kind}.jpg")
        save(copy, root / copied[-1])
    return root, copied


@pytest.mark.slow
def test_copies_of_training_images_stay_out_of_validation_and_test_through_the_flow(tmp_path):
    folder, copied = dataset_with_copies(tmp_path / "src")
    data = zip_folder(folder, tmp_path / "copies.zip", prefix="copies/")
    summary = run_flow(data, tmp_path / "artifacts")
    assert summary["near_duplicates"] == {"groups": 3, "images": 6, "across_splits": 0}
    left_out = {s["path"]: s["reason"] for s in summary["data"]["skipped_files"]}
    for path in copied:
        assert left_out[path].startswith("near-duplicate of train/cats/photo")
    for group in summary["near_duplicate_groups"]:
        assert sorted(m["split"] for m in group) == ["left out", "train"]
    assert summary["data"]["counts"]["train"]["cats"] == 15  # 12 + the 3 originals
    report = Path(summary["run"]["report"]).read_text()
    assert "near-duplicates: 3 group(s) of 6 images, 0 straddling splits" in report
    assert "![near-duplicates]" in report


def publish_dataset(site, tmp_path: Path, name: str, *, dogs: int, seed: int, swap=False) -> None:
    """Serve a dataset of 250 training cats and `dogs` training dogs at the site's pets.zip.
    `swap` makes the cats bright and the dogs dark, the other way round from the others: a
    model trained on it is wrong about every image of the others."""
    import shutil

    classes = ("dogs", "cats") if swap else ("cats", "dogs")
    folder = make_dataset(tmp_path / name, train=250, validation=10, classes=classes, seed=seed)
    for path in sorted((folder / "train" / "dogs").glob("*.jpg"))[dogs:]:
        path.unlink()
    shutil.copy(zip_folder(folder, tmp_path / f"{name}.zip"), site.folder / "pets.zip")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_halved_class_fails_the_balance_check_and_each_policy_does_what_it_says(site, tmp_path):
    import os

    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    artifacts = tmp_path / "artifacts"
    url = site.url("pets.zip")
    settings = {"precision": "float32", "epochs": 2}
    publish_dataset(site, tmp_path, "a", dogs=250, seed=1, swap=True)
    first = run_flow(url, artifacts, **settings)
    assert first["promotion"]["promoted"] and first["data_checks"] == []
    assert first["data_checks_note"].startswith("no production model yet")

    # A new archive at the same URL: half of the dogs are gone.
    publish_dataset(site, tmp_path, "b", dogs=125, seed=2)
    held = run_flow(url, artifacts, on_data_issue="hold", **settings)
    failed = {check["name"] for check in held["data_checks"] if not check["passed"]}
    assert "class_balance" in failed
    assert held["models"]["model1"]["epochs"] == 2  # trained and reported
    assert held["promotion"]["rule"] == "data_checks"
    assert "would be promoted" in held["promotion"]["reason"]
    registry = json.loads((artifacts / "production" / "registry.json").read_text())
    assert registry["run_id"] == first["run"]["id"]  # production is still the first run's
    report = Path(held["run"]["report"]).read_text()
    assert "**failed: class_balance" in report and "(--on-data-issue hold)" in report

    warned = run_flow(url, artifacts, **settings)  # warn: the gate decides as usual
    assert "class_balance" in {c["name"] for c in warned["data_checks"] if not c["passed"]}
    assert warned["promotion"]["promoted"], warned["promotion"]["reason"]

    wanted = EventFilter(
        event=EventNameFilter(name=["catdog.data.check.failed"]),
        resource=EventResourceFilter(id=[f"catdog.data.{artifacts}"]),
    )
    with get_client(sync_client=True) as client:
        events = client.read_events(filter=wanted, limit=50).events
    balance = [event for event in events if event.payload["check"] == "class_balance"]
    assert sorted(event.payload["policy"] for event in balance) == ["hold", "warn"]
    related = {r.id for event in balance for r in event.related if r.role == "flow-run"}
    assert related == {f"prefect.flow-run.{run['run']['id']}" for run in (held, warned)}

    # Production now trained on half the dogs; all of them again is a change too.
    publish_dataset(site, tmp_path, "c", dogs=250, seed=3)
    models_before = sorted((artifacts / "04_models").rglob("*"))
    command = [sys.executable, str(REPO / "flows/train_flow.py"), "--data", url]
    command += ["--models", "model1", "--image-size", "32", "--batch-size", "8", "--no-export"]
    command += ["--on-data-issue", "stop", "--artifacts", str(artifacts)]
    stopped = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **api_env()}, timeout=300
    )
    assert stopped.returncode == 2, stopped.stderr
    [line] = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stopped.stderr
    assert line.startswith("error: check_data failed: data checks failed")
    assert "class_balance" in line and "nothing trained" in line
    assert sorted((artifacts / "04_models").rglob("*")) == models_before
    assert json.loads((artifacts / "summary.json").read_text())["run"]["id"] == warned["run"]["id"]


def colour_dataset(root: Path, seed: int, *, gray: bool = False, scale: float = 1.0) -> Path:
    """60 training and 8 validation images per class of smooth colour pictures (dogs
    brighter); `gray` and `scale` change every image, as a new camera would."""
    for part, (split, count) in enumerate((("train", 60), ("validation", 8))):
        for index, name in enumerate(("cats", "dogs")):
            for i in range(count):
                image = smooth_image(seed * 10_000 + part * 5000 + index * 1000 + i, (80, 60))
                if index:
                    image = Image.eval(image, lambda v: min(255, v + 60))
                if gray:
                    image = image.convert("L").convert("RGB")
                if scale != 1.0:
                    image = image.resize((int(80 * scale), int(60 * scale)))
                save(image, root / split / name / f"{i}.jpg")
    return root


@pytest.mark.slow
@pytest.mark.skipif(not REAL_WEIGHTS.is_file(), reason="shared MobileNetV2 weights absent")
def test_grayscale_or_quarter_size_data_fails_the_property_and_embedding_checks(tmp_path):
    artifacts = tmp_path / "artifacts"
    settings = {"models": ["model4"], "weights": str(REAL_WEIGHTS), "transfer_image_size": 64}
    first = run_flow(colour_dataset(tmp_path / "first", 1), artifacts, **settings)
    assert first["promotion"]["promoted"] and first["suspects_from"].startswith("model4 at 64px")
    same = run_flow(colour_dataset(tmp_path / "same", 2), artifacts, **settings)
    assert [c["name"] for c in same["data_checks"] if not c["passed"]] == []
    assert "embeddings" in {c["name"] for c in same["data_checks"]}

    gray = run_flow(colour_dataset(tmp_path / "gray", 3, gray=True), artifacts, **settings)
    failed = {c["name"] for c in gray["data_checks"] if not c["passed"]}
    assert {"property:saturation", "embeddings"} <= failed
    small = run_flow(colour_dataset(tmp_path / "small", 4, scale=0.25), artifacts, **settings)
    failed = {c["name"] for c in small["data_checks"] if not c["passed"]}
    assert {"property:width", "property:height", "embeddings"} <= failed
    assert len(small["suspect_labels"]) == 20
    report = Path(small["run"]["report"]).read_text()
    assert "Suspect labels" in report and "![suspect labels]" in report
