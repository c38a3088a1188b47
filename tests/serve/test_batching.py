"""Continuous batching through a real server: rows with different adapters share decode steps and
each gives the same tokens as the same request run alone, through a hot swap."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench.synthetic import synthetic_adapter
from tests.serve.conftest import running_server

PROMPTS = ["Tone of: I lost my keys again\n", "Extract: a table for two in Paris on Friday\n",
           "Tone of: we won the cup!\n", "Hello there, how are", "Extract: 3 rooms in Rome\n",
           "Tone of: the train is late\n", "Once upon a time", "Tone of: what a lovely day\n"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def batch_adapters(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tone (q,v r=4), extract (all-linear r=8), od (o/down r=2), gu (gate/up r=16), and a second gu version."""
    import shutil

    from slmops.bundle import read_manifest

    template = read_manifest(tiny_bundle).lora_template
    root = tmp_path_factory.mktemp("batch-adapters")
    files = {name: Path(shutil.copy(tiny_bundle / "adapters" / f"{name}.onnx_adapter", root / f"{name}.onnx_adapter"))
             for name in ("tone", "extract")}
    # large values so each adapter visibly changes the tiny model's tokens
    files["od"] = synthetic_adapter(template, ["o_proj", "down_proj"], 2, root / "od.onnx_adapter", seed=1, scale=2.0)
    files["gu"] = synthetic_adapter(template, ["gate_proj", "up_proj"], 16, root / "gu.onnx_adapter", seed=2, scale=2.0)
    files["gu-v2"] = synthetic_adapter(template, ["gate_proj", "up_proj"], 16, root / "gu-v2.onnx_adapter", seed=3, scale=2.0)
    return files


def test_eight_streams_on_four_adapters_match_alone_through_a_hot_swap(tiny_bundle: Path,
                                                                       batch_adapters: dict[str, Path]) -> None:
    from slmops_serve.client import SlmopsClient

    names = ["tone", "extract", "od", "gu"]
    with running_server(tiny_bundle, adapter_dir=str(batch_adapters["tone"].parent), max_batch=8, max_queue=16) as srv, \
            SlmopsClient(srv.address, token="test-admin-token", timeout=60) as client:
        for name in ("od", "gu"):
            client.load_adapter(name, path=batch_adapters[name].name)
        cases = [(PROMPTS[i], names[i % 4]) for i in range(8)]
        # alone: one request at a time, both versions of gu
        alone = {(p, a, sha(batch_adapters[a])): client.generate(p, adapter=a, max_new_tokens=24).text for p, a in cases}
        client.load_adapter("gu", path=batch_adapters["gu-v2"].name)
        alone.update({(p, a, sha(batch_adapters["gu-v2"])): client.generate(p, adapter=a, max_new_tokens=24).text
                      for p, a in cases if a == "gu"})
        client.load_adapter("gu", path=batch_adapters["gu"].name)
        # the adapters really differ on this model, so a row on the wrong adapter would show
        assert len({alone[(PROMPTS[i], names[i % 4], sha(batch_adapters[names[i % 4]]))] for i in range(8)}) > 2
        assert alone[(PROMPTS[3], "gu", sha(batch_adapters["gu"]))] != alone[(PROMPTS[3], "gu", sha(batch_adapters["gu-v2"]))]

        batch_sizes: list[int] = []
        lock = threading.Lock()
        step_rows: set[str] = set()

        def hook(gen: Any, produced: int) -> None:
            with lock:
                if gen.request_id in step_rows:
                    batch_sizes.append(len(step_rows))
                    step_rows.clear()
                step_rows.add(gen.request_id)
            time.sleep(0.001)

        srv.engine.token_hook = hook
        try:
            with ThreadPoolExecutor(12) as pool:
                before = [pool.submit(client.generate, p, adapter=a, max_new_tokens=24) for p, a in cases]
                deadline = time.monotonic() + 20
                while srv.engine.running < 6:
                    assert time.monotonic() < deadline, "the requests never ran together"
                    time.sleep(0.005)
                swap = client.load_adapter("gu", path=batch_adapters["gu-v2"].name)
                assert swap.replaced
                after = [pool.submit(client.generate, p, adapter=a, max_new_tokens=24) for p, a in cases if a == "gu"]
                responses = [f.result(60) for f in before + after]
        finally:
            srv.engine.token_hook = None
        assert max(batch_sizes) >= 6, f"rows never shared a step: {batch_sizes}"
        for (prompt, adapter), response in zip(cases + [c for c in cases if c[1] == "gu"], responses, strict=True):
            assert response.adapter == adapter
            assert response.text == alone[(prompt, adapter, response.adapter_sha256)], (prompt, adapter)
        # the requests admitted before the swap ran on gu v1, those after on v2
        assert responses[3].adapter_sha256 == sha(batch_adapters["gu"])
        assert {r.adapter_sha256 for r in responses[8:]} == {sha(batch_adapters["gu-v2"])}
        assert srv.engine.registry.retired_count() == 0


def test_batched_prefill_and_decode_equal_onnxruntime_genai(tiny_bundle: Path, reference: Any) -> None:
    """fp32: every row of a mixed batch (short prompts prefilled together, a long one in chunks)
    gives exactly onnxruntime-genai's greedy tokens for that request alone."""
    from slmops_serve.engine import Engine, GenerationRequest

    from tests.serve.conftest import make_config

    engine = Engine(make_config(tiny_bundle, max_batch=6, prefill_chunk=16))
    engine.load()
    try:
        long_prompt = " ".join(PROMPTS * 3)  # many 16-token chunks, and past the first cache capacity (256)
        cases = [(p, a) for p, a in zip([*PROMPTS[:5], long_prompt], ["tone", "extract", "", "tone", "extract", "tone"],
                                        strict=True)]
        gens = [engine.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=16)) for p, a in cases]
        results = [g.result() for g in gens]
        # the cache grew under live rows (version 1 is the first allocation), and shrank back once they finished
        assert engine.runner is not None and engine.runner.cache.version >= 2
    finally:
        engine.close()
    for (prompt, adapter), result in zip(cases, results, strict=True):
        file = tiny_bundle / "adapters" / f"{adapter}.onnx_adapter" if adapter else None
        assert result.text == reference.generate(prompt, file, 16)[0], (prompt, adapter)


def test_gpu_bundle_without_its_provider_is_refused_in_one_line() -> None:
    from slmops.runtime.runner import session_providers

    assert session_providers("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert session_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    with pytest.raises(ValueError, match="targets cuda .*lacks"):
        session_providers("cuda", ["CPUExecutionProvider"])
