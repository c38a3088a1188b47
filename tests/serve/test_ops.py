"""Operations: health transitions, reflection, Prometheus metrics, admin token, TLS, JSON logs, threads."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.serve.conftest import ADMIN_TOKEN, PROMPT, Gate, make_config, running_server

HEALTH_NAMES = ("", "slmops.v1.Generation", "slmops.v1.Adapters")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_health_is_not_serving_until_warm_then_serving_then_not_serving_while_draining(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient
    from slmops_serve.server import SlmopsServer

    server = SlmopsServer(make_config(tiny_bundle, max_batch=1))
    server.start()
    try:
        with SlmopsClient(server.address, token=ADMIN_TOKEN) as client:
            assert {n: client.health(n) for n in HEALTH_NAMES} == dict.fromkeys(HEALTH_NAMES, "NOT_SERVING")
            with pytest.raises(grpc.RpcError) as exc:
                client.generate(PROMPT, max_new_tokens=2)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as exc:
                client.list_adapters()
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            server.load()
            assert {n: client.health(n) for n in HEALTH_NAMES} == dict.fromkeys(HEALTH_NAMES, "SERVING")
            with Gate(server.engine, after_tokens=1) as gate, ThreadPoolExecutor(2) as pool:
                in_flight = pool.submit(client.generate, PROMPT, max_new_tokens=6)
                gate.wait_for(1)
                stopping = pool.submit(server.stop, 10.0)
                deadline = time.monotonic() + 5
                while client.health() != "NOT_SERVING":
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                with pytest.raises(grpc.RpcError) as exc:
                    client.generate(PROMPT, max_new_tokens=2)
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
                assert not stopping.done()
                gate.open()
                assert in_flight.result(30).usage.completion_tokens == 6  # drained, not cut
                assert stopping.result(30) is True
    finally:
        server.stop(grace=1)


def test_reflection_lists_the_services(server: Any) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"slmops.v1.Generation", "slmops.v1.Adapters", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= services
        pool = DescriptorPool(database)
        request = pool.FindMessageTypeByName("slmops.v1.GenerateRequest")
        assert {"prompt", "messages", "adapter", "max_new_tokens", "seed", "stop"} <= set(request.fields_by_name)
        methods = {m.name for m in pool.FindServiceByName("slmops.v1.Adapters").methods}
        assert methods == {"ListAdapters", "LoadAdapter", "UploadAdapter", "UnloadAdapter"}


def test_metrics_move(server: Any, client: Any, adapter_files: dict[str, Path]) -> None:
    port = server.metrics_port
    before = scrape(port)
    client.generate(PROMPT, adapter="tone", max_new_tokens=5)
    list(client.generate_stream(PROMPT, max_new_tokens=5))
    with pytest.raises(grpc.RpcError):
        client.generate(PROMPT, max_new_tokens=-1)
    client.load_adapter("metrics-probe", path="extract.onnx_adapter")
    during = scrape(port)
    client.unload_adapter("metrics-probe")
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return metric(during, name, **labels) - metric(before, name, **labels)

    assert delta("slmops_requests_total", method="Generate", code="OK") == 1
    assert delta("slmops_requests_total", method="GenerateStream", code="OK") == 1
    assert delta("slmops_requests_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta("slmops_adapter_requests_total", adapter="tone") == 1
    assert delta("slmops_adapter_requests_total", adapter="base") == 1
    assert delta("slmops_generated_tokens_total") == 10
    assert delta("slmops_time_to_first_token_seconds_count") == 2
    assert delta("slmops_decode_tokens_per_second_count") == 2
    assert delta("slmops_adapter_load_seconds_count") == 1
    assert metric(during, "slmops_adapters_loaded") == metric(before, "slmops_adapters_loaded") + 1
    assert metric(during, "slmops_adapter_loaded", adapter="metrics-probe") == 1
    assert metric(after, "slmops_adapter_loaded", adapter="metrics-probe") == 0
    assert metric(after, "slmops_model_ready") == 1
    assert "slmops_queue_depth 0.0" in after and "slmops_active_generations 0.0" in after


def test_adapters_service_requires_the_admin_token(server: Any) -> None:
    from slmops_serve.client import SlmopsClient

    for token in (None, "wrong-token"):
        with SlmopsClient(server.address, token=token or "") as anonymous:
            for call in (anonymous.list_adapters, lambda: anonymous.load_adapter("evil", path="tone.onnx_adapter"),
                         lambda: anonymous.unload_adapter("tone"),
                         lambda: anonymous.upload_adapter("evil", server.engine.bundle_dir / "adapters" / "tone.onnx_adapter")):
                with pytest.raises(grpc.RpcError) as exc:
                    call()
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert exc.value.details().startswith("authorization: ")
            # Generation needs no token.
            assert anonymous.generate(PROMPT, max_new_tokens=2).usage.completion_tokens == 2
    with SlmopsClient(server.address, token=ADMIN_TOKEN) as admin:
        assert {"tone", "extract"} <= {a.name for a in admin.list_adapters()}


def test_tls(tiny_bundle: Path, tls_cert: tuple[Path, Path]) -> None:
    from slmops_serve.client import SlmopsClient

    cert, key = tls_cert
    with running_server(tiny_bundle, tls_cert=str(cert), tls_key=str(key), max_batch=1) as srv:
        with SlmopsClient(f"localhost:{srv.port}", ca_cert=str(cert), token=ADMIN_TOKEN) as client:
            assert client.generate(PROMPT, max_new_tokens=3).usage.completion_tokens == 3
            assert {"tone", "extract"} <= {a.name for a in client.list_adapters()}
        with SlmopsClient(f"localhost:{srv.port}", timeout=3) as plaintext, pytest.raises(grpc.RpcError) as exc:
            plaintext.generate(PROMPT, max_new_tokens=3)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_logs_are_json_lines_with_the_request_id(server: Any, client: Any) -> None:
    from slmops_serve.logs import JsonFormatter

    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(JsonFormatter().format(record))

    handler = Capture()
    logger = logging.getLogger("slmops.serve")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        client.generate(PROMPT, adapter="tone", max_new_tokens=2, request_id="log-me-7")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(r) for r in records]
    rpc = [line for line in lines if line.get("request_id") == "log-me-7"]
    assert rpc and rpc[0]["event"] == "rpc" and rpc[0]["method"] == "Generate" and rpc[0]["code"] == "OK"
    assert rpc[0]["adapter"] == "tone" and rpc[0]["completion_tokens"] == 2 and "ttft_ms" in rpc[0]


def test_threads_come_from_the_bundle_unless_overridden(tiny_bundle: Path, server: Any) -> None:
    from slmops_serve.engine import session_threads

    genai = json.loads((tiny_bundle / "model" / "genai_config.json").read_text())
    bundle_threads = genai["model"]["decoder"]["session_options"]["intra_op_num_threads"]
    assert session_threads(tiny_bundle / "model", None) == bundle_threads
    assert session_threads(tiny_bundle / "model", 3) == 3
    assert server.engine.threads == 1  # the test server passes --threads 1


def test_a_second_server_on_the_same_port_fails(server: Any, tiny_bundle: Path) -> None:
    from slmops_serve.server import SlmopsServer

    other = SlmopsServer(make_config(tiny_bundle, port=server.port, metrics_port=None))
    with pytest.raises(RuntimeError):
        other.start()
    assert threading.active_count() > 0
