"""How `--runner dask` shares out a machine, and the checks of the Dask options."""

from __future__ import annotations

import pytest

from catdog.cluster import ClusterError, check_scheduler_address, plan_workers, visible_gpus


def test_without_a_gpu_two_workers_split_the_cores():
    shares = plan_workers(None, cpu_count=8, gpus=[])
    assert [(share.threads, share.gpu, share.resources) for share in shares] == [(4, None, {})] * 2
    env = shares[0].env()
    assert env["TF_NUM_INTRAOP_THREADS"] == env["TF_NUM_INTEROP_THREADS"] == "4"
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # none: TensorFlow would take every GPU it sees


def test_with_gpus_one_worker_each_sees_only_its_own():
    shares = plan_workers(None, cpu_count=16, gpus=["0", "3"])
    assert [share.gpu for share in shares] == ["0", "3"]
    assert [share.env()["CUDA_VISIBLE_DEVICES"] for share in shares] == ["0", "3"]
    assert all(share.resources == {"GPU": 1} and share.threads == 8 for share in shares)


def test_more_workers_than_gpus_or_cores():
    shares = plan_workers(3, cpu_count=2, gpus=["0"])
    assert [share.gpu for share in shares] == ["0", None, None]
    assert {share.threads for share in shares} == {1}  # never zero threads


def test_no_workers_is_refused():
    with pytest.raises(ClusterError, match="--workers 0"):
        plan_workers(0, cpu_count=2, gpus=[])


@pytest.mark.parametrize(
    ("listed", "expected"), [("0,1", ["0", "1"]), ("", []), ("-1", []), (" 2 ", ["2"])]
)
def test_cuda_visible_devices_narrows_the_gpus(listed, expected):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": listed}) == expected


@pytest.mark.parametrize("address", ["udp://host:8786", "tcp://host", "host:port", "tcp://:8786"])
def test_a_malformed_scheduler_address_is_refused(address):
    with pytest.raises(ClusterError, match="expected tls://HOST:PORT"):
        check_scheduler_address(address)


def test_a_scheduler_address_with_something_listening_is_accepted():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert check_scheduler_address(f"127.0.0.1:{port}") == f"tcp://127.0.0.1:{port}"
