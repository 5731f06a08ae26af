"""--approve-promotion: the run pauses where the gate would promote, and the answer given
through the Prefect API decides; no answer within the timeout keeps production."""

from __future__ import annotations

import threading
import time

import pytest

from catdog.layout import Layout
from catdog.registry import read as read_registry
from flows.cli import main
from tests.conftest import run_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def _paused_run(started: float, timeout: float = 120) -> object:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType as Types
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=Types(any_=[StateType.PAUSED]))
                )
            )
            fresh = [r for r in runs if r.start_time and r.start_time.timestamp() >= started]
            if fresh:
                return fresh[0]
            time.sleep(0.5)
    raise AssertionError("no run paused for approval")


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [({"approve": True, "by": "alice"}, "approved"), ({"approve": False, "by": "bob"}, "rejected")],
)
def test_the_answer_decides(dataset_zip, tmp_path, answer, outcome):
    from prefect.flow_runs import resume_flow_run

    artifacts = tmp_path / "artifacts"
    result: dict = {}
    started = time.time() - 1
    thread = threading.Thread(
        target=lambda: result.update(
            summary=run_flow(dataset_zip, artifacts, approve_promotion=True, approval_timeout=300)
        )
    )
    thread.start()
    paused = _paused_run(started)
    resume_flow_run(paused.id, run_input=answer)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the flow did not end after the answer"
    assert _latest_run_state() == "COMPLETED"
    summary = result["summary"]
    registry = read_registry(Layout.at(artifacts))
    decision = registry.history[-1]
    assert decision["approval"] == {"outcome": outcome, "by": answer["by"]}
    if outcome == "approved":
        assert summary["promotion"]["promoted"] and registry.production.model == "model1"
    else:
        assert not summary["promotion"]["promoted"] and summary["promotion"]["rule"] == "approval"
        assert "rejected by bob" in summary["promotion"]["reason"] and registry.production is None


def _latest_run_state() -> str:
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [latest] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    return latest.state.type.value


def test_no_answer_within_the_timeout_keeps_production(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    summary = run_flow(dataset_zip, artifacts, approve_promotion=True, approval_timeout=3)
    assert _latest_run_state() == "COMPLETED"  # keeping production is not a failure
    assert not summary["promotion"]["promoted"]
    assert "timed out" in summary["promotion"]["reason"]
    assert read_registry(Layout.at(artifacts)).history[-1]["approval"]["outcome"] == "timed out"


def test_the_command_line_without_a_lasting_server_refuses_it(dataset_zip, tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(SystemExit) as exit:
        main(["--data", str(dataset_zip), "--approve-promotion", "--artifacts", str(tmp_path)])
    assert exit.value.code == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert "--approve-promotion" in line and "prefect server start" in line
    assert not (tmp_path / "01_raw").exists()
