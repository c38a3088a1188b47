"""Generation over real gRPC: stream == unary == direct onnxruntime-genai, sampling, stop strings,
chat templates, and every bad request answered with the status code and field it deserves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from slmops.v1 import generation_pb2
from tests.conftest import CHAT_TEMPLATE
from tests.serve.conftest import PROMPT

ADAPTERS = ["", "tone", "extract"]


def _stream(client: Any, prompt: str | None = None, **kwargs: Any) -> tuple[str, list[Any]]:
    chunks = list(client.generate_stream(prompt, **kwargs))
    return "".join(c.text for c in chunks), chunks


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_streaming_and_unary_agree(client: Any, tiny_bundle: Path, adapter: str) -> None:
    unary = client.generate(PROMPT, adapter=adapter, max_new_tokens=24)
    text, chunks = _stream(client, PROMPT, adapter=adapter, max_new_tokens=24)
    assert text == unary.text
    last = chunks[-1]
    assert last.finish_reason == unary.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    assert all(c.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert last.usage == unary.usage and unary.usage.completion_tokens > 0
    assert unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens
    assert last.timings.time_to_first_token_ms > 0 and last.timings.total_ms >= last.timings.time_to_first_token_ms
    assert unary.timings.total_ms > 0
    assert {c.adapter for c in chunks} == {adapter} == {unary.adapter}
    assert {c.adapter_sha256 for c in chunks} == {unary.adapter_sha256}
    if adapter:
        import json

        manifest = json.loads((tiny_bundle / "bundle.json").read_text())
        assert unary.adapter_sha256 == manifest["adapters"][adapter]["sha256"]
    else:
        assert unary.adapter_sha256 == ""


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_outputs_match_direct_onnxruntime_genai(client: Any, reference: Any, tiny_bundle: Path, adapter: str) -> None:
    adapter_file = tiny_bundle / "adapters" / f"{adapter}.onnx_adapter" if adapter else None
    for prompt in (PROMPT, "Extract: a table for two at seven"):
        want_text, want_tokens = reference.generate(prompt, adapter_file, max_new_tokens=20)
        got = client.generate(prompt, adapter=adapter, max_new_tokens=20)
        assert (got.text, got.usage.completion_tokens) == (want_text, want_tokens)


def test_adapters_change_the_output(client: Any) -> None:
    texts = {a: client.generate(PROMPT, adapter=a, max_new_tokens=12).text for a in ADAPTERS}
    assert texts["extract"] != texts[""]


def test_same_seed_same_text(client: Any) -> None:
    kwargs = dict(adapter="extract", max_new_tokens=20, temperature=1.2, top_p=0.95, top_k=50)
    a = client.generate(PROMPT, seed=1234, **kwargs)
    b = client.generate(PROMPT, seed=1234, **kwargs)
    streamed, _ = _stream(client, PROMPT, seed=1234, **kwargs)
    assert a.text == b.text == streamed
    others = {client.generate(PROMPT, seed=s, **kwargs).text for s in (1, 2, 3)}
    assert len(others | {a.text}) > 1, "different seeds should sample different text"


def test_top_k_one_is_greedy(client: Any) -> None:
    greedy = client.generate(PROMPT, adapter="tone", max_new_tokens=16)
    sampled = client.generate(PROMPT, adapter="tone", max_new_tokens=16, temperature=1.0, top_k=1, seed=7)
    assert sampled.text == greedy.text


def test_stop_strings_cut_text_in_unary_and_stream(client: Any) -> None:
    kwargs = dict(max_new_tokens=40, temperature=1.0, seed=99)
    full = client.generate("Hello", **kwargs)
    assert len(full.text) > 10, full.text
    stop = full.text[6:9]
    cut = full.text[: full.text.index(stop)]
    unary = client.generate("Hello", stop=[stop, "never-appears"], **kwargs)
    assert unary.text == cut and unary.finish_reason == generation_pb2.FINISH_REASON_STOP
    text, chunks = _stream(client, "Hello", stop=[stop], **kwargs)
    assert text == cut and chunks[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    assert unary.usage.completion_tokens < full.usage.completion_tokens


def test_chat_messages_use_the_bundle_chat_template(client: Any, reference: Any) -> None:
    import jinja2

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Extract: a table for two"}]
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    chat = client.generate(messages=messages, adapter="extract", max_new_tokens=12)
    plain = client.generate(rendered, adapter="extract", max_new_tokens=12)
    assert (chat.text, chat.usage.prompt_tokens) == (plain.text, plain.usage.prompt_tokens)


def test_max_new_tokens_defaults_to_the_server_default(client: Any, server: Any) -> None:
    response = client.generate(PROMPT)  # base model repeats a token: no EOS within 16 tokens
    assert response.usage.completion_tokens == server.config.default_max_new_tokens
    assert response.finish_reason == generation_pb2.FINISH_REASON_LENGTH


def test_min_new_tokens_suppresses_eos(client: Any, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """End-of-sequence tokens cannot be sampled before min_new_tokens (their logits are masked)."""
    first = client.generate(PROMPT, max_new_tokens=1)
    # The tiny model never emits its EOS: make its first greedy token an end-of-sequence token.
    token = server.engine.tokenizer.encode(first.text)[-1]
    monkeypatch.setattr(server.engine, "eos_ids", server.engine.eos_ids | {int(token)})
    short = client.generate(PROMPT, max_new_tokens=12)
    assert short.finish_reason == generation_pb2.FINISH_REASON_EOS and short.usage.completion_tokens == 1
    fixed = client.generate(PROMPT, max_new_tokens=12, min_new_tokens=12)
    assert fixed.usage.completion_tokens == 12 and fixed.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    chunks = list(client.generate_stream(PROMPT, max_new_tokens=12, min_new_tokens=5))
    assert chunks[-1].usage.completion_tokens >= 5
    # the greedy first token is now an EOS id: masked, so the text starts with the runner-up instead
    assert not "".join(c.text for c in chunks).startswith(first.text)


def test_request_id_is_echoed_or_made(client: Any) -> None:
    assert client.generate(PROMPT, max_new_tokens=2, request_id="req-42").request_id == "req-42"
    assert len(client.generate(PROMPT, max_new_tokens=2).request_id) >= 8


@pytest.mark.parametrize("kwargs,code,field", [
    (dict(prompt=""), "INVALID_ARGUMENT", "prompt"),
    (dict(prompt="   "), "INVALID_ARGUMENT", "prompt"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "hi"}]), "INVALID_ARGUMENT", "prompt"),
    (dict(messages=[{"role": "", "content": "hi"}]), "INVALID_ARGUMENT", "messages[0].role"),
    (dict(prompt="hi", max_new_tokens=-1), "INVALID_ARGUMENT", "max_new_tokens"),
    (dict(prompt="hi", max_new_tokens=1_000_000), "INVALID_ARGUMENT", "max_new_tokens"),
    (dict(prompt="hi", min_new_tokens=-1), "INVALID_ARGUMENT", "min_new_tokens"),
    (dict(prompt="hi", max_new_tokens=8, min_new_tokens=9), "INVALID_ARGUMENT", "min_new_tokens"),
    (dict(prompt="hi", temperature=-0.5), "INVALID_ARGUMENT", "temperature"),
    (dict(prompt="hi", top_p=0.0), "INVALID_ARGUMENT", "top_p"),
    (dict(prompt="hi", top_p=1.5), "INVALID_ARGUMENT", "top_p"),
    (dict(prompt="hi", top_k=-3), "INVALID_ARGUMENT", "top_k"),
    (dict(prompt="hi", stop=["x"] * 17), "INVALID_ARGUMENT", "stop"),
    (dict(prompt="hi " * 600), "INVALID_ARGUMENT", "prompt"),
    (dict(prompt="hi", adapter="no-such-adapter"), "NOT_FOUND", "adapter"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(client: Any, kwargs: dict[str, Any], code: str,
                                                                     field: str, streaming: bool) -> None:
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(grpc.RpcError) as exc:
        if streaming:
            list(client.generate_stream(prompt, **kwargs))
        else:
            client.generate(prompt, **kwargs)
    assert exc.value.code() == getattr(grpc.StatusCode, code)
    assert exc.value.details().startswith(f"{field}: "), exc.value.details()
    assert client.generate(PROMPT, max_new_tokens=2).usage.completion_tokens == 2
