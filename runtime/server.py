"""The trace server: one ROUTER socket, one inference thread, dynamic batching.

The inference thread also watches the socket while it is idle: it decodes and validates
requests, answers hello / ping / stats at once, and puts each predict into its client's
single *pending slot*; a newer request from the same client replaces the older one,
which is answered ``superseded``. Once a batch is due (every recently active client has
a request pending, at most ``max_batch``, or ``batch_window_ms`` ran out), it hands the
watch to a helper thread, runs ``model.predict_batch``, takes the watch back and sends
the replies. So a request reaches the model with no thread hand-off, and the socket is
watched while the model runs; a model whose batches all take under ``inline_below_ms``
runs without the helper, since waking it would cost more than the wait. A batch the model
fails on is split and re-run, so a request that breaks the model fails alone; a request
whose traces are not finite is answered with an error, never with the NaNs.

ZeroMQ sockets are not thread-safe: only the thread on watch touches the ROUTER, under
one lock, and it sleeps in select() on the ROUTER's file descriptor, outside zmq. A slow
client never blocks anyone: once ``send_hwm`` replies to a peer wait unread, the next
ones are dropped, counted in ``stats.dropped_replies`` and logged. Wire format:
runtime/wire.py and docs/protocol.md.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import os
import select
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from runtime import wire
from runtime.model_api import TraceModel
from runtime.wire import ErrorCode, Kind, WireError

log = logging.getLogger("mu0.server")

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_CLIENT_IDLE_S = 60.0  # forget per-client state (rate bucket) after this long unheard
_TRACE = Kind.TRACE.value
# Log lines per client and second: a client sending garbage at 1,000 frames/s would
# otherwise cost the server a line per frame (and fill the disk); the lines left out
# are counted in the next one logged.
_ERROR_LINES_PER_S = 5
_DROP_LINES_PER_S = 1
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_large_buffers_to_the_os(threshold_bytes: int = 4 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold_bytes`` or more by mmap, so a large
    frame's buffer goes back to the OS when it is freed. Process-wide: `mu0 serve` calls
    it at start. By default glibc raises that threshold to the largest block freed so far
    (up to 32 MiB); after one 16 MiB frame, ZeroMQ's I/O thread took the next ones from
    its heap and kept them, and malloc_trim did not give them back: 10,000 fuzzed frames
    (22 of 16 MiB) left the server 47% larger. False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def log_event(level: int, event: str, **fields: Any) -> None:
    """A structured log line: ``event=<name> key=value ...``; the JSON formatter of
    ``mu0 serve --log-json`` reads the same fields from the record."""
    if not log.isEnabledFor(level):
        return
    text = " ".join([f"event={event}", *(f"{k}={v}" for k, v in fields.items())])
    log.log(level, "%s", text, extra={"event": event, "fields": fields})


@dataclass(frozen=True)
class CurveConfig:
    """CURVE encryption and authentication: the server's key pair and the z85 public
    keys of the clients it accepts. Any other client fails the handshake (gets nothing)."""

    server_public: bytes
    server_secret: bytes
    allowed_clients: frozenset[bytes]

    @classmethod
    def from_files(
        cls, server_secret_file: str | Path, allowed: Iterable[str | Path]
    ) -> CurveConfig:
        """``server_secret_file`` is a ``*.key_secret`` written by ``zmq.auth``; each entry
        of ``allowed`` is a client ``*.key`` file or a directory of them."""
        import zmq.auth

        public, secret = zmq.auth.load_certificate(server_secret_file)
        if secret is None:
            raise ValueError(f"{server_secret_file} holds no secret key (need *.key_secret)")
        keys: set[bytes] = set()
        for entry in map(Path, allowed):
            files = sorted(entry.glob("*.key")) if entry.is_dir() else [entry]
            for f in files:
                keys.add(zmq.auth.load_certificate(f)[0])
        if not keys:
            raise ValueError("CURVE needs at least one allowed client public key")
        return cls(public, secret, frozenset(keys))


class _AllowList:
    """Credentials provider for zmq's ZAP authenticator."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = client_key in self.keys
        if not allowed:
            log_event(logging.WARNING, "curve_denied", client_key=client_key.decode())
        return allowed


@dataclass
class _Pending:
    """One predict waiting in its client's slot (arrays are views over ``frames``)."""

    identity: bytes
    request_id: int
    obs: dict[str, Any]
    t_recv: float


@dataclass
class _ClientState:
    tokens: float
    last_seen: float
    requests: int = 0


@dataclass
class _LogBudget:
    """One kind of log line for one client: at most ``per_s`` lines a second."""

    per_s: int
    window_start: float = -1e9
    used: int = 0
    left_out: int = 0

    def take(self, now: float) -> int | None:
        """None: leave this line out; else log it, with this many left out before it."""
        if now - self.window_start >= 1.0:
            self.window_start, self.used = now, 0
        if self.used >= self.per_s:
            self.left_out += 1
            return None
        self.used += 1
        left_out, self.left_out = self.left_out, 0
        return left_out


@dataclass
class _Stats:
    """Counters and rolling windows (the watching thread counts requests, the inference
    thread traces)."""

    started: float = field(default_factory=time.monotonic)
    counts: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)
    trace_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20000))
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    infer_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    dropped_replies: int = 0

    def snapshot(self, clients: int, pending: int) -> dict[str, Any]:
        now = time.monotonic()
        uptime = now - self.started
        window = min(5.0, max(uptime, 1e-3))
        recent = sum(1 for t in list(self.trace_times) if now - t <= window)  # a snapshot
        sizes = list(self.batch_sizes)
        return {
            "uptime_s": round(uptime, 3),
            "requests_per_s": round(recent / window, 2),
            "latency_ms": _percentiles(self.latency_ms),
            "infer_ms": _percentiles(self.infer_ms),
            "batch_size": {
                "mean": round(float(np.mean(sizes)), 3) if sizes else 0.0,
                "max": max(sizes, default=0),
                "histogram": {str(k): v for k, v in sorted(collections.Counter(sizes).items())},
            },
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "clients": clients,
            "pending": pending,
            "dropped_replies": self.dropped_replies,
        }


def _percentiles(values: Iterable[float]) -> dict[str, float]:
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(data.max()), 3),
        "n": int(data.size),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _finite_or_reason(prediction: dict[str, Any]) -> dict[str, Any] | str:
    """The prediction if every float array in it is finite (the protocol promises that),
    else the error message for its request."""
    for key, value in prediction.items():
        if (
            isinstance(value, np.ndarray)
            and value.dtype.kind == "f"
            and not np.isfinite(value).all()
        ):
            log_event(logging.ERROR, "model_not_finite", field=key)
            return f"the model's '{key}' for this request is not finite"
    return prediction


class TraceServer:
    """Serves a ``TraceModel`` on ``tcp://host:port`` (port 0 picks a free one).

    ``batch_window_ms`` = 0 with ``max_batch`` = 1 turns batching off. ``rate_limit_hz``
    = 0 turns the per-client limit off. ``pub_port`` (0 = pick one) opens a read-only
    PUB socket where every trace is also published for observers.

    ``inline_below_ms``: once the last 8 batches each took less than this, the inference
    thread runs the next batch without handing the watch to the helper. Waking the helper
    costs tens of microseconds of a busy CPU, more than such a model takes, and requests
    that arrive meanwhile wait at most that long in ZeroMQ's queue. 0 always hands over.

    ``send_hwm``: replies per client that may wait unread before further ones are dropped
    (counted and logged); a client with at most half of it unanswered never loses one.
    ``max_header_bytes`` bounds frame 0 of a request, which is the part that is unpacked.
    """

    def __init__(
        self,
        model: TraceModel,
        host: str = "127.0.0.1",
        port: int = 0,
        batch_window_ms: float = 2.0,
        max_batch: int = 16,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
        rate_limit_hz: float = 200.0,
        curve: CurveConfig | None = None,
        pub_port: int | None = None,
        max_pending: int = 256,
        send_hwm: int = 256,
        inline_below_ms: float = 1.0,
        max_header_bytes: int = wire.DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model = model
        self.metadata = dict(model.metadata())
        self.host = host
        self.batch_window_s = batch_window_ms / 1e3
        self.max_batch = max_batch
        self.max_message_bytes = max_message_bytes
        self.max_header_bytes = min(max_header_bytes, max_message_bytes)
        self.send_hwm = send_hwm
        self.rate_limit_hz = rate_limit_hz
        self.max_pending = max_pending
        self.inline_below_ms = inline_below_ms
        self.curve = curve
        if host not in _LOOPBACK and curve is None:
            log_event(
                logging.WARNING, "insecure_bind", host=host, hint="use --curve beyond loopback"
            )

        # Two I/O threads: while one copies a 16 MiB frame in (legal, if refused), the
        # other keeps reading other clients; with one, a ping sent right after such a
        # frame waited 13 ms at p50 (45 ms at worst), with two 3-4 ms.
        self._ctx = zmq.Context(io_threads=2)
        self._auth = None
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback(
                "*", credentials_provider=_AllowList(curve.allowed_clients)
            )

        self._router = self._socket(zmq.ROUTER, send_hwm)
        # A full peer queue makes a non-blocking send fail (EAGAIN) instead of dropping in
        # silence, so every drop is counted and logged (docs/protocol.md, "Replies").
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # The transport drops (and disconnects) frames far above our limit before they
        # are buffered; messages just above it still reach us and get a typed TOO_LARGE.
        self._router.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes + (1 << 20))
        self.port = self._bind(self._router, port)
        self.address = f"tcp://{host}:{self.port}"

        self._pub: zmq.Socket | None = None
        self.pub_port: int | None = None
        self.pub_address: str | None = None
        if pub_port is not None:
            self._pub = self._socket(zmq.PUB, send_hwm)
            self.pub_port = self._bind(self._pub, pub_port)
            self.pub_address = f"tcp://{host}:{self.pub_port}"

        # Which thread watches the ROUTER: the inference thread while it is idle, so that
        # a request goes from the socket straight into the model with no hand-off, and the
        # helper thread while the model runs. Only the thread on watch calls ZeroMQ on the
        # ROUTER, under _sock_lock (the hand-over of the watch is the fence zmq asks for);
        # it sleeps in select() on the ROUTER's ZMQ_FD, never inside zmq. A write to the
        # poke pipe wakes whichever thread is watching.
        self._sock_lock = threading.Lock()
        self._router_fd = self._router.get(zmq.FD)
        self._poke_r, self._poke_w = os.pipe()
        os.set_blocking(self._poke_r, False)
        os.set_blocking(self._poke_w, False)
        self._helper_go = threading.Lock()  # released: the helper takes the watch
        self._helper_go.acquire()
        self._helper_off = threading.Lock()  # released: the helper has left the watch
        self._helper_off.acquire()
        self._reclaim = False  # the inference thread wants the watch back

        # Touched only by the thread on watch (and the inference thread between watches).
        self._pending: dict[bytes, _Pending] = {}  # insertion order = FIFO
        self._batch_deadline: float | None = None
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._clients: dict[bytes, _ClientState] = {}
        self._log_budgets: dict[tuple[bytes, str], _LogBudget] = {}
        self._warmup_infer_ms: float | None = None
        # Clients that sent a predict within the last second: the worker waits for at most
        # this many, so a lone client never sits out the batch window for nobody.
        self._recent_predictors: dict[bytes, float] = {}
        self._active_predictors = 0
        self._last_prune = time.monotonic()
        self._stats = _Stats()
        self._threads: list[threading.Thread] = []
        self._helper: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def _socket(self, kind: int, send_hwm: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, send_hwm)
        if self.curve is not None:
            sock.curve_secretkey = self.curve.server_secret
            sock.curve_publickey = self.curve.server_public
            sock.curve_server = True
        return sock

    def _bind(self, sock: zmq.Socket, port: int) -> int:
        if port == 0:
            return sock.bind_to_random_port(f"tcp://{self.host}")
        sock.bind(f"tcp://{self.host}:{port}")
        return port

    def start(self, inference_thread: bool = True) -> TraceServer:
        """Start the helper thread (and, unless told otherwise, the inference thread) and
        return at once."""
        if self._threads:
            return self
        self._helper = threading.Thread(target=self._helper_loop, name="mu0-watch", daemon=True)
        self._threads = [self._helper]
        if inference_thread:
            self._threads.append(
                threading.Thread(target=self._inference_loop, name="mu0-infer", daemon=True)
            )
        for t in self._threads:
            t.start()
        log_event(
            logging.INFO,
            "serving",
            address=self.address,
            pub=self.pub_address,
            model=self.metadata.get("model_id"),
            max_batch=self.max_batch,
            window_ms=self.batch_window_s * 1e3,
            curve=self.curve is not None,
        )
        return self

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (a signal handler may call it), then clean up."""
        # Inference runs on the calling (main) thread: torch's OpenMP kernels ran up to 2x
        # slower on a secondary Python thread (tiny μ0 on 2 cores: 43 ms on the main
        # thread, 68-93 ms on another), which the server would add to every request. The
        # helper thread keeps watching the socket while the model runs.
        self.start(inference_thread=False)
        self._inference_loop()  # returns once shutdown() is called
        self.close()

    def shutdown(self) -> None:
        """Ask both threads to stop; safe from a signal handler."""
        self._stop.set()
        self._poke()

    def close(self) -> None:
        """Stop, join the threads and release the sockets. Idempotent."""
        if self._closed.is_set():
            return
        self.shutdown()
        if self._helper_go.locked():
            self._helper_go.release()  # an idle helper wakes, sees the stop and returns
        for t in self._threads:
            t.join(timeout=5.0)
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        os.close(self._poke_r)
        os.close(self._poke_w)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        self._closed.set()
        log_event(logging.INFO, "stopped", **self._stats.counts)

    def __enter__(self) -> TraceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm_up(self, rounds: int = 2) -> float:
        """Run the model on made-up observations before serving (first calls pay for lazy
        initialisation) and keep the last time as the handshake's ``typical_infer_ms``
        until real batches have been timed. Call before ``start``; returns that time."""
        from runtime.model_api import make_observation

        size = self.metadata.get("image_size") or (224, 224)
        queries = min(16, int(self.metadata.get("max_queries", 16)))
        obs = make_observation(num_queries=queries, image_size=tuple(size))
        for _ in range(rounds):
            t0 = time.perf_counter()
            self.model.predict_batch([obs])
            self._warmup_infer_ms = _ms(time.perf_counter() - t0)
        return self._warmup_infer_ms

    def stats(self) -> dict[str, Any]:
        """Live statistics (the body of a ``stats_ok`` reply)."""
        return self._stats.snapshot(len(self._clients), len(self._pending))

    # ------------------------------------------------------------------ the watch

    def _sleep(self, timeout_s: float) -> None:
        """Sleep until the ROUTER's ZMQ_FD or the poke pipe is readable, or ``timeout_s``.

        select() waits with microsecond precision; poll() rounds up to whole milliseconds,
        which would stretch a 2 ms batch window to 3. select() only takes descriptors below
        FD_SETSIZE (1024), so a process holding more files falls back to poll()."""
        fds = (self._router_fd, self._poke_r)
        if max(fds) < 1024:
            readable = select.select(fds, (), (), timeout_s)[0]
        else:
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            readable = [fd for fd, _ in poller.poll(timeout_s * 1e3)]
        if self._poke_r in readable:
            try:
                os.read(self._poke_r, 4096)
            except BlockingIOError:
                pass

    def _watch(self, due: Callable[[], float]) -> None:
        """Receive and handle requests until ``due()`` (seconds left to watch) is <= 0 or
        the server stops. ZMQ_FD is edge-triggered, so ZMQ_EVENTS is read (under the lock)
        before each sleep."""
        while not self._stop.is_set():
            with self._sock_lock:
                more = self._drain(due)
            wait = due()
            if wait <= 0:
                return
            now = time.monotonic()
            if now - self._last_prune > 0.25:
                self._prune_clients(now)
                self._last_prune = now
            if not more:  # after a bounded drain of a flood, re-check the deadline at once
                self._sleep(min(wait, 0.05))

    def _drain(self, due: Callable[[], float]) -> bool:
        """Handle what the ROUTER holds until it is empty (False), or the watch is due to
        end or 256 messages were handled (True). Checking ``due`` after every message keeps
        a flood of requests from delaying a batch, or the hand-back of the watch; whoever
        watches next drains first, so nothing waits for an edge of ZMQ_FD that was taken.
        The caller holds _sock_lock."""
        router = self._router
        for _ in range(256):
            if not router.get(zmq.EVENTS) & zmq.POLLIN:
                return False
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            self._handle(frames)
            if due() <= 0:
                return True
        return True

    def _poke(self) -> None:
        """Wake the thread on watch (it re-reads ZMQ_EVENTS and its deadline)."""
        try:
            os.write(self._poke_w, b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    # ------------------------------------------------------------------ requests

    def _handle(self, frames: list[zmq.Frame]) -> None:
        t_recv = time.perf_counter()
        identity = frames[0].bytes
        request_id: int | None = None
        try:
            header = wire.decode(frames[1:], self.max_message_bytes, self.max_header_bytes)
            request_id = header.get("id") if type(header.get("id")) is int else None
            kind, request_id, body = wire.check_header(header, wire.REQUEST_KINDS)
            # After decoding (cheap: no copies) so the refusal names the request it refuses.
            self._admit(identity)
            self._stats.counts[kind.value] += 1
            if kind is Kind.PREDICT:
                self._enqueue_predict(identity, request_id, body, t_recv)
            elif kind is Kind.HELLO:
                self._send(
                    identity, wire.reply(Kind.HELLO_OK, request_id, self._hello_body()), t_recv
                )
            elif kind is Kind.PING:
                self._send(identity, wire.reply(Kind.PONG, request_id), t_recv)
            elif kind is Kind.STATS:
                self._send(identity, wire.reply(Kind.STATS_OK, request_id, self.stats()), t_recv)
        except WireError as exc:
            rid = request_id if request_id is not None else exc.request_id
            self._send_error(identity, exc.code, exc.message, rid, t_recv)
        except Exception:  # never let one request take the loop down
            log.error("event=handler_failed\n%s", traceback.format_exc())
            self._send_error(
                identity, ErrorCode.INTERNAL, "internal server error", request_id, t_recv
            )

    def _admit(self, identity: bytes) -> None:
        """Per-client token bucket (capacity one second's worth, at least 2)."""
        now = time.monotonic()
        state = self._clients.get(identity)
        if state is None:
            state = self._clients[identity] = _ClientState(
                tokens=self._bucket_size(), last_seen=now
            )
        if self.rate_limit_hz > 0:
            elapsed = now - state.last_seen
            state.tokens = min(self._bucket_size(), state.tokens + elapsed * self.rate_limit_hz)
        state.last_seen = now
        state.requests += 1
        if self.rate_limit_hz > 0:
            if state.tokens < 1.0:
                raise WireError(
                    ErrorCode.RATE_LIMITED, f"more than {self.rate_limit_hz:g} requests/s"
                )
            state.tokens -= 1.0

    def _bucket_size(self) -> float:
        return max(2.0, self.rate_limit_hz)

    def _prune_clients(self, now: float) -> None:
        stale = [k for k, s in self._clients.items() if now - s.last_seen > _CLIENT_IDLE_S]
        for k in stale:
            del self._clients[k]
            self._log_budgets.pop((k, "request_error"), None)
            self._log_budgets.pop((k, "reply_dropped"), None)
        quiet = [k for k, t in self._recent_predictors.items() if now - t > 1.0]
        for k in quiet:
            del self._recent_predictors[k]
        self._active_predictors = len(self._recent_predictors)

    def _hello_body(self) -> dict[str, Any]:
        recent = list(self._stats.infer_ms)
        typical = float(np.median(recent)) if recent else self._warmup_infer_ms
        return {
            "protocol_version": wire.PROTOCOL_VERSION,
            **self.metadata,
            "max_batch": self.max_batch,
            "batch_window_ms": self.batch_window_s * 1e3,
            "max_message_bytes": self.max_message_bytes,
            "max_header_bytes": self.max_header_bytes,
            "rate_limit_hz": self.rate_limit_hz,
            "rate_limit_burst": self._bucket_size() if self.rate_limit_hz > 0 else None,
            "max_pending": self.max_pending,
            "send_queue": self.send_hwm,
            "typical_infer_ms": None if typical is None else round(typical, 3),
            "pub_port": self.pub_port,
            "dtypes": sorted(wire.SUPPORTED_DTYPES),
        }

    def _enqueue_predict(
        self, identity: bytes, request_id: int, body: dict[str, Any], t_recv: float
    ) -> None:
        obs = body.get("obs")
        if not isinstance(obs, dict):
            raise WireError(ErrorCode.MALFORMED, "predict body needs an 'obs' map")
        self.model.validate(obs)
        item = _Pending(identity, request_id, obs, t_recv)
        self._recent_predictors[identity] = time.monotonic()
        self._active_predictors = max(self._active_predictors, len(self._recent_predictors))
        old = self._pending.get(identity)
        if old is None and len(self._pending) >= self.max_pending:
            raise WireError(ErrorCode.OVERLOADED, f"{len(self._pending)} clients waiting")
        self._pending[identity] = item  # replacing keeps the client's place in line
        if old is not None:
            self._stats.counts["superseded"] += 1
            self._send(
                identity,
                wire.reply(Kind.SUPERSEDED, old.request_id, {"by": request_id}),
                old.t_recv,
            )

    def _send_error(
        self, identity: bytes, code: ErrorCode, message: str, request_id: int | None, t_recv: float
    ) -> None:
        self._stats.errors[code.value] += 1
        self._log_limited(
            identity,
            "request_error",
            _ERROR_LINES_PER_S,
            id=request_id,
            code=code.value,
            detail=repr(message),
        )
        self._send(identity, wire.error_reply(code, message, request_id), t_recv)

    def _log_limited(self, identity: bytes, event: str, per_s: int, **fields: Any) -> None:
        """A WARNING line about this client, at most ``per_s`` of ``event`` a second; each
        line says how many were left out (``left_out``) since the previous one."""
        budget = self._log_budgets.get((identity, event))
        if budget is None:
            budget = self._log_budgets[(identity, event)] = _LogBudget(per_s)
        left_out = budget.take(time.monotonic())
        if left_out is not None:
            log_event(logging.WARNING, event, client=identity.hex(), left_out=left_out, **fields)

    def _send(self, identity: bytes, header: dict[str, Any], t_recv: float) -> None:
        """Stamp total server time (receive -> send) and send without copying arrays."""
        total = time.perf_counter() - t_recv
        header["timings"]["total_ms"] = _ms(total)
        if header["kind"] == _TRACE:
            self._stats.latency_ms.append(_ms(total))
        frames = wire.encode(header)
        try:
            if len(frames) == 1:  # small arrays only, all inline: a plain copying send
                self._router.send(identity, zmq.SNDMORE | zmq.NOBLOCK)
                self._router.send(frames[0], zmq.NOBLOCK)
            else:
                self._router.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the peer's queue is full (ROUTER_MANDATORY): drop, count, log
            self._dropped(identity, header)
        except zmq.ZMQError as exc:  # peer gone mid-send; nothing to do
            log_event(logging.DEBUG, "send_failed", client=identity.hex(), error=exc)

    def _dropped(self, identity: bytes, header: dict[str, Any]) -> None:
        self._stats.dropped_replies += 1
        self._log_limited(
            identity,
            "reply_dropped",
            _DROP_LINES_PER_S,
            id=header["id"],
            kind=header["kind"],
            reason=f"{self.send_hwm} replies wait unread",
        )

    # ------------------------------------------------------------------ threads

    def _helper_loop(self) -> None:
        """Watch the socket whenever the inference thread hands the watch over."""
        while not self._stop.is_set():
            if not self._helper_go.acquire(timeout=0.2):
                continue
            self._watch(lambda: -1.0 if self._reclaim else 0.05)
            self._reclaim = False
            self._helper_off.release()

    def _inference_loop(self) -> None:
        """Watch the socket until a batch is due; hand the watch to the helper, run the
        model and take the watch back; then send the replies. Only the thread on watch ever
        touches the ROUTER, so the two threads never contend for it (a helper draining a
        flood of requests would otherwise starve the replies)."""
        while not self._stop.is_set():
            self._watch(self._batch_wait)
            if self._stop.is_set() or not self._pending:
                break
            batch = self._take_batch()
            recent = list(itertools.islice(reversed(self._stats.infer_ms), 8))
            handover = len(recent) < 8 or max(recent) >= self.inline_below_ms
            if handover:
                self._helper_go.release()
            t_start = time.perf_counter()
            predictions = self._predict(batch)
            t_end = time.perf_counter()
            self._stats.batch_sizes.append(len(batch))
            self._stats.infer_ms.append(_ms(t_end - t_start))
            if handover:
                self._reclaim = True
                self._poke()
                while not self._helper_off.acquire(timeout=0.2):
                    if self._helper is None or not self._helper.is_alive():
                        break  # stopped: nobody else is on watch
            self._send_traces(batch, predictions, t_start, t_end)
        # Requests still pending at the stop are dropped: their clients time out.

    def _batch_wait(self) -> float:
        """Seconds the inference thread may still watch before its next batch is due.

        A batch is due once every recently active client has a request pending (at most
        max_batch) or the batch window has run out. The window starts when the model is
        free and a request waits, not when the oldest request arrived: otherwise clients
        that arrive during a forward pass split into cohorts that take turns in half-full
        batches forever, each waiting a whole pass extra."""
        if not self._pending:
            return 0.05
        now = time.perf_counter()
        if self._batch_deadline is None:
            self._batch_deadline = now + self.batch_window_s
        if len(self._pending) >= min(self.max_batch, max(1, self._active_predictors)):
            return 0.0
        return self._batch_deadline - now

    def _take_batch(self) -> list[_Pending]:
        self._batch_deadline = None
        keys = list(itertools.islice(self._pending, self.max_batch))
        return [self._pending.pop(k) for k in keys]

    def _predict(self, batch: list[_Pending]) -> list[dict[str, Any] | str]:
        """The model's prediction for each request of ``batch``, or why it has none.

        A batch the model fails on is split in halves and each half re-run, down to single
        requests: whatever input validation let through fails only its own request, for
        about 2 log2(batch) extra passes. (Re-running every request alone would cost a pass
        per request.)"""
        try:
            predictions = self.model.predict_batch([p.obs for p in batch])
            if len(predictions) != len(batch):
                raise RuntimeError(f"model returned {len(predictions)} for {len(batch)}")
        except Exception:
            if len(batch) > 1:
                log_event(logging.WARNING, "batch_failed", batch=len(batch), retry="in halves")
                half = len(batch) // 2
                return self._predict(batch[:half]) + self._predict(batch[half:])
            log.error(
                "event=model_failed client=%s id=%s\n%s",
                batch[0].identity.hex(),
                batch[0].request_id,
                traceback.format_exc(),
            )
            return ["model failed"]
        return [_finite_or_reason(p) for p in predictions]

    def _send_traces(
        self,
        batch: list[_Pending],
        predictions: list[dict[str, Any] | str],
        t_start: float,
        t_end: float,
    ) -> None:
        """Reply to every request of a batch (the caller is on watch) and publish."""
        sent = []
        with self._sock_lock:
            for p, prediction in zip(batch, predictions):
                if isinstance(prediction, str):
                    self._send_error(
                        p.identity, ErrorCode.INTERNAL, prediction, p.request_id, p.t_recv
                    )
                    continue
                timings = {
                    "queue_ms": _ms(t_start - p.t_recv),
                    "infer_ms": _ms(t_end - t_start),
                    "batch_size": len(batch),
                }
                header = wire.reply(Kind.TRACE, p.request_id, prediction, timings)
                self._send(p.identity, header, p.t_recv)
                self._stats.trace_times.append(time.monotonic())
                sent.append((p.identity, header))
        if self._pub is not None:
            for identity, header in sent:
                header["client"] = identity.hex()
                self._pub.send_multipart([b"trace", *wire.encode(header)], copy=False)
