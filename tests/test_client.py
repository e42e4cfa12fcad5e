"""The light client: blocking predict, streaming with an age budget, timeouts, recovery
after the server is killed and restarted, and its import diet."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime.client import TraceClient, TraceReply
from runtime.model_api import EchoTraceModel, make_observation
from tests.runtime_helpers import REPO, running_server, spawn_server


def test_predict_returns_a_frozen_reply_with_its_age() -> None:
    with running_server() as server, TraceClient(server.address) as client:
        obs = make_observation(num_queries=7)
        reply = client.predict(obs)
    assert isinstance(reply, TraceReply) and reply.request_id > 0
    assert reply["traces_uvz"].shape == (7, 32, 3)
    assert 0 < reply.round_trip_ms < 1000 and reply.age_s >= reply.round_trip_ms / 1e3
    assert reply.timings["total_ms"] > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        reply.request_id = 3  # type: ignore[misc]


def test_stream_keeps_the_newest_trace_within_the_age_budget() -> None:
    model = EchoTraceModel(compute_s=0.02)  # slower than the camera: some frames get superseded
    with running_server(model, rate_limit_hz=0) as server:
        with TraceClient(server.address, max_age_s=0.3) as client:
            client.start_stream()
            obs = [make_observation(num_queries=2, seed=s) for s in range(60)]
            for o in obs:
                client.submit(o)
                time.sleep(0.005)
            time.sleep(0.1)
            reply = client.latest()
            assert reply is not None and reply.age_s < 0.3
            # the newest submitted frame won
            np.testing.assert_array_equal(reply["traces_uvz"][:, 0], obs[-1]["hist_uvz"][:, -1])
            counts = client.stream_counts
            assert counts["traces"] < counts["sent"] or counts["sent"] < len(obs)
            assert client.latest(max_age_s=0.0) is None  # a tighter budget of the caller
            time.sleep(0.35)
            assert client.latest() is None  # never hands out a trace past the budget
            client.stop()


def test_timeout_when_no_server_listens() -> None:
    with running_server() as server:
        address = server.address
    with TraceClient(address, timeout_s=0.3) as client:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            client.ping()
        assert time.monotonic() - t0 < 5.0  # the 0.3 s timeout is honoured, not a long wait


def test_client_recovers_after_the_server_is_killed_and_restarted(tmp_path) -> None:
    proc, port = spawn_server(tmp_path)
    address = f"tcp://127.0.0.1:{port}"
    obs = make_observation(num_queries=4)
    with TraceClient(address, timeout_s=0.5, max_age_s=0.5) as client:
        try:
            client.start_stream()
            deadline = time.monotonic() + 10
            while client.latest() is None and time.monotonic() < deadline:
                client.submit(obs)
                time.sleep(0.02)
            assert client.latest() is not None

            proc.send_signal(signal.SIGKILL)  # mid-stream, no goodbye
            proc.wait(timeout=5)
            proc.stderr.close()
            for _ in range(40):  # keep streaming while it is down
                client.submit(obs)
                time.sleep(0.02)
            assert client.latest() is None  # the last trace aged past the budget
            traces_before = client.stream_counts["traces"]

            proc, _ = spawn_server(tmp_path, port)
            deadline = time.monotonic() + 10
            while client.stream_counts["traces"] == traces_before and time.monotonic() < deadline:
                client.submit(obs)
                time.sleep(0.02)
            assert client.latest() is not None, client.stream_counts
            client.stop()
            # blocking calls work again too
            assert client.predict(obs, timeout_s=3)["traces_uvz"].shape == (4, 32, 3)
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()


def test_client_imports_neither_torch_nor_mu0_core() -> None:
    code = (
        "import sys, runtime.client\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'mu0_core')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=30)


def test_the_client_example_in_the_protocol_doc_works() -> None:
    text = (REPO / "docs" / "protocol.md").read_text()
    example = re.search(r"## A complete client.*?```python\n(.*?)```", text, re.S).group(1)
    with running_server() as server:
        out = subprocess.run(
            [sys.executable, "-c", example, server.address],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("echo (4, 32, 3)")
