"""A person's go-ahead before the gate replaces production (`--approve-promotion`).

The run pauses with Prefect's `pause_flow_run(wait_for_input=...)`: the UI shows the gate's
evidence and a form (approve, and who you are), and resuming the run with it decides. No answer
within the timeout keeps production, and the run goes on to its report and completes: the run
answers its own pause with "reject" at the deadline. (Left to Prefect's own pause timeout, the
server would fail the run, and a failure alert would follow for a run that did its job.)
A pause needs an API that outlives the run.
"""

from __future__ import annotations

import contextvars
import threading

from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput

from catdog import stage_records
from catdog.stage_records import PromotionRecord

PAUSE_GRACE_S = 120


class ApprovalForm(RunInput):
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
            f"| test accuracy | {facts.candidate_accuracy:.4f} | {facts.production_accuracy:.4f} |",
            f"| right where the other is wrong | {facts.candidate_only} | "
            f"{facts.production_only} |",
            "",
            f"McNemar p = {facts.p_value:.3g}",
        ]
    lines += ["", "Tick *approve* to promote it; leave it unticked to keep production."]
    return "\n".join(lines)


def ask_for_approval(proposal: PromotionRecord, timeout: int) -> stage_records.Approval:
    """Pause the run until someone answers, or `timeout` seconds pass; nobody is asked about a
    candidate the gate would not promote anyway.

    Returns:
        The outcome ("approved", "rejected", "timed out" or "not asked ...") and who answered.
    """
    if not proposal.promoted:
        return stage_records.Approval("not asked (the gate would keep production)", "")
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("ask_for_approval pauses a flow run: call it inside one")
    run_id = context.flow_run.id
    answered, expired = threading.Event(), threading.Event()

    def answer_at_the_deadline() -> None:
        if answered.wait(timeout):
            return
        try:  # refused when a person's answer came first: theirs stands
            resume_flow_run(run_id, run_input={"approve": False, "by": ""})
        except Exception:  # not paused any more, or the API is gone
            return
        expired.set()

    timer = threading.Thread(
        target=contextvars.copy_context().run,  # the API settings of this run
        args=(answer_at_the_deadline,),
        name="approval-deadline",
        daemon=True,
    )
    timer.start()
    form = ApprovalForm.with_initial_data(description=_evidence(proposal))
    try:
        # Prefect's own timeout only ends a pause nobody resumes at all (this process died).
        answer = pause_flow_run(wait_for_input=form, timeout=timeout + PAUSE_GRACE_S)
    except FlowPauseTimeout:
        return stage_records.Approval("timed out", "")
    finally:
        answered.set()
        timer.join()
    if expired.is_set():
        return stage_records.Approval("timed out", "")
    return stage_records.Approval("approved" if answer.approve else "rejected", answer.by)
