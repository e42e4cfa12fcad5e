"""Transport benchmark: the ZeroMQ trace server against an openpi-style websocket server,
and dynamic batching with 1, 4 and 16 clients. Servers run in their own processes on
127.0.0.1; the payload is one 224x224 RGB-D observation with 16 query points.

    python -m runtime.bench_server            # prints the result dict as JSON

``run_server_bench(model_factory="pkg.module:function")`` serves that model (a
zero-argument function returning a TraceModel) in the batching table instead of
``EchoTraceModel`` with an emulated per-batch compute cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from runtime.model_api import EchoTraceModel, TraceModel, make_observation

_REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- servers


def _load_factory(spec: str | None, compute_ms: float) -> TraceModel:
    if not spec:
        return EchoTraceModel(compute_s=compute_ms / 1e3)
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)()


def _serve_zmq(args: argparse.Namespace) -> None:
    from runtime.server import TraceServer

    model = _load_factory(args.factory, args.compute_ms)
    server = TraceServer(
        model, port=0, batch_window_ms=args.window_ms, max_batch=args.max_batch, rate_limit_hz=0
    )
    server.start(inference_thread=False)
    _announce(args.port_file, server.port)
    server.serve_forever()  # inference on this (main) thread, as `mu0 serve` runs it


# openpi-style websocket serving: msgpack with arrays as inline bytes, one handler per
# connection that runs the model inline. Written here only as the point of comparison.
def _ws_pack(obj: Any) -> bytes:
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return {
                "__ndarray__": True,
                "data": o.tobytes(),
                "dtype": o.dtype.str,
                "shape": o.shape,
            }
        raise TypeError(f"cannot pack {type(o)}")

    return msgpack.packb(obj, default=default, use_bin_type=True)


def _ws_unpack(data: bytes) -> Any:
    def hook(d: dict) -> Any:
        if d.get("__ndarray__"):
            return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
        return d

    return msgpack.unpackb(data, object_hook=hook, raw=False)


def _serve_ws(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import serve

    model = _load_factory(args.factory, args.compute_ms)

    async def handler(ws: Any) -> None:
        await ws.send(_ws_pack(model.metadata()))
        async for message in ws:
            obs = _ws_unpack(message)
            await ws.send(_ws_pack(model.predict_batch([obs])[0]))

    async def main() -> None:
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            _announce(args.port_file, server.sockets[0].getsockname()[1])
            await asyncio.Future()

    asyncio.run(main())


def _announce(port_file: str, port: int) -> None:
    tmp = port_file + ".tmp"
    Path(tmp).write_text(json.dumps({"port": port}))
    os.replace(tmp, port_file)


@contextlib.contextmanager
def _server_process(mode: str, *extra: str) -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port.json")
        cmd = [sys.executable, "-m", "runtime.bench_server", mode, "--port-file", port_file, *extra]
        env = {
            **os.environ,
            "PYTHONPATH": str(_REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(port_file):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{mode} server failed: {proc.stderr.read().decode()[-1500:]}"
                    )
                time.sleep(0.02)
            yield json.loads(Path(port_file).read_text())["port"]
        finally:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- clients


def _summary(latencies_s: list[float], elapsed_s: float) -> dict[str, float]:
    if not latencies_s:
        raise RuntimeError("benchmark: no request completed (is the machine overloaded?)")
    ms = np.asarray(latencies_s) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "throughput_hz": round(len(ms) / elapsed_s, 1),
        "n": len(ms),
    }


def _zmq_loop(
    address: str,
    obs: dict,
    duration_s: float,
    warmup: int = 20,
    infer_ms: list[float] | None = None,
    start: threading.Barrier | None = None,
) -> list[float]:
    """Round trips in seconds; the server's own model time per reply goes into ``infer_ms``.
    With ``start``, the timed loop begins once every client has finished its warm-up."""
    from runtime.client import TraceClient

    latencies = []
    # Generous: 16 clients served one at a time by a CPU model queue for seconds under load.
    with TraceClient(address, timeout_s=60) as client:
        for _ in range(warmup):
            client.predict(obs)
        if start is not None:
            start.wait()
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            t0 = time.perf_counter()
            reply = client.predict(obs)
            latencies.append(time.perf_counter() - t0)
            if infer_ms is not None:
                infer_ms.append(reply.timings["infer_ms"])
    return latencies


def _many_clients(address: str, clients: int, obs: dict, duration_s: float) -> dict[str, float]:
    """``clients`` threads, each with its own client, warm up, then send back to back for
    ``duration_s``; throughput counts only the timed requests over the timed span."""
    results: list[list[float]] = [[] for _ in range(clients)]
    infer_ms: list[float] = []
    start = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        try:
            results[i] = _zmq_loop(address, obs, duration_s, 3, infer_ms, start)
        except BaseException:
            start.abort()  # the others (and the caller) stop waiting and see the failure
            raise

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        for t in threads:
            t.join()
        raise RuntimeError(f"benchmark: a client of {address} failed during warm-up") from None
    t0 = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    row = _summary([x for r in results for x in r], max(elapsed, duration_s))
    row["server_infer_p50_ms"] = round(float(np.percentile(infer_ms, 50)), 3) if infer_ms else None
    return row


def _alternate(
    calls: tuple[Any, Any], block: int, duration_s: float, pause_s: float = 0.0
) -> tuple[list[float], list[float]]:
    """Time ``calls`` (two zero-argument callables) in turn, ``block`` calls of one, then
    ``block`` of the other, for ``duration_s``, sleeping ``pause_s`` before each call."""
    times: tuple[list[float], list[float]] = ([], [])
    t_start = time.monotonic()
    while time.monotonic() - t_start < duration_s:
        for call, out in zip(calls, times):
            for _ in range(block):
                if pause_s:
                    time.sleep(pause_s)
                t0 = time.perf_counter()
                call()
                out.append(time.perf_counter() - t0)
    return times


def _transport_vs_websocket(obs: dict, duration_s: float, paced_s: float = 3.0) -> dict[str, Any]:
    """Round trips with a model that does nothing: the ZeroMQ server against an openpi-style
    websocket server, both up at once, in the same run, three ways:

    - one request each in turn (the headline figures): each server finds the machine as
      the other left it;
    - ``stream``: 50 requests to one, then 50 to the other: a client streaming back to back;
    - ``30hz``: one request each in turn, each after a 1/30 s pause, as a camera-rate
      client sends them: the CPUs idle between requests and wake up for each."""
    from websockets.sync.client import connect

    from runtime.client import TraceClient

    with (
        _server_process("zmq-serve", "--compute-ms", "0") as zmq_port,
        _server_process("ws-serve", "--compute-ms", "0") as ws_port,
        TraceClient(f"tcp://127.0.0.1:{zmq_port}", timeout_s=10) as client,
        connect(f"ws://127.0.0.1:{ws_port}", compression=None, max_size=None) as ws,
    ):
        _ws_unpack(ws.recv())  # metadata

        def ws_predict() -> None:
            ws.send(_ws_pack(obs))
            _ws_unpack(ws.recv())

        calls = (lambda: client.predict(obs), ws_predict)
        _alternate(calls, 20, 0.0)  # warm-up: one block each
        zmq_ms, ws_ms = _alternate(calls, 1, 2 * duration_s)
        zmq_stream, ws_stream = _alternate(calls, 50, 2 * duration_s)
        zmq_paced, ws_paced = _alternate(calls, 1, paced_s, pause_s=1 / 30)
    out: dict[str, Any] = {}
    for name, (zmq_times, ws_times) in (
        ("", (zmq_ms, ws_ms)),
        ("_stream", (zmq_stream, ws_stream)),
        ("_30hz", (zmq_paced, ws_paced)),
    ):
        for server, times in (("transport", zmq_times), ("websocket", ws_times)):
            row = _summary(times, sum(times))
            for key in ("p50_ms", "p99_ms", "throughput_hz"):
                out[f"{server}{name}_{key}"] = row[key]
        out[f"transport_vs_websocket{name}_speedup"] = round(
            out[f"websocket{name}_p50_ms"] / out[f"transport{name}_p50_ms"], 2
        )
    return out


def run_server_bench(
    duration_s: float = 1.5,
    compute_ms: float = 5.0,
    client_counts: tuple[int, ...] = (1, 4, 16),
    batch_window_ms: float = 2.0,
    max_batch: int = 16,
    model_factory: str | None = None,
    include_transport: bool = True,
    paced_s: float = 3.0,
) -> dict[str, Any]:
    """Measure transport latency (ZeroMQ vs websocket, no compute; ``paced_s`` seconds at
    30 Hz) and the batching table (clients x batching on/off, ``compute_ms`` per forward
    pass or ``model_factory``)."""
    obs = make_observation(num_queries=16, image_size=(224, 224), depth=True)
    out: dict[str, Any] = {
        "payload_bytes": sum(v.nbytes for v in obs.values() if isinstance(v, np.ndarray))
    }

    if include_transport:
        out.update(_transport_vs_websocket(obs, duration_s, paced_s))

    factory = ["--factory", model_factory] if model_factory else []
    table = []
    for batching in (False, True):
        window, batch = (batch_window_ms, max_batch) if batching else (0.0, 1)
        args = [
            "--compute-ms",
            str(compute_ms),
            "--window-ms",
            str(window),
            "--max-batch",
            str(batch),
        ]
        with _server_process("zmq-serve", *args, *factory) as port:
            address = f"tcp://127.0.0.1:{port}"
            for clients in client_counts:
                row = _many_clients(address, clients, obs, duration_s)
                table.append({"clients": clients, "batching": batching, **row})
    out["model"] = model_factory or f"echo+{compute_ms:g}ms/batch"
    out["table"] = table
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench_server")
    parser.add_argument(
        "mode", nargs="?", default="bench", choices=["bench", "zmq-serve", "ws-serve"]
    )
    parser.add_argument("--port-file", default="")
    parser.add_argument("--compute-ms", type=float, default=5.0)
    parser.add_argument("--window-ms", type=float, default=2.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--factory", default=None, help="module:function returning a TraceModel")
    parser.add_argument("--duration-s", type=float, default=1.5)
    args = parser.parse_args(argv)
    if args.mode == "zmq-serve":
        _serve_zmq(args)
    elif args.mode == "ws-serve":
        _serve_ws(args)
    else:
        result = run_server_bench(args.duration_s, args.compute_ms, model_factory=args.factory)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
