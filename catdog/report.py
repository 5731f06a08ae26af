"""The run report as Markdown, from the run's summary (`catdog.summary.RunSummary`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from catdog.candidates import shipped_val_accuracy
from catdog.io import human_bytes
from catdog.stage_records import PromotionRecord

if TYPE_CHECKING:  # catdog.summary renders its summaries here
    from catdog.summary import ModelSummary, RunSummary

Row = dict[str, str | int | float]  # one row of a table: column -> cell


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _input_size(model: ModelSummary) -> str:
    return f"{model.image_size}x{model.image_size}"


def _saved_epoch(name: str, model: ModelSummary) -> str:
    epoch = str(model.best_epoch)
    return epoch if model.saved_from == name else f"{epoch} ({model.saved_from}'s weights)"


def leaderboard_rows(summary: RunSummary) -> list[Row]:
    rows: list[Row] = []
    for name, model in sorted(
        summary.models.items(), key=lambda item: -shipped_val_accuracy(item[1])
    ):
        rows.append(
            {
                "model": name,
                "input": _input_size(model),
                "epochs": model.epochs,
                "saved epoch": _saved_epoch(name, model),
                "val accuracy (saved epoch)": round(shipped_val_accuracy(model), 4),
                "val accuracy (last epoch)": round(model.history["val_accuracy"][-1], 4),
                "test accuracy": round(model.test_accuracy, 4),
                "test loss": round(model.test_loss, 4),
                "trainable params": model.trainable_params,
                "total params": model.total_params,
                "train seconds": round(model.train_seconds, 1),
            }
        )
    return rows


def gate_evidence_row(promotion: PromotionRecord) -> Row:
    """The promotion gate's evidence as one table row: both accuracies on the same test
    images, the images on which they disagree, and the exact McNemar p-value."""
    evidence = promotion.evidence
    if evidence is None:
        raise ValueError(f"no evidence: {promotion.candidate} was not compared with production")
    return {
        "candidate": f"{promotion.candidate} (epoch {promotion.candidate_epoch})",
        "candidate test accuracy": _pct(evidence.candidate_accuracy),
        "production test accuracy": _pct(evidence.production_accuracy),
        "disagreements": evidence.disagreements,
        "right by candidate only": evidence.candidate_only,
        "right by production only": evidence.production_only,
        "McNemar p": f"{evidence.p_value:.3g}",
        "margin": promotion.margin,
        "decision": "promoted" if promotion.promoted else "kept production",
    }


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "_none_\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def data_check_lines(summary: RunSummary, figures: Mapping[str, str]) -> list[str]:
    """The report's data checks: drift against production's data, near-duplicates, suspect
    labels, and the profile's figure."""
    checks = summary.data_checks
    failed = [str(check["name"]) for check in checks if not check["passed"]]
    lines = ["## Data checks", ""]
    if checks:
        verdict = f"**failed: {', '.join(failed)}**" if failed else "all passed"
        lines += [
            f"This run's training data against the data that trained production "
            f"(`{summary.data_checks_reference}`): {verdict} "
            f"(--on-data-issue {summary.on_data_issue}).",
            "",
            markdown_table(
                [
                    {
                        "check": check["name"],
                        "verdict": "passed" if check["passed"] else "FAILED",
                        "statistic": check["statistic"],
                        "threshold": check["threshold"],
                        "detail": check["detail"],
                    }
                    for check in checks
                ]
            ),
        ]
    if summary.data_checks_note:
        lines += [f"- {summary.data_checks_note}", ""]
    near = summary.near_duplicates
    lines += [
        f"- near-duplicates: {near['groups']} group(s) of {near['images']} "
        f"images, {near['across_splits']} straddling splits",
    ]
    for group in summary.near_duplicate_groups[:10]:
        lines.append("  - " + ", ".join(f"`{m['path']}` ({m['split']})" for m in group))
    if "near_duplicates" in figures:
        lines += ["", f"![near-duplicates]({figures['near_duplicates']})"]
    suspects = summary.suspect_labels
    if suspects:
        lines += [
            "",
            f"Suspect labels (a cross-validated linear probe on {summary.suspects_from} "
            "features; the probability it gives each image's own label, lowest first):",
            "",
            markdown_table(suspects[:10]),
        ]
        if "suspects" in figures:
            lines += [f"![suspect labels]({figures['suspects']})", ""]
    if "profile" in figures:
        lines += ["", "Image properties per split:", "", f"![profile]({figures['profile']})", ""]
    return [*lines, ""]


def promotion_lines(promotion: PromotionRecord) -> list[str]:
    """The gate's decision, the rule that decided, the exports' check and the evidence."""
    verdict = "promoted" if promotion.promoted else "kept"
    lines = ["## Production model", ""]
    lines += [f"**{verdict}** (rule: {promotion.rule}): {promotion.reason}", ""]
    check = promotion.export_check
    if check:
        outcome = "passed" if check.passed else "failed"
        lines += [f"Exports checked in fresh processes ({outcome}): {check.reason()}.", ""]
    if promotion.evidence:
        lines += [markdown_table([gate_evidence_row(promotion)])]
    return lines


def render_report(summary: RunSummary, figures: Mapping[str, str]) -> str:
    """Markdown for people: data, baseline, every model, the best one, promotion, figures."""
    data = summary.data
    classes = data.classes
    count_rows = [
        {
            "split": split,
            **{c: per[c] for c in classes},
            "total": sum(per.values()),
            "majority baseline": _pct(data.baseline[split]),
        }
        for split, per in data.counts.items()
    ]
    lines = [
        f"# catdog run {summary.run.name}",
        "",
        f"- data: `{summary.run.data}` (layout {data.layout}, split "
        f"`{data.split_hash[:12]}`, seed {summary.run.seed})",
        f"- classes: {', '.join(classes)}; skipped files: {data.skipped}",
        f"- majority-class baseline on the test split: {_pct(data.baseline_accuracy)}",
        "",
        "## Data",
        "",
        markdown_table(count_rows),
    ]
    for skipped in data.skipped_files[:20]:
        lines.append(f"- skipped `{skipped['path']}`: {skipped['reason']}")
    lines += [
        "",
        f"![samples]({figures.get('samples', '')})",
        "",
        f"![augmentation]({figures.get('augmentation', '')})",
        "",
    ]
    lines += data_check_lines(summary, figures)
    lines += increment_lines(summary)
    lines += ["## Models", "", markdown_table(leaderboard_rows(summary))]
    lines += warm_start_lines(summary)
    best = summary.best_model
    if best:
        model = summary.models[best]
        lines += [
            f"**Best model (by the validation accuracy of its saved epoch): {best}**, epoch "
            f"{model.best_epoch}, test accuracy {_pct(model.test_accuracy)} against a baseline "
            f"of {_pct(data.baseline_accuracy)}.",
            "",
        ]
        if model.per_class:
            lines += [
                markdown_table(
                    [
                        {
                            "class": name,
                            "precision": round(m["precision"], 4),
                            "recall": round(m["recall"], 4),
                            "f1": round(m["f1"], 4),
                            "support": m["support"],
                        }
                        for name, m in model.per_class.items()
                    ]
                )
            ]
    if summary.promotion:
        lines += promotion_lines(summary.promotion)
    if "comparison" in figures:
        lines += ["## Training curves", "", f"![comparison]({figures['comparison']})", ""]
    for name in summary.models:
        for kind in ("curves", "confusion", "misclassified"):
            ref = figures.get(f"{name}:{kind}")
            if ref:
                lines += [f"![{name} {kind}]({ref})", ""]
    lines += ["## Tasks", ""]
    lines += [f"- {task}: {state}" for task, state in summary.tasks.items()]
    if summary.disk_bytes:
        sizes = {stage: human_bytes(size) for stage, size in summary.disk_bytes.items()}
        lines += ["", "## Disk", "", markdown_table([sizes])]
    return "\n".join(lines) + "\n"


def warm_start_lines(summary: RunSummary) -> list[str]:
    """What each model started from, when the run asked for warm starts."""
    cold = summary.run.cold_starts
    if not cold and not any(model.warm_start for model in summary.models.values()):
        return []
    lines = ["Warm starts (`--warm-start production`):", ""]
    for name, model in summary.models.items():
        why = f"started cold: {cold[name]}" if name in cold else "started cold"
        lines.append(f"- {name}: {model.warm_start or why}")
    return [*lines, ""]


def increment_lines(summary: RunSummary) -> list[str]:
    """What changed since the last run, and what each per-image stage computed for it."""
    increment = summary.increment
    if not increment.get("stages"):
        return []
    images = increment.get("images")
    since = f"since run {increment.get('since')}" if increment.get("since") else ""
    if images is None:
        change = "the first run on these artifacts (or the last run's manifest was pruned)"
    else:
        change = (
            f"{images['new']} new, {images['changed']} changed, {images['moved']} moved "
            f"(renamed or relabelled) and {images['removed']} removed images {since}"
        )
    rows = [
        {
            "stage": label,
            "state": stage["state"],
            "computed": stage["computed"],
            "reused": stage["reused"],
        }
        for label, stage in increment["stages"].items()
    ]
    return [
        "### What this run computed",
        "",
        f"Data: {change}. Per-image work is kept by each image's content: a stage computes "
        "only images no run computed before.",
        "",
        markdown_table(rows),
        "",
    ]
