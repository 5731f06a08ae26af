"""What people see of a run in the Prefect UI: tables, images, progress, the report.

Artifact keys are stable, so the UI shows each one's history across runs. Local images are
embedded as small data-URL PNGs in Markdown, because Prefect's image artifacts render only
public URLs.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any
from uuid import UUID

from PIL import Image
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

MAX_EMBED_WIDTH = 900


def embedded_png(path: Path, max_width: int = MAX_EMBED_WIDTH) -> str:
    """A Markdown image holding the PNG itself, downscaled to keep the artifact small."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"![{path.stem}](data:image/png;base64,{data})"


def publish_image(key: str, path: Path, description: str) -> None:
    create_markdown_artifact(
        key=key, markdown=f"### {description}\n\n{embedded_png(path)}\n", description=description
    )


def publish_counts(counts: dict[str, Any]) -> None:
    rows = []
    for split, per_class in counts["counts"].items():
        row: dict[str, Any] = {"split": split, **per_class}
        row["total"] = sum(per_class.values())
        row["majority baseline"] = round(counts["baseline"][split], 4)
        rows.append(row)
    create_table_artifact(
        key="label-counts", table=rows, description="Images per class and split, with baseline"
    )


def start_progress(description: str) -> UUID | None:
    artifact_id = create_progress_artifact(progress=0.0, description=description)
    return artifact_id if isinstance(artifact_id, UUID) else None


def update_progress(artifact_id: UUID | None, percent: float) -> None:
    if artifact_id is not None:
        update_progress_artifact(artifact_id=artifact_id, progress=percent)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    create_table_artifact(key=key, table=rows, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=key, markdown=markdown, description=description)
