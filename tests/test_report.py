"""The Markdown report and the leaderboard, rendered from a summary."""

from __future__ import annotations

import dataclasses
import json

from catdog.report import leaderboard_rows, markdown_table, render_report
from catdog.stage_records import Evidence, Policy, PromotionRecord
from catdog.summary import DataSummary, ModelSummary, RunFacts, RunSummary


def model_entry(
    name: str, val: list[float], test: float, size: int = 160, best: int = 2
) -> ModelSummary:
    return ModelSummary(
        image_size=size,
        epochs=len(val),
        history={"val_accuracy": val},
        epoch_seconds=[1.0] * len(val),
        best_epoch=best,
        saved_from=name,
        train_seconds=12.34,
        trainable_params=10,
        total_params=20,
        path=f"04_models/{name}/model.keras",
        worker={"host": "h", "pid": 1},
        test_accuracy=test,
        test_loss=0.5,
        confusion_matrix=[[90, 10], [20, 80]],
        per_class={
            "cats": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 100},
            "dogs": {"precision": 0.8, "recall": 0.9, "f1": 0.85, "support": 100},
        },
        macro_f1=0.85,
        evaluation_dir=f"04_evaluations/{name}",
    )


def summary(**extra) -> RunSummary:
    run = RunFacts(
        data="pets.zip",
        models=["model1", "model4"],
        epochs=3,
        seed=7,
        weights=None,
        image_size=160,
        transfer_image_size=224,
        source_fresh=True,
        source_warning=None,
        id="0190abcd",
        name="run-7",
        finished_at="2026-12-06T12:00:00+00:00",
        report="05_reports/runs/x/report.md",
    )
    data = DataSummary(
        classes=["cats", "dogs"],
        layout="split",
        images=51,
        skipped=1,
        skipped_files=[{"path": "cats/bad.jpg", "reason": "truncated JPEG"}],
        counts={"train": {"cats": 10, "dogs": 30}, "test": {"cats": 5, "dogs": 5}},
        baseline={"train": 0.75, "test": 0.5},
        baseline_accuracy=0.5,
        majority_class="dogs",
        manifest_hash="m",
        split_hash="abcdef1234567890",
        source_fresh=True,
        source_warning=None,
    )
    facts = RunSummary(
        run=run,
        data=data,
        data_checks=[],
        data_checks_reference=None,
        data_checks_note="",
        on_data_issue="warn",
        near_duplicates={"groups": 0, "images": 0, "across_splits": 0},
        near_duplicate_groups=[],
        suspect_labels=[],
        suspects_from=None,
        models={
            "model1": model_entry("model1", [0.5, 0.6, 0.4], 0.55),  # ships epoch 2
            "model4": model_entry("model4", [0.9, 0.97], 0.98, size=224),
        },
        best_model=None,
        promotion=None,
        tasks={"train_model[model1]": "Cached", "write_report": "Completed"},
        artifacts_used=[],
        disk_bytes={},
        stage_seconds={},
    )
    return dataclasses.replace(facts, **extra)


def test_leaderboard_ranks_by_the_validation_accuracy_of_the_saved_epoch():
    data = summary()
    data.models["model3"] = model_entry("model3", [0.7, 0.5, 0.65], 0.6, best=1)
    rows = leaderboard_rows(data)
    assert [row["model"] for row in rows] == ["model4", "model3", "model1"]
    assert rows[0]["input"] == "224x224" and rows[0]["test accuracy"] == 0.98
    assert rows[1]["saved epoch"] == "1" and rows[1]["val accuracy (saved epoch)"] == 0.7
    assert rows[1]["val accuracy (last epoch)"] == 0.65 and rows[2]["train seconds"] == 12.3
    data.models["model3"] = dataclasses.replace(data.models["model3"], saved_from="model1")
    assert leaderboard_rows(data)[1]["saved epoch"] == "1 (model1's weights)"


def test_markdown_table_has_a_header_and_a_row_each():
    text = markdown_table([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
    assert markdown_table([]) == "_none_\n"


def test_report_states_data_baseline_best_model_and_promotion():
    promotion = PromotionRecord(
        promoted=False,
        reason="kept production (0.9800 on the test split)",
        candidate="model4",
        candidate_epoch=2,
        margin=0.0,
        rule="margin",
        policy=Policy(),
        candidate_accuracy=0.975,
        production_accuracy=0.98,
        evidence=Evidence(
            candidate_accuracy=0.975,
            production_accuracy=0.98,
            disagreements=3,
            candidate_only=1,
            production_only=2,
            p_value=1.0,
        ),
        export_check=None,
        approval=None,
    )
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
    text = render_report(summary(models={}), {})
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


def test_summary_json_reads_back_as_the_same_summary():
    promotion = PromotionRecord(
        promoted=True,
        reason="model4 is the first production model",
        candidate="model4",
        candidate_epoch=2,
        margin=0.0,
        rule="first",
        policy=Policy(min_accuracy=0.5),
        candidate_accuracy=None,
        production_accuracy=None,
        evidence=None,
        export_check=None,
        approval=None,
    )
    facts = summary(best_model="model4", promotion=promotion, disk_bytes={"total": 3})
    written = json.loads(json.dumps(facts.to_json()))
    assert RunSummary.from_json(written) == facts
    assert "comparison_figure" not in written["run"]  # no figure: not in the JSON at all
    assert written["promotion"]["policy"]["min_accuracy"] == 0.5
