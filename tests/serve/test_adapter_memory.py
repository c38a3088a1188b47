"""Bounded memory with many adapters: --adapter-memory (LRU eviction of idle adapters, never a pinned
or in-use one), lazy loading from --adapter-dir, byte-bounded feeds caches, a mix's concatenation
built off the scheduler thread, and memory handed back to the OS after an unload and after a KV
burst (the process RSS, not a dict size). Real engine on the tiny bundle, real files, real sessions."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import multiprocessing
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from bench.synthetic import synthetic_adapter
from slmops.bundle import read_manifest
from slmops.contract import read_adapter_tensors
from tests.serve.conftest import ADMIN_TOKEN, Gate, make_config, running_server

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = [f"m{i:02d}" for i in range(10)]
PROMPT = "Tone of: I lost my keys again\n"
MIB = 1 << 20


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


@pytest.fixture(scope="module")
def many_dir(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An --adapter-dir of 10 synthetic adapters (all modules, rank 16, large values so each visibly
    changes the tiny model's tokens), none of them loaded by the bundle."""
    template = read_manifest(tiny_bundle).lora_template
    root = tmp_path_factory.mktemp("many-adapters")
    for i, name in enumerate(NAMES):
        synthetic_adapter(template, MODULES, 16, root / f"{name}.onnx_adapter", seed=100 + i, scale=2.0)
    return root


def adapter_bytes(path: Path) -> int:
    return sum(int(a.nbytes) for a in read_adapter_tensors(path).values())


def memory_mb(adapter_part: float) -> float:
    """The --adapter-memory (MB) whose adapters' share (split_adapter_memory) is ``adapter_part`` bytes."""
    from slmops.runtime.memory import MIX_SHARE

    return adapter_part / (1 - MIX_SHARE) / MIB


@pytest.fixture
def engine_factory(tiny_bundle: Path) -> Iterator[Callable[..., Any]]:
    with contextlib.ExitStack() as engines:
        yield lambda **overrides: engines.enter_context(engine_on(tiny_bundle, **overrides))


def idle(engine: Any, timeout: float = 30) -> None:
    """Wait until the engine's mix builder has nothing queued or running."""
    deadline = time.time() + timeout
    while engine._mixes.pending and time.time() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def engine_on(bundle: Path, **overrides: Any) -> Iterator[Any]:
    from slmops_serve.engine import Engine

    engine = Engine(make_config(bundle, **overrides))
    engine.load()
    try:
        yield engine
    finally:
        engine.close()


def in_fresh_process(measure: Callable[..., None], *args: Any) -> None:
    """Run an RSS measurement in a spawned process: inside the suite's pytest process (~1 GB, its heap
    shaped by every earlier test) freed pages of other tests absorb or hide tens of MB, so the same
    figure passed alone and failed in CI. An AssertionError comes back with its message."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(measure, args)


def generate(engine: Any, adapter: str, tokens: int = 8, prompt: str = PROMPT) -> str:
    from slmops_serve.engine import GenerationRequest

    return str(engine.generate(GenerationRequest(prompt=prompt, adapter=adapter, max_new_tokens=tokens)).text)


def test_lru_evicts_idle_adapters_never_a_pinned_or_in_use_one(engine_factory: Any, many_dir: Path) -> None:
    from slmops_serve.errors import RESOURCE_EXHAUSTED, ServeError

    size = adapter_bytes(many_dir / "m00.onnx_adapter")
    engine = engine_factory(adapter_dir=str(many_dir), adapter_memory_mb=memory_mb(4.5 * size), pin=["m00"], max_batch=2)
    registry = engine.registry
    budget = registry.memory_budget  # the adapters' share of --adapter-memory
    assert budget is not None and abs(budget - 4.5 * size) <= 2
    assert registry.lazy and "m00" in registry.names()  # pinned: loaded at start from the adapter dir
    first: dict[str, str] = {}
    for name in NAMES[1:7]:  # lazily loaded by name, evicting the least recently used idle ones
        first[name] = generate(engine, name)
        assert name in registry.names()
        assert registry.held_bytes <= budget
        assert "m00" in registry.names()
    assert registry.evictions >= 3
    assert "tone" not in registry.names() and "extract" not in registry.names()  # loaded at start, never used: first out
    assert engine.metrics.registry.get_sample_value("slmops_adapter_evictions_total") == registry.evictions
    assert engine.metrics.registry.get_sample_value("slmops_adapter_memory_bytes") == registry.held_bytes
    assert len(set(first.values())) > 2, "the adapters must change the tokens for the reload check to mean anything"

    with Gate(engine) as gate, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(generate, engine, "m01")  # evicted above: loaded again, then held at the gate
        gate.wait_for(1)
        held = []
        for name in NAMES[2:9]:  # each admission evicts the LRU idle one: never m01 (in use) nor m00 (pinned)
            entry = registry.acquire(name)
            registry.release(entry)
            assert {"m00", "m01"} <= set(registry.names())
            assert registry.held_bytes <= budget
        for name in ("m02", "m03"):  # two more in use: 4 adapters pinned or in use, the 5th does not fit
            held.append(registry.acquire(name))
        before = registry.names()
        with pytest.raises(ServeError) as exc:
            registry.acquire("m09")
        assert exc.value.code == RESOURCE_EXHAUSTED and "m00" in exc.value.message and "m01" in exc.value.message
        assert registry.names() == before, "a load that cannot fit must evict nothing"
        for entry in held:
            registry.release(entry)
        gate.open()
        assert in_flight.result(timeout=60) == first["m01"]
    # evicted and loaded again by name: the same weights, the same tokens
    for name in ("m04", "m05", "m06"):
        assert generate(engine, name) == first[name]
    assert registry.held_bytes <= budget
    # unloading an evicted adapter answers for it (its memory is already free) and forgets it
    evicted = next(n for n in NAMES[1:9] if n not in registry.names())
    held_now = registry.held_bytes
    entry, drained = registry.unload(evicted)
    assert entry.name == evicted and drained and registry.held_bytes == held_now
    with pytest.raises(ServeError):
        registry.unload(evicted)


def test_lazy_load_by_name_over_grpc_and_http_unknown_is_not_found(tiny_bundle: Path, many_dir: Path) -> None:
    from slmops_serve.client import SlmopsClient

    budget = 3 * adapter_bytes(many_dir / "m00.onnx_adapter") + 2
    with running_server(tiny_bundle, adapter_dir=str(many_dir), adapter_memory_mb=memory_mb(budget), http_port=0) as srv, \
            SlmopsClient(srv.address, token=ADMIN_TOKEN, timeout=60) as client:
        assert "m07" not in [a.name for a in client.list_adapters()]
        response = client.generate(PROMPT, adapter="m07", max_new_tokens=4)
        assert response.adapter == "m07" and response.usage.completion_tokens > 0
        assert "m07" in [a.name for a in client.list_adapters()]
        with pytest.raises(grpc.RpcError) as exc:
            client.generate(PROMPT, adapter="nope", max_new_tokens=4)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in (exc.value.details() or "")

        def post(model: str) -> tuple[int, dict[str, Any]]:
            body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 4}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read() or b"{}")

        status, answer = post("m08")
        assert status == 200 and answer["choices"][0]["text"] is not None
        assert "m08" in srv.engine.registry.names()
        assert post("nope")[0] == 404
        assert srv.engine.registry.held_bytes <= budget
        lazy = srv.metrics.registry.get_sample_value("slmops_adapter_lazy_loads_total")
        assert lazy is not None and lazy >= 2


def test_a_mix_is_concatenated_off_the_scheduler_thread(engine_factory: Any, many_dir: Path) -> None:
    engine = engine_factory(adapter_dir=str(many_dir), lazy_load=True, max_batch=4)
    bank = engine.runner.bank
    alone = {name: generate(engine, name, tokens=12) for name in NAMES[:4]}
    built_on: list[str] = []
    original = bank._concatenated

    def spy(tensors_of: Any, build: bool = True) -> Any:  # the real method; records who made a new array
        before = set(bank.cache.ordered_keys())
        result = original(tensors_of, build)
        if set(bank.cache.ordered_keys()) - before and bank.needs_copy(tensors_of):
            built_on.append(threading.current_thread().name)
        return result

    bank._concatenated = spy
    with ThreadPoolExecutor(4) as pool:
        together = dict(zip(NAMES[:4], pool.map(lambda n: generate(engine, n, tokens=12), NAMES[:4]), strict=True))
    assert together == alone  # rows that waited for the mix, or ran split, still give their own tokens
    assert built_on and set(built_on) == {"slmops-lora-mix"}, built_on
    assert engine._mixes.built >= 1


def test_feeds_caches_are_bounded_in_bytes(tiny_bundle: Path, many_dir: Path) -> None:
    from slmops.runtime.memory import ByteLRU
    from slmops.runtime.runner import LoraBank

    lru: ByteLRU[str] = ByteLRU(100)
    for i in range(5):
        lru.put(i, "x", 40)
        assert lru.nbytes <= 100
    assert lru.ordered_keys() == [3, 4] and lru.evictions == 3
    lru.put("huge", "y", 500)  # the entry just put stays, whatever its size
    assert lru.ordered_keys() == ["huge"] and lru.nbytes == 500

    template = read_manifest(tiny_bundle).lora_template
    tensors = {n: read_adapter_tensors(many_dir / f"{n}.onnx_adapter") for n in NAMES[:8]}
    size = sum(a.nbytes for a in tensors["m00"].values())
    bank = LoraBank(template, np.float32, cache_bytes=3 * size)
    for i in range(0, 8, 2):
        a, b = NAMES[i], NAMES[i + 1]
        feeds = bank.feeds([(a, tensors[a]), (b, tensors[b])])
        assert bank.cache.nbytes <= 3 * size
        name = next(k for k in feeds if ".lora_A." in k)
        np.testing.assert_array_equal(feeds[name], np.concatenate([tensors[a][name], tensors[b][name]], axis=1))
    assert bank.cache.evictions >= 2
    bank.forget("m07")
    assert all("m07" not in k for k in bank.cache.ordered_keys() if isinstance(k, tuple))


def test_unloading_big_adapters_returns_their_memory_to_the_os(tiny_bundle: Path, tmp_path: Path) -> None:
    template = read_manifest(tiny_bundle).lora_template
    for i, name in enumerate(["big0", "big1", "big2"]):
        synthetic_adapter(template, MODULES, 3072, tmp_path / f"{name}.onnx_adapter", seed=i)
    assert adapter_bytes(tmp_path / "big0.onnx_adapter") > 30 * MIB
    in_fresh_process(measure_unloading_big_adapters, tiny_bundle, tmp_path)


def measure_unloading_big_adapters(tiny_bundle: Path, tmp_path: Path) -> None:
    with engine_on(tiny_bundle, adapter_dir=str(tmp_path), lazy_load=True, max_batch=4) as engine:
        check_unloading_big_adapters(engine, tmp_path)


def check_unloading_big_adapters(engine: Any, tmp_path: Path) -> None:
    names = ["big0", "big1", "big2"]
    size = adapter_bytes(tmp_path / "big0.onnx_adapter")
    registry = engine.registry
    bundle_held = registry.held_bytes  # the bundle's own adapters
    generate(engine, "", tokens=4)  # warm-up: the first step's allocations are not the adapters'
    base = rss()
    with ThreadPoolExecutor(3) as pool:  # alone, then together (a concatenated mix of all three)
        for name in names:
            generate(engine, name, tokens=4)
        list(pool.map(lambda n: generate(engine, n, tokens=16), names))
    idle(engine)
    loaded = rss()
    assert registry.held_bytes == bundle_held + 3 * size
    assert loaded - base > 2.5 * size, (base, loaded)
    for name in names:
        registry.unload(name, timeout=10)
    assert registry.held_bytes == bundle_held
    assert not [n for n in engine.store.names() if n.startswith("big")]
    assert engine.runner.bank.cache.nbytes == 0 and engine._feeds_cache.nbytes == 0
    assert engine.runner.static_cache.nbytes == 0
    idle(engine)
    deadline = time.time() + 10  # the mix builder may still finish a copy of them, which it then drops
    while (after := rss()) - base >= 0.25 * (loaded - base) and time.time() < deadline:
        time.sleep(0.2)
    assert after - base < 0.25 * (loaded - base), f"RSS {base / MIB:.0f} -> {loaded / MIB:.0f} -> {after / MIB:.0f} MiB"


def test_kv_cache_shrinks_after_a_burst_and_rss_drops(tiny_bundle: Path) -> None:
    in_fresh_process(measure_kv_burst, tiny_bundle)


def measure_kv_burst(tiny_bundle: Path) -> None:
    from slmops.contract import GenaiConfig
    from slmops.runtime.runner import KVCache

    info = dataclasses.replace(GenaiConfig.read(tiny_bundle / "model"), num_layers=4, kv_heads=4, head_size=64)
    cache = KVCache(info, rows=4, dtype=np.float32, max_length=4096)
    base = rss()
    cache.ensure(4000)
    for layer in range(info.num_layers):  # a burst: every row writes 4000 positions
        cache.keys[layer][:, :, :4000] = 1.0
        cache.values[layer][:, :, :4000] = 2.0
    cache.used[:] = 4000
    cache.keys[0][0, :, :10] = 7.0
    burst = rss()
    assert burst - base > 100 * MIB
    assert not cache.shrink(live_rows=1, longest=2000)  # still busy: a long row keeps the capacity
    assert cache.shrink(live_rows=1, longest=10)
    assert cache.capacity == 256
    assert float(cache.keys[0][0, 0, 9, 0]) == 7.0 and float(cache.values[3][0, 0, 9, 0]) == 2.0  # row 0 kept
    assert int(cache.used[1]) == 0
    from slmops.runtime.memory import release_freed_memory

    release_freed_memory()
    after = rss()
    assert after - base < 0.2 * (burst - base), f"RSS {base / MIB:.0f} -> {burst / MIB:.0f} -> {after / MIB:.0f} MiB"


def test_engine_shrinks_the_kv_cache_after_long_rows_and_a_live_row_keeps_its_tokens(engine_factory: Any) -> None:
    from slmops_serve.engine import GenerationRequest

    engine = engine_factory(max_batch=4, max_new_tokens_limit=512, default_max_new_tokens=16)
    runner = engine.runner

    def short() -> GenerationRequest:
        return GenerationRequest(prompt="Tone of: we won the cup!\n", max_new_tokens=100, min_new_tokens=100,
                                 request_id="short")

    alone = engine.generate(short()).text
    reached = threading.Event()
    live_after_shrink: list[int] = []  # tokens the short row had made when it first stepped in the smaller cache

    def hook(gen: Any, produced: int) -> None:
        if gen.request_id == "long-0" and produced == 270:  # past the initial 256 positions
            reached.set()
            time.sleep(0.05)
        if gen.request_id == "short" and reached.is_set() and runner.cache.capacity == 256 and not live_after_shrink:
            live_after_shrink.append(produced)

    engine.token_hook = hook
    try:
        long_gens = [engine.submit(GenerationRequest(prompt="Once upon a time", max_new_tokens=300, min_new_tokens=300,
                                                     request_id=f"long-{i}")) for i in range(2)]
        assert reached.wait(120)
        assert runner.cache.capacity >= 512  # the burst grew it
        short_gen = engine.submit(short())
        for gen in long_gens:
            assert gen.result().completion_tokens == 300
        assert short_gen.result().text == alone  # its positions moved into smaller buffers mid-generation
    finally:
        engine.token_hook = None
    assert live_after_shrink and 0 < live_after_shrink[0] < 90, live_after_shrink  # shrunk while it was live
    assert runner.cache.capacity == 256
    assert engine.metrics.registry.get_sample_value("slmops_kv_cache_bytes") == runner.cache.nbytes


def test_an_evicted_upload_comes_back_from_its_spooled_copy(engine_factory: Any, many_dir: Path,
                                                            tmp_path: Path) -> None:
    size = adapter_bytes(many_dir / "m00.onnx_adapter")
    engine = engine_factory(adapter_dir=str(many_dir), adapter_memory_mb=memory_mb(2.5 * size))
    registry = engine.registry
    outside = tmp_path / "elsewhere.onnx_adapter"  # not in the adapter dir: only the upload's bytes exist
    outside.write_bytes((many_dir / "m09.onnx_adapter").read_bytes())
    registry.load("up", data=outside.read_bytes(), source="upload")
    outside.unlink()
    first = generate(engine, "up")
    for name in NAMES[:3]:
        generate(engine, name)
    assert "up" not in registry.names()  # evicted
    assert generate(engine, "up") == first  # loaded again from the server's own copy, by name
    registry.unload("up", timeout=5)
    spool = registry._spool
    assert spool is not None and not list(spool.iterdir())  # the unload dropped the copy
    with pytest.raises(Exception, match="not loaded"):
        generate(engine, "up")


def root_array(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def weight_arrays(engine: Any) -> tuple[dict[int, int], dict[int, int]]:
    """(arrays the budget owns: loaded adapters' tensors and the bank's concatenations; arrays the
    engine's and the runner's feeds caches reference), as id of the root array -> bytes. Arrays under
    4 kB (the row masks) are left out."""
    def add(into: dict[int, int], arrays: Any) -> None:
        for array in arrays:
            if isinstance(array, np.ndarray) and array.nbytes >= 4096:
                root = root_array(array)
                into[id(root)] = int(root.nbytes)

    owned: dict[int, int] = {}
    viewed: dict[int, int] = {}
    for name in engine.store.names():
        add(owned, engine.store.tensors(name).values())
    for _, (feeds, _segments, _weight) in engine.runner.bank.cache.items():
        add(owned, feeds.values())
    for _, feeds in engine._feeds_cache.items():
        add(viewed, feeds.values())
    for _, (names, _values, _fetch_names, _fetches, keep) in engine.runner.static_cache.items():
        add(viewed, [value._numpy_obj for name, value in zip(names, keep, strict=True) if ".lora_" in name])
    return owned, viewed


def test_one_budget_covers_adapters_and_mix_concatenations(engine_factory: Any, many_dir: Path) -> None:
    """--adapter-memory is split between loaded adapters and the bank's mix concatenations, and the
    engine's and the runner's caches never keep an array alive that neither of those holds (an
    evicted concatenation is dropped from them too), so the two shares bound every LoRA weight."""
    size = adapter_bytes(many_dir / "m00.onnx_adapter")
    engine = engine_factory(adapter_dir=str(many_dir), adapter_memory_mb=memory_mb(6 * size), max_batch=2)
    registry, bank = engine.registry, engine.runner.bank
    total = engine.config.adapter_memory_bytes
    assert registry.memory_budget is not None and registry.memory_budget + bank.cache.limit == total
    assert bank.cache.limit >= 2 * size  # a pair's concatenation fits the mixes' share
    pairs = [(NAMES[i], NAMES[(i + 3) % len(NAMES)]) for i in range(len(NAMES))]
    checked = 0  # times a mix nobody used evicted a concatenation
    with ThreadPoolExecutor(2) as pool:
        for pair in pairs:
            for name in pair:  # loaded first, so both rows start together and share steps (a mix)
                registry.release(registry.acquire(name))
            list(pool.map(lambda n: generate(engine, n, tokens=24), pair))
            idle(engine)
            owned, viewed = weight_arrays(engine)
            stray = {k: v for k, v in viewed.items() if k not in owned}
            assert not stray, f"{sum(stray.values())} bytes of LoRA arrays held only by the feeds caches after {pair}"
            assert registry.held_bytes + bank.cache.nbytes <= total
            assert sum(owned.values()) <= total
            # a mix built for rows that left before it was ready (the mix builder's case): the bank
            # evicts the concatenation the last step used, and the engine and the runner let it go too
            others = [registry.get(n) for n in registry.names() if n in NAMES and n not in pair][:2]
            if len(others) == 2:
                evictions = bank.cache.evictions
                bank.build({e.internal: engine.store.tensors(e.internal) for e in others if e is not None})
                checked += bank.cache.evictions > evictions
                owned, viewed = weight_arrays(engine)
                stray = {k: v for k, v in viewed.items() if k not in owned}
                assert not stray, f"{sum(stray.values())} bytes held only by the feeds caches after a mix nobody used"
    assert bank.cache.evictions >= 2 and registry.evictions >= 2  # both shares were full and made room
    assert checked >= 2


def test_rss_stays_flat_over_many_adapters_and_returns_to_base_after_unloads(tiny_bundle: Path,
                                                                              tmp_path: Path) -> None:
    """Twelve ~10 MB adapters cycled in mixed pairs through a budget of four (plus the mixes' share):
    the process RSS grows by about the budget, not by what was loaded over time, and after every
    adapter is unloaded it returns near where it started."""
    template = read_manifest(tiny_bundle).lora_template
    for i in range(12):
        synthetic_adapter(template, MODULES, 1024, tmp_path / f"r{i:02d}.onnx_adapter", seed=200 + i)
    assert adapter_bytes(tmp_path / "r00.onnx_adapter") > 5 * MIB
    in_fresh_process(measure_many_adapters, tiny_bundle, tmp_path)


def measure_many_adapters(tiny_bundle: Path, tmp_path: Path) -> None:
    names = [f"r{i:02d}" for i in range(12)]
    size = adapter_bytes(tmp_path / "r00.onnx_adapter")
    with engine_on(tiny_bundle, adapter_dir=str(tmp_path), adapter_memory_mb=memory_mb(4 * size),
                   max_batch=2) as engine:
        check_many_adapters(engine, names, size)


def check_many_adapters(engine: Any, names: list[str], size: int) -> None:
    total = engine.config.adapter_memory_bytes
    with ThreadPoolExecutor(2) as pool:  # warm-up on the base model: a pair's step allocations
        list(pool.map(lambda _: generate(engine, "", tokens=8), range(2)))
    base = rss()
    peaks = []
    with ThreadPoolExecutor(2) as pool:
        for _round in range(2):
            for i in range(0, len(names), 2):
                list(pool.map(lambda n: generate(engine, n, tokens=8), (names[i], names[(i + 3) % len(names)])))
                idle(engine)
                peaks.append(rss() - base)
    loaded_over_time = engine.registry.evictions * size
    assert loaded_over_time > 3 * total  # far more went through than the budget holds
    # the budget, plus a pair's concatenation while a step uses it (a bigger one than the mixes' share
    # stays while in use), plus allocator slack
    bound = total + 2 * size + 24 * MIB
    assert max(peaks) <= bound, f"RSS grew {max(peaks) / MIB:.0f} MiB, bound {bound / MIB:.0f} MiB: {[round(p / MIB) for p in peaks]}"
    for name in engine.registry.names():
        engine.registry.unload(name, timeout=10)
    idle(engine)
    engine._mixes.trim()
    deadline = time.time() + 10
    while (after := rss() - base) >= 0.25 * max(peaks) and time.time() < deadline:
        time.sleep(0.2)
    assert after < 0.25 * max(peaks), f"RSS {base / MIB:.0f} MiB + {max(peaks) / MIB:.0f} at most -> + {after / MIB:.0f} after unloads"


def test_onnxruntime_arena_is_handed_back_after_a_large_shape(tiny_bundle: Path) -> None:
    """onnxruntime's CPU arena grows to the largest step it ran (here 8 prompts of 480 tokens: the
    attention scores alone are tens of MB) and keeps it; every ARENA_SHRINK_EVERY runs one run shrinks
    it, so the RSS returns near where it was once the large step is over."""
    in_fresh_process(measure_arena, tiny_bundle)


def measure_arena(tiny_bundle: Path) -> None:
    from slmops.runtime import runner as runner_module
    from slmops.runtime.runner import ModelRunner

    runner_module.ARENA_SHRINK_EVERY = 8  # a fresh process: nothing to restore
    manifest = read_manifest(tiny_bundle)
    runner = ModelRunner(tiny_bundle / manifest.model_dir, manifest.lora_template, rows=8, threads=1, max_length=512)
    runner.cache.ensure(512)
    step = (np.ones(1, np.int64), np.zeros(1, np.int64))
    while runner.runs % 8 != 7:  # the next run (the large one) is the last before a shrink... and then some
        runner.decode(*step, {})
    runner.decode(*step, {})  # this one shrinks: the arena holds only what a decode needs
    base = rss()
    rng = np.random.default_rng(0)
    runner.prefill_rows(0, rng.integers(1, 300, (8, 480)), np.full(8, 480), {})
    grown = rss()
    assert grown - base > 16 * MIB, f"the large step grew RSS by {(grown - base) / MIB:.1f} MiB only"
    for _ in range(8):  # small steps up to and including the shrinking run
        runner.decode(*step, {})
    from slmops.runtime.memory import release_freed_memory

    release_freed_memory()  # the arena's regions went back to malloc; the heap's free pages to the OS
    after = rss()
    assert after - base < 0.25 * (grown - base), f"RSS {base / MIB:.0f} -> {grown / MIB:.0f} -> {after / MIB:.0f} MiB"
