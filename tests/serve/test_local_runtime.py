"""slmops.runtime.LocalModel: the server's decode loop for one prompt, without the server (build
validation, `slmops bundle verify` and the benches use it). It must produce what the server does
and, at fp32, what onnxruntime-genai does."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import PROMPT

ADAPTERS = ["", "tone", "extract"]


@pytest.fixture(scope="module")
def local(tiny_bundle: Path) -> Any:
    from slmops.bundle import read_manifest
    from slmops.runtime import LocalModel

    manifest = read_manifest(tiny_bundle)
    model = LocalModel(tiny_bundle / "model", manifest.lora_template, threads=1)
    for name, info in manifest.adapters.items():
        assert model.load_adapter(name, tiny_bundle / info.file) >= 0
    return model


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_greedy_equals_onnxruntime_genai(local: Any, reference: Any, tiny_bundle: Path, adapter: str) -> None:
    adapter_file = tiny_bundle / "adapters" / f"{adapter}.onnx_adapter" if adapter else None
    for prompt in (PROMPT, "Extract: a table for two at seven"):
        want_text, want_count = reference.generate(prompt, adapter_file, max_new_tokens=20)
        tokens = local.generate(local.codec.encode(prompt), 20, adapter=adapter or None)
        # og counts the EOS it stopped on; LocalModel leaves it out
        assert len(tokens) in (want_count, want_count - 1)
        assert local.codec.decode(tokens) == want_text, (prompt, adapter)


def test_sampled_with_a_seed_equals_the_server(local: Any, client: Any) -> None:
    from slmops.runtime import Sampler

    for adapter in ADAPTERS:
        served = client.generate(PROMPT, adapter=adapter, max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=11)
        tokens = local.generate(local.codec.encode(PROMPT), 16, adapter=adapter or None,
                                sampler=Sampler(0.9, 0.95, 40, seed=11))
        assert local.codec.decode(tokens) == served.text, adapter
        assert len(tokens) in (served.usage.completion_tokens, served.usage.completion_tokens - 1)  # the server counts an EOS


def test_adapters_change_the_logits_and_bad_adapters_are_refused(local: Any, tiny_bundle: Path,
                                                                 adapter_files: dict[str, Path]) -> None:
    ids = local.codec.encode(PROMPT)
    assert abs(local.last_logits(ids, "extract") - local.last_logits(ids)).max() > 1e-3
    with pytest.raises(ValueError, match="float16"):
        local.load_adapter("bad", adapter_files["wrong_dtype"])
    with pytest.raises(KeyError, match="not loaded"):
        local.generate(ids, 2, adapter="bad")


def test_one_call_generate_and_the_length_limit(tiny_bundle: Path, local: Any) -> None:
    from slmops.runtime import generate

    text = generate(tiny_bundle, PROMPT, max_new_tokens=8, adapter="tone", chat=False, threads=1)
    assert text == local.codec.decode(local.generate(local.codec.encode(PROMPT), 8, adapter="tone"))
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        generate(tiny_bundle, PROMPT, adapter="nope")


def test_import_slmops_stays_light() -> None:
    import subprocess

    code = ("import sys, slmops, slmops.bundle, slmops.contract, slmops.runtime; "
            "print(sorted(m for m in ('numpy', 'onnxruntime', 'tokenizers', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_container_probe_records_each_steps_logits(tiny_bundle: Path, local: Any) -> None:
    """tests/containers/greedy_probe.py (run inside the serve images) decodes with the same loop."""
    import numpy as np

    from tests.containers.greedy_probe import main

    rows = main(str(tiny_bundle), 5, [PROMPT], ["", "tone"])
    for row in rows:
        assert len(row["tokens"]) == len(row["logits"]) == 5
        assert row["tokens"] == [int(np.argmax(step)) for step in row["logits"]]
        ids = local.codec.encode(PROMPT)
        assert row["tokens"] == local.generate(ids, 5, adapter=row["adapter"] or None, stop_at_eos=False)


def test_a_replaced_adapter_runs_its_new_weights(tiny_bundle: Path) -> None:
    """Loading other weights under a name the model already ran must not leave the old ones cached."""
    from slmops.bundle import read_manifest
    from slmops.runtime import LocalModel

    manifest = read_manifest(tiny_bundle)
    model = LocalModel(tiny_bundle / "model", manifest.lora_template, threads=1)
    ids = model.codec.encode(PROMPT)
    model.load_adapter("x", tiny_bundle / "adapters" / "tone.onnx_adapter")
    tone = model.last_logits(ids, "x")
    model.load_adapter("x", tiny_bundle / "adapters" / "extract.onnx_adapter")
    model.load_adapter("extract", tiny_bundle / "adapters" / "extract.onnx_adapter")
    replaced = model.last_logits(ids, "x")
    assert abs(replaced - tone).max() > 1e-3
    assert abs(replaced - model.last_logits(ids, "extract")).max() < 1e-5
