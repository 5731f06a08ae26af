"""Scheduled retraining: the deployment `serve` registers, and the one prefect.yaml declares."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import prefect
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.cli import build_deployment, main, serve_parser
from flows.train_flow import train_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]  # a Prefect API

ROOT = Path(__file__).resolve().parents[1]
CRON = "0 3 * * 1"
ENTRYPOINT = "flows/train_flow.py:train_flow"


def serve_args(dataset_zip: Path, artifacts: Path, *schedule: str) -> list[str]:
    return [
        *schedule,
        "--data",
        str(dataset_zip),
        "--models",
        "model1,model2",
        "--epochs",
        "3",
        "--artifacts",
        str(artifacts),
    ]


def read_back(deployment_id: Any) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id)


def test_serve_deployment_has_the_cron_schedule_and_the_options(dataset_zip, tmp_path) -> None:
    args = serve_parser().parse_args(
        serve_args(dataset_zip, tmp_path / "artifacts", "--cron", CRON)
    )
    deployment = build_deployment(args)
    assert deployment.entrypoint is not None and deployment.entrypoint.endswith(ENTRYPOINT)

    saved = read_back(deployment.apply())

    assert saved.name == "scheduled-retraining"
    assert saved.tags == ["catdog", "scheduled"]
    [schedule] = saved.schedules
    assert schedule.active
    assert schedule.schedule.cron == CRON
    assert str(schedule.schedule.timezone) == "UTC"
    assert saved.parameters["data"] == str(dataset_zip)
    assert saved.parameters["models"] == ["model1", "model2"]
    assert saved.parameters["epochs"] == 3
    assert saved.parameters["artifacts"] == str((tmp_path / "artifacts").resolve())
    assert set(saved.parameters) <= set(inspect.signature(train_flow.fn).parameters)
    with get_client(sync_client=True) as client:
        assert client.read_flow(saved.flow_id).name == "catdog-train"


def test_serve_deployment_with_an_interval(dataset_zip, tmp_path) -> None:
    args = serve_parser().parse_args(
        [*serve_args(dataset_zip, tmp_path, "--interval", "600"), "--name", "every-ten"]
    )
    saved = read_back(build_deployment(args).apply())
    assert saved.name == "every-ten"
    [schedule] = saved.schedules
    assert schedule.schedule.interval.total_seconds() == 600


def test_main_serve_registers_the_deployment_it_serves(monkeypatch, dataset_zip, tmp_path):
    served: list[Any] = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments: served.extend(deployments))
    argv = ["serve", *serve_args(dataset_zip, tmp_path, "--cron", CRON)]
    assert main(argv) == 0
    [deployment] = served
    assert deployment.name == "scheduled-retraining"
    assert deployment.schedules[0].schedule.cron == CRON
    assert deployment.parameters["models"] == ["model1", "model2"]


def test_serve_rejects_a_bad_schedule_in_one_line(capsys, dataset_zip, tmp_path) -> None:
    argv = ["serve", *serve_args(dataset_zip, tmp_path, "--cron", "every monday")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cron 'every monday'") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--data", str(dataset_zip)])  # a schedule is required
    assert exit_info.value.code == 2


def train_flow_defaults() -> dict:
    import inspect

    return {
        name: parameter.default
        for name, parameter in inspect.signature(train_flow.fn).parameters.items()
    }


def test_prefect_yaml_declares_the_same_deployment() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deployment] = config["deployments"]
    assert deployment["name"] == serve_parser().get_default("name") == "scheduled-retraining"
    assert deployment["entrypoint"] == ENTRYPOINT
    assert deployment["work_pool"]["name"] == "catdog-process"
    assert deployment["schedules"] == [{"cron": CRON, "timezone": "UTC", "active": True}]
    assert deployment["tags"] == ["catdog", "scheduled"]
    # Every parameter comes from the flow's defaults, so the two cannot disagree, but the one
    # both scheduled deployments set: data that fails its checks holds production back.
    assert deployment["parameters"] == {"on_data_issue": "hold"}
    assert serve_parser().get_default("on_data_issue") == "hold"
    assert train_flow_defaults()["on_data_issue"] == "warn"
    path, function = deployment["entrypoint"].split(":")
    assert (ROOT / path).is_file() and train_flow.fn.__name__ == function
    [pull] = config["pull"]
    assert "prefect.deployments.steps.set_working_directory" in pull


def test_deployment_run_with_an_unknown_model_is_refused_at_once(dataset_zip, tmp_path) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    args = serve_parser().parse_args(serve_args(dataset_zip, tmp_path, "--interval", "3600"))
    deployment_id = build_deployment(args).apply()
    with get_client(sync_client=True) as client, pytest.raises(PrefectHTTPStatusError) as info:
        client.create_flow_run_from_deployment(deployment_id, parameters={"models": ["model9"]})
    assert "model9" in info.value.response.text
    assert "'model1'" in info.value.response.text  # it says what would be accepted


def test_deployment_run_with_a_bad_weights_file_fails_before_any_stage(
    dataset_zip, tmp_path
) -> None:
    from prefect.flow_engine import run_flow

    artifacts = tmp_path / "artifacts"
    args = serve_parser().parse_args(serve_args(dataset_zip, artifacts, "--interval", "3600"))
    deployment_id = build_deployment(args).apply()
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"not weights")
    parameters = {"models": ["model4"], "weights": str(bad)}
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    state = run_flow(
        train_flow, flow_run=flow_run, parameters=flow_run.parameters, return_type="state"
    )
    assert state.is_failed()
    assert "weights.bin" in state.message and "not an .h5 file" in state.message
    with get_client(sync_client=True) as client:
        saved = client.read_flow_run(flow_run.id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    assert saved.state.is_failed()
    assert tasks == []  # no stage ran
    assert not (tmp_path / "artifacts").exists()
