"""The floor under `mu0 bench server`'s transport figure on this machine: round trips of the same
352,784-byte payload (a 224x224 RGB-D observation) to a server in another process that
(a) echoes from its ROUTER socket thread (msgpack header, numpy view of the buffer, nothing
else), and (b) hands each request to a worker thread and sends the reply back through an
inproc socket, as `runtime.server` did before it let its inference thread watch the socket
(what that change saves). Prints p50/p99 per mode, twice each.

    .venv/bin/python scripts/bench_zmq_floor.py
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import msgpack
import numpy as np
import zmq

PAYLOAD_BYTES = 352_784


def _reply(header: dict, array: np.ndarray) -> bytes:
    return msgpack.packb({"id": header["id"], "n": int(array.size)})


def _serve(port_queue: mp.Queue, mode: str) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port_queue.put(router.bind_to_random_port("tcp://127.0.0.1"))
    if mode == "bare":
        while True:
            ident, head, buf = router.recv_multipart(copy=False)
            router.send_multipart([ident, _reply(msgpack.unpackb(head.bytes), np.frombuffer(buf))])
    done_rx = ctx.socket(zmq.PAIR)
    done_rx.bind("inproc://done")
    cond, slot = threading.Condition(), []

    def worker() -> None:
        done_tx = ctx.socket(zmq.PAIR)
        done_tx.connect("inproc://done")
        while True:
            with cond:
                while not slot:
                    cond.wait()
                ident, header, array = slot.pop()
            done_tx.send_multipart([ident, _reply(header, array)])

    threading.Thread(target=worker, daemon=True).start()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(done_rx, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if router in events:
            ident, head, buf = router.recv_multipart(copy=False)
            with cond:
                slot.append((ident.bytes, msgpack.unpackb(head.bytes), np.frombuffer(buf)))
                cond.notify()
        if done_rx in events:
            router.send_multipart(done_rx.recv_multipart())


def _round_trips(port: int, n: int = 2000, warmup: int = 200) -> np.ndarray:
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    payload = np.random.default_rng(0).integers(0, 255, PAYLOAD_BYTES, np.uint8)
    ms = []
    for i in range(n + warmup):
        t = time.perf_counter()
        dealer.send_multipart([msgpack.packb({"id": i}), payload], copy=False)
        msgpack.unpackb(dealer.recv())
        ms.append((time.perf_counter() - t) * 1e3)
    dealer.close()
    return np.percentile(ms[warmup:], [50, 99])


def main() -> None:
    for _ in range(2):
        for mode in ("bare", "handoff"):
            ports: mp.Queue = mp.Queue()
            server = mp.Process(target=_serve, args=(ports, mode), daemon=True)
            server.start()
            p50, p99 = _round_trips(ports.get())
            server.terminate()
            print(f"{mode:8s} p50 {p50:.3f} ms  p99 {p99:.3f} ms")


if __name__ == "__main__":
    main()
