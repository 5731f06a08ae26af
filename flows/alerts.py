"""Alerts through Prefect's own automations: what a person wants to hear of an unattended run.

`catdog alerts --webhook URL [--slack-webhook URL]` saves Prefect
notification blocks for the destinations and creates, on the connected server, one automation
per kind of news: a catdog run failed or crashed, production changed, a data check failed.
Running it again replaces them (same names); `--remove` takes them and the blocks down. Runs
that keep production send nothing (their `catdog.model.kept` event is in the event feed).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

FLOW_NAME = "catdog-train"
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


def install_automations(webhook: str | None, slack: str | None = None) -> list[str]:
    """Create (or replace) the catdog automations; the names created."""
    blocks = _destinations(webhook, slack)
    created = []
    for alert in ALERTS:
        while _delete(alert.name):
            pass
        match_related = (
            {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}
            if alert.of_catdog_runs
            else {}
        )
        Automation(
            name=alert.name,
            description="Made by `catdog alerts`",
            trigger=EventTrigger(
                expect=set(alert.events),
                match_related=match_related,
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[
                SendNotification(block_document_id=block, subject=alert.subject, body=alert.body)
                for block in blocks
            ],
        ).create()
        created.append(alert.name)
    return created


def remove_automations() -> list[str]:
    """Delete the catdog automations and notification blocks; the automations deleted."""
    from prefect.client.orchestration import get_client

    deleted = []
    for alert in ALERTS:
        while _delete(alert.name):
            deleted.append(alert.name)
    blocks = ((CustomWebhookNotificationBlock, WEBHOOK_BLOCK), (SlackWebhook, SLACK_BLOCK))
    with get_client(sync_client=True) as client:
        for kind, name in blocks:
            try:
                document = client.read_block_document_by_name(name, kind.get_block_type_slug())
            except ObjectNotFound:
                continue
            client.delete_block_document(document.id)
    return deleted
