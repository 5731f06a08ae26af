"""Alerts through Prefect's own automations: what a person wants to hear of an unattended run.

`catdog alerts --webhook URL [--slack-webhook URL]` saves Prefect
notification blocks for the destinations and creates, on the connected server, one automation
per kind of news: a catdog run failed or crashed, production changed, a data check failed.
Running it again replaces them (same names); `--remove` takes them and the blocks down. Runs
that keep production send nothing (their `catdog.model.kept` event is in the event feed).

A run whose process or machine died says nothing: it would stay Running for ever. Every flow
run sends a heartbeat event (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 180 s by default), and one more
automation marks a catdog run crashed when its heartbeats stop for `silent_after` without the
run ending; the Crashed state it sets is then notified as any other failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

from catdog.config import RUN

FLOW_NAME = "catdog-train"
SILENT_RUNS = "catdog: a silent run is marked crashed"
SILENT_AFTER = timedelta(seconds=RUN.silent_after)
WEBHOOK_BLOCK = "catdog-alerts-webhook"
SLACK_BLOCK = "catdog-alerts-slack"


@dataclass(frozen=True)
class Alert:
    name: str  # the automation's name: "catdog: ..."
    events: frozenset[str]
    subject: str  # Jinja, as Prefect renders notification templates
    body: str
    of_catdog_runs: bool = False  # only events related to the catdog-train flow


ALERTS = (
    Alert(
        "catdog: a run failed",
        frozenset({"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}),
        "catdog run {{ flow_run.name }}: {{ flow_run.state.name }}",
        "The catdog run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
        "{{ flow_run.state.message }}",
        of_catdog_runs=True,
    ),
    Alert(
        "catdog: production changed",
        frozenset({"catdog.model.promoted"}),
        "catdog: {{ event.payload.candidate }} is production",
        "{{ event.payload.flow_run }} promoted {{ event.payload.candidate }} "
        "(epoch {{ event.payload.candidate_epoch }}) in {{ event.payload.artifacts }}, "
        "rule {{ event.payload.rule }}: {{ event.payload.reason }}",
    ),
    Alert(
        "catdog: a data check failed",
        frozenset({"catdog.data.check.failed"}),
        "catdog: data check {{ event.payload.check }} failed",
        "{{ event.payload.flow_run }}: {{ event.payload.detail }}",
    ),
)


def _destinations(webhook: str | None, slack: str | None) -> list[str]:
    """Save a notification block per destination; their document ids."""
    ids = []
    if webhook:
        block = CustomWebhookNotificationBlock(
            name="catdog",
            url=webhook,
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        )
        ids.append(str(block.save(WEBHOOK_BLOCK, overwrite=True)))
    if slack:
        ids.append(str(SlackWebhook(url=slack).save(SLACK_BLOCK, overwrite=True)))
    return ids


def _delete(name: str) -> bool:
    try:
        automation = Automation.read(name=name)
    except (ObjectNotFound, ValueError):
        return False
    return bool(automation.delete())


def _of_catdog_runs() -> dict[str, str]:
    return {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}


def install_automations(
    webhook: str | None, slack: str | None = None, silent_after: timedelta = SILENT_AFTER
) -> list[str]:
    """Create (or replace) the catdog automations; the names created."""
    blocks = _destinations(webhook, slack)
    created = []
    for alert in ALERTS:
        while _delete(alert.name):
            pass
        Automation(
            name=alert.name,
            description="Made by `catdog alerts`",
            trigger=EventTrigger(
                expect=set(alert.events),
                match_related=_of_catdog_runs() if alert.of_catdog_runs else {},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[
                SendNotification(block_document_id=block, subject=alert.subject, body=alert.body)
                for block in blocks
            ],
        ).create()
        created.append(alert.name)
    while _delete(SILENT_RUNS):
        pass
    silent_runs(silent_after).create()
    return [*created, SILENT_RUNS]


def silent_runs(silent_after: timedelta) -> Automation:
    """Prefect's zombie-run recipe for catdog runs: after a heartbeat, expect another heartbeat
    or the run's end within `silent_after`, for each run; else mark the run Crashed."""
    ends = {
        f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")
    }
    seconds = int(silent_after.total_seconds())
    return Automation(
        name=SILENT_RUNS,
        description="Made by `catdog alerts`",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ends},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=_of_catdog_runs(),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=silent_after,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {seconds} s: its process or machine stopped "
                "without a word (marked by the catdog automation)",
            )
        ],
    )


def remove_automations() -> list[str]:
    """Delete the catdog automations and notification blocks; the automations deleted."""
    from prefect.client.orchestration import get_client

    deleted = []
    for name in [*(alert.name for alert in ALERTS), SILENT_RUNS]:
        while _delete(name):
            deleted.append(name)
    blocks = ((CustomWebhookNotificationBlock, WEBHOOK_BLOCK), (SlackWebhook, SLACK_BLOCK))
    with get_client(sync_client=True) as client:
        for kind, name in blocks:
            try:
                document = client.read_block_document_by_name(name, kind.get_block_type_slug())
            except ObjectNotFound:
                continue
            client.delete_block_document(document.id)
    return deleted
