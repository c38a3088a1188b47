"""Fail loudly: faults injected into the real scheduler (``Engine.fault_hook``, the documented test
hook: "step" at the start of a step, "join" with a request taken from the queue and not yet a row,
"handler" inside the step-error handler) of a real server on real ports, seen through real gRPC
clients, the openai client and plain HTTP.

A failed step fails its rows and the popped request with INTERNAL / 500 and the server goes on; a
scheduler that dies (its handler fails, steps keep failing, or a BaseException escapes) turns every
health service NOT_SERVING, /livez and /readyz 503, fails every waiting and running request with
UNAVAILABLE / 503, refuses new ones the same way, makes the image's health probe fail, and drains
at once."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from tests.conftest import REPO
from tests.serve.conftest import ADMIN_TOKEN, PROMPT, Gate, running_server

HEALTH_NAMES = ("", "slmops.v1.Generation", "slmops.v1.Adapters")


class Fault:
    """A fault_hook that raises ``exc`` at ``where`` (``times`` times; None = always)."""

    def __init__(self, faults: dict[str, BaseException], times: int | None = None) -> None:
        self.faults = faults
        self.times = times
        self.fired: list[str] = []

    def __call__(self, where: str) -> None:
        if where in self.faults and (self.times is None or len(self.fired) < self.times):
            self.fired.append(where)
            raise self.faults[where]


def requests_total(srv: Any, method: str, code: str) -> float:
    value = srv.metrics.registry.get_sample_value("slmops_requests_total", {"method": method, "code": code})
    return float(value or 0.0)


def http_get(srv: Any, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read().decode())
    finally:
        conn.close()


def post(srv: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, text
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def rpc_code(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def test_a_failed_step_fails_its_rows_and_the_popped_request_and_the_server_goes_on(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, http_port=0, metrics_port=None, max_batch=1, max_queue=4) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        engine = srv.engine
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0, timeout=60)
        # 1. a fault with a request taken from the queue but not yet a row: that request gets INTERNAL
        with Gate(engine) as gate:
            running = pool.submit(client.generate, PROMPT, max_new_tokens=4)
            gate.wait_for(1)
            popped = pool.submit(client.generate, PROMPT, max_new_tokens=4)
            wait_until(lambda: len(engine._waiting) == 1)
            engine.fault_hook = Fault({"join": RuntimeError("injected join fault")}, times=1)
            gate.open()
            assert running.result(30).usage.completion_tokens == 4
            with pytest.raises(grpc.RpcError) as exc:
                popped.result(30)
        assert exc.value.code() == grpc.StatusCode.INTERNAL and "injected join fault" in exc.value.details()
        # 2. a fault at the start of a step with an HTTP request in the batch: 500 in OpenAI's shape
        with Gate(engine) as gate:
            held = pool.submit(oai.completions.create, model="", prompt=PROMPT, max_tokens=8)
            gate.wait_for(1)
            engine.fault_hook = Fault({"step": RuntimeError("injected step fault")}, times=1)
            gate.open()
            with pytest.raises(openai.InternalServerError) as http_exc:
                held.result(30)
        assert http_exc.value.status_code == 500 and "injected step fault" in http_exc.value.body["message"]
        assert http_exc.value.body["type"] == "server_error"
        engine.fault_hook = None
        # the server goes on: healthy, serving, nothing left admitted
        assert engine.failure is None and engine.admitted == 0
        assert all(client.health(name) == "SERVING" for name in HEALTH_NAMES)
        assert http_get(srv, "/livez")[0] == 200 and http_get(srv, "/readyz")[0] == 200
        assert client.generate(PROMPT, max_new_tokens=3).usage.completion_tokens == 3
        assert requests_total(srv, "Generate", "INTERNAL") == 1
        assert requests_total(srv, "http /v1/completions", "INTERNAL") == 1


def test_a_dead_scheduler_fails_every_request_and_turns_health_not_serving(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, http_port=0, metrics_port=None, max_batch=1, max_queue=4,
                        grace_period_s=30) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client, ThreadPoolExecutor(6) as pool:
        engine = srv.engine
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0, timeout=60)
        with Gate(engine) as gate:
            stream = client.generate_stream(PROMPT, max_new_tokens=200)
            first = next(iter(stream))  # running: a row, one token out
            gate.wait_for(1)
            queued_unary = pool.submit(client.generate, PROMPT, max_new_tokens=4)
            queued_stream = pool.submit(lambda: list(client.generate_stream(PROMPT, max_new_tokens=4)))
            queued_http = pool.submit(oai.completions.create, model="", prompt=PROMPT, max_tokens=4)
            queued_sse = pool.submit(post, srv, "/v1/completions", {"model": "", "prompt": PROMPT, "max_tokens": 4,
                                                                    "stream": True})
            wait_until(lambda: len(engine._waiting) == 4)
            # a step fails, and so does the loop's own handler: the scheduler thread dies
            engine.fault_hook = Fault({"step": RuntimeError("injected step fault"),
                                       "handler": RuntimeError("injected handler fault")})
            died_at = time.monotonic()
            gate.open()
            with pytest.raises(grpc.RpcError) as running_exc:
                list(stream)
            answered_s = time.monotonic() - died_at
        assert first.text is not None
        assert running_exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "scheduler died" in running_exc.value.details()
        for future in (queued_unary, queued_stream):
            with pytest.raises(grpc.RpcError) as exc:
                future.result(10)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "scheduler died" in exc.value.details()
        with pytest.raises(openai.APIStatusError) as http_exc:
            queued_http.result(10)
        assert http_exc.value.status_code == 503 and "scheduler died" in http_exc.value.body["message"]
        status, text = queued_sse.result(10)
        assert status == 503 and "scheduler died" in json.loads(text)["error"]["message"]
        assert answered_s < 5
        assert isinstance(engine.failure, RuntimeError) and "handler" in str(engine.failure)
        assert not engine._thread.is_alive() and engine.admitted == 0 and srv.failed.is_set()

        # health says so at once, on every service and over HTTP
        assert all(client.health(name) == "NOT_SERVING" for name in HEALTH_NAMES)
        status, body = http_get(srv, "/livez")
        assert status == 503 and body["status"] == "DEAD" and "RuntimeError" in body["error"]
        assert http_get(srv, "/readyz")[0] == 503 and http_get(srv, "/health")[0] == 503
        # the image's HEALTHCHECK fails, so Docker/Swarm restart the container
        probe = subprocess.run([sys.executable, str(REPO / "dockerfiles" / "healthcheck.py")], capture_output=True,
                               text=True, timeout=30, env={**os.environ, "SLMOPS_HEALTH_ADDR": srv.address})
        assert probe.returncode == 1 and "NOT_SERVING" in probe.stdout

        # new requests are refused the same way, and nobody blocks
        code, details = rpc_code(lambda: client.generate(PROMPT, max_new_tokens=2))
        assert code == "UNAVAILABLE" and "scheduler died" in details
        code, _ = rpc_code(lambda: list(client.generate_stream(PROMPT, max_new_tokens=2)))
        assert code == "UNAVAILABLE"
        status, text = post(srv, "/v1/chat/completions", {"model": "", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and json.loads(text)["error"]["type"] == "service_unavailable"
        code, _ = rpc_code(lambda: client.unload_adapter("tone"))
        assert code == "UNAVAILABLE"
        # counted as what they were, not OK
        assert requests_total(srv, "GenerateStream", "UNAVAILABLE") == 3
        assert requests_total(srv, "Generate", "UNAVAILABLE") == 2
        assert requests_total(srv, "http /v1/completions", "UNAVAILABLE") == 2
        assert srv.metrics.registry.get_sample_value("slmops_model_ready") == 0
        # the drain does not wait its grace period (30 s) on a dead scheduler
        started = time.monotonic()
        assert srv.stop() is False
        stop_s = time.monotonic() - started
        assert stop_s < 8
        print(f"\nscheduler death: the running stream ended UNAVAILABLE {answered_s * 1000:.0f} ms after the faulty step began"
              f"; drain on the dead scheduler {stop_s:.2f} s (grace period 30 s)")


class Escaped(BaseException):
    """Not an Exception: no step handler catches it."""


@pytest.mark.parametrize("faults", [
    pytest.param({"step": RuntimeError("every step fails")}, id="every-step-fails"),
    pytest.param({"step": Escaped("not an Exception")}, id="base-exception"),
])
def test_any_death_of_the_scheduler_is_loud(tiny_bundle: Path, faults: dict[str, BaseException]) -> None:
    from slmops_serve.client import SlmopsClient
    from slmops_serve.engine import MAX_FAILED_STEPS

    with running_server(tiny_bundle, metrics_port=None, max_batch=1, max_queue=4) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client:
        hook = Fault(faults)
        srv.engine.fault_hook = hook
        started = time.monotonic()
        code, details = rpc_code(lambda: client.generate(PROMPT, max_new_tokens=4))
        assert time.monotonic() - started < 10
        assert code == "UNAVAILABLE" and "scheduler died" in details, (code, details)
        assert len(hook.fired) == (MAX_FAILED_STEPS if "every" in str(faults["step"]) else 1)
        assert srv.failed.is_set() and srv.engine.failure is not None
        assert all(client.health(name) == "NOT_SERVING" for name in HEALTH_NAMES)


def test_the_cancel_of_a_client_that_left_during_admission_skips_the_work(tiny_bundle: Path) -> None:
    """The cancel callback is registered before tokenizing: a request whose client left while its
    prompt was being rendered never compiles its grammar and never reaches the scheduler."""
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, http_port=0, metrics_port=None, max_batch=1) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client:
        engine = srv.engine
        render, compile_grammar = engine.render_prompt, engine.grammars.matcher
        compiled: list[Any] = []
        rendering = threading.Event()

        def slow_render(request: Any) -> str:  # a slow tokenizer/template: the client gives up meanwhile
            rendering.set()
            time.sleep(1.5)
            return str(render(request))

        def counted_compile(request: Any) -> Any:
            compiled.append(request.request_id)
            return compile_grammar(request)

        engine.render_prompt = slow_render
        engine.grammars.matcher = counted_compile
        joined_before = srv.metrics.registry.get_sample_value("slmops_queue_wait_seconds_count")
        try:
            code, _ = rpc_code(lambda: client.generate(PROMPT, max_new_tokens=50, guidance=("regex", "[a-z ]{1,40}"),
                                                       timeout=0.5))
            assert code == "DEADLINE_EXCEEDED"
            wait_until(lambda: requests_total(srv, "Generate", "CANCELLED") == 1, timeout=10)
            oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0, timeout=0.5)
            rendering.clear()
            with pytest.raises(openai.APITimeoutError):
                oai.completions.create(model="", prompt=PROMPT, max_tokens=50, extra_body={"guided_regex": "[a-z ]{1,40}"})
            wait_until(lambda: requests_total(srv, "http /v1/completions", "CANCELLED") == 1, timeout=10)
            assert rendering.is_set()
        finally:
            engine.render_prompt = render
            engine.grammars.matcher = compile_grammar
        assert compiled == [] and engine.admitted == 0
        assert srv.metrics.registry.get_sample_value("slmops_queue_wait_seconds_count") == joined_before  # none joined
        assert client.generate(PROMPT, max_new_tokens=2).usage.completion_tokens == 2


# `slmops serve`'s serve() with a fault hook that fails every step and its handler, set once the
# model is loaded (the process is otherwise the real one: signals, ports, exit code).
SERVE_WITH_FAULT = r'''
import sys
from slmops_serve import server
from slmops_serve.config import ServeConfig

load = server.SlmopsServer.load


def load_then_arm(self):
    load(self)

    def fault(where):
        raise RuntimeError(f"injected {where} fault")

    self.engine.fault_hook = fault


server.SlmopsServer.load = load_then_arm
sys.exit(server.serve(ServeConfig(bundle_dir=sys.argv[1], host="127.0.0.1", port=int(sys.argv[2]), metrics_port=None,
                                  threads=1, max_batch=1, grace_period_s=60)))
'''


def test_the_serve_process_exits_1_when_its_scheduler_dies(tiny_bundle: Path) -> None:
    """So that a restart policy (docker --restart, Swarm, Kubernetes) replaces it without waiting for
    the health check to fail three times."""
    import socket

    from slmops_serve.client import SlmopsClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_FAULT, str(tiny_bundle), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with SlmopsClient(f"127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                try:
                    if client.health() == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server never became SERVING"
                time.sleep(0.1)
            started = time.monotonic()
            code, details = rpc_code(lambda: client.generate(PROMPT, max_new_tokens=4))
        assert code == "UNAVAILABLE" and "scheduler died" in details, (code, details)
        assert proc.wait(timeout=30) == 1
        assert time.monotonic() - started < 15  # not the 60 s grace period
        _, stderr = proc.communicate()
        events = [json.loads(line).get("event") for line in stderr.splitlines() if line.startswith("{")]
        assert "scheduler_died" in events and events[-1] == "stopped", events[-6:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_hung_step_is_a_death_of_the_scheduler(tiny_bundle: Path) -> None:
    """A step that runs past --step-timeout (a hung onnxruntime call, here a step held by the token
    hook) fails the running and the waiting request with UNAVAILABLE and turns health NOT_SERVING,
    instead of holding every client while health says SERVING; when the hung step ends at last, the
    thread ends without answering anyone again."""
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, http_port=0, metrics_port=None, max_batch=1, max_queue=4, step_timeout=1.0) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        engine = srv.engine
        gate = Gate(engine)
        with gate:
            started = time.monotonic()
            running = pool.submit(rpc_code, lambda: client.generate(PROMPT, max_new_tokens=4))
            gate.wait_for(1)
            waiting = pool.submit(rpc_code, lambda: client.generate(PROMPT, max_new_tokens=4))
            answers = [running.result(20), waiting.result(20)]
            took = time.monotonic() - started
            assert all(code == "UNAVAILABLE" and "--step-timeout" in details for code, details in answers), answers
            assert took < 6, f"the hung step was noticed after {took:.1f}s (timeout 1s)"
            assert srv.failed.is_set() and isinstance(engine.failure, TimeoutError)
            assert all(client.health(name) == "NOT_SERVING" for name in HEALTH_NAMES)
            assert http_get(srv, "/livez")[0] == 503
            assert engine._thread is not None and engine._thread.is_alive()  # still hung in its step
        # the gate opens: the late step returns into a dead engine and its thread ends quietly
        engine._thread.join(timeout=10)
        assert not engine._thread.is_alive()
        assert rpc_code(lambda: client.generate(PROMPT, max_new_tokens=2))[0] == "UNAVAILABLE"
