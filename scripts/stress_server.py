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

With ``--fuzz N`` it fuzzes instead: `mu0 serve` in its own process, one client predicting
at 100 Hz alone, then beside a seeded corpus of N malformed frames (sent from another
process), then alone again; it prints that client's latency in each phase, the server's
RSS after warm-up, at its peak and after the run, and how every frame was answered;
exits 1 if a frame went unanswered or untyped, or the good client saw an error.

    .venv/bin/python scripts/stress_server.py --fuzz 10000 --seconds 10
    .venv/bin/python scripts/stress_server.py --fuzz 10000 --checkpoint checkpoints/tiny
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

import msgpack  # noqa: E402

from runtime import wire  # noqa: E402
from runtime.client import ServerError, TraceClient  # noqa: E402
from runtime.model_api import (  # noqa: E402
    EchoTraceModel,
    make_observation,
    validate_observation,
)
from runtime.wire import Kind  # noqa: E402
from tests.runtime_helpers import RawDealer, running_server, spawn_server  # noqa: E402


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
    fuzz = parser.add_argument_group("fuzzing (--fuzz N: a good client beside N malformed frames)")
    fuzz.add_argument("--fuzz", type=int, default=0, help="malformed frames to send (0 = off)")
    fuzz.add_argument("--seed", type=int, default=0, help="the corpus's seed")
    fuzz.add_argument("--fuzz-rate", type=float, default=1000.0, help="frames/s (0 = flat out)")
    fuzz.add_argument("--good-hz", type=float, default=100.0, help="the good client's rate")
    fuzz.add_argument("--warmup-s", type=float, default=3.0)
    fuzz.add_argument("--checkpoint", default=None, help="serve this μ0 (default: trivial)")
    fuzz.add_argument("--fuzz-worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    fuzz.add_argument(
        "--hostile-headers", action="store_true", help="print what decoding each one costs"
    )
    args = parser.parse_args(argv)
    if args.hostile_headers:
        return hostile_header_costs()
    if args.fuzz_worker:
        report = fuzz_worker(args.fuzz_worker, args.fuzz, args.seed, args.fuzz_rate, True)
        print(json.dumps(report))
        return 0
    if args.fuzz:
        return fuzz_main(args)

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


# ----------------------------------------------------------------------------- fuzzing
#
# `--fuzz N`: a seeded corpus of N malformed frames, sent from its own process beside one
# well-behaved client that predicts at 100 Hz, against `mu0 serve` in its own process
# (the real defaults: rate limit, queue sizes, logging). The good client's latency alone
# and under the fuzzer, and the server's RSS after warm-up, at its peak and after the
# run, come from the same run.

_KINDS = ("hello", "ping", "predict", "stats", "exec", "", None, 7)
_ODD_VALUES = (None, -1, 2.0, "2", True, 2**64 - 1, [], {}, "x" * 300, b"\x00bin", 1.5e308)


def _frames(obs: dict, rid: int = 1) -> list[bytes]:
    return [bytes(f) for f in wire.encode(wire.request(Kind.PREDICT, rid, {"obs": obs}))]


def hostile_headers() -> dict[str, bytes]:
    """Frame-0 payloads built to make an unbounded msgpack decoder spend time and memory."""
    # Under the 1 MiB header limit: a map of 1,000 lists of 1,000 empty maps (a byte each).
    inner = b"\xdc" + (1000).to_bytes(2, "big") + b"\x80" * 1000
    wide = b"\xde" + (1000).to_bytes(2, "big")
    wide += b"".join(msgpack.packb(f"k{i}") + inner for i in range(1000))
    strings = {"v": wire.PROTOCOL_VERSION, "kind": "ping", "id": 1, "x": [["ab"] * 1000] * 300}
    return {
        "16_mib_of_empty_maps": b"\xdd" + (16 << 20).to_bytes(4, "big") + b"\x80" * (16 << 20),
        "1_mib_of_nested_maps": wide,
        "huge_claimed_length": b"\xdd\xff\xff\xff\xff",  # a list claiming 4 billion elements
        "deep_nesting": b"\x91" * 100_000 + b"\xc0",
        "many_small_strings": msgpack.packb(strings),
    }


def _refusal(header: bytes) -> str:
    """The error code a server answers this frame 0 with, or "accepted"."""
    try:
        wire.check_header(wire.decode([header]), wire.REQUEST_KINDS)
    except wire.WireError as exc:
        return exc.code.value
    return "accepted"


def hostile_header_costs() -> int:
    """Print what decoding each hostile header costs: best of 5 wall times, and the peak
    of Python allocations (tracemalloc) during one more."""
    import tracemalloc

    print("| header | bytes | answer | ms (best of 5) | MB (peak) |")
    print("|---|---|---|---|---|")
    for name, header in hostile_headers().items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            answer = _refusal(header)
            best = min(best, time.perf_counter() - t0)
        tracemalloc.start()
        _refusal(header)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"| {name} | {len(header):,} | {answer} | {best * 1e3:.3f} | {peak / 2**20:.2f} |")
    return 0


def fuzz_corpus(count: int, seed: int) -> list[list[bytes]]:
    """``count`` malformed messages (lists of frames), the same for the same seed: every
    one is refused by the wire checks or by validation, so none costs a model call.
    Large hostile frames are shared objects, so the corpus itself stays small."""
    rng = np.random.default_rng(seed)
    large = _frames(make_observation(num_queries=16, seed=seed))  # header + rgb + depth
    small = _frames(make_observation(num_queries=4, image_size=(32, 32), depth=False, seed=seed))
    small_map = msgpack.unpackb(small[0])
    hostile = hostile_headers()

    def mutated_obs() -> list[bytes]:
        obs = make_observation(num_queries=4, image_size=(32, 32), depth=False, seed=seed)
        hist = obs["hist_uvz"].copy()
        choice = rng.integers(9)
        if choice == 0:
            obs["intrinsics"] = np.zeros(4, np.float32)
        elif choice == 1:
            obs["intrinsics"] = rng.choice([np.nan, np.inf, -1.0, 1e9], 4).astype(np.float32)
        elif choice == 2:
            hist[rng.integers(4), rng.integers(8), rng.integers(3)] = rng.choice([np.nan, -np.inf])
        elif choice == 3:
            hist[..., 2] = -hist[..., 2]
        elif choice == 4:
            obs["instruction"] = "push " * int(rng.integers(500, 5000))
        elif choice == 5:
            obs["rgb"] = np.zeros((0, 32, 3), np.uint8)
        elif choice == 6:
            obs["hist_uvz"] = hist.astype(np.float64)
        elif choice == 7:
            obs["hist_valid"] = np.ones((5, 8), bool)
        else:
            del obs[str(rng.choice(["rgb", "hist_uvz", "intrinsics", "instruction"]))]
        if choice in (2, 3):
            obs["hist_uvz"] = hist
        return _frames(obs)

    def odd_field() -> list[bytes]:
        header = {**small_map, "body": dict(small_map["body"])}
        key = str(rng.choice(["v", "kind", "id", "body"]))
        header[key] = _ODD_VALUES[rng.integers(len(_ODD_VALUES))]
        if key == "kind":
            header[key] = _KINDS[rng.integers(len(_KINDS))]
        return [msgpack.packb(header)]

    def unknown_key() -> list[bytes]:
        header = {**small_map, "body": {"obs": dict(small_map["body"]["obs"])}}
        target = [header, header["body"], header["body"]["obs"]][rng.integers(3)]
        target[f"extra{rng.integers(100)}"] = 1
        return [msgpack.packb(header)]

    def bool_two() -> list[bytes]:
        obs = make_observation(num_queries=4, image_size=(32, 32), depth=False, seed=seed)
        obs["hist_valid"] = np.ones((4, 8), bool)
        header = msgpack.unpackb(_frames(obs)[0])
        spec = header["body"]["obs"]["hist_valid"]
        spec["data"] = b"\x02" + spec["data"][1:]
        return [msgpack.packb(header)]

    def flipped(frames: list[bytes]) -> list[bytes]:
        head = bytearray(frames[0])
        for _ in range(rng.integers(1, 9)):
            head[rng.integers(len(head))] = rng.integers(256)
        return [bytes(head), *frames[1:]]

    def frames_off(frames: list[bytes]) -> list[bytes]:
        choice = rng.integers(4)
        if choice == 0:
            return frames[:-1]  # a referenced frame missing
        if choice == 1:
            return [*frames, rng.bytes(int(rng.integers(1, 64)))]  # one unreferenced
        if choice == 2:
            return [frames[0], frames[1][: -int(rng.integers(1, 100))], *frames[2:]]
        return [frames[0], *[b""] * int(rng.integers(10, 100))]

    makers = [
        (0.10, lambda: [rng.bytes(int(rng.integers(0, 512)))]),
        (0.05, lambda: [msgpack.packb([int(x) for x in rng.integers(0, 9, rng.integers(9))])]),
        (0.12, lambda: flipped(small)),
        (0.05, lambda: flipped(large)),
        (0.08, lambda: [small[0][: int(rng.integers(len(small[0])))]]),
        (0.10, lambda: frames_off(large)),
        (0.12, odd_field),
        (0.08, unknown_key),
        (0.18, mutated_obs),
        (0.04, bool_two),
        (0.02, lambda: [msgpack.packb({"v": 2, 1: 2})]),  # a non-string key
        (0.02, lambda: [msgpack.packb(msgpack.ExtType(1, b"x"))]),
        (0.01, lambda: [hostile["huge_claimed_length"]]),
        (0.01, lambda: [hostile["deep_nesting"]]),
        (0.01, lambda: [hostile["1_mib_of_nested_maps"]]),
        (0.008, lambda: [hostile["many_small_strings"]]),
        (0.002, lambda: [hostile["16_mib_of_empty_maps"]]),  # once stalled the server 4.65 s
    ]
    weights = np.array([w for w, _ in makers])
    weights /= weights.sum()
    corpus = []
    while len(corpus) < count:
        message = makers[rng.choice(len(makers), p=weights)][1]()
        if _is_malformed(message):  # a bit flip in image bytes leaves a valid request
            corpus.append(message)
    return corpus


def _is_malformed(frames: list[bytes]) -> bool:
    """True if a server of any image size would refuse the message."""
    try:
        header = wire.decode(frames)
        kind, _, body = wire.check_header(header, wire.REQUEST_KINDS)
        if kind is Kind.PREDICT:
            validate_observation(body.get("obs"), None, max_queries=256)
    except wire.WireError:
        return True
    return False


def fuzz_worker(
    address: str, count: int, seed: int, rate_hz: float, wait_for_go: bool = False
) -> dict:
    """Send the corpus over 8 connections (at most 64 unanswered) and count the answers:
    every frame must get one typed reply. ``wait_for_go``: build the corpus and connect,
    print "ready", and start sending once a line arrives on stdin (so that building the
    corpus does not share the CPU with the phase being measured)."""
    from collections import Counter

    import zmq

    corpus = fuzz_corpus(count, seed)
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(8)]
    for s in socks:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    replies: Counter = Counter()
    if wait_for_go:
        print("ready", flush=True)
        sys.stdin.readline()
    untyped: list[str] = []
    outstanding = 0

    def read(timeout_ms: int) -> None:
        nonlocal outstanding
        for sock, _ in poller.poll(timeout_ms):
            while sock.poll(0):
                header = wire.decode(sock.recv_multipart(copy=False))
                outstanding -= 1
                kind = header.get("kind")
                code = header["body"].get("code") if kind == "error" else None
                replies[f"{kind}:{code}" if code else str(kind)] += 1
                if kind == "error" and code not in {c.value for c in wire.ErrorCode}:
                    untyped.append(str(code))

    t0 = time.monotonic()
    for i, frames in enumerate(corpus):
        if rate_hz > 0:
            delay = t0 + i / rate_hz - time.monotonic()
            if delay > 0:
                read(int(delay * 1e3))
                time.sleep(max(0.0, t0 + i / rate_hz - time.monotonic()))
        while outstanding >= 64:
            read(100)
        socks[i % len(socks)].send_multipart(frames, copy=False)
        outstanding += 1
    sent_s = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while outstanding > 0 and time.monotonic() < deadline:
        read(100)
    for s in socks:
        s.close()
    ctx.term()
    return {
        "frames": count,
        "seed": seed,
        "send_s": round(sent_s, 2),
        "unanswered": outstanding,
        "untyped": untyped[:10],
        "replies": dict(sorted(replies.items())),
    }


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1e3
    out = {f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 99)}
    return {**out, "max": round(float(ms.max()), 2), "n": int(ms.size)}


def fuzz_main(args: argparse.Namespace) -> int:
    """A good client at --good-hz alone, then beside the fuzzer, then alone again."""
    model = ("--checkpoint", args.checkpoint) if args.checkpoint else ("--trivial",)
    if not args.checkpoint:
        model += ("--trivial-compute-ms", str(args.compute_ms))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, port = spawn_server(Path(tmp), 0, model=model, start_timeout_s=120, log=log)
        address = f"tcp://127.0.0.1:{port}"
        latencies: dict[str, list[float]] = {"warm-up": [], "alone": [], "fuzz": [], "after": []}
        phase = ["warm-up"]
        stop = threading.Event()
        failures: list[str] = []
        obs = make_observation(num_queries=16, seed=1)

        def good() -> None:
            period = 1.0 / args.good_hz
            with TraceClient(address, timeout_s=2) as client:
                next_t = time.monotonic()
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        client.predict(obs)
                        latencies[phase[0]].append(time.monotonic() - t0)
                    except (ServerError, TimeoutError) as exc:
                        failures.append(f"{phase[0]}: {exc}")
                    next_t += period
                    time.sleep(max(0.0, next_t - time.monotonic()))

        rss: dict[str, float] = {}
        thread = threading.Thread(target=good)
        cmd = [sys.executable, __file__, "--fuzz-worker", address, "--fuzz", str(args.fuzz)]
        cmd += ["--seed", str(args.seed), "--fuzz-rate", str(args.fuzz_rate)]
        try:
            thread.start()
            worker = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True
            )
            time.sleep(args.warmup_s)
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError("the fuzz worker did not start")
            rss["after_warm_up_mb"] = _rss_mb(proc.pid)
            phase[0] = "alone"
            time.sleep(args.seconds)
            phase[0] = "fuzz"
            worker.stdin.write("go\n")
            worker.stdin.flush()
            peak = 0.0
            while worker.poll() is None:
                peak = max(peak, _rss_mb(proc.pid))
                time.sleep(0.05)
            fuzz = json.loads(worker.stdout.read())
            rss["peak_during_fuzz_mb"] = peak
            phase[0] = "after"
            time.sleep(args.seconds)
            rss["after_fuzz_mb"] = _rss_mb(proc.pid)
        finally:
            stop.set()
            thread.join(timeout=10)
        with TraceClient(address, timeout_s=5) as client:
            stats = client.stats()
        proc.terminate()
        proc.wait(timeout=10)
        log_lines = len(log.read_text().splitlines())
    good_ms = {k: _percentiles_ms(v) for k, v in latencies.items() if v and k != "warm-up"}
    ratio = good_ms["fuzz"]["p99"] / good_ms["alone"]["p99"]
    growth = rss["after_fuzz_mb"] / rss["after_warm_up_mb"] - 1
    report = {
        "server": " ".join(model),
        "good_client_hz": args.good_hz,
        "good_client_ms": good_ms,
        "p99_fuzz_over_alone": round(ratio, 2),
        "good_client_failures": failures[:10],
        "server_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_after_vs_warm_up": f"{growth:+.1%}",
        "fuzzer": fuzz,
        "server_errors": stats["errors"],
        "server_dropped_replies": stats["dropped_replies"],
        "server_log_lines": log_lines,
    }
    print(json.dumps(report, indent=2))
    ok = not failures and not fuzz["unanswered"] and not fuzz["untyped"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
