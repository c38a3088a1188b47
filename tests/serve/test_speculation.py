"""Speculative decoding (prompt lookup + grammar-forced tokens): the served text is the same with it
on as with it off, token for token, and equals onnxruntime-genai's greedy output on the fp32 test
bundle, alone and in a mixed-adapter batch; seeded sampling is unchanged too; drafts were really
verified and accepted (the metrics say so), and a row whose drafts fail stops drafting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from slmops_serve.speculation import CallCosts, RowDrafter, SpecSettings, ngram_draft

from tests.serve.conftest import make_config

# prompts whose continuations repeat spans of themselves on the tiny model, and ones that do not
PROMPTS = ["Extract: a table for two in Paris on Friday, a table for two in Paris on Friday\n",
           "Tone of: I lost my keys again, I lost my keys again\n", "Once upon a time", "Hello there, how are",
           "Extract: 3 rooms in Rome, 3 rooms in Rome, 3 rooms\n", "Tone of: we won the cup!\n"]
ADAPTERS = ["extract", "tone", "", "tone", "extract", ""]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                                           "guests": {"type": "integer"}},
          "required": ["name", "city", "guests"], "additionalProperties": False}


def counter(engine: Any, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels or None)
    return float(value or 0.0)


@pytest.fixture(scope="module")
def engines(tiny_bundle: Path) -> Any:
    from slmops_serve.engine import Engine

    on = Engine(make_config(tiny_bundle, max_batch=6, speculation="ngram", max_draft=6))
    off = Engine(make_config(tiny_bundle, max_batch=6, speculation="off"))
    on.load()
    off.load()
    yield on, off
    on.close()
    off.close()


def test_ngram_draft_finds_the_latest_longest_match() -> None:
    history = np.array([5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3], np.int64)
    assert ngram_draft(history, len(history), 3).tolist() == [7, 8, 4]  # the latest earlier 1,2,3
    assert ngram_draft(history, len(history), 10).tolist() == [7, 8, 4, 1, 2, 3]  # never past the end
    assert ngram_draft(np.array([1, 2, 3, 4], np.int64), 4, 3).tolist() == []  # nothing repeats
    assert ngram_draft(history, len(history), 0).tolist() == []
    # an earlier output of the same adapter: its continuation, up to its end
    earlier = np.array([6, 1, 2, 3, 5, 5], np.int64)
    assert ngram_draft(history, len(history), 8, source=earlier).tolist() == [5, 5]
    drafter = RowDrafter(SpecSettings(max_draft=4))
    assert drafter.propose(np.array([9, 2, 3], np.int64), 3, 4, corpus=[earlier]).tolist() == [5, 5]


def test_a_row_whose_drafts_fail_stops_drafting_then_retries() -> None:
    drafter = RowDrafter(SpecSettings(max_draft=6), patience=2)
    history = np.array([1, 2, 3, 1, 2], np.int64)
    assert drafter.propose(history, 5, 6).tolist() == [3, 1, 2]
    drafter.update(3, 3)
    assert drafter.limit == 5
    drafter.update(3, 0)
    drafter.update(1, 0)  # two failures in a row: paused for 4 steps
    assert [drafter.propose(history, 5, 6).tolist() for _ in range(4)] == [[]] * 4
    assert drafter.propose(history, 5, 6).tolist() == [3, 1]  # tries again, short: 0 accepted + 2
    assert drafter.rate < 0.5


def test_call_costs_draft_only_what_pays() -> None:
    costs = CallCosts()
    assert costs.best_length(0, 6, 0.9) == 0  # no plain step measured yet: measure one first
    costs.observe(1, 1, 0.010)
    assert costs.best_length(0, 6, 0.9) == 6  # untried widths: optimistic prior
    assert costs.best_length(0, 6, 0.05) == 0  # a row whose guesses fail does not draft
    for width in range(2, 8):
        costs.observe(1, width, 0.010 * width)  # each token costs a full step (a compute-bound machine)
    assert costs.best_length(0, 6, 0.9) == 0
    assert costs.best_length(3, 0, 0.0) == 0  # even forced tokens do not pay there (0.98 chain < 1 per step)
    for width in range(2, 8):
        costs.observe(1, width, 0.010 + 0.0005 * width)  # nearly free (memory-bound): the moving average follows
    for _ in range(60):
        for width in range(1, 8):
            costs.observe(1, width, 0.010 + (0.0005 * width if width > 1 else 0))
    assert costs.best_length(0, 6, 0.9) == 6
    assert costs.best_length(0, 6, 0.9, batch=4) == 6  # 5+ expected tokens per call beat a 4-row step
    assert costs.best_length(0, 6, 0.3, batch=4) == 0


def test_greedy_output_is_unchanged_and_equals_onnxruntime_genai(engines: Any, reference: Any, tiny_bundle: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Lone rows (the draft verified in the decode call) and a mixed-adapter batch of 6 (rows
    verified in calls of their own) give exactly the tokens of speculation off and of og. Every
    draft is verified here (whatever this machine's call costs say), so both paths run."""
    from slmops_serve.engine import GenerationRequest

    on, off = engines
    monkeypatch.setattr(on._costs, "best_length", lambda forced, guesses, rate, batch=1: forced + guesses)
    requests = [dict(prompt=p, adapter=a, max_new_tokens=40) for p, a in zip(PROMPTS, ADAPTERS, strict=True)]
    before = counter(on, "slmops_spec_accepted_tokens_total", source="ngram")
    alone_on = [on.generate(GenerationRequest(**r)).text for r in requests]
    alone_accepted = counter(on, "slmops_spec_accepted_tokens_total", source="ngram") - before
    alone_off = [off.generate(GenerationRequest(**r)).text for r in requests]
    assert alone_on == alone_off
    for r, text in zip(requests, alone_on, strict=True):
        file = tiny_bundle / "adapters" / f"{r['adapter']}.onnx_adapter" if r["adapter"] else None
        assert text == reference.generate(r["prompt"], file, 40)[0], r
    before = counter(on, "slmops_spec_accepted_tokens_total", source="ngram")
    gens = [on.submit(GenerationRequest(**r)) for r in requests]
    batch_on = [g.result().text for g in gens]
    batch_accepted = counter(on, "slmops_spec_accepted_tokens_total", source="ngram") - before
    assert batch_on == alone_off
    # the speculative paths really ran and drafts were accepted
    assert alone_accepted > 10, alone_accepted
    assert batch_accepted > 0, batch_accepted
    steps = counter(on, "slmops_spec_row_steps_total")
    assert counter(on, "slmops_spec_emitted_tokens_total") > steps  # more than one token per verifying step
    assert counter(off, "slmops_spec_steps_total") == 0


def test_seeded_sampling_is_unchanged(engines: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampling row speculates too: each emitted token is still drawn from its own logits with
    the row's generator, so a seed gives the same text with speculation on and off."""
    from slmops_serve.engine import GenerationRequest

    on, off = engines
    monkeypatch.setattr(on._costs, "best_length", lambda forced, guesses, rate, batch=1: forced + guesses)
    for seed in range(4):
        request = dict(prompt=PROMPTS[0], adapter="extract", max_new_tokens=32, temperature=0.7, top_p=0.95, seed=seed)
        assert on.generate(GenerationRequest(**request)).text == off.generate(GenerationRequest(**request)).text


def test_structured_output_jumps_forward_over_forced_tokens(engines: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """json_schema: the tokens the grammar forces (keys, quotes, braces) are drafted and accepted;
    the JSON is the same as without speculation, alone and beside other rows."""
    from slmops_serve.engine import GenerationRequest

    on, off = engines
    monkeypatch.setattr(on._costs, "best_length", lambda forced, guesses, rate, batch=1: forced + guesses)
    request = dict(prompt=PROMPTS[0], adapter="extract", max_new_tokens=60, guidance_kind="json_schema",
                   guidance=json.dumps(SCHEMA))
    before = counter(on, "slmops_spec_accepted_tokens_total", source="grammar")
    text = on.generate(GenerationRequest(**request)).text
    assert counter(on, "slmops_spec_accepted_tokens_total", source="grammar") - before >= 5
    assert text == off.generate(GenerationRequest(**request)).text
    gens = [on.submit(GenerationRequest(**request)), on.submit(GenerationRequest(prompt=PROMPTS[2], max_new_tokens=30))]
    assert gens[0].result().text == text
    assert gens[1].result().text == off.generate(GenerationRequest(prompt=PROMPTS[2], max_new_tokens=30)).text


@pytest.mark.parametrize("args,option", [(["--max-draft", "0"], "--max-draft"), (["--speculation", "eagle"], "--speculation")])
def test_bad_speculation_options_exit_2_in_one_line(args: list[str], option: str, tiny_bundle: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from tests.serve.test_cli import run

    code, _, err = run(["serve", str(tiny_bundle), *args], capsys)
    assert code == 2, err
    assert option in err and len(err.strip().splitlines()) == 1, err


def test_a_long_prompt_is_prefilled_in_slices_that_fit_the_running_streams_gap(tiny_bundle: Path, reference: Any) -> None:
    """While a row decodes, a long prompt is prefilled in slices sized by the measured costs (about
    two decode steps' time, not --prefill-chunk), and both answers still equal onnxruntime-genai's."""
    import threading

    from slmops_serve.engine import Engine, GenerationRequest

    engine = Engine(make_config(tiny_bundle, max_batch=2, prefill_chunk=128))
    engine.load()
    try:
        assert engine.runner is not None
        runner = engine.runner
        slices: list[tuple[int, int]] = []  # (decoding rows, prompt tokens) of each prefill call over a past
        original = runner.prefill
        first_tokens = threading.Event()

        def prefill(row: int, ids: Any, past: int, lora: Any, lora_key: Any = None) -> Any:
            slices.append((row, len(ids)))
            return original(row, ids, past, lora, lora_key)

        runner.prefill = prefill  # type: ignore[method-assign]
        engine.token_hook = lambda gen, produced: first_tokens.set() if produced >= 4 else None
        long_prompt = " ".join(PROMPTS * 3)  # ~480 tokens: the test model has 512 positions
        running = engine.submit(GenerationRequest(prompt=PROMPTS[2], max_new_tokens=200, min_new_tokens=200))
        assert first_tokens.wait(30)
        arriving = engine.submit(GenerationRequest(prompt=long_prompt, adapter="tone", max_new_tokens=12))
        texts = [running.result().text, arriving.result().text]
    finally:
        engine.token_hook = None
        engine.close()
    beside = [n for row, n in slices if row == 1]  # row 1: the arriving prompt, row 0 decoding
    assert len(beside) >= 4 and max(beside[1:]) < 128, beside
    assert texts[1] == reference.generate(long_prompt, tiny_bundle / "adapters" / "tone.onnx_adapter", 12)[0]
    assert texts[0] == reference.generate(PROMPTS[2], None, 200, forced=True)[0]
