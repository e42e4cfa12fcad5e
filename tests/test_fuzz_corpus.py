"""The fuzzer of scripts/stress_server.py: its corpus repeats for a seed, and every one of
its malformed frames gets exactly one typed reply while a good client keeps being served."""

from __future__ import annotations

import threading

import numpy as np

from runtime.client import TraceClient
from runtime.model_api import make_observation
from scripts.stress_server import fuzz_corpus, fuzz_worker
from tests.runtime_helpers import running_server


def test_the_corpus_is_the_same_for_a_seed_and_differs_between_seeds() -> None:
    a, b, c = fuzz_corpus(300, seed=3), fuzz_corpus(300, seed=3), fuzz_corpus(300, seed=4)
    assert [list(map(bytes, m)) for m in a] == [list(map(bytes, m)) for m in b]
    assert [list(map(bytes, m)) for m in a] != [list(map(bytes, m)) for m in c]


def test_every_fuzz_frame_gets_one_typed_reply_beside_a_good_client() -> None:
    with running_server(rate_limit_hz=0) as server:
        good_latencies: list[float] = []
        stop = threading.Event()

        def good() -> None:
            obs = make_observation(num_queries=4, seed=2)
            with TraceClient(server.address, timeout_s=2) as client:
                while not stop.is_set():
                    good_latencies.append(client.predict(obs).round_trip_ms)

        thread = threading.Thread(target=good)
        thread.start()
        try:
            report = fuzz_worker(server.address, count=400, seed=1, rate_hz=0)
        finally:
            stop.set()
            thread.join()
    assert report["unanswered"] == 0 and not report["untyped"]
    assert sum(report["replies"].values()) == 400
    assert all(k.startswith("error:") for k in report["replies"])  # all malformed, as built
    codes = {k.split(":")[1] for k in report["replies"] if k.startswith("error:")}
    assert {"malformed", "bad_shape", "bad_value"} <= codes
    assert len(good_latencies) > 10 and np.median(good_latencies) < 100
