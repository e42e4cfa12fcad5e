"""`mu0 bench <what>`: benchmarks that print figures and write them as JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# Repeats per preset: big random-weight VLMs are slow on a CPU; a few runs suffice for p50/p90.
DEFAULT_REPEATS = {"tiny": 30, "small": 5, "paper": 3}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (model latency, ...) as printed figures and JSON")
    what = p.add_subparsers(dest="what", metavar="WHAT")
    m = what.add_parser("model", help="parameter counts and sample() latency per preset")
    m.add_argument("--presets", default="tiny,small,paper", help="comma-separated preset names")
    m.add_argument("--queries", default="16,64", help="query counts to time")
    m.add_argument("--repeats", type=int, default=None, help="timed runs per query count")
    m.add_argument("--steps", type=int, default=4, help="Euler steps")
    m.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (2 = the target laptop)"
    )
    m.add_argument("--device", default="cpu")
    m.add_argument("--json", type=Path, default=None, help="write the figures here")
    m.set_defaults(func=run_model)
    srv = what.add_parser(
        "server", help="trace server: transport, websocket baseline, tiny μ0, batching"
    )
    srv.add_argument("--duration-s", type=float, default=2.0, help="seconds per measurement")
    srv.add_argument(
        "--rounds", type=int, default=60, help="interleaved sample()/server rounds (tiny μ0)"
    )
    srv.add_argument("--json", type=Path, default=None, help="write the figures here")
    srv.set_defaults(func=run_server)
    from runtime.commands.bench_calibration import add_bench_parser as add_calibration
    from runtime.commands.bench_extract import add_bench_parser

    add_bench_parser(what)
    add_calibration(what)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def write_json(path: Path | None, figures: dict) -> None:
    """Write a benchmark's figures as JSON when ``--json`` was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}")


def run_model(args: argparse.Namespace) -> int:
    import torch

    from configs import get_model_config
    from mu0_core.bench import bench_preset

    torch.set_num_threads(args.threads)
    queries = tuple(int(q) for q in args.queries.split(","))
    results = {}
    for name in [s.strip() for s in args.presets.split(",") if s.strip()]:
        cfg = get_model_config(name)
        repeats = args.repeats or DEFAULT_REPEATS.get(name, 10)
        try:
            results[name] = bench_preset(
                cfg, queries, repeats=repeats, num_steps=args.steps, device=args.device
            )
        except (MemoryError, RuntimeError) as e:  # a preset too big for this machine
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results[name]["threads"] = args.threads
        _print_row(name, results[name], queries)
    write_json(args.json, results)
    return 0


def _print_row(name: str, r: dict, queries: tuple[int, ...]) -> None:
    if "error" in r:
        print(f"{name:6s}  could not run: {r['error']}")
        return
    lat = "  ".join(
        f"q{q}: p50 {r[f'sample_ms_p50_q{q}']:.1f} ms, p90 {r[f'sample_ms_p90_q{q}']:.1f} ms"
        for q in queries
    )
    note = " (random weights)" if r.get("random_weights") else ""
    print(
        f"{name:6s}  params {r['params_total'] / 1e6:.1f}M total, {r['params_trainable'] / 1e6:.2f}M trainable"
        f"  |  {lat}  |  {r['device']}, {r['threads']} threads{note}"
    )


def run_server(args: argparse.Namespace) -> int:
    """Transport alone (trivial model) against a websocket server, then the tiny μ0 behind the
    server: end-to-end latency, the model's own latency in the same run, and batching."""
    import torch

    from mu0_core.types import TraceQuery
    from runtime.bench_server import run_server_bench
    from runtime.model_api import make_observation

    obs = make_observation(num_queries=16, image_size=(224, 224), depth=True)
    query = TraceQuery(
        rgb=obs["rgb"],
        instruction=obs["instruction"],
        hist_uvz=obs["hist_uvz"],
        intrinsics=tuple(float(x) for x in obs["intrinsics"]),
        depth_m=obs["depth_m"],
    )
    print("tiny μ0: sample() here and end-to-end through the server, interleaved ...", flush=True)
    overhead = _interleaved_overhead(query, obs, rounds=args.rounds)

    print("transport (trivial model) and websocket baseline ...", flush=True)
    echo = run_server_bench(args.duration_s, compute_ms=5.0)
    print("tiny μ0 behind the server ...", flush=True)
    mu0 = run_server_bench(
        2 * args.duration_s,
        model_factory="runtime.mu0_adapter:tiny_untrained",
        include_transport=False,
    )

    def row(table, clients, batching):
        return next(r for r in table if r["clients"] == clients and r["batching"] == batching)

    result = {
        **{k: v for k, v in echo.items() if k not in ("table", "model")},
        "echo_table": echo["table"],
        "mu0_table": mu0["table"],
        **overhead,
        "batching_speedup_16": round(
            row(mu0["table"], 16, True)["throughput_hz"]
            / row(mu0["table"], 16, False)["throughput_hz"],
            2,
        ),
        "batching_speedup_16_echo": round(
            row(echo["table"], 16, True)["throughput_hz"]
            / row(echo["table"], 16, False)["throughput_hz"],
            2,
        ),
        "torch_threads": torch.get_num_threads(),
    }
    for name, label in (
        ("", "one each in turn"),
        ("_stream", "50 each in turn"),
        ("_30hz", "at 30 Hz"),
    ):
        print(
            f"transport p50 {result[f'transport{name}_p50_ms']:.3f} ms "
            f"(p99 {result[f'transport{name}_p99_ms']:.3f}); websocket p50 "
            f"{result[f'websocket{name}_p50_ms']:.3f} ms -> "
            f"{result[f'transport_vs_websocket{name}_speedup']:.2f}x  ({label})"
        )
    print(
        f"tiny μ0: end-to-end p50 {result['mu0_e2e_p50_ms']:.2f} ms, sample() p50 "
        f"{result['mu0_sample_p50_ms']:.2f} ms -> server adds {result['server_overhead_p50_ms']:.2f} ms "
        f"(paired {result['server_overhead_paired_p50_ms']:.2f} ms) "
        f"(vs the server's own model time {result['mu0_server_infer_p50_ms']:.2f} ms: "
        f"{result['server_overhead_vs_infer_p50_ms']:.2f} ms; {result['overhead_rounds']} interleaved rounds)"
    )
    print(
        f"batching at 16 clients: tiny μ0 {result['batching_speedup_16']:.2f}x, "
        f"trivial model (5 ms/batch) {result['batching_speedup_16_echo']:.2f}x"
    )
    for name, table in (("trivial", echo["table"]), ("tiny μ0", mu0["table"])):
        print(f"  {name:8s} clients batching  p50_ms  p99_ms  req/s")
        for r in table:
            print(
                f"  {'':8s} {r['clients']:7d} {'on' if r['batching'] else 'off':8s} "
                f"{r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['throughput_hz']:7.1f}"
            )
    write_json(args.json, result)
    return 0


def _interleaved_overhead(query, obs: dict, rounds: int) -> dict[str, float]:
    """What the server adds to the tiny μ0: direct ``sample()`` calls in this process and
    round trips through a server (batching off) serving the same weights, alternated one
    by one so that both see the same machine, then compared at p50."""
    import numpy as np

    from runtime.bench_server import _server_process
    from runtime.client import TraceClient
    from runtime.mu0_adapter import tiny_untrained

    model = tiny_untrained().model
    direct, e2e, infer = [], [], []
    factory = ("--factory", "runtime.mu0_adapter:tiny_untrained")
    with _server_process("zmq-serve", "--window-ms", "0", "--max-batch", "1", *factory) as port:
        with TraceClient(f"tcp://127.0.0.1:{port}", timeout_s=60) as client:
            for i in range(rounds + 3):  # the first 3 rounds warm both up
                t0 = time.perf_counter()
                model.sample(query)
                t1 = time.perf_counter()
                reply = client.predict(obs)
                t2 = time.perf_counter()
                if i >= 3:
                    direct.append((t1 - t0) * 1e3)
                    e2e.append((t2 - t1) * 1e3)
                    infer.append(reply.timings["infer_ms"])
    p50 = {name: float(np.median(v)) for name, v in (("d", direct), ("e", e2e), ("i", infer))}
    return {
        "mu0_e2e_p50_ms": round(p50["e"], 3),
        "mu0_sample_p50_ms": round(p50["d"], 3),
        "server_overhead_p50_ms": round(p50["e"] - p50["d"], 3),
        # The same, pair by pair (each round trip against the direct call just before it).
        "server_overhead_paired_p50_ms": round(
            float(np.median(np.asarray(e2e) - np.asarray(direct))), 3
        ),
        # The same difference against the model time the server itself measured per request.
        "mu0_server_infer_p50_ms": round(p50["i"], 3),
        "server_overhead_vs_infer_p50_ms": round(p50["e"] - p50["i"], 3),
        "overhead_rounds": rounds,
    }
