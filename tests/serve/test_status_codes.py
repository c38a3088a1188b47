"""Status codes that say what happened, on a real server: requests cancelled by a drain that ran out
of time end UNAVAILABLE on gRPC (unary and stream) like HTTP's 503; an exception that is no
ServeError reaches gRPC as INTERNAL with a short message and HTTP as a 500 in OpenAI's shape, and
both are counted as errors; a grammar that allows only end-of-sequence while min_new_tokens
suppresses it is INVALID_ARGUMENT / 400 naming min_new_tokens."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from tests.serve.conftest import ADMIN_TOKEN, PROMPT, running_server


def requests_total(srv: Any, method: str, code: str) -> float:
    value = srv.metrics.registry.get_sample_value("slmops_requests_total", {"method": method, "code": code})
    return float(value or 0.0)


def test_a_drain_that_runs_out_of_time_ends_grpc_calls_unavailable(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, http_port=0, metrics_port=None, max_batch=3) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        srv.engine.token_hook = lambda gen, produced: time.sleep(0.05)  # slow steps: 400 tokens take ~20 s
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0, timeout=60)
        unary = pool.submit(client.generate, PROMPT, max_new_tokens=400, min_new_tokens=400)
        stream = client.generate_stream(PROMPT, max_new_tokens=400, min_new_tokens=400)
        first = next(iter(stream))
        via_http = pool.submit(oai.completions.create, model="", prompt=PROMPT, max_tokens=400,
                               extra_body={"min_tokens": 400})
        deadline = time.monotonic() + 10
        while srv.engine.running < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        assert srv.stop(grace=0.5) is False  # the drain runs out of time and cancels the three
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as exc:
            unary.result(10)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            list(stream)
        assert first.text is not None
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.value.details()
        with pytest.raises(openai.APIStatusError) as http_exc:
            via_http.result(10)
        assert http_exc.value.status_code == 503
        assert requests_total(srv, "Generate", "UNAVAILABLE") == 1
        assert requests_total(srv, "GenerateStream", "UNAVAILABLE") == 1
        assert requests_total(srv, "Generate", "OK") == requests_total(srv, "GenerateStream", "OK") == 0


def test_an_unexpected_exception_is_internal_500_and_counted(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, http_port=0, metrics_port=0, max_batch=1) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client:
        engine = srv.engine
        render = engine.render_prompt

        def broken(request: Any) -> str:  # a bug in the tokenizer path: not a ServeError
            raise ValueError("a bug the server did not expect\nwith a second line")

        engine.render_prompt = broken
        try:
            for call in (lambda: client.generate(PROMPT, max_new_tokens=2),
                         lambda: list(client.generate_stream(PROMPT, max_new_tokens=2))):
                with pytest.raises(grpc.RpcError) as exc:
                    call()
                assert exc.value.code() == grpc.StatusCode.INTERNAL
                details = exc.value.details()
                assert details.startswith("internal error (ValueError: a bug") and "second line" not in details
            oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0, timeout=60)
            for create in (lambda: oai.completions.create(model="", prompt=PROMPT, max_tokens=2),
                           lambda: oai.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}],
                                                               max_tokens=2, stream=True)):
                with pytest.raises(openai.InternalServerError) as http_exc:
                    create()
                assert http_exc.value.status_code == 500
                assert http_exc.value.body["type"] == "server_error" and "ValueError" in http_exc.value.body["message"]
        finally:
            engine.render_prompt = render
        for method in ("Generate", "GenerateStream", "http /v1/completions", "http /v1/chat/completions"):
            assert requests_total(srv, method, "INTERNAL") == 1, method
            assert requests_total(srv, method, "OK") == 0, method
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert 'slmops_requests_total{code="INTERNAL",method="Generate"} 1.0' in scraped
        assert client.generate(PROMPT, max_new_tokens=2).usage.completion_tokens == 2


def test_a_grammar_that_allows_only_eos_before_min_new_tokens_is_a_clear_error(tiny_bundle: Path) -> None:
    from slmops_serve.client import SlmopsClient

    with running_server(tiny_bundle, http_port=0, metrics_port=None, max_batch=1) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as exc:
            client.generate(PROMPT, max_new_tokens=10, min_new_tokens=5, guidance=("regex", "a"))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details().startswith("min_new_tokens: 5 cannot be met"), exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            list(client.generate_stream(PROMPT, max_new_tokens=10, min_new_tokens=5, guidance=("regex", "a")))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as http_exc:
            oai.completions.create(model="", prompt=PROMPT, max_tokens=10, extra_body={"min_tokens": 5, "guided_regex": "a"})
        assert http_exc.value.body["param"] == "min_tokens" and "cannot be met" in http_exc.value.body["message"]
        # the same grammar without min_new_tokens ends normally with the one allowed character
        response = client.generate(PROMPT, max_new_tokens=10, guidance=("regex", "a"))
        assert response.text == "a"
        assert json.dumps(response.text)  # and the server goes on
        assert srv.engine.admitted == 0
