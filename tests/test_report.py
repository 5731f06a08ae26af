"""The Markdown report and the leaderboard, rendered from a summary."""

from __future__ import annotations

from catdog.report import leaderboard_rows, markdown_table, render_report


def model_entry(val: list[float], test: float, size: int = 160, best: int = 2) -> dict:
    return {
        "image_size": size,
        "epochs": len(val),
        "best_epoch": best,
        "history": {"val_accuracy": val},
        "test_accuracy": test,
        "test_loss": 0.5,
        "trainable_params": 10,
        "total_params": 20,
        "train_seconds": 12.34,
        "per_class": {
            "cats": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 100},
            "dogs": {"precision": 0.8, "recall": 0.9, "f1": 0.85, "support": 100},
        },
    }


def summary(**extra) -> dict:
    return {
        "run": {"name": "run-7", "data": "pets.zip", "seed": 7},
        "data": {
            "classes": ["cats", "dogs"],
            "layout": "split",
            "split_hash": "abcdef1234567890",
            "skipped": 1,
            "skipped_files": [{"path": "cats/bad.jpg", "reason": "truncated JPEG"}],
            "counts": {"train": {"cats": 10, "dogs": 30}, "test": {"cats": 5, "dogs": 5}},
            "baseline": {"train": 0.75, "test": 0.5},
            "baseline_accuracy": 0.5,
        },
        "models": {
            "model1": model_entry([0.5, 0.6, 0.4], 0.55),  # ships epoch 2
            "model4": model_entry([0.9, 0.97], 0.98, size=224),
        },
        "tasks": {"train_model[model1]": "Cached", "write_report": "Completed"},
        **extra,
    }


def test_leaderboard_ranks_by_the_validation_accuracy_of_the_saved_epoch():
    data = summary()
    data["models"]["model3"] = model_entry([0.7, 0.5, 0.65], 0.6, best=1)
    rows = leaderboard_rows(data)
    assert [row["model"] for row in rows] == ["model4", "model3", "model1"]
    assert rows[0]["input"] == "224x224" and rows[0]["test accuracy"] == 0.98
    assert rows[1]["saved epoch"] == "1" and rows[1]["val accuracy (saved epoch)"] == 0.7
    assert rows[1]["val accuracy (last epoch)"] == 0.65 and rows[2]["train seconds"] == 12.3
    data["models"]["model3"]["saved_from"] = "model1"
    assert leaderboard_rows(data)[1]["saved epoch"] == "1 (model1's weights)"


def test_markdown_table_has_a_header_and_a_row_each():
    text = markdown_table([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
    assert markdown_table([]) == "_none_\n"


def test_report_states_data_baseline_best_model_and_promotion():
    promotion = {
        "promoted": False,
        "reason": "kept production (0.9800 on the test split)",
        "candidate": "model4",
        "candidate_epoch": 2,
        "margin": 0.0,
        "rule": "margin",
        "evidence": {
            "candidate_accuracy": 0.975,
            "production_accuracy": 0.98,
            "disagreements": 3,
            "candidate_only": 1,
            "production_only": 2,
            "p_value": 1.0,
        },
    }
    text = render_report(
        summary(best_model="model4", promotion=promotion),
        {"samples": "s.png", "comparison": "c.png", "model4:curves": "m4.png"},
    )
    assert text.startswith("# catdog run run-7\n")
    assert "split `abcdef123456`, seed 7" in text
    assert "| train | 10 | 30 | 40 | 75.0% |" in text  # counts and majority baseline
    assert "- skipped `cats/bad.jpg`: truncated JPEG" in text
    assert (
        "**Best model (by the validation accuracy of its saved epoch): model4**, epoch 2, "
        "test accuracy 98.0%"
    ) in text
    assert "**kept** (rule: margin): kept production (0.9800 on the test split)" in text
    assert "| model4 (epoch 2) | 97.5% | 98.0% | 3 | 1 | 2 | 1 | 0.0 | kept production |" in text
    assert "![comparison](c.png)" in text and "![model4 curves](m4.png)" in text
    assert "![model1 curves]" not in text  # no figure, no broken link
    assert "- train_model[model1]: Cached" in text


def test_report_without_models_has_no_best_model_or_promotion():
    empty = summary()
    empty["models"] = {}
    text = render_report(empty, {})
    assert "Best model" not in text and "## Production model" not in text
    assert "_none_" in text


def test_report_lists_each_stages_disk_use():
    text = render_report(
        summary(disk_bytes={"decode": 1_234_567, "train": 50_000, "total": 1_284_567}), {}
    )
    disk = text.split("## Disk", 1)[1]
    assert "| decode | train | total |" in disk
    assert "| 1.2 MB | 50.0 KB | 1.3 MB |" in disk
    assert "## Disk" not in render_report(summary(), {})
