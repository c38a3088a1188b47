"""Structured output over gRPC and the CLI: every token is constrained by llguidance, so the text
matches the regex / parses as the JSON schema even on a tiny random model; bad constraints are
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import run_cli
from tests.serve.conftest import PROMPT

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "guests": {"type": "integer", "minimum": 1, "maximum": 20}},
          "required": ["city", "guests"], "additionalProperties": False}


def test_regex_output_matches_on_every_adapter(client: Any) -> None:
    pattern = r"(yes|no), [0-9]{2,3}!"
    for adapter in ("", "tone", "extract"):
        response = client.generate(PROMPT, adapter=adapter, max_new_tokens=24, guidance=("regex", pattern))
        assert re.fullmatch(pattern, response.text), (adapter, response.text)
        assert response.finish_reason == 1  # EOS: the grammar ended the output


def test_json_schema_output_is_valid(client: Any) -> None:
    for adapter in ("", "extract"):
        response = client.generate(PROMPT, adapter=adapter, max_new_tokens=60, guidance=("json_schema", json.dumps(SCHEMA)))
        value = json.loads(response.text)
        assert set(value) == {"city", "guests"} and isinstance(value["guests"], int) and 1 <= value["guests"] <= 20
    unconstrained = client.generate(PROMPT, adapter="extract", max_new_tokens=20).text
    with pytest.raises(ValueError):
        json.loads(unconstrained)  # the tiny model does not write JSON by itself: the constraint did


def test_constrained_rows_batch_with_free_ones(client: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        free = pool.submit(client.generate, PROMPT, adapter="tone", max_new_tokens=16)
        guided = pool.submit(client.generate, PROMPT, adapter="extract", max_new_tokens=16, guidance=("regex", "[a-c]{3}"))
        assert re.fullmatch("[a-c]{3}", guided.result(30).text)
        assert free.result(30).text == client.generate(PROMPT, adapter="tone", max_new_tokens=16).text


@pytest.mark.parametrize("kind,text,field", [
    ("json_schema", "{not json", "guidance.text"),
    ("json_schema", "[1, 2]", "guidance.text"),
    ("regex", "([", "guidance.text"),
    ("lark_grammar", "start: undefined_rule", "guidance.text"),
    ("regex", "", "guidance.text"),
    ("xml_schema", "<a/>", "guidance.kind"),
])
def test_bad_constraint_is_invalid_argument(client: Any, kind: str, text: str, field: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        client.generate(PROMPT, max_new_tokens=4, guidance=(kind, text))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(field), exc.value.details()


def test_cli_json_schema_and_regex(server: Any, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    out = run_cli(["generate", PROMPT, "--server", server.address, "--adapter", "extract", "--max-new-tokens", "60",
                   "--json-schema", str(schema)])
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"city", "guests"}
    out = run_cli(["generate", PROMPT, "--server", server.address, "--regex", "[0-9]{4}"])
    assert out.returncode == 0 and re.fullmatch("[0-9]{4}", out.stdout.strip()), out.stdout
    out = run_cli(["generate", PROMPT, "--server", server.address, "--regex", "[0-9]", "--json-object"])
    assert out.returncode == 2 and "give one structured-output constraint" in out.stderr


def test_sampled_structured_output_still_matches(client: Any) -> None:
    """Sampling (temperature, top-k/top-p) draws only among the tokens the grammar allows."""
    for seed in (1, 2, 3):
        response = client.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.9, seed=seed,
                                   guidance=("regex", "[xyz]{2,5}"))
        assert re.fullmatch("[xyz]{2,5}", response.text), response.text
