"""Bounded queue, cancellation and deadlines: a full queue answers RESOURCE_EXHAUSTED, a cancelled
stream or an expired deadline stops generation within one token step and frees the worker."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.serve.conftest import PROMPT, Gate, running_server


def wait_until(check: Any, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "condition not reached"
        time.sleep(0.005)
    return time.monotonic() - started


def test_full_queue_is_resource_exhausted_and_queued_work_completes(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, max_batch=1, max_queue=1) as srv, SlmopsClient(srv.address) as client, \
            Gate(srv.engine, after_tokens=1) as gate, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.generate, PROMPT, max_new_tokens=4)
        gate.wait_for(1)
        queued = pool.submit(client.generate, PROMPT, max_new_tokens=4, adapter="tone")
        wait_until(lambda: srv.engine.admitted == 2)
        assert srv.engine.running == 1
        for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
            with pytest.raises(grpc.RpcError) as exc:
                call(PROMPT, max_new_tokens=4)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in exc.value.details()
        assert client.health() == "SERVING"  # admin and health calls still get threads
        gate.open()
        assert running.result(30).usage.completion_tokens == 4
        assert queued.result(30).usage.completion_tokens == 4
        assert client.generate(PROMPT, max_new_tokens=2).usage.completion_tokens == 2
        samples = {s.name: s.value for m in srv.metrics.registry.collect() for s in m.samples}
        assert samples["slmops_queue_depth"] == 0 and samples["slmops_active_generations"] == 0


def _slow(server: Any, seconds: float = 0.02) -> None:
    server.engine.token_hook = lambda gen, produced: time.sleep(seconds)


def test_cancelled_stream_stops_within_one_step_and_frees_the_worker(server: Any, client: Any) -> None:
    _slow(server)
    try:
        stream = client.generate_stream(PROMPT, max_new_tokens=500)
        next(stream)
        wait_until(lambda: server.engine.running == 1)
        stream.cancel()
        took = wait_until(lambda: server.engine.admitted == 0, timeout=2.0)
        assert took < 0.5, f"worker freed after {took:.2f}s"
    finally:
        server.engine.token_hook = None
    assert client.generate(PROMPT, max_new_tokens=3).usage.completion_tokens == 3


def test_expired_deadline_stops_generation_and_frees_the_worker(server: Any, client: Any) -> None:
    _slow(server)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            client.generate(PROMPT, max_new_tokens=500, timeout=0.3)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: server.engine.admitted == 0, timeout=2.0)
        assert time.monotonic() - started < 1.5  # 500 slow tokens would take 10 s
        with pytest.raises(grpc.RpcError) as exc:
            list(client.generate_stream(PROMPT, max_new_tokens=500, timeout=0.3))
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: server.engine.admitted == 0, timeout=2.0)
    finally:
        server.engine.token_hook = None
    samples = [s for m in server.metrics.registry.collect() for s in m.samples if s.name == "slmops_requests_total"]
    codes = {s.labels["code"] for s in samples}
    assert "DEADLINE_EXCEEDED" in codes


def test_requests_share_decode_steps(server: Any, client: Any) -> None:
    """Continuous batching: two requests in flight decode in the same steps (not one after the other)."""
    steps: list[set[str]] = []

    def record(gen: Any, produced: int) -> None:
        if not steps or gen.request_id in steps[-1]:
            steps.append(set())
        steps[-1].add(gen.request_id)
        time.sleep(0.002)

    server.engine.token_hook = record
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(client.generate, PROMPT, max_new_tokens=24, min_new_tokens=24, adapter=a)
                       for a in ("tone", "extract")]
            assert [f.result(30).usage.completion_tokens for f in futures] == [24, 24]
    finally:
        server.engine.token_hook = None
    assert max(len(s) for s in steps) == 2, "the two requests never shared a decode step"
