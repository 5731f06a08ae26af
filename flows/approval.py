"""A person's go-ahead before the gate replaces production (`--approve-promotion`).

The run pauses with Prefect's `pause_flow_run(wait_for_input=...)`: the UI shows the gate's
evidence and a form (approve, and who you are), and resuming the run with it decides. No answer
within the timeout keeps production. A pause needs an API that outlives the run.
"""

from __future__ import annotations

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from catdog.records import PromotionRecord


class Approval(RunInput):
    """The form the UI shows on the paused run."""

    approve: bool = False  # replace production with the candidate
    by: str = ""  # who decided, for the registry


def _evidence(proposal: PromotionRecord) -> str:
    lines = [
        f"### Promote {proposal.candidate} (epoch {proposal.candidate_epoch})?",
        "",
        f"The gate would promote it: {proposal.reason}.",
    ]
    if proposal.evidence:
        facts = proposal.evidence
        lines += [
            "",
            "| | candidate | production |",
            "|---|---|---|",
            f"| test accuracy | {facts['candidate_accuracy']:.4f} | "
            f"{facts['production_accuracy']:.4f} |",
            f"| right where the other is wrong | {facts['candidate_only']} | "
            f"{facts['production_only']} |",
            "",
            f"McNemar p = {facts['p_value']:.3g}",
        ]
    lines += ["", "Tick *approve* to promote it; leave it unticked to keep production."]
    return "\n".join(lines)


def ask_for_approval(proposal: PromotionRecord, timeout: int) -> dict[str, str]:
    """Pause the run until someone answers, or `timeout` seconds pass.

    Returns:
        {"outcome": "approved", "rejected" or "timed out", "by": who answered}.
    """
    form = Approval.with_initial_data(description=_evidence(proposal))
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout)
    except FlowPauseTimeout:
        return {"outcome": "timed out", "by": ""}
    return {"outcome": "approved" if answer.approve else "rejected", "by": answer.by}
