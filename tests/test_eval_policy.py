"""`mu0 eval-policy` end to end: the shipped experts, two robots in their own processes, the
JSON it writes; and a SIGTERM stops the robots' processes with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.sim
REPO = Path(__file__).resolve().parents[1]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "runtime.cli",
        "eval-policy",
        "--tasks",
        "Lift",
        "--robots",
        "Panda,UR5e",
        "--conditions",
        "no_trace,static_trace",
        "--videos",
        "0",
        "--out",
        str(out),
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_eval_policy_writes_results_for_every_robot(tmp_path):
    pytest.importorskip("robosuite")
    out = tmp_path / "eval"
    cmd = _cmd(out, "--episodes", "1", "--max-steps", "4", "--json", str(tmp_path / "r.json"))
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {(r["robot"], r["condition"]) for r in results} == {
        (robot, c) for robot in ("Panda", "UR5e") for c in ("no_trace", "static_trace")
    }
    for r in results:
        assert r["task"] == "Lift" and r["episodes"] == 1 and r["mean_steps"] <= 4
        assert 0.0 <= r["success"] <= 1.0 and r["held_steps"] == 0
    assert "| Lift | Panda | no_trace |" in (out / "table.md").read_text()


def test_sigterm_stops_the_robot_processes(tmp_path):
    pytest.importorskip("robosuite")
    proc = subprocess.Popen(
        _cmd(tmp_path / "eval", "--episodes", "50"),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while time.monotonic() < deadline and len(workers) < 2:  # the two robots' processes
            time.sleep(0.5)
            workers = {p for p in _children(proc.pid) if _alive(p)}
            assert proc.poll() is None, "eval-policy ended before its robots started"
        assert len(workers) >= 2, "the robots' processes never started"
        time.sleep(2.0)  # let them get into their episodes
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "robot processes outlived eval-policy"
    finally:
        if proc.poll() is None:
            proc.kill()
