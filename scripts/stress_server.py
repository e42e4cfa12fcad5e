"""Load the trace server from every side at once and count what comes back.

Streaming clients submit as fast as they can (each new observation supersedes the last),
blocking clients ask and wait and check that the trace is theirs, one client pings every
10 ms, and one sends garbage that must come back as a typed error. The server serves
EchoTraceModel with a fixed compute time per batch, in this process (its threads then
share the GIL with every client thread: the harder case) or in its own (`--process`).
Prints the counts, the ping latency and the server's own statistics; exits 1 if any client
saw a wrong trace, an untyped reply or a timed-out ping.

    .venv/bin/python scripts/stress_server.py --seconds 15
    .venv/bin/python scripts/stress_server.py --process --streams 24 --blocking 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.client import ServerError, TraceClient  # noqa: E402
from runtime.model_api import EchoTraceModel, make_observation  # noqa: E402
from tests.runtime_helpers import RawDealer, running_server  # noqa: E402


@contextlib.contextmanager
def serve(args: argparse.Namespace) -> Iterator[str]:
    """The server's address, in this process or in a child process."""
    if not args.process:
        logging.getLogger("mu0.server").setLevel(logging.ERROR)  # one line per garbage frame
        model = EchoTraceModel(compute_s=args.compute_ms / 1e3)
        with running_server(model, rate_limit_hz=0, max_batch=args.max_batch) as server:
            yield server.address
        return
    # Not tests.runtime_helpers.spawn_server: it keeps the server's stderr in a pipe that
    # nobody reads, and the garbage sender makes the server log a line per frame.
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port.json"
        cmd = [sys.executable, "-m", "runtime.serve", "--trivial", "--port", "0"]
        cmd += ["--trivial-compute-ms", str(args.compute_ms), "--max-batch", str(args.max_batch)]
        cmd += ["--rate-limit-hz", "0", "--port-file", str(port_file)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.05)
            yield f"tcp://127.0.0.1:{json.loads(port_file.read_text())['port']}"
        finally:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--streams", type=int, default=24, help="streaming clients")
    parser.add_argument("--blocking", type=int, default=8, help="blocking clients")
    parser.add_argument("--compute-ms", type=float, default=2.0, help="model time per batch")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--process", action="store_true", help="serve from a child process")
    args = parser.parse_args(argv)

    stop = threading.Event()
    problems: list[str] = []
    counts = {"answers": 0, "timeouts": 0, "pings": 0, "garbage": 0}
    pings: list[float] = []
    streams: list[dict[str, int]] = []

    def blocking(address: str, seed: int) -> None:
        obs = make_observation(num_queries=3 + seed % 5, seed=seed)
        expected = np.repeat(obs["hist_uvz"][:, -1:], 32, axis=1)
        with TraceClient(address, timeout_s=3) as client:
            while not stop.is_set():
                try:
                    if not np.array_equal(client.predict(obs)["traces_uvz"], expected):
                        problems.append(f"blocking client {seed} got someone else's trace")
                    counts["answers"] += 1
                except TimeoutError:
                    counts["timeouts"] += 1
                except ServerError as exc:
                    problems.append(f"blocking client {seed}: {exc}")

    def streaming(address: str, seed: int) -> None:
        obs = make_observation(num_queries=4, seed=100 + seed)
        with TraceClient(address, timeout_s=3, max_age_s=1.0) as client:
            client.start_stream()
            while not stop.is_set():
                client.submit(obs)
                time.sleep(0.002)
            client.stop()
            streams.append(dict(client.stream_counts))

    def pinger(address: str) -> None:
        with TraceClient(address, timeout_s=1) as client:
            while not stop.is_set():
                try:
                    pings.append(client.ping())
                    counts["pings"] += 1
                except TimeoutError:
                    problems.append("a ping timed out")
                time.sleep(0.01)

    def garbage(address: str) -> None:
        with RawDealer(address) as dealer:
            while not stop.is_set():
                dealer.send_frames([b"\x00 not msgpack"])
                reply = dealer.recv(timeout_s=2)
                if reply is None or reply["kind"] != "error":
                    problems.append(f"garbage was answered with {reply}")
                counts["garbage"] += 1
                time.sleep(0.005)

    with serve(args) as address:
        threads = [
            threading.Thread(target=blocking, args=(address, i)) for i in range(args.blocking)
        ]
        threads += [
            threading.Thread(target=streaming, args=(address, i)) for i in range(args.streams)
        ]
        threads += [threading.Thread(target=f, args=(address,)) for f in (pinger, garbage)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(timeout=10)
        with TraceClient(address, timeout_s=5) as client:
            stats = client.stats()

    stream_totals = {k: sum(s[k] for s in streams) for k in streams[0]} if streams else {}
    print(
        f"{args.seconds:g} s, server {'in its own process' if args.process else 'in this process'}"
    )
    print(f"blocking clients: {counts['answers']} answers, {counts['timeouts']} timeouts")
    print(f"streaming clients: {stream_totals}")
    if pings:
        print(
            f"pings: {len(pings)}, p50 {np.percentile(pings, 50) * 1e3:.1f} ms, "
            f"max {max(pings) * 1e3:.1f} ms; garbage answered: {counts['garbage']}"
        )
    print(
        f"server: batch size {stats['batch_size']}, counts {stats['counts']}, errors {stats['errors']}"
    )
    for line in problems[:10]:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
