"""The OpenAI-compatible HTTP API on a real port, beside gRPC on the same engine: the official
``openai`` client (models, chat and completions, streamed or not, with and without adapters: the same
greedy text as gRPC), curl for the SSE framing, OpenAI-shaped errors with their statuses, health that
agrees with gRPC, client disconnects, HTTP and gRPC at once, a hot swap under HTTP streams, and
structured output (response_format, guided_regex, guided_grammar)."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import EXAMPLES
from tests.serve.conftest import ADMIN_TOKEN, PROMPT, Gate, running_server

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "I lost my keys again"}]
EXTRACT_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                   "date": {"type": "string", "maxLength": 16},
                                                   "guests": {"type": "integer", "minimum": 1, "maximum": 20}},
                  "required": ["city", "date", "guests"], "additionalProperties": False}


@pytest.fixture(scope="module")
def hserver(tiny_bundle: Path, adapter_files: dict[str, Path]) -> Iterator[Any]:
    """A server with gRPC and HTTP on free ports (batches of 2, queue 8, admin token)."""
    with running_server(tiny_bundle, http_port=0, adapter_dir=str(adapter_files["tone"].parent)) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(hserver: Any) -> Any:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{hserver.http_port}/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def grpc_client(hserver: Any) -> Iterator[Any]:
    from slmops_serve.client import SlmopsClient

    with SlmopsClient(hserver.address, token=ADMIN_TOKEN, timeout=60) as c:
        yield c


def base_name(srv: Any) -> str:
    return str(srv.engine.manifest.base_model.name)


def request(srv: Any, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload
    finally:
        conn.close()


def sse_events(srv: Any, path: str, body: dict[str, Any]) -> tuple[dict[str, str], list[Any]]:
    """POST a streaming request; the response headers and every event's data (parsed, or '[DONE]')."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers={"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        events = [line[len("data: "):] for line in response.read().decode().split("\n\n") if line]
        return headers, [e if e == "[DONE]" else json.loads(e) for e in events]
    finally:
        conn.close()


def metric(srv: Any, method: str, code: str) -> float:
    value = srv.metrics.registry.get_sample_value("slmops_requests_total", {"method": method, "code": code})
    return float(value or 0.0)


# ---- models ---------------------------------------------------------------------------------------
def test_models_list_the_base_and_every_adapter(hserver: Any, oai: Any) -> None:
    models = {m.id: m for m in oai.models.list()}
    base = base_name(hserver)
    assert set(models) == {base, "tone", "extract"}
    assert models["tone"].owned_by == "slmops"
    cards = {m["id"]: m for m in request(hserver, "GET", "/v1/models")[2]["data"]}
    assert cards[base]["parent"] is None and cards["tone"]["parent"] == base
    assert cards["tone"]["sha256"] == hserver.engine.registry.get("tone").sha256
    assert oai.models.retrieve("extract").id == "extract"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


# ---- generation: the same greedy text as gRPC ------------------------------------------------------
@pytest.mark.parametrize("adapter", ["", "tone", "extract"])
def test_chat_equals_grpc_streamed_and_not(hserver: Any, oai: Any, grpc_client: Any, adapter: str) -> None:
    want = grpc_client.generate(None, messages=MESSAGES, adapter=adapter, max_new_tokens=20)
    model = adapter or base_name(hserver)
    got = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == want.usage.completion_tokens
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert got.choices[0].finish_reason == {1: "stop", 2: "length", 3: "stop"}[want.finish_reason]
    assert got.model == model and got.object == "chat.completion"
    stream = oai.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=20, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == got.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("adapter", ["", "tone"])
def test_completions_equal_grpc(hserver: Any, oai: Any, grpc_client: Any, adapter: str) -> None:
    want = grpc_client.generate(PROMPT, adapter=adapter, max_new_tokens=16)
    got = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=16, temperature=0)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == want.usage.completion_tokens
    streamed = list(oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want.text
    assert streamed[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_base_name_and_empty_model_both_select_the_base(hserver: Any, oai: Any) -> None:
    texts = {oai.completions.create(model=m, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
             for m in ("", base_name(hserver))}
    assert len(texts) == 1
    assert oai.completions.create(model="extract", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text not in texts


def test_stop_seed_and_length_map_to_openai_fields(hserver: Any, oai: Any) -> None:
    full = oai.completions.create(model="", prompt=PROMPT, max_tokens=24, temperature=0).choices[0]
    assert full.finish_reason in ("length", "stop")
    cut = full.text[3:6]
    if cut:
        stopped = oai.completions.create(model="", prompt=PROMPT, max_tokens=24, temperature=0, stop=[cut]).choices[0]
        assert stopped.finish_reason == "stop" and stopped.text == full.text[:full.text.index(cut)]
    sampled = [oai.completions.create(model="tone", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    short = oai.completions.create(model="", prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"min_tokens": 2})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_request_id_and_adapter_sha256_headers(hserver: Any) -> None:
    status, headers, body = request(hserver, "POST", "/v1/completions", {"model": "tone", "prompt": PROMPT, "max_tokens": 3},
                                    headers={"x-request-id": "trace-42"})
    assert status == 200 and headers["x-request-id"] == "trace-42" and body["id"] == "cmpl-trace-42"
    assert headers["x-slmops-adapter-sha256"] == hserver.engine.registry.get("tone").sha256
    headers, events = sse_events(hserver, "/v1/completions", {"model": "", "prompt": PROMPT, "max_tokens": 3})
    assert headers["x-slmops-adapter-sha256"] == "" and len(headers["x-request-id"]) == 16
    assert {e["id"] for e in events if e != "[DONE]"} == {"cmpl-" + headers["x-request-id"]}


def test_sse_framing_with_curl(hserver: Any) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "tone", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True})
    out = subprocess.run([curl, "-sS", "-N", "-i", f"http://127.0.0.1:{hserver.http_port}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    head, _, payload = out.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    assert payload.endswith("data: [DONE]\n\n")
    events = payload.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    parsed = [json.loads(e[6:]) for e in events[:-1]]
    assert {p["object"] for p in parsed} == {"chat.completion.chunk"} and len({p["id"] for p in parsed}) == 1
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"guided_regex": "a", "guided_grammar": "start: \"a\""}, "guided_grammar"),
])
def test_bad_fields_are_400_naming_the_param(oai: Any, extra: dict[str, Any], param: str) -> None:
    fields: dict[str, Any] = {"model": "", "messages": MESSAGES, "max_tokens": 4, **extra}
    known = {k: fields.pop(k) for k in ("model", "messages", "max_tokens", "n", "tools", "logprobs", "temperature",
                                        "top_p", "stop", "response_format") if k in fields}
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(**known, extra_body=fields or None)
    assert exc.value.status_code == 400
    error = exc.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(f"{param}: "), error


def test_wrong_types_and_bad_json_are_400(hserver: Any) -> None:
    status, _, body = request(hserver, "POST", "/v1/chat/completions", {"model": "", "messages": MESSAGES, "max_tokens": "many"})
    assert status == 400 and body["error"]["param"] == "max_tokens", body
    status, _, body = request(hserver, "POST", "/v1/chat/completions",
                              {"model": "", "messages": [{"role": "user", "content": 5}]})
    assert status == 400 and body["error"]["param"] == "messages[0].content", body
    status, _, body = request(hserver, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    status, _, body = request(hserver, "POST", "/v1/completions", {"model": ""})
    assert status == 400 and body["error"]["param"] == "prompt" and "required" in body["error"]["message"], body


def test_unknown_model_is_404_model_not_found(oai: Any) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        oai.chat.completions.create(model="no-such-adapter", messages=MESSAGES, max_tokens=4)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    assert "tone" in exc.value.body["message"]


def test_body_over_the_limit_is_413(tiny_bundle: Path) -> None:
    with running_server(tiny_bundle, http_port=0, http_max_body_bytes=2048, metrics_port=None) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as exc:
            client.completions.create(model="", prompt="word " * 1000, max_tokens=4)
        assert exc.value.status_code == 413 and "--http-max-body-bytes" in exc.value.body["message"]
        assert client.completions.create(model="", prompt=PROMPT, max_tokens=4).choices[0].text is not None


def test_queue_full_is_429_and_admin_routes_need_the_token(tiny_bundle: Path) -> None:
    with running_server(tiny_bundle, http_port=0, max_batch=1, max_queue=0, metrics_port=None) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0)
        with Gate(srv.engine) as gate, ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.completions.create, model="", prompt=PROMPT, max_tokens=8)
            gate.wait_for(1)
            with pytest.raises(openai.RateLimitError) as exc:
                client.completions.create(model="", prompt=PROMPT, max_tokens=8)
            assert exc.value.status_code == 429 and "queue is full" in exc.value.body["message"]
            gate.open()
            assert held.result(30).choices[0].finish_reason in ("stop", "length")
        for method, path, body in (("GET", "/v1/adapters", None), ("POST", "/v1/adapters", {"name": "t", "path": "x"}),
                                   ("DELETE", "/v1/adapters/tone", None)):
            status, _, payload = request(srv, method, path, body)
            assert status == 401 and payload["error"]["type"] == "authentication_error", (path, payload)
            status, _, _ = request(srv, method, path, body, headers={"authorization": "Bearer wrong"})
            assert status == 401
        assert metric(srv, "http GET /v1/adapters", "UNAUTHENTICATED") == 2
        with pytest.raises(openai.AuthenticationError):  # the openai client's api_key is not the admin token
            client.get("/adapters", cast_to=object)


def test_admin_routes_load_replace_and_unload(hserver: Any, oai: Any) -> None:
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    status, _, body = request(hserver, "POST", "/v1/adapters", {"name": "swap", "path": "tone.onnx_adapter"}, auth)
    assert status == 200 and not body["replaced"], body
    tone_sha = body["adapter"]["sha256"]
    assert "swap" in {m.id for m in oai.models.list()}
    status, _, body = request(hserver, "POST", "/v1/adapters", {"name": "swap", "path": "extract.onnx_adapter"}, auth)
    assert status == 200 and body["replaced"] and body["previous_sha256"] == tone_sha
    status, _, body = request(hserver, "POST", "/v1/adapters", {"name": "bad", "path": "garbage.onnx_adapter"}, auth)
    assert status == 400 and body["error"]["param"] == "path", body
    status, _, body = request(hserver, "DELETE", "/v1/adapters/swap", headers=auth)
    assert status == 200 and body["name"] == "swap"
    status, _, body = request(hserver, "DELETE", "/v1/adapters/swap", headers=auth)
    assert status == 404
    status, _, body = request(hserver, "GET", "/v1/adapters", headers=auth)
    assert {a["name"] for a in body["data"]} == {"tone", "extract"}


def test_health_agrees_with_grpc_through_load_and_drain(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient
    from slmops_serve.server import SlmopsServer

    from tests.serve.conftest import make_config

    srv = SlmopsServer(make_config(tiny_bundle, http_port=0, metrics_port=None, max_batch=1))
    srv.start()
    try:
        with SlmopsClient(srv.address, timeout=10) as client:
            assert client.health() == "NOT_SERVING"
            assert request(srv, "GET", "/health")[0] == 503 and request(srv, "GET", "/readyz")[0] == 503
            assert request(srv, "GET", "/livez")[0] == 200
            status, _, body = request(srv, "POST", "/v1/completions", {"model": "", "prompt": PROMPT})
            assert status == 503 and body["error"]["type"] == "service_unavailable", body
            oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.InternalServerError) as exc:
                oai.chat.completions.create(model="", messages=MESSAGES, max_tokens=2)
            assert exc.value.status_code == 503 and "not ready" in exc.value.body["message"]
            srv.load()
            assert client.health() == "SERVING"
            status, _, body = request(srv, "GET", "/health")
            assert (status, body) == (200, {"status": "SERVING"})
            # a stream in flight when the drain starts finishes; health turns 503 meanwhile
            with Gate(srv.engine) as gate, ThreadPoolExecutor(2) as pool:
                stream = pool.submit(sse_events, srv, "/v1/completions", {"model": "", "prompt": PROMPT, "max_tokens": 8})
                gate.wait_for(1)
                stopping = pool.submit(srv.stop, 30)
                deadline = time.monotonic() + 10
                while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert request(srv, "GET", "/health")[0] == 503
                status, _, body = request(srv, "POST", "/v1/completions", {"model": "", "prompt": PROMPT})
                assert status == 503
                gate.open()
                _, events = stream.result(30)
                assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
                assert stopping.result(30) is True
    finally:
        srv.stop(grace=0)


def test_client_disconnect_cancels_the_generation(hserver: Any) -> None:
    engine = hserver.engine
    before = metric(hserver, "http /v1/completions", "CANCELLED")
    conn = http.client.HTTPConnection("127.0.0.1", hserver.http_port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "", "prompt": PROMPT, "max_tokens": 500,
                                                             "min_tokens": 500, "stream": True}),
                 headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(6) == b"data: "
    conn.sock.shutdown(2)  # type: ignore[union-attr]
    conn.close()
    deadline = time.monotonic() + 10
    while (engine.admitted or metric(hserver, "http /v1/completions", "CANCELLED") == before) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.admitted == 0
    assert metric(hserver, "http /v1/completions", "CANCELLED") == before + 1


# ---- concurrency ------------------------------------------------------------------------------------
def test_http_and_grpc_at_once_give_the_texts_of_requests_alone(hserver: Any, oai: Any, grpc_client: Any) -> None:
    adapters = ["", "tone", "extract"]
    alone = {a: grpc_client.generate(PROMPT, adapter=a, max_new_tokens=20).text for a in adapters}

    def over_http(i: int) -> tuple[str, str]:
        adapter = adapters[i % 3]
        chunks = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=20, temperature=0, stream=True)
        return adapter, "".join(c.choices[0].text for c in chunks)

    def over_grpc(i: int) -> tuple[str, str]:
        adapter = adapters[(i + 1) % 3]
        return adapter, "".join(c.text for c in grpc_client.generate_stream(PROMPT, adapter=adapter, max_new_tokens=20))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(over_http if i % 2 else over_grpc, i) for i in range(16)]
        results = [f.result(120) for f in futures]
    assert all(text == alone[adapter] for adapter, text in results), results
    assert metric(hserver, "http /v1/completions", "OK") >= 8


def test_hot_swap_during_http_streams_loses_nothing(hserver: Any, oai: Any, grpc_client: Any) -> None:
    """6 HTTP streams on `hot` while an operator (over HTTP) replaces it tone <-> extract: every stream
    finishes with [DONE] and the text of the version its x-slmops-adapter-sha256 header names."""
    registry = hserver.engine.registry
    expected = {registry.get(a).sha256: grpc_client.generate(PROMPT, adapter=a, max_new_tokens=16).text
                for a in ("tone", "extract")}
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert request(hserver, "POST", "/v1/adapters", {"name": "hot", "path": "tone.onnx_adapter"}, auth)[0] == 200
    stop = threading.Event()
    swaps = [0]

    def operator() -> None:
        files = ["extract.onnx_adapter", "tone.onnx_adapter"]
        while not stop.is_set():
            status, _, body = request(hserver, "POST", "/v1/adapters", {"name": "hot", "path": files[swaps[0] % 2]}, auth)
            assert status == 200, body
            swaps[0] += 1

    def streamer(_: int) -> list[tuple[str, str, Any]]:
        out = []
        for _ in range(4):
            headers, events = sse_events(hserver, "/v1/completions", {"model": "hot", "prompt": PROMPT, "max_tokens": 16,
                                                                      "temperature": 0})
            text = "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e.get("choices"))
            out.append((headers["x-slmops-adapter-sha256"], text, events[-1]))
        return out

    admin = threading.Thread(target=operator)
    admin.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            results = [r for f in [pool.submit(streamer, i) for i in range(6)] for r in f.result(180)]
    finally:
        stop.set()
        admin.join(30)
        request(hserver, "DELETE", "/v1/adapters/hot", headers=auth)
    assert len(results) == 24 and swaps[0] >= 2
    assert all(done == "[DONE]" for _, _, done in results)
    assert all(text == expected[sha] for sha, text, _ in results), [(s[:8], t) for s, t, _ in results]
    assert hserver.engine.admitted == 0 and registry.retired_count() == 0


# ---- structured output (llguidance in the engine) ---------------------------------------------------
def _extract_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in (EXAMPLES / "extract" / "eval.jsonl").read_text().splitlines()[:10]]


def _valid(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {"city", "date", "guests"} and isinstance(value["city"], str)
            and isinstance(value["date"], str) and type(value["guests"]) is int and 1 <= value["guests"] <= 20)


def test_json_schema_output_is_valid_on_every_extract_eval_row(oai: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "booking", "schema": EXTRACT_SCHEMA}}
    for row in _extract_rows():
        got = oai.chat.completions.create(model="extract", messages=[{"role": "user", "content": row["request"]}],
                                          max_tokens=120, temperature=0, response_format=fmt)
        assert _valid(json.loads(got.choices[0].message.content)), got.choices[0].message.content
    streamed = oai.completions.create(model="extract", prompt=_extract_rows()[0]["request"], max_tokens=120,
                                      temperature=0, stream=True, extra_body={"guided_json": EXTRACT_SCHEMA})
    assert _valid(json.loads("".join(c.choices[0].text for c in streamed)))


def test_json_object_regex_and_grammar_constrain_the_text(oai: Any) -> None:
    # any JSON object: unbounded, so the tiny random model may run out of tokens inside it
    for model in ("", "tone", "extract"):
        got = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60, temperature=0,
                                          response_format={"type": "json_object"}).choices[0]
        assert got.message.content.startswith("{"), got.message.content
        if got.finish_reason == "stop":
            assert isinstance(json.loads(got.message.content), dict)
        else:
            assert got.finish_reason == "length"
        free = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60, temperature=0).choices[0]
        assert not free.message.content.startswith("{")
    pattern = r"(yes|no), [0-9]{2,3}!"
    for model in ("", "tone"):
        text = oai.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                      extra_body={"guided_regex": pattern}).choices[0].text
        assert re.fullmatch(pattern, text), text
    grammar = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    text = oai.completions.create(model="extract", prompt=PROMPT, max_tokens=24, temperature=0,
                                  extra_body={"guided_grammar": grammar}).choices[0].text
    assert re.fullmatch(r"The answer is (yes|no)\.", text), text


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(["}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
])
def test_every_bad_constraint_is_400(hserver: Any, extra: dict[str, Any], param: str) -> None:
    status, _, body = request(hserver, "POST", "/v1/chat/completions",
                              {"model": "", "messages": MESSAGES, "max_tokens": 4, **extra})
    assert status == 400, body
    assert body["error"]["param"].startswith(param) and body["error"]["type"] == "invalid_request_error", body
    assert hserver.engine.admitted == 0


# ---- the CLI ----------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_slmops_serve_http_port_serves_both_apis_and_exits_0_on_sigterm(tiny_bundle: Path) -> None:
    import os
    import signal
    import sys
    import urllib.error
    import urllib.request

    port, http_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmops.cli", "serve", str(tiny_bundle), "--host", "127.0.0.1",
                             "--port", str(port), "--http-port", str(http_port), "--no-metrics", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SLMOPS_ADMIN_TOKEN": ""})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "HTTP /health never turned 200"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x", max_retries=0, timeout=60)
        text = client.completions.create(model="tone", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        from slmops_serve.client import SlmopsClient

        with SlmopsClient(f"127.0.0.1:{port}", timeout=60) as grpc_client:
            assert grpc_client.generate(PROMPT, adapter="tone", max_new_tokens=8).text == text
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]
        assert '"http_port": ' + str(http_port) in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_taken_http_port_is_one_line_naming_the_option(tiny_bundle: Path) -> None:
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "slmops.cli", "serve", str(tiny_bundle), "--host", "127.0.0.1",
                              "--port", "0", "--no-metrics", "--http-port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "--http-port" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_tls_serves_https_on_the_http_port(tiny_bundle: Path, tls_cert: tuple[Path, Path]) -> None:
    import httpx2

    cert, key = tls_cert
    with running_server(tiny_bundle, tls_cert=str(cert), tls_key=str(key), http_port=0, metrics_port=None, max_batch=1) as srv:
        client = openai.OpenAI(base_url=f"https://localhost:{srv.http_port}/v1", api_key="x", max_retries=0,
                               http_client=httpx2.Client(verify=str(cert)))
        assert client.completions.create(model="", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
        plain = openai.OpenAI(base_url=f"http://localhost:{srv.http_port}/v1", api_key="x", max_retries=0, timeout=5)
        with pytest.raises(openai.APIConnectionError):
            plain.models.list()


def test_the_http_api_imports_no_training_dependencies(tiny_bundle: Path) -> None:
    """The serve image installs only `.[serve]`: FastAPI/uvicorn must not pull in torch & co."""
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import json, sys, urllib.request
        from slmops_serve.config import ServeConfig
        from slmops_serve.server import SlmopsServer
        server = SlmopsServer(ServeConfig(bundle_dir={str(tiny_bundle)!r}, host="127.0.0.1", port=0, metrics_port=None,
                                          http_port=0, threads=1))
        server.start()
        server.load()
        request = urllib.request.Request(f"http://127.0.0.1:{{server.http_port}}/v1/completions", method="POST",
                                         data=json.dumps({{"model": "tone", "prompt": {PROMPT!r}, "max_tokens": 3}}).encode(),
                                         headers={{"content-type": "application/json"}})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 3
        server.stop(grace=1)
        loaded = sorted(m for m in ("torch", "transformers", "peft", "datasets", "accelerate", "openai") if m in sys.modules)
        print("LOADED", loaded)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout
