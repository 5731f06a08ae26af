"""Prefect events for automations and alerts, each related to the flow run that emitted it."""

from __future__ import annotations

from prefect.events import emit_event
from prefect.runtime import flow_run

from catdog.io import JsonObject


def emit_run_event(event: str, resource: str, name: str, payload: JsonObject) -> None:
    """Emit `event` about `resource` (its id and name), related to the running flow run, whose
    name joins the payload as "flow_run"."""
    run_id, run_name = flow_run.get_id(), flow_run.get_name()
    related = []
    if run_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": str(run_name),
            }
        )
    emit_event(
        event=event,
        resource={"prefect.resource.id": resource, "prefect.resource.name": name},
        related=related,
        payload={**payload, "flow_run": str(run_name)},
    )
