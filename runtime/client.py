"""The light trace client: numpy, pyzmq and msgpack only (never torch, never mu0_core).

Two ways to use it. Blocking: ``predict(obs)`` sends one observation and waits for its
trace. Streaming: ``start_stream()`` then ``submit(obs)`` at camera rate from any thread;
a background thread owns its own DEALER socket, sends the newest observation, and keeps
the newest trace, which ``latest()`` hands out only while it is younger than the age
budget. A trace's age counts from when its observation was captured (or submitted), so
it includes the round trip: the number a controller needs to decide whether to act.

Reconnection: zmq redials a restarted server by itself (with exponential back-off up to
``RECONNECT_IVL_MAX``); on a timeout the client also throws its socket away and makes a
new one, so a request lost with the old server cannot wedge it. Recreations themselves
back off exponentially while the server stays away.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from runtime import wire
from runtime.wire import ErrorCode, Kind, WireError

_REPLY_KINDS = frozenset(
    {Kind.HELLO_OK, Kind.PONG, Kind.TRACE, Kind.SUPERSEDED, Kind.STATS_OK, Kind.ERROR}
)


class ServerError(WireError):
    """The server answered with a typed ``error`` reply."""

    @classmethod
    def from_body(cls, body: dict[str, Any], request_id: int | None) -> ServerError:
        try:
            code = ErrorCode(body.get("code"))
        except ValueError:  # a newer server's code this client does not know
            code = ErrorCode.INTERNAL
        return cls(code, str(body.get("message", "")), request_id)


@dataclass(frozen=True)
class ClientCurve:
    """CURVE keys of a client: the server's public key and this client's key pair."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(
        cls, server_public_file: str | Path, client_secret_file: str | Path
    ) -> ClientCurve:
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(server_public_file)
        public, secret = zmq.auth.load_certificate(client_secret_file)
        if secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key (need *.key_secret)")
        return cls(server_public, public, secret)


@dataclass(frozen=True, repr=False)
class TraceReply:
    """One prediction. ``arrays``: traces_uvz float32[N, H, 3], traces_xyz_cam float32[N, H, 3],
    done bool[N, H] (read-only views over the received message). Times are
    ``time.monotonic()`` seconds; ``timings`` are the server's, in ms."""

    arrays: dict[str, np.ndarray]
    request_id: int
    timings: dict[str, float]
    captured_at: float  # when the observation was captured (or submitted)
    received_at: float

    @property
    def age_s(self) -> float:
        """Seconds since the observation behind this trace was captured."""
        return time.monotonic() - self.captured_at

    @property
    def round_trip_ms(self) -> float:
        return (self.received_at - self.captured_at) * 1e3

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={v.dtype}{list(v.shape)}" for k, v in self.arrays.items())
        return f"TraceReply(id={self.request_id}, age_s={self.age_s:.4f}, {shapes}, timings={self.timings})"


class _Backoff:
    """Exponential delay between socket recreations while the server stays away."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.delay_s = 0.0
        self.last = -math.inf

    def ready(self) -> bool:
        return time.monotonic() - self.last >= self.delay_s

    def failed(self) -> None:
        self.last = time.monotonic()
        self.delay_s = min(self.max_s, max(self.initial_s, 2 * self.delay_s))

    def succeeded(self) -> None:
        self.delay_s = 0.0


class TraceClient:
    """A DEALER client of a trace server (``address`` like ``tcp://127.0.0.1:5555``).

    ``timeout_s`` bounds every blocking call; ``max_age_s`` is the budget beyond which
    ``latest()`` returns None instead of a stale trace. Use one client per thread for
    blocking calls; ``submit``/``latest`` are safe from any thread.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = 2.0,
        curve: ClientCurve | None = None,
        max_age_s: float = 0.5,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.curve = curve
        self.max_age_s = max_age_s
        self.max_message_bytes = max_message_bytes
        self._ctx = zmq.Context()
        self._ids = itertools.count(1)
        self._backoff = _Backoff(backoff_initial_s, backoff_max_s)
        self._sock = self._new_socket()
        self._rcvtimeo_ms = -1  # RCVTIMEO last set on self._sock
        self.reconnects = 0
        # streaming state
        self._lock = threading.Lock()
        self._slot: tuple[dict[str, Any], float] | None = None
        self._latest: TraceReply | None = None
        self._stream_thread: threading.Thread | None = None
        self._stream_stop = threading.Event()
        self._wake_r = self._wake_w = -1
        self.stream_counts = {"sent": 0, "traces": 0, "superseded": 0, "errors": 0, "reconnects": 0}
        self.last_error: WireError | None = None

    # ------------------------------------------------------------------ sockets

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes + (1 << 20))
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_public
            sock.curve_publickey = self.curve.client_public
            sock.curve_secretkey = self.curve.client_secret
        sock.connect(self.address)
        return sock

    def _recreate(self, sock: zmq.Socket) -> zmq.Socket:
        """Replace a socket that timed out, unless the back-off says wait a little longer."""
        if not self._backoff.ready():
            return sock
        self._backoff.failed()
        sock.close(linger=0)
        self.reconnects += 1
        self._rcvtimeo_ms = -1
        return self._new_socket()

    def _send(self, sock: zmq.Socket, kind: Kind, body: dict[str, Any]) -> int:
        request_id = next(self._ids)
        sock.send_multipart(wire.encode(wire.request(kind, request_id, body)), copy=False)
        return request_id

    def _recv(self, sock: zmq.Socket, flags: int = zmq.NOBLOCK) -> dict[str, Any]:
        frames = sock.recv_multipart(flags, copy=False)
        header = wire.decode(frames, self.max_message_bytes)
        wire.check_header(header, _REPLY_KINDS)
        return header

    # ------------------------------------------------------------------ blocking calls

    def _call(self, kind: Kind, body: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        request_id = self._send(self._sock, kind, body)
        while True:
            remaining_ms = (deadline - time.monotonic()) * 1e3
            # A blocking receive bounded by RCVTIMEO: one wake-up fewer than poll-then-recv.
            # The first wait uses the whole timeout, so RCVTIMEO is set only when it changes.
            timeout_ms = max(1, int(remaining_ms + 0.5))
            if self._rcvtimeo_ms != timeout_ms:
                self._sock.rcvtimeo = self._rcvtimeo_ms = timeout_ms
            try:
                header = self._recv(self._sock, 0) if remaining_ms > 0 else None
            except zmq.Again:
                header = None
            if header is None:
                if time.monotonic() < deadline:
                    continue
                self._sock = self._recreate(self._sock)
                raise TimeoutError(f"no reply from {self.address} within {timeout_s:.3g} s")
            if header["id"] != request_id:
                continue  # a late answer to an earlier, abandoned request
            self._backoff.succeeded()
            if header["kind"] == Kind.ERROR.value:
                raise ServerError.from_body(header["body"], request_id)
            if header["kind"] == Kind.SUPERSEDED.value:
                raise ServerError(
                    ErrorCode.INTERNAL, "request superseded by a newer one", request_id
                )
            return header

    def hello(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The server's metadata: protocol_version, model_id, model_hash, horizon, frames, ..."""
        return self._call(Kind.HELLO, {}, timeout_s)["body"]

    def ping(self, timeout_s: float | None = None) -> float:
        """Round trip in seconds."""
        t0 = time.monotonic()
        self._call(Kind.PING, {}, timeout_s)
        return time.monotonic() - t0

    def stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Live server statistics (requests/s, latency percentiles, batch sizes, errors)."""
        return self._call(Kind.STATS, {}, timeout_s)["body"]

    def predict(self, obs: dict[str, Any], timeout_s: float | None = None) -> TraceReply:
        """Send one observation and wait for its trace. Raises ServerError (typed) or
        TimeoutError."""
        captured_at = time.monotonic()
        header = self._call(Kind.PREDICT, {"obs": obs}, timeout_s)
        return TraceReply(
            header["body"], header["id"], header["timings"], captured_at, time.monotonic()
        )

    # ------------------------------------------------------------------ streaming

    def start_stream(self) -> None:
        """Start the background sender/receiver. Idempotent."""
        if self._stream_thread is not None:
            return
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._stream_stop.clear()
        self._stream_thread = threading.Thread(
            target=self._stream_loop, name="mu0-stream", daemon=True
        )
        self._stream_thread.start()

    def submit(self, obs: dict[str, Any], captured_at: float | None = None) -> None:
        """Queue an observation for the stream; a newer one replaces it if it has not left
        yet. ``captured_at`` (time.monotonic()) defaults to now."""
        if self._stream_thread is None:
            raise RuntimeError("call start_stream() first")
        with self._lock:
            self._slot = (obs, time.monotonic() if captured_at is None else captured_at)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def latest(self, max_age_s: float | None = None) -> TraceReply | None:
        """The newest trace if it is younger than ``min(max_age_s, self.max_age_s)``, else None."""
        budget = self.max_age_s if max_age_s is None else min(max_age_s, self.max_age_s)
        with self._lock:
            reply = self._latest
        if reply is None or reply.age_s > budget:
            return None
        return reply

    def stop(self) -> None:
        """Stop the stream thread and forget its traces."""
        if self._stream_thread is None:
            return
        self._stream_stop.set()
        os.write(self._wake_w, b"x")
        self._stream_thread.join(timeout=5.0)
        self._stream_thread = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        with self._lock:
            self._latest, self._slot = None, None

    def _stream_loop(self) -> None:
        sock = self._new_socket()
        in_flight: dict[int, float] = {}  # request id -> captured_at
        waiting_since: float | None = None  # oldest unanswered send since the last reply
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stream_stop.is_set():
                events = dict(poller.poll(50))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                with self._lock:
                    slot, self._slot = self._slot, None
                if slot is not None:
                    request_id = self._send(sock, Kind.PREDICT, {"obs": slot[0]})
                    in_flight[request_id] = slot[1]
                    self.stream_counts["sent"] += 1
                    if waiting_since is None:
                        waiting_since = time.monotonic()
                if sock in events:
                    while sock.poll(0, zmq.POLLIN):
                        try:
                            self._stream_reply(self._recv(sock), in_flight)
                        except WireError as exc:  # a reply we cannot read; keep streaming
                            self.stream_counts["errors"] += 1
                            self.last_error = exc
                        waiting_since = time.monotonic() if in_flight else None
                        self._backoff.succeeded()
                if waiting_since is not None and time.monotonic() - waiting_since > self.timeout_s:
                    new = self._recreate(sock)
                    if new is not sock:
                        poller.unregister(sock)
                        poller.register(new, zmq.POLLIN)
                        sock = new
                        in_flight.clear()
                        waiting_since = None
                        self.stream_counts["reconnects"] += 1
        finally:
            sock.close(linger=0)

    def _stream_reply(self, header: dict[str, Any], in_flight: dict[int, float]) -> None:
        captured_at = in_flight.pop(header["id"], None)
        if captured_at is None:
            return  # answer to a request sent on a socket we already replaced
        kind = header["kind"]
        if kind == Kind.TRACE.value:
            reply = TraceReply(
                header["body"], header["id"], header["timings"], captured_at, time.monotonic()
            )
            self.stream_counts["traces"] += 1
            with self._lock:
                if self._latest is None or reply.request_id > self._latest.request_id:
                    self._latest = reply
        elif kind == Kind.SUPERSEDED.value:
            self.stream_counts["superseded"] += 1
        elif kind == Kind.ERROR.value:
            self.stream_counts["errors"] += 1
            self.last_error = ServerError.from_body(header["body"], header["id"])

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.stop()
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> TraceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
