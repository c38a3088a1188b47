"""Throughput of 8 streams against the number of distinct adapters among them (S-LoRA style). JSON.

    .venv/bin/python bench/bench_adapter_mix.py BUNDLE --out bench/results/adapter_mix_<tag>.json
    .venv/bin/python bench/bench_adapter_mix.py --make-bundle /tmp/small-bundle --out ...  # no model at hand

``--make-bundle DIR`` first builds (``slmops build``, fp32, no validation) a random-init Llama of
hidden 512, 8 layers, 4 KV heads, with the test suite's 400-token tokenizer (``SMALL_LLAMA``): the
speeds of a model of that shape, not of a trained one, with synthetic adapters.

In one process, the engine as the server runs it (continuous batching, ``--max-batch 8``): 8 streams
of a fixed length (end-of-sequence suppressed) start together and decode to the end; the aggregate
decode rate is their tokens over the wall time of the round. The streams' adapters:

  base     no adapter (the ceiling)
  k1 k2 k4 k8   the 8 streams spread round-robin over 1, 2, 4 or 8 distinct synthetic adapters
           (all modules, ``--rank``), loaded beforehand: a step's mix is concatenated once (off
           the scheduler thread) and each distinct adapter's weights are read once per step
  lru      8 distinct adapters per round, drawn from a pool of ``--pool`` in ``--adapter-dir`` on a
           second engine whose ``--adapter-memory`` holds ``--lru-fit`` of them: every round names
           adapters the LRU evicted, so every request first loads its adapter (lazily, by name)

Scenarios are interleaved ``--reps`` times after one untimed warm-up round each; medians, and
ratios against k1, are printed and written. The machine's load average is recorded: on a shared
machine compare the scenarios of one run, not runs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "serve")]

from bench.synthetic import synthetic_adapter  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Tone of: I lost my keys again\n", "Extract: a table for two in Paris on Friday\n",
           "Tone of: we won the cup!\n", "Hello there, how are", "Extract: 3 rooms in Rome\n",
           "Tone of: the train is late\n", "Once upon a time", "Tone of: what a lovely day\n"]
STREAMS = 8


SMALL_LLAMA: dict[str, Any] = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                                    num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                                    rope_theta=10000.0, tie_word_embeddings=True)


def make_small_bundle(out: Path) -> Path:
    """A cpu fp32 bundle of a random-init SMALL_LLAMA (no adapters, no validation) at ``out``."""
    import torch
    from rich.console import Console
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path[:0] = [str(REPO / "build")]
    from slmops_build.build import BuildConfig, build_bundle

    from tests.conftest import make_tiny_tokenizer

    if (out / "bundle.json").is_file():
        return out
    model_dir = out.parent / f"{out.name}-model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SMALL_LLAMA)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    build = BuildConfig.model_validate({"target": "cpu", "precision": "fp32", "model_name_or_path": str(model_dir),
                                        "output_path": str(out), "validate_bundle": False, "overwrite": True})
    return Path(build_bundle(build, console=Console(stderr=True, quiet=True)))


def versions() -> dict[str, str]:
    import platform

    from slmops.contract import package_versions

    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count()),
            **package_versions(("onnxruntime", "numpy"))}


def make_engine(bundle: Path, adapter_dir: Path, threads: int | None, **overrides: Any) -> Any:
    from slmops_serve.config import ServeConfig
    from slmops_serve.engine import Engine

    config = ServeConfig(bundle_dir=str(bundle), adapter_dir=str(adapter_dir), max_batch=STREAMS, max_queue=64,
                         threads=threads, metrics_port=None, max_new_tokens_limit=4096, verify_bundle=False,
                         **overrides)
    engine = Engine(config)
    engine.load()
    return engine


def one_round(engine: Any, adapters: list[str], tokens: int) -> dict[str, float]:
    """8 streams at once; their adapters in ``adapters`` (one per stream, "" = base)."""
    from slmops_serve.engine import GenerationRequest

    started = time.perf_counter()
    gens = [engine.submit(GenerationRequest(prompt=PROMPTS[i], adapter=adapters[i], max_new_tokens=tokens,
                                            min_new_tokens=tokens)) for i in range(STREAMS)]
    results = [g.result() for g in gens]
    wall = time.perf_counter() - started
    produced = sum(r.completion_tokens for r in results)
    return {"tokens_per_s": produced / wall, "wall_s": wall, "ttft_p50_ms": statistics.median(r.ttft_ms for r in results),
            "ttft_max_ms": max(r.ttft_ms for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, nargs="?")
    parser.add_argument("--make-bundle", type=Path, default=None, help="build a random-init small bundle here first")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (a new file; never a committed one)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream per round")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pool", type=int, default=32, help="adapters in the LRU case's --adapter-dir")
    parser.add_argument("--lru-fit", type=float, default=10.0, help="adapters the LRU case's --adapter-memory holds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. a short run on a shared machine)")
    args = parser.parse_args(argv)
    from readme_figures import beside_committed  # never over a committed results file

    args.out = beside_committed(args.out)
    if args.out.exists():
        parser.error(f"--out {args.out} exists; write a new file (committed figures are updated on purpose, not by a run)")
    if args.make_bundle is not None:
        args.bundle = make_small_bundle(args.make_bundle)
    if args.bundle is None:
        parser.error("give BUNDLE or --make-bundle DIR")

    from slmops.bundle import read_manifest
    from slmops.contract import read_adapter_tensors

    manifest = read_manifest(args.bundle)
    template = manifest.lora_template
    work = Path(tempfile.mkdtemp(prefix="bench-adapter-mix-"))
    atexit.register(shutil.rmtree, work, True)  # the synthetic adapters (hundreds of MB) go with the run
    mix_dir, pool_dir = work / "mix", work / "pool"
    mix_dir.mkdir()
    pool_dir.mkdir()
    for i in range(STREAMS):
        synthetic_adapter(template, MODULES, args.rank, mix_dir / f"a{i}.onnx_adapter", seed=i)
    for i in range(args.pool):
        synthetic_adapter(template, MODULES, args.rank, pool_dir / f"p{i:03d}.onnx_adapter", seed=1000 + i)
    adapter_bytes = sum(int(a.nbytes) for a in read_adapter_tensors(mix_dir / "a0.onnx_adapter").values())
    budget_mb = args.lru_fit * adapter_bytes / (1 << 20)

    engine = make_engine(args.bundle, mix_dir, args.threads)
    for i in range(STREAMS):
        engine.registry.load(f"a{i}", path=f"a{i}.onnx_adapter")
    lru = make_engine(args.bundle, pool_dir, args.threads, adapter_memory_mb=budget_mb, lazy_load=True)

    def adapters_of(scenario: str, rep: int) -> list[str]:
        if scenario == "base":
            return [""] * STREAMS
        if scenario == "lru":
            start = (rep * STREAMS) % args.pool
            return [f"p{(start + i) % args.pool:03d}" for i in range(STREAMS)]
        k = int(scenario[1:])
        return [f"a{i % k}" for i in range(STREAMS)]

    scenarios = ["base", "k1", "k2", "k4", "k8", "lru"]
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
    lru_rounds = 0
    for s in scenarios:  # warm-up: onnxruntime's first runs of each shape, each mix built once
        one_round(lru if s == "lru" else engine, adapters_of(s, lru_rounds if s == "lru" else 0), args.tokens)
        lru_rounds += s == "lru"
    evictions_before, lazy_before = lru.registry.evictions, lazy_loads(lru)
    load_avg = [os.getloadavg()[0]]
    started = time.time()
    for rep in range(args.reps):
        order = scenarios[rep % len(scenarios):] + scenarios[:rep % len(scenarios)]  # rotate the order
        for s in order:
            target = lru if s == "lru" else engine
            runs[s].append(one_round(target, adapters_of(s, lru_rounds if s == "lru" else rep), args.tokens))
            lru_rounds += s == "lru"
        load_avg.append(os.getloadavg()[0])
    medians = {s: statistics.median(r["tokens_per_s"] for r in runs[s]) for s in scenarios}
    k1 = medians["k1"]
    result = {
        "bench": "adapter_mix", "bundle": str(args.bundle), "model_dir": manifest.model_dir,
        "precision": manifest.target.precision, "versions": versions(), "note": args.note,
        "streams": STREAMS, "tokens_per_stream": args.tokens, "reps": args.reps, "rank": args.rank,
        "adapter_bytes": adapter_bytes, "synthetic_adapters": True, "threads": engine.threads,
        "lru": {"pool": args.pool, "adapter_memory_mb": round(budget_mb, 3), "fits_adapters": args.lru_fit,
                "evictions": lru.registry.evictions - evictions_before, "lazy_loads": lazy_loads(lru) - lazy_before,
                "timed_rounds": args.reps},
        "mix_builds": engine._mixes.built if engine._mixes is not None else 0,
        "load_avg_1m": load_avg, "seconds": round(time.time() - started, 1),
        "median_tokens_per_s": {s: round(v, 2) for s, v in medians.items()},
        "ratio_vs_k1": {s: round(v / k1, 3) for s, v in medians.items()},
        "runs": runs,
    }
    engine.close()
    lru.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"8 streams x {args.tokens} tokens, rank {args.rank} adapters ({adapter_bytes / (1 << 20):.2f} MiB each), "
          f"{args.reps} reps; load avg {min(load_avg):.1f}-{max(load_avg):.1f}")
    print("| adapters | tok/s (median) | vs 1 adapter |")
    print("|---|---|---|")
    for s in scenarios:
        label = {"base": "none (base)", "lru": f"8 of {args.pool}, LRU evicting"}.get(s, f"{s[1:]} distinct")
        print(f"| {label} | {medians[s]:.1f} | {medians[s] / k1:.2f} |")
    print(f"lru: {result['lru']['evictions']} evictions, {result['lru']['lazy_loads']} lazy loads in the timed rounds")
    print(f"wrote {args.out}")
    return 0


def lazy_loads(engine: Any) -> int:
    value = engine.metrics.registry.get_sample_value("slmops_adapter_lazy_loads_total")
    return int(value or 0)


if __name__ == "__main__":
    sys.exit(main())
