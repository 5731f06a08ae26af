"""What people see of a run in the Prefect UI: tables, images, progress, the report.

Artifact keys are stable, so the UI shows each one's history across runs. Local images are
embedded as small data-URL PNGs in Markdown, because Prefect's image artifacts render only
public URLs.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from uuid import UUID

from PIL import Image
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from catdog.stage_records import CountsRecord

MAX_EMBED_WIDTH = 900
log = logging.getLogger(__name__)


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


def publish_counts(counts: CountsRecord) -> None:
    rows = []
    for split, per_class in counts.counts.items():
        row: dict[str, str | int | float] = {"split": split, **per_class}
        row["total"] = sum(per_class.values())
        row["majority baseline"] = round(counts.baseline[split], 4)
        rows.append(row)
    create_table_artifact(
        key="label-counts", table=rows, description="Images per class and split, with baseline"
    )


def start_progress(description: str) -> UUID | None:
    """A progress artifact, or None if the API cannot take one now (progress is optional)."""
    try:
        artifact_id = create_progress_artifact(progress=0.0, description=description)
    except Exception as error:  # a progress bar must never fail a training run
        log.warning("no progress artifact (%s)", error)
        return None
    return artifact_id if isinstance(artifact_id, UUID) else None


def update_progress(artifact_id: UUID | None, percent: float) -> None:
    """Best effort: an unreachable API costs the progress bar, never the training run."""
    if artifact_id is None:
        return
    try:
        update_progress_artifact(artifact_id=artifact_id, progress=percent)
    except Exception as error:
        log.warning("progress artifact not updated (%s)", error)


def publish_table(key: str, rows: Sequence[Mapping[str, object]], description: str) -> None:
    create_table_artifact(key=key, table=[dict(row) for row in rows], description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=key, markdown=markdown, description=description)
