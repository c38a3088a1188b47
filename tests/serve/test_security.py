"""Security defaults on a real server: admin calls from another host.

A test host that is not loopback: a network namespace with one end of a veth pair (created here,
removed after), from which a client process (``ip netns exec NS python``) calls the server bound to
0.0.0.0. Without ``--admin-token`` every admin call from it is refused with PERMISSION_DENIED / 403
naming the flag (the issue's ``UnloadAdapter {"name": "tone"}`` included) while loopback is served;
with a token it needs the token (UNAUTHENTICATED / 401 otherwise). ``--api-key`` guards inference
(gRPC metadata, the openai client's api_key) and leaves health, reflection and /livez open; the
default upload limit follows the bundle's largest adapter."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from tests.serve.conftest import ADMIN_TOKEN, PROMPT, running_server

API_KEY = "test-api-key"
ADMIN_METHODS = ("list", "unload", "load", "upload")
HTTP_ADMIN = ("http_list", "http_load", "http_unload")

# Run inside the namespace: every admin call and one inference call, over gRPC and HTTP; prints
# {call: [status code or name, message]} as JSON.
NS_CLIENT = r'''
import http.client, json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from slmops.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

host, grpc_port, http_port, token, upload_file = sys.argv[1:6]
metadata = [("authorization", f"Bearer {token}")] if token else []
out = {}
channel = grpc.insecure_channel(f"{host}:{grpc_port}")
adapters = adapters_pb2_grpc.AdaptersStub(channel)


def rpc(name, call):
    try:
        call()
        out[name] = ["OK", ""]
    except grpc.RpcError as exc:
        out[name] = [exc.code().name, exc.details()]


data = open(upload_file, "rb").read()
rpc("list", lambda: adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=metadata, timeout=30))
rpc("unload", lambda: adapters.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="tone"), metadata=metadata, timeout=30))
rpc("load", lambda: adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="tone", path="tone.onnx_adapter"),
                                         metadata=metadata, timeout=30))
rpc("upload", lambda: adapters.UploadAdapter(iter([adapters_pb2.UploadAdapterChunk(name="ns-upload", size=len(data),
                                                                                     data=data)]),
                                             metadata=metadata, timeout=30))
rpc("generate", lambda: generation_pb2_grpc.GenerationStub(channel).Generate(
    generation_pb2.GenerateRequest(prompt="Hello", max_new_tokens=2), timeout=60))
rpc("health", lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10))


def call_http(name, method, path, body=None):
    conn = http.client.HTTPConnection(host, int(http_port), timeout=60)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    out[name] = [response.status, response.read().decode()]


call_http("http_list", "GET", "/v1/adapters")
call_http("http_load", "POST", "/v1/adapters", {"name": "ns-http", "path": "extract.onnx_adapter"})
call_http("http_unload", "DELETE", "/v1/adapters/ns-http")
call_http("http_completion", "POST", "/v1/completions", {"model": "", "prompt": "Hello", "max_tokens": 2})
call_http("http_health", "GET", "/health")
print(json.dumps(out))
'''


class Netns:
    """A network namespace joined to this one by a veth pair: ``host_ip`` here, ``peer_ip`` there."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.name = f"slmops-sec-{tag}"
        self.host_if, self.peer_if = f"slmh{tag}", f"slmp{tag}"
        octet = os.getpid() % 200 + 20
        self.host_ip, self.peer_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"

    def setup(self) -> None:
        for command in (["ip", "netns", "add", self.name],
                        ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if],
                        ["ip", "link", "set", self.peer_if, "netns", self.name],
                        ["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if],
                        ["ip", "link", "set", self.host_if, "up"],
                        ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.peer_ip}/24", "dev", self.peer_if],
                        ["ip", "netns", "exec", self.name, "ip", "link", "set", self.peer_if, "up"],
                        ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"]):
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)

    def cleanup(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)  # takes its veth end along
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)

    def call_server(self, srv: Any, token: str, upload_file: Path) -> dict[str, list[Any]]:
        """Run NS_CLIENT in the namespace against ``srv`` (reached at the host side's veth address)."""
        result = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", NS_CLIENT, self.host_ip,
                                 str(srv.port), str(srv.http_port), token, str(upload_file)],
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create a network namespace (the non-loopback test host)")
    ns = Netns()
    try:
        ns.setup()
    except subprocess.CalledProcessError as exc:
        ns.cleanup()
        pytest.skip(f"`ip netns` is not permitted here ({' '.join(exc.cmd)}: {exc.stderr.strip()}); the "
                    "non-loopback peer cannot be created")
    try:
        yield ns
    finally:
        ns.cleanup()
    assert ns.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def http_request(host: str, port: int, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text
    finally:
        conn.close()


def requests_total(srv: Any, method: str, code: str) -> float:
    value = srv.metrics.registry.get_sample_value("slmops_requests_total", {"method": method, "code": code})
    return float(value or 0.0)


def test_without_a_token_admin_calls_from_another_host_are_refused_and_loopback_is_served(
        tiny_bundle: Path, adapter_files: dict[str, Path], netns: Netns) -> None:
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, host="0.0.0.0", http_port=0, metrics_port=None, admin_token=None,
                        adapter_dir=str(adapter_files["tone"].parent)) as srv:
        out = netns.call_server(srv, "", adapter_files["extract"])
        for name in ADMIN_METHODS:
            code, message = out[name]
            assert code == "PERMISSION_DENIED", (name, out[name])
            assert "--admin-token" in message and "SLMOPS_ADMIN_TOKEN" in message and netns.peer_ip in message
        for name in HTTP_ADMIN:
            status, text = out[name]
            body = json.loads(text)
            assert status == 403 and body["error"]["type"] == "permission_error", (name, out[name])
            assert "--admin-token" in body["error"]["message"]
        # inference and health stay open to the network
        assert out["generate"] == ["OK", ""] and out["health"] == ["OK", ""]
        assert out["http_completion"][0] == 200 and out["http_health"][0] == 200
        # nothing was unloaded, uploaded or loaded by the refused calls
        assert sorted(srv.engine.registry.names()) == ["extract", "tone"]
        assert requests_total(srv, "UnloadAdapter", "PERMISSION_DENIED") == 1
        assert requests_total(srv, "http GET /v1/adapters", "PERMISSION_DENIED") == 1

        # the same calls from loopback, without a token, are served
        with SlmopsClient(srv.address, token="", timeout=60) as local:
            assert {"tone", "extract"} <= {a.name for a in local.list_adapters()}
            assert local.unload_adapter("tone").name == "tone"
            assert local.load_adapter("tone", path="tone.onnx_adapter").adapter.name == "tone"
            assert local.upload_adapter("local-upload", adapter_files["extract"]).adapter.source == "upload"
        status, body = http_request("127.0.0.1", srv.http_port, "DELETE", "/v1/adapters/local-upload")
        assert status == 200 and body["name"] == "local-upload", body
        assert sorted(srv.engine.registry.names()) == ["extract", "tone"]


def test_with_a_token_another_host_needs_it(tiny_bundle: Path, adapter_files: dict[str, Path], netns: Netns) -> None:
    with running_server(tiny_bundle, host="0.0.0.0", http_port=0, metrics_port=None,
                        adapter_dir=str(adapter_files["tone"].parent)) as srv:
        for token in ("", "wrong-token"):
            out = netns.call_server(srv, token, adapter_files["extract"])
            for name in ADMIN_METHODS:
                assert out[name][0] == "UNAUTHENTICATED" and "--admin-token" in out[name][1], (token, name, out[name])
            for name in HTTP_ADMIN:
                assert out[name][0] == 401, (token, name, out[name])
            assert sorted(srv.engine.registry.names()) == ["extract", "tone"]
        out = netns.call_server(srv, ADMIN_TOKEN, adapter_files["extract"])
        for name in (*ADMIN_METHODS, "generate", "health"):
            assert out[name] == ["OK", ""], (name, out[name])
        for name in (*HTTP_ADMIN, "http_completion"):
            assert out[name][0] == 200, (name, out[name])
        assert sorted(srv.engine.registry.names()) == ["extract", "ns-upload", "tone"]
        # a token also binds loopback: no token from 127.0.0.1 is UNAUTHENTICATED too
        status, body = http_request("127.0.0.1", srv.http_port, "GET", "/v1/adapters")
        assert status == 401 and body["error"]["type"] == "authentication_error"


def test_api_key_guards_inference_and_leaves_health_open(tiny_bundle: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, http_port=0, metrics_port=None, api_key=API_KEY, max_batch=1) as srv:
        base = f"http://127.0.0.1:{srv.http_port}/v1"
        for wrong in ("unused", ADMIN_TOKEN + "x"):
            client = openai.OpenAI(base_url=base, api_key=wrong, max_retries=0, timeout=60)
            with pytest.raises(openai.AuthenticationError) as exc:
                client.completions.create(model="", prompt=PROMPT, max_tokens=2)
            assert exc.value.status_code == 401 and "--api-key" in exc.value.body["message"]
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
            with pytest.raises(openai.AuthenticationError):  # also for a body that does not validate
                client.chat.completions.create(model="", messages=[{"content": "no role"}], max_tokens=2)  # type: ignore[list-item, typeddict-item]
        good = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=60)
        assert good.completions.create(model="", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        assert {m.id for m in good.models.list()} >= {"tone", "extract"}
        # the admin token is accepted for inference too
        admin = openai.OpenAI(base_url=base, api_key=ADMIN_TOKEN, max_retries=0, timeout=60)
        assert admin.chat.completions.create(model="tone", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2).choices[0].message.content is not None
        for path in ("/health", "/readyz", "/livez"):
            assert http_request("127.0.0.1", srv.http_port, "GET", path)[0] == 200, path
        assert requests_total(srv, "http /v1/completions", "UNAUTHENTICATED") == 2

        with SlmopsClient(srv.address, token=ADMIN_TOKEN, api_key="", timeout=60) as keyless:
            with pytest.raises(grpc.RpcError) as rpc_exc:
                keyless.generate(PROMPT, max_new_tokens=2)
            assert rpc_exc.value.code() == grpc.StatusCode.UNAUTHENTICATED and "--api-key" in rpc_exc.value.details()
            with pytest.raises(grpc.RpcError) as rpc_exc:
                list(keyless.generate_stream(PROMPT, max_new_tokens=2))
            assert rpc_exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert keyless.health() == "SERVING" and keyless.health("slmops.v1.Generation") == "SERVING"
            stub = reflection_pb2_grpc.ServerReflectionStub(keyless.channel)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for reply in replies for s in reply.list_services_response.service}
            assert "slmops.v1.Generation" in names
            assert {a.name for a in keyless.list_adapters()} >= {"tone"}  # admin calls use the admin token
        assert requests_total(srv, "Generate", "UNAUTHENTICATED") == 1
        with SlmopsClient(srv.address, api_key=API_KEY, timeout=60) as keyed:
            assert keyed.generate(PROMPT, max_new_tokens=2).usage.completion_tokens == 2
            assert "".join(c.text for c in keyed.generate_stream(PROMPT, max_new_tokens=3)) is not None


def test_upload_limit_defaults_to_a_few_times_the_largest_bundled_adapter(tiny_bundle: Path) -> None:
    from slmops_serve.config import UPLOAD_FACTOR, UPLOAD_FLOOR

    from slmops.v1 import adapters_pb2

    largest = max(p.stat().st_size for p in (tiny_bundle / "adapters").glob("*.onnx_adapter"))
    with running_server(tiny_bundle, metrics_port=None, max_upload_bytes=None, max_batch=1) as srv:
        limit = srv.config.upload_limit()
        assert limit == max(UPLOAD_FLOOR, UPLOAD_FACTOR * largest) and limit < 256 << 20
        assert srv.engine.registry.max_upload_bytes == limit
        from slmops_serve.client import SlmopsClient

        with SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client:
            chunk = adapters_pb2.UploadAdapterChunk(name="too-big", size=limit + 1, data=b"x")
            with pytest.raises(grpc.RpcError) as exc:
                client.adapters.UploadAdapter(iter([chunk]), metadata=client._admin_metadata(), timeout=30)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"--max-upload-bytes {limit}" in exc.value.details()
    # a bundle with a large adapter gets UPLOAD_FACTOR times it
    from slmops_serve.config import ServeConfig

    config = ServeConfig(bundle_dir=str(tiny_bundle))
    assert config.upload_limit() == max(UPLOAD_FLOOR, UPLOAD_FACTOR * largest)
    assert ServeConfig(bundle_dir=str(tiny_bundle), max_upload_bytes=1234).upload_limit() == 1234


def test_peer_addresses_and_bearer_parsing() -> None:
    from slmops_serve import auth

    for peer in ("ipv4:127.0.0.1:5000", "ipv4:127.8.9.10:1", "ipv6:[::1]:5000", "ipv6:[::ffff:127.0.0.1]:80",
                 "unix:/tmp/s.sock"):
        assert auth.is_loopback_peer(peer), peer
    for peer in ("ipv4:10.0.0.2:5000", "ipv6:[fe80::1%eth0]:5000", "ipv6:[::ffff:10.0.0.1]:80", "ipv4:0.0.0.0:1",
                 "garbage", ""):
        assert not auth.is_loopback_peer(peer), peer
    assert auth.bearer_matches("Bearer s3cret", "s3cret") and auth.bearer_matches("bearer  s3cret ", "s3cret")
    assert not auth.bearer_matches("Bearer s3cre", "s3cret") and not auth.bearer_matches("s3cret", "s3cret")
    assert not auth.bearer_matches(None, "s3cret") and not auth.bearer_matches("Basic s3cret", "s3cret")


def test_api_key_option_and_env(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slmops_serve.config import serve_config

    from slmops.errors import SlmopsUsageError

    monkeypatch.setenv("SLMOPS_API_KEY", "from-env")
    assert serve_config({"bundle_dir": str(tiny_bundle)}).api_key == "from-env"
    assert serve_config({"bundle_dir": str(tiny_bundle), "api_key": "flag"}).api_key == "flag"
    monkeypatch.delenv("SLMOPS_API_KEY")
    with pytest.raises(SlmopsUsageError) as exc:
        serve_config({"bundle_dir": str(tiny_bundle), "api_key": " "})
    assert "--api-key" in str(exc.value)
