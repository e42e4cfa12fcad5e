"""The trace server: handshake, typed errors that never stop it, batching, fairness, CURVE."""

from __future__ import annotations

import signal
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from runtime import wire
from runtime.client import ClientCurve, ServerError, TraceClient
from runtime.model_api import EchoTraceModel, make_observation
from runtime.server import CurveConfig
from runtime.wire import ErrorCode, Kind
from tests.runtime_helpers import RawDealer, running_server, spawn_server


@pytest.fixture(scope="module")
def server():
    with running_server(max_message_bytes=1 << 20, rate_limit_hz=0) as s:
        yield s


def test_hello_ping_and_stats(server) -> None:
    with TraceClient(server.address, timeout_s=2) as client:
        meta = client.hello()
        assert meta["protocol_version"] == wire.PROTOCOL_VERSION
        assert meta["model_id"] == "echo" and meta["model_hash"]
        assert meta["horizon"] == 32 and meta["image_size"] == [224, 224]
        assert meta["max_queries"] >= 16 and "uv" in meta["frames"]
        assert client.ping() < 1.0
        client.predict(make_observation(image_size=(224, 224)))
        stats = client.stats()
        assert stats["counts"]["predict"] >= 1 and stats["latency_ms"]["n"] >= 1
        assert {"requests_per_s", "batch_size", "errors", "clients"} <= stats.keys()


def test_predict_holds_points_still_and_reports_timings(server) -> None:
    obs = make_observation(num_queries=5, seed=3)
    with TraceClient(server.address) as client:
        reply = client.predict(obs)
    current = obs["hist_uvz"][:, -1]
    assert reply["traces_uvz"].shape == (5, 32, 3) and reply["traces_uvz"].dtype == np.float32
    np.testing.assert_allclose(reply["traces_uvz"], np.repeat(current[:, None], 32, axis=1))
    np.testing.assert_allclose(reply["traces_xyz_cam"][..., 2], reply["traces_uvz"][..., 2])
    assert reply["done"].dtype == bool and not reply["done"].any()
    assert {"queue_ms", "infer_ms", "total_ms", "batch_size"} <= reply.timings.keys()


V = wire.PROTOCOL_VERSION


def _predict_header(obs: dict, rid: int = 1, v: int = wire.PROTOCOL_VERSION) -> dict:
    return {"v": v, "kind": "predict", "id": rid, "body": {"obs": obs}}


def _bad_messages() -> dict[str, tuple[list, ErrorCode]]:
    good = make_observation()
    wrong_shape = {**good, "rgb": np.zeros((100, 224, 3), np.uint8)}
    wrong_dtype = {**good, "hist_uvz": good["hist_uvz"].astype(np.float64)}
    frames = wire.encode(_predict_header(good))
    return {
        "garbage": ([b"\x00\xff garbage \x13"], ErrorCode.MALFORMED),
        "empty_frame": ([b""], ErrorCode.MALFORMED),
        "truncated_frames": (frames[:2], ErrorCode.MALFORMED),  # header names missing frames
        "truncated_array": ([frames[0], bytes(frames[1])[:-7], *frames[2:]], ErrorCode.BAD_SHAPE),
        "truncated_header": ([bytes(frames[0])[:-5], *frames[1:]], ErrorCode.MALFORMED),
        "version_1_client": (wire.encode(_predict_header(good, v=1)), ErrorCode.VERSION_MISMATCH),
        "wrong_shape": (wire.encode(_predict_header(wrong_shape)), ErrorCode.BAD_SHAPE),
        "wrong_dtype": (wire.encode(_predict_header(wrong_dtype)), ErrorCode.BAD_DTYPE),
        "missing_field": (wire.encode(_predict_header({"rgb": good["rgb"]})), ErrorCode.MALFORMED),
        "no_obs": (
            wire.encode({"v": V, "kind": "predict", "id": 1, "body": {}}),
            ErrorCode.MALFORMED,
        ),
        "version": (wire.encode(_predict_header(good, v=99)), ErrorCode.VERSION_MISMATCH),
        "kind": (wire.encode({"v": V, "kind": "exec", "id": 1}), ErrorCode.UNKNOWN_KIND),
        "oversized": (
            [msgpack.packb({"v": V, "kind": "ping", "id": 1}), b"x" * (3 << 19)],
            ErrorCode.TOO_LARGE,
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_messages()))
def test_bad_messages_get_typed_errors_and_others_keep_being_served(server, case: str) -> None:
    frames, code = _bad_messages()[case]
    with RawDealer(server.address) as bad, TraceClient(server.address) as good:
        bad.send_frames(frames)
        reply = bad.recv(timeout_s=2)
        assert reply is not None and reply["kind"] == "error"
        assert reply["body"]["code"] == code.value
        assert "Traceback" not in reply["body"]["message"]
        assert good.predict(make_observation()).request_id > 0  # still serving


def test_frames_beyond_the_transport_limit_are_dropped_without_harm(server) -> None:
    with RawDealer(server.address) as bad, TraceClient(server.address) as good:
        bad.send_frames([msgpack.packb({"v": V, "kind": "ping", "id": 1}), b"x" * (4 << 20)])
        assert bad.recv(timeout_s=0.3) is None  # zmq's MAXMSGSIZE cut the connection
        good.predict(make_observation())


# 5 ms per batch: the helper watches the socket while the model runs; 0: the model is
# fast enough to run inline, with the socket unwatched for the few microseconds it takes.
@pytest.mark.parametrize("compute_s", [0.005, 0.0])
def test_twelve_concurrent_clients_get_their_own_answers(compute_s: float) -> None:
    model = EchoTraceModel(compute_s=compute_s)
    with running_server(model, batch_window_ms=5, max_batch=16) as server:
        failures: list[str] = []

        def run(seed: int) -> None:
            obs = make_observation(num_queries=4 + seed % 3, seed=seed)
            with TraceClient(server.address, timeout_s=5) as client:
                for _ in range(15):
                    reply = client.predict(obs)
                    expected = np.repeat(obs["hist_uvz"][:, -1:], 32, axis=1)
                    if not np.array_equal(reply["traces_uvz"], expected):
                        failures.append(f"client {seed} got someone else's trace")

        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=25)
        assert not failures
        stats = server.stats()
        assert stats["counts"]["predict"] == 12 * 15
        assert stats["batch_size"]["max"] > 1  # requests of different clients shared a forward pass


def test_the_socket_is_watched_while_the_model_runs() -> None:
    with running_server(EchoTraceModel(compute_s=0.4), rate_limit_hz=0) as server:
        with TraceClient(server.address, timeout_s=3) as busy, TraceClient(server.address) as other:
            for _ in range(3):  # later batches too, not only the first
                done = threading.Event()
                thread = threading.Thread(
                    target=lambda: (busy.predict(make_observation()), done.set())
                )
                thread.start()
                time.sleep(0.1)  # the model is now running busy's request
                assert other.ping(timeout_s=0.25) < 0.25
                assert not done.is_set()  # answered during the forward pass, not after it
                thread.join()
                assert done.is_set()


def test_newer_request_supersedes_the_pending_one() -> None:
    with running_server(EchoTraceModel(compute_s=0.3), rate_limit_hz=0) as server:
        with RawDealer(server.address) as dealer:
            obs = make_observation(num_queries=2)
            dealer.send(_predict_header(obs, rid=1))
            time.sleep(0.1)  # the worker is now busy with request 1
            dealer.send(_predict_header(obs, rid=2))
            dealer.send(_predict_header(obs, rid=3))
            replies = [dealer.recv(timeout_s=3) for _ in range(3)]
    got = {(r["id"], r["kind"]) for r in replies if r is not None}
    assert got == {(1, "trace"), (2, "superseded"), (3, "trace")}


def test_a_client_that_never_reads_does_not_stall_the_others() -> None:
    with running_server(EchoTraceModel(compute_s=0.002), rate_limit_hz=0, send_hwm=8) as server:
        flooder = RawDealer(server.address)
        flooder.sock.setsockopt(zmq.RCVHWM, 1)
        flooder.sock.setsockopt(zmq.RCVBUF, 4096)
        obs = make_observation()
        stop = threading.Event()
        sent = [0]

        def flood() -> None:
            while not stop.is_set():
                sent[0] += 1
                flooder.send(_predict_header(obs, rid=sent[0]))

        thread = threading.Thread(target=flood)
        thread.start()
        try:
            with TraceClient(server.address, timeout_s=2) as client:
                latencies = []
                for _ in range(30):
                    t0 = time.monotonic()
                    client.predict(obs)
                    latencies.append(time.monotonic() - t0)
        finally:
            stop.set()
            thread.join()
            flooder.close()
        # Every request of the reading client was answered (predict raises on its 2 s timeout)
        # while the flooder kept sending and never read. The bound below only catches a gross
        # stall: the model takes 2 ms, so 1 s is a margin of 500x, safe on a loaded CI machine.
        assert len(latencies) == 30 and sent[0] > 30
        assert np.median(latencies) < 1.0, latencies


def test_per_client_rate_limit() -> None:
    with running_server(rate_limit_hz=5) as server, RawDealer(server.address) as dealer:
        for rid in range(20):
            dealer.send(wire.request(Kind.PING, rid))
        replies = [dealer.recv(timeout_s=1) for _ in range(20)]
        errors = [r for r in replies if r is not None and r["kind"] == "error"]
        codes = [r["body"]["code"] for r in errors]
        assert all(r["id"] is not None for r in errors)  # each refusal names its request
        assert "rate_limited" in codes
        assert sum(1 for r in replies if r is not None and r["kind"] == "pong") >= 2


def test_overloaded_when_too_many_clients_wait() -> None:
    model = EchoTraceModel(compute_s=0.3)
    with running_server(model, max_pending=1, batch_window_ms=0, max_batch=1) as server:
        a, b, c = (RawDealer(server.address) for _ in range(3))
        try:
            obs = make_observation(num_queries=1)
            a.send(_predict_header(obs))
            time.sleep(0.1)  # a is being computed, the queue is empty again
            b.send(_predict_header(obs))
            time.sleep(0.05)
            c.send(_predict_header(obs))
            reply = c.recv(timeout_s=1)
            assert reply["kind"] == "error" and reply["body"]["code"] == "overloaded"
            assert a.recv(timeout_s=2)["kind"] == "trace" and b.recv(timeout_s=2)["kind"] == "trace"
        finally:
            for d in (a, b, c):
                d.close()


class _FlakyModel(EchoTraceModel):
    fail_next = True

    def predict_batch(self, observations):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA out of memory (secret detail)")
        return super().predict_batch(observations)


def test_model_failure_is_a_typed_error_and_the_server_lives_on() -> None:
    with running_server(_FlakyModel()) as server, TraceClient(server.address) as client:
        with pytest.raises(ServerError) as err:
            client.predict(make_observation())
        assert err.value.code is ErrorCode.INTERNAL and "secret" not in err.value.message
        assert client.predict(make_observation())["traces_uvz"].shape == (16, 32, 3)


def test_observers_subscribe_to_the_trace_stream() -> None:
    with running_server(pub_port=0) as server, TraceClient(server.address) as client:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"trace")
        sub.connect(server.pub_address)
        try:
            obs = make_observation(num_queries=3)
            for _ in range(50):  # PUB drops until the subscription has propagated
                client.predict(obs)
                if sub.poll(50):
                    break
            topic, *frames = sub.recv_multipart(copy=False)
            header = wire.decode(frames)
            assert topic.bytes == b"trace" and header["kind"] == "trace"
            assert header["body"]["traces_uvz"].shape == (3, 32, 3) and header["client"]
        finally:
            sub.close()
            ctx.term()


def test_curve_allows_known_clients_and_gives_unknown_ones_nothing(tmp_path) -> None:
    import zmq.auth

    keys = tmp_path / "keys"
    for d in (keys / "clients", tmp_path / "other"):
        d.mkdir(parents=True)
    server_pub, server_secret = zmq.auth.create_certificates(keys, "server")
    _, robot_secret = zmq.auth.create_certificates(keys / "clients", "robot")
    _, stranger_secret = zmq.auth.create_certificates(tmp_path / "other", "stranger")
    curve = CurveConfig.from_files(server_secret, [keys / "clients"])
    with running_server(curve=curve) as server:
        with TraceClient(
            server.address, curve=ClientCurve.from_files(server_pub, robot_secret)
        ) as ok:
            assert ok.hello()["model_id"] == "echo"
            assert ok.predict(make_observation())["traces_uvz"].shape == (16, 32, 3)
        stranger = ClientCurve.from_files(server_pub, stranger_secret)
        with TraceClient(server.address, timeout_s=0.5, curve=stranger) as denied:
            with pytest.raises(TimeoutError):
                denied.hello()
        with TraceClient(server.address, timeout_s=0.5) as plain:
            with pytest.raises(TimeoutError):
                plain.ping()


def test_sigterm_stops_the_server_cleanly(tmp_path) -> None:
    proc, port = spawn_server(tmp_path)
    try:
        with TraceClient(f"tcp://127.0.0.1:{port}", timeout_s=3) as client:
            assert client.ping() < 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        log = proc.stderr.read().decode()
        assert "event=signal" in log and "event=stopped" in log
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_benchmark_runs_and_reports_its_keys() -> None:
    from runtime.bench_server import run_server_bench

    result = run_server_bench(duration_s=0.2, client_counts=(2,), paced_s=0.3)
    for key in (
        "transport_p50_ms",
        "transport_p99_ms",
        "websocket_p50_ms",
        "transport_vs_websocket_speedup",
        "transport_stream_p50_ms",
        "websocket_stream_p50_ms",
        "transport_30hz_p50_ms",
        "websocket_30hz_p99_ms",
    ):
        assert result[key] > 0
    assert {(row["clients"], row["batching"]) for row in result["table"]} == {(2, False), (2, True)}


def test_replies_keep_flowing_while_the_socket_is_flooded() -> None:
    """Eight clients send as fast as they can (each new request supersedes the last) while
    one more client asks and waits. The thread that watches the socket during a forward
    pass is busy with the flood all the time; the replies must not wait on it."""
    model = EchoTraceModel(compute_s=0.005, image_size=None)
    with running_server(model, rate_limit_hz=0, max_batch=8, batch_window_ms=1) as server:
        small = make_observation(num_queries=2, image_size=(8, 8))
        stop = threading.Event()

        def flood(seed: int) -> None:
            with RawDealer(server.address) as dealer:
                rid = 0
                while not stop.is_set():
                    rid += 1
                    dealer.send(_predict_header(small, rid=rid))
                    while dealer.sock.poll(0):  # read what comes back, so nothing piles up
                        dealer.sock.recv_multipart()

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        try:
            with TraceClient(server.address, timeout_s=5) as client:
                answered, t_end = 0, time.monotonic() + 3.0
                while time.monotonic() < t_end:
                    client.predict(small)
                    answered += 1
        finally:
            stop.set()
            for t in threads:
                t.join()
        stats = server.stats()
    # Here the waiting client was answered 146 times in 3 s; when the replies queued behind
    # the flood (a bug once), 7 times.
    assert stats["counts"]["superseded"] > 100  # the flood really flooded
    assert answered >= 20, (answered, stats["counts"])
