"""`slmops serve` as a real process: SIGTERM turns health NOT_SERVING, refuses new work, lets every
admitted request (running and queued) finish, and exits 0 within the grace period."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from tests.serve.conftest import PROMPT
from tests.serve.test_ops import metric

STREAMS = 8
TOKENS = 480


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sigterm_drains_in_flight_work_and_exits_0(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient

    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmops.cli", "serve", str(tiny_bundle), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", str(metrics_port), "--max-batch", "1", "--max-queue", "15", "--threads", "1",
         "--grace-period", "60", "--max-new-tokens-limit", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "SLMOPS_ADMIN_TOKEN": ""})
    try:
        with SlmopsClient(f"127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                try:
                    if client.health() == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server never became SERVING"
                time.sleep(0.1)

            def stream(_: int) -> tuple[str, int, int]:
                chunks = list(client.generate_stream(PROMPT, max_new_tokens=TOKENS))
                return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].usage.completion_tokens

            def admitted() -> float:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                    return metric(response.read().decode(), "slmops_adapter_requests_total", adapter="base")

            with ThreadPoolExecutor(STREAMS) as pool:
                futures = [pool.submit(stream, i) for i in range(STREAMS)]
                while admitted() < STREAMS:
                    time.sleep(0.005)
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                saw_not_serving = refused = False
                while not all(f.done() for f in futures):
                    try:
                        saw_not_serving |= client.health() == "NOT_SERVING"
                        if saw_not_serving and not refused:
                            client.generate(PROMPT, max_new_tokens=2)
                    except grpc.RpcError as exc:
                        refused |= exc.code() == grpc.StatusCode.UNAVAILABLE
                    time.sleep(0.01)
                results = [f.result(timeout=60) for f in futures]
        code = proc.wait(timeout=60)
        exited_after = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 0, stderr[-3000:]
    assert exited_after < 60
    assert [(reason, tokens) for _, reason, tokens in results] == [(2, TOKENS)] * STREAMS  # FINISH_REASON_LENGTH
    assert saw_not_serving and refused
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    stopped = [e for e in events if e.get("event") == "stopped"]
    assert stopped and stopped[0]["drained"] is True and stopped[0]["in_flight_at_signal"] >= 1
