"""`mu0 eval-policy`: action experts in closed loop, with and without μ0's traces.

For each task × robot, on the same fixed seeds, four conditions: ``mu0`` (traces from the
frozen μ0 through a trace server), ``static_trace`` (the same points held still: the expert
without the forecast), ``no_trace`` (the same expert without traces or points) and ``oracle``
(the true futures of the same points; ``policies.control`` says how each is made). The robots run at the same time, one process
each, every one a client of one server hosting one μ0 checkpoint. Success comes with a Wilson
95% interval, per-step latencies and trace staleness; videos of the first episodes with the
traces drawn go to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_EXPERTS = Path("checkpoints/experts")


def add_parser(sub) -> None:
    p = sub.add_parser("eval-policy", help="closed-loop success of action experts, ±traces")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="Lift,Stack", help="comma-separated tasks")
    p.add_argument(
        "--robots", default="Panda,UR5e", help="comma-separated robots (one expert each)"
    )
    p.add_argument("--conditions", default="mu0,static_trace,no_trace,oracle")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task, robot, condition")
    p.add_argument("--seed", type=int, default=5000, help="first seed (never used in training)")
    p.add_argument("--experts", type=Path, default=DEFAULT_EXPERTS, help="folder of <Robot>/")
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/tiny"), help="μ0")
    p.add_argument("--server", default=None, help="tcp://HOST:PORT of a running server")
    p.add_argument("--device", default="cpu", help="device of the server this command starts")
    p.add_argument("--max-steps", type=int, default=None, help="per episode (default: the task's)")
    p.add_argument("--rate-hz", type=float, default=20.0)
    p.add_argument("--trace-max-age", type=float, default=1.0, help="seconds")
    p.add_argument("--realtime", action="store_true", help="pace the loop to wall-clock rate")
    p.add_argument("--videos", type=int, default=1, help="episodes recorded per condition")
    p.add_argument("--out", type=Path, default=Path("outputs/eval_policy"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--sequential", action="store_true", help="robots one after another")


@contextlib.contextmanager
def trace_server(
    checkpoint: Path, device: str = "cpu", log: Path | None = None, threads: int = 1
) -> Iterator[str]:
    """Start ``mu0 serve`` on a free loopback port for the duration; yield its address."""
    if not (Path(checkpoint) / "config.json").is_file():
        raise SystemExit(f"no μ0 checkpoint at {checkpoint} (see scripts/make_checkpoints.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port.json"
        cmd = [
            sys.executable,
            "-m",
            "runtime.serve",
            "--checkpoint",
            str(checkpoint),
            "--device",
            device,
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--threads",
            str(threads),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(_REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        err = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=env, stderr=err, stdout=err)
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"trace server failed to start (log: {log})")
                time.sleep(0.05)
            yield f"tcp://127.0.0.1:{json.loads(port_file.read_text())['port']}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            if log:
                err.close()


def _pct(xs: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(xs, q)), 2) if xs else None


def evaluate_robot(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One robot's expert over every task and condition (runs in its own process)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from envs.robosuite_env import RobosuiteTraceEnv
    from policies import load_expert
    from policies.control import GroundTruthTraces, LoopConfig, run_episode, wilson_interval

    robot, out = job["robot"], Path(job["out"])
    expert = load_expert(Path(job["experts"]) / robot)
    cfg = LoopConfig(
        rate_hz=job["rate_hz"], trace_max_age_s=job["trace_max_age"], realtime=job["realtime"]
    )
    client = None
    if "mu0" in job["conditions"]:
        from runtime.client import TraceClient

        client = TraceClient(job["server"], timeout_s=10.0, max_age_s=job["trace_max_age"])
        client.hello()
        client.start_stream()
    results = []
    for task in job["tasks"]:
        env = RobosuiteTraceEnv(task, robot)
        oracle = GroundTruthTraces(task, robot) if "oracle" in job["conditions"] else None
        for condition in job["conditions"]:
            eps = []
            for k in range(job["episodes"]):
                seed = job["seed"] + k
                r = run_episode(
                    env,
                    expert,
                    condition,
                    seed,
                    client=client,
                    oracle=oracle,
                    cfg=cfg,
                    max_steps=job["max_steps"],
                    record_frames=k < job["videos"],
                )
                if r.frames:
                    _save_video(r.frames, out / f"{task}-{robot}-{condition}-seed{seed}.mp4")
                    r.frames = []
                eps.append(r)
                if job["progress"]:
                    print(
                        f"{task}-{robot} {condition:8s} seed {seed}: "
                        f"{'success' if r.success else 'fail'} in {r.steps} steps",
                        flush=True,
                    )
            n_ok = sum(e.success for e in eps)
            lo, hi = wilson_interval(n_ok, len(eps))
            step_ms = [x for e in eps for x in e.step_ms]
            expert_ms = [x for e in eps for x in e.expert_ms]
            age = [x for e in eps for x in e.trace_age_ms]
            rtt = [x for e in eps for x in e.trace_rtt_ms]
            results.append(
                {
                    "task": task,
                    "robot": robot,
                    "condition": condition,
                    "success": n_ok / len(eps),
                    "successes": n_ok,
                    "episodes": len(eps),
                    "wilson95": [round(lo, 3), round(hi, 3)],
                    "seeds": [job["seed"], job["seed"] + job["episodes"] - 1],
                    "mean_steps": round(float(np.mean([e.steps for e in eps])), 1),
                    "step_ms_p50": _pct(step_ms, 50),
                    "step_ms_p99": _pct(step_ms, 99),
                    "expert_ms_p50": _pct(expert_ms, 50),
                    "trace_age_ms_p50": _pct(age, 50),
                    "trace_age_ms_p99": _pct(age, 99),
                    "trace_rtt_ms_p50": _pct(rtt, 50),
                    "held_steps": int(sum(e.held_steps for e in eps)),
                    "dropped_actions": int(sum(e.dropped_actions for e in eps)),
                }
            )
            # Each finished condition is kept at once: an interrupted run loses no result.
            with (out / f"partial-{robot}.jsonl").open("a") as f:
                f.write(json.dumps(results[-1]) + "\n")
        env.close()
        if oracle is not None:
            oracle.close()
    if client is not None:
        client.close()
    return results


def _save_video(frames: list, path: Path) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        iio.imwrite(path, frames, fps=20, codec="libx264")
    except Exception:  # no ffmpeg plugin: fall back to an animated GIF
        iio.imwrite(path.with_suffix(".gif"), frames, duration=50, loop=0)


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | robot | condition | success | Wilson 95% | episodes | step p50 ms | trace age p50 ms | held steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['task']} | {r['robot']} | {r['condition']} | {100 * r['success']:.0f}% "
            f"| {100 * r['wilson95'][0]:.0f}–{100 * r['wilson95'][1]:.0f}% | {r['episodes']} "
            f"| {r['step_ms_p50']} | {r['trace_age_ms_p50'] if r['trace_age_ms_p50'] is not None else '–'} "
            f"| {r['held_steps']} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM (``kill``, a job scheduler) unwinds like Ctrl-C, so the trace
    server and the robots' processes are stopped too; by default Python dies at once and
    they run on. Call from the main thread (only it may set signal handlers)."""
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run(args: argparse.Namespace) -> int:
    from multiprocessing import get_context

    tasks = [t for t in args.tasks.split(",") if t]
    robots = [r for r in args.robots.split(",") if r]
    from policies.control import CONDITIONS

    conditions = [c for c in args.conditions.split(",") if c]
    for c in conditions:
        if c not in CONDITIONS:
            raise SystemExit(f"mu0 eval-policy: unknown condition {c!r} ({', '.join(CONDITIONS)})")
    for robot in robots:
        if not (args.experts / robot / "expert.json").is_file():
            raise SystemExit(
                f"mu0 eval-policy: no {robot} expert in {args.experts} (train one: mu0 train-expert)"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_unwinds())
        server = args.server
        if server is None and "mu0" in conditions:
            server = stack.enter_context(
                trace_server(args.checkpoint, args.device, log=args.out / "server.log")
            )
            print(f"trace server ({args.checkpoint}) at {server}")
        jobs = [
            {
                "robot": robot,
                "tasks": tasks,
                "conditions": conditions,
                "episodes": args.episodes,
                "seed": args.seed,
                "experts": str(args.experts),
                "server": server,
                "rate_hz": args.rate_hz,
                "max_steps": args.max_steps,
                "trace_max_age": args.trace_max_age,
                "realtime": args.realtime,
                "videos": args.videos,
                "out": str(args.out),
                "progress": True,
            }
            for robot in robots
        ]
        if args.sequential or len(jobs) == 1:
            per_robot = [evaluate_robot(j) for j in jobs]
        else:
            # A Pool, not an executor: leaving it early (Ctrl-C, SIGTERM) terminates the workers.
            with get_context("spawn").Pool(len(jobs)) as pool:
                per_robot = pool.map(evaluate_robot, jobs)
    results = [r for rs in per_robot for r in rs]
    results.sort(key=lambda r: (r["task"], r["robot"], conditions.index(r["condition"])))
    table = markdown_table(results)
    print(table)
    wall = time.time() - t0
    print(f"wall time {wall:.0f} s; videos in {args.out}")
    (args.out / "table.md").write_text(table + "\n")
    payload = {"results": results, "wall_s": round(wall, 1), "checkpoint": str(args.checkpoint)}
    (args.out / "results.json").write_text(json.dumps(payload, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0
