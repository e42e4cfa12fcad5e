"""Shared helpers for the runtime transport tests: servers in threads or processes, raw sockets."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from runtime import wire
from runtime.model_api import EchoTraceModel
from runtime.server import TraceServer

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_server(model: Any = None, **kwargs: Any) -> Iterator[TraceServer]:
    """A TraceServer on a free loopback port, in this process's threads."""
    server = TraceServer(model or EchoTraceModel(), host="127.0.0.1", port=0, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.close()


def spawn_server(
    tmp_path: Path,
    port: int = 0,
    *extra: str,
    model: tuple[str, ...] = ("--trivial",),
    start_timeout_s: float = 15.0,
    log: Path | None = None,
) -> tuple[subprocess.Popen, int]:
    """``python -m runtime.serve --trivial`` (or ``model``'s arguments) as a subprocess;
    returns (process, port) once it serves. Its stderr goes to ``log`` if given (a server
    that logs a lot would fill an unread pipe and stall), else to ``process.stderr``."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "runtime.serve", *model, "--port", str(port)]
    cmd += ["--port-file", str(port_file), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with contextlib.ExitStack() as files:
        stderr = subprocess.PIPE if log is None else files.enter_context(log.open("wb"))
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + start_timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            why = proc.stderr.read().decode() if log is None else log.read_text()
            raise RuntimeError(f"server did not start: {why[-2000:]}")
        time.sleep(0.02)
    return proc, json.loads(port_file.read_text())["port"]


class RawDealer:
    """A bare DEALER for sending hand-made (and broken) frames."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send_frames(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames, copy=False)

    def send(self, header: dict[str, Any]) -> None:
        self.send_frames(wire.encode(header))

    def recv(self, timeout_s: float = 2.0) -> dict[str, Any] | None:
        if not self.sock.poll(int(timeout_s * 1e3)):
            return None
        return wire.decode(self.sock.recv_multipart(copy=False))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> RawDealer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
