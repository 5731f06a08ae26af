"""Scale-out that lets no one in: the README's store and secured-cluster recipes run as they
stand (artifacts in an S3 store; mutual TLS between the run, the scheduler and the workers; a
Prefect API that wants a password), and what it refuses: a plain client, a client certified by
another CA, a request without the password, a run whose TLS settings do not match its
address."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.builders import write_image
from tests.conftest import REPO, flow_command, free_port, make_dataset, zip_folder
from tests.s3_server import free_port_pair

pytestmark = [pytest.mark.slow]

MARKER = "<!-- secured-cluster-recipe -->"
STORE_MARKER = "<!-- store-recipe -->"


def recipe(marker: str = MARKER) -> str:
    """The README's commands after `marker`, as written."""
    text = (REPO / "README.md").read_text()
    block = text.split(marker, 1)[1]
    match = re.search(r"```bash\n(.*?)```", block, re.S)
    assert match, f"the README lost its recipe after {marker}"
    return match.group(1)


def _make_certs(folder: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts/make_certs.py"), str(folder)],
        check=True,
        capture_output=True,
    )


def _refusal(address: str, **client: object) -> str | None:
    """Why a Dask client cannot connect to `address` (None: it connected)."""
    from distributed import Client

    try:
        with Client(address, timeout=10, set_as_default=False, **client):
            return None
    except (OSError, TimeoutError) as error:
        return f"{type(error).__name__}: {error}"


def test_the_readme_recipes_start_a_secured_cluster_on_a_store_that_trains_and_refuses_strangers(
    tmp_path,
):
    """The store recipe, then the secured-cluster recipe, as the README says to run them."""
    from distributed import Security

    data = zip_folder(make_dataset(tmp_path / "src"), tmp_path / "tiny.zip")
    cache = tmp_path / "cache"  # this machine's copy of the store: the run's and its workers'
    certs, other = tmp_path / "cluster" / "certs", tmp_path / "other-ca"
    api_port, dask_port = free_port(), free_port()
    master, volume, filer, s3 = (free_port_pair() for _ in range(4))
    script = tmp_path / "recipe.sh"
    script.write_text("set -euo pipefail\n" + recipe(STORE_MARKER) + recipe())
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "DASK_"))
    }
    env.update(
        HOST="127.0.0.1",
        API_PORT=str(api_port),
        DASK_PORT=str(dask_port),
        CLUSTER=str(tmp_path / "cluster"),
        DATA=str(data),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        S3_PORT=str(s3),
        WEED_MASTER_PORT=str(master),
        WEED_VOLUME_PORT=str(volume),
        WEED_FILER_PORT=str(filer),
        CATDOG_CACHE_DIR=str(cache),
    )
    # The options the recipe's run line passes on: two models, one epoch, tiny images (and
    # not --artifacts: the recipe gives the store's).
    options = flow_command(data, tmp_path / "unused", epochs=1, models="model1,model2")[4:-2]
    cluster = subprocess.Popen(
        ["bash", str(script), *options],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the recipe's servers and workers: one group to stop
    )
    try:
        out, err = cluster.communicate(timeout=600)
        assert cluster.returncode == 0, (out, err[-4000:])
        identity = json.loads((tmp_path / "cluster" / "store" / "identity.json").read_text())
        secret = identity["identities"][0]["credentials"][0]["secretKey"]
        assert secret not in out + err
        summary = json.loads((cache / "stores/s3/catdog/runs/summary.json").read_text())
        assert set(summary["models"]) == {"model1", "model2"}
        workers = {model["worker"]["pid"] for model in summary["models"].values()}
        assert os.getpid() not in workers and cluster.pid not in workers

        # A third machine, its cache empty, with the store's settings: production's model.
        third = {
            **env,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}",
            "AWS_ACCESS_KEY_ID": "catdog",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "CATDOG_CACHE_DIR": str(tmp_path / "third"),
        }
        photo = write_image(tmp_path / "photo.jpg", seed=3)
        predicted = subprocess.run(
            [str(Path(sys.executable).with_name("catdog")), "predict", str(photo),
             "--artifacts", "s3://catdog/runs"],
            env=third, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr[-2000:]
        assert predicted.stdout.split("\t")[1] in ("cats", "dogs")
        assert "(production, keras)" in predicted.stderr
        assert secret not in predicted.stdout + predicted.stderr

        address = f"tls://127.0.0.1:{dask_port}"
        # Plain TCP, and a certificate from another CA: both refused.
        # Refused by the scheduler itself, not a port that does not answer ("Timed out").
        plain_refusal = _refusal(f"tcp://127.0.0.1:{dask_port}")
        assert plain_refusal and "CommClosedError" in plain_refusal, plain_refusal
        user, _, password = (certs / "api-auth").read_text().strip().partition(":")
        plain_tcp = ["--dask-address", f"tcp://127.0.0.1:{dask_port}"]
        plain = subprocess.run(  # the command line says so in one line, before any work
            [*flow_command(data, tmp_path / "elsewhere", epochs=1), *plain_tcp],
            env={
                **env,
                "PREFECT_API_URL": f"http://127.0.0.1:{api_port}/api",
                "PREFECT_API_AUTH_STRING": f"{user}:{password}",
            },
            capture_output=True,
            text=True,
            timeout=300,
        )
        errors = [line for line in plain.stderr.splitlines() if line.startswith("error:")]
        assert plain.returncode == 2 and len(errors) == 1, plain.stderr[-3000:]
        assert "needs a tls:// address" in errors[0]
        assert not (tmp_path / "elsewhere").exists()
        _make_certs(other)
        stranger = Security(
            tls_ca_file=str(other / "ca.pem"),
            tls_client_cert=str(other / "client.pem"),
            tls_client_key=str(other / "client-key.pem"),
            require_encryption=True,
        )
        stranger_refusal = _refusal(address, security=stranger)
        assert stranger_refusal and "TLS certificate does not match" in stranger_refusal
        member = Security(
            tls_ca_file=str(certs / "ca.pem"),
            tls_client_cert=str(certs / "client.pem"),
            tls_client_key=str(certs / "client-key.pem"),
            require_encryption=True,
        )
        assert _refusal(address, security=member) is None

        # The API: nothing without the password, not even a read; the run's flow is there
        # for a client that has it.
        api = f"http://127.0.0.1:{api_port}/api"
        assert httpx.post(f"{api}/flow_runs/filter", json={}).status_code == 401
        assert httpx.post(f"{api}/flows/", json={"name": "intruder"}).status_code == 401
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, auth=(user, password))
        assert runs.status_code == 200
        assert [run["state_type"] for run in runs.json()] == ["COMPLETED"]
        flows = httpx.post(f"{api}/flows/filter", json={}, auth=(user, password)).json()
        assert [flow["name"] for flow in flows] == ["catdog-train"]  # no "intruder"
        assert (certs / "ca-key.pem").stat().st_mode & 0o077 == 0
    finally:
        for stop in (signal.SIGTERM, signal.SIGKILL):  # the server, the scheduler, the workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cluster.pid, stop)
            time.sleep(1)


@pytest.mark.parametrize(
    ("scheme", "settings", "expected"),
    [
        ("tls", {}, "a TLS scheduler needs this client's CA file, certificate and key"),
        ("tcp", {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}, "use tls://"),
    ],
)
def test_an_address_whose_scheme_and_security_disagree_stops_before_any_work(
    tmp_path, scheme, settings, expected
):
    import socket

    data = zip_folder(make_dataset(tmp_path / "src"), tmp_path / "tiny.zip")
    artifacts = tmp_path / "artifacts"
    with socket.create_server(("127.0.0.1", 0)) as listening:
        address = f"{scheme}://127.0.0.1:{listening.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
        result = subprocess.run(
            [*flow_command(data, artifacts, epochs=1), "--dask-address", address],
            env={**env, **settings, "PREFECT_HOME": str(tmp_path / "home")},
            capture_output=True,
            text=True,
            timeout=300,
        )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and expected in errors[0], errors
    assert not artifacts.exists()
