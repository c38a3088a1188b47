"""Continuous batching on a real bundle, through `slmops serve BUNDLE` with no tuning flags.

    .venv/bin/python bench/bench_batching.py dist/bundles/cpu --out bench/results/batching_cpu.json

Measures, in ONE run, every configuration interleaved round by round (warm-up first, the
server's threads as the bundle sets them):
  1. aggregate decode tok/s of 1, 4 and 8 concurrent streams, each forced to the same length and
     prompt, with no adapter, all on one adapter, and mixed over 4 adapters of different ranks and
     modules (the bundle's, plus synthetic ones up to 4); ratios against 1 stream of the same mix
     (for the mix: one stream at a time cycling through the 4 adapters). Goals: >= 2.0x at 4, >= 2.6x at 8;
  2. a lone stream against onnxruntime-genai's og.Generator in-process on the same bundle (the
     engine the server used before; no gRPC on its side): goal >= 0.97x, with and without adapter;
  3. time to first token of a request arriving while 4 streams decode, against idle: goal <= 2x;
  4. the longest gap between tokens of running streams while a long prompt is prefilled, beside
     the time of one prefill chunk.
Results and the load average go to JSON; compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import REPO, ServerProcess, free_port, pct, start_tied, versions  # noqa: E402
from og_reference import OgReference  # noqa: E402
from synthetic import synthetic_adapter  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."
GOALS = {"x4": 2.0, "x8": 2.6, "single_vs_og": 0.97, "ttft_busy_vs_idle": 2.0}
EXTRA = {"od4": (["o_proj", "down_proj"], 4), "gu32": (["gate_proj", "up_proj"], 32),
         "qv8": (["q_proj", "v_proj"], 8), "all16": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"], 16)}


def timed_stream(client: Any, adapter: str, tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    """One forced-length GenerateStream; client-side times of send, first and every later chunk."""
    sent = time.perf_counter()
    stamps: list[float] = []
    last = None
    for chunk in client.generate_stream(prompt, adapter=adapter, max_new_tokens=tokens, min_new_tokens=tokens):
        stamps.append(time.perf_counter())
        last = chunk
    assert last is not None and last.usage.completion_tokens == tokens, "unequal work"
    return {"sent": sent, "first": stamps[0], "end": stamps[-1], "stamps": stamps, "tokens": tokens,
            "server_decode_tps": last.timings.decode_tokens_per_second, "prompt_tokens": last.usage.prompt_tokens}


def run_streams(client: Any, adapters: list[str], tokens: int) -> dict[str, Any]:
    """len(adapters) concurrent streams (stream i on adapters[i]); aggregate tok/s over the wall time."""
    with ThreadPoolExecutor(len(adapters)) as pool:
        records = list(pool.map(lambda a: timed_stream(client, a, tokens), adapters))
    wall = max(r["end"] for r in records) - min(r["sent"] for r in records)
    return {"tok_s": sum(r["tokens"] for r in records) / wall, "ttft_ms": [(r["first"] - r["sent"]) * 1000 for r in records]}


def run_sequential(client: Any, adapters: list[str], tokens: int) -> float:
    """One stream at a time over ``adapters``: the single-stream figure of a mix."""
    started = time.perf_counter()
    for adapter in adapters:
        timed_stream(client, adapter, tokens)
    return len(adapters) * tokens / (time.perf_counter() - started)


DEMO_PROMPTS = {  # the demo adapters' prompt templates (examples/train.yaml), user turn of the chat template
    "tone": ("tone", "Classify the tone of this phrase as joy, sadness, anger, fear or surprise: {phrase}"),
    "extract": ("extract", "Extract city, date and guests as JSON: {request}"),
}


def parity(bundle: Path, split: str, limit: int) -> dict[str, Any]:
    """Greedy answers of the demo adapters' ``split`` rows, each alone vs all submitted at once
    (batches of 8, mixed adapters), in-process on the server's engine. For each difference: the
    first differing token and the top-2 logit margin there when run alone (a near-tie flips on
    the rounding of a different kernel path, not on a wrong row)."""
    import numpy as np
    from slmops_serve.config import ServeConfig
    from slmops_serve.engine import Engine, GenerationRequest

    from slmops.bundle import read_manifest

    manifest = read_manifest(bundle)
    cases: list[tuple[str, list[dict[str, str]]]] = []
    for adapter, (folder, template) in DEMO_PROMPTS.items():
        if adapter not in manifest.adapters:
            continue
        path = REPO / "examples" / folder / f"{split}.jsonl"
        for line in path.read_text().splitlines()[:limit]:
            row = json.loads(line)
            cases.append((adapter, [{"role": "user", "content": template.format(**row)}]))
    if not cases:
        return {"skipped": "the bundle has no demo adapters (tone, extract)"}
    engine = Engine(ServeConfig(bundle_dir=str(bundle), metrics_port=None, max_queue=len(cases)))
    engine.load()
    try:
        alone = [engine.generate(GenerationRequest(messages=m, adapter=a, max_new_tokens=32)).text for a, m in cases]
        gens = [engine.submit(GenerationRequest(messages=m, adapter=a, max_new_tokens=32)) for a, m in cases]
        batched = [g.result().text for g in gens]
        # the scheduler is idle now (every request finished): replay the differences on its runner
        differences = []
        assert engine.runner is not None and engine.tokenizer is not None and engine.registry is not None
        for (adapter, messages), a, b in zip(cases, alone, batched, strict=True):
            if a == b:
                continue
            prefix = 0
            while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
                prefix += 1
            prompt_ids = engine.tokenizer.encode(engine.tokenizer.render_chat(messages) + a[:prefix])
            entry = engine.registry.get(adapter)
            assert entry is not None and engine.store is not None and engine.runner.bank is not None
            feeds = engine.runner.bank.feeds([(entry.internal, engine.store.tensors(entry.internal))])
            logits = engine.runner.prefill(0, np.asarray(prompt_ids), 0, feeds)
            top = np.sort(logits)[-2:]
            differences.append({"adapter": adapter, "alone": a, "batched": b, "first_diff_char": prefix,
                                "top2_logit_margin_alone": round(float(top[1] - top[0]), 5)})
    finally:
        engine.close()
    return {"split": split, "rows": len(cases), "identical": len(cases) - len(differences), "differences": differences}


class LlamaServer:
    """llama.cpp's llama-server (--parallel slots, per-request LoRA scales) on the default model's
    Q4_1 GGUF with the demo adapters converted by llama.cpp's own convert_lora_to_gguf.py."""

    def __init__(self, binary: Path, convert_dir: Path, adapters: dict[str, Path], threads: int, slots: int,
                 work: Path) -> None:
        import subprocess

        from bench_lora import convert_lora

        from slmops.models import default_gguf_path, resolve_model_path

        hf_dir = str(resolve_model_path("default"))
        self.names = list(adapters)
        loras = [convert_lora(path, hf_dir, convert_dir, work / f"{name}.lora.gguf") for name, path in adapters.items()]
        self.port = free_port()
        args = [str(binary), "-m", str(default_gguf_path()), "-np", str(slots), "-c", str(1024 * slots), "-t", str(threads),
                "--host", "127.0.0.1", "--port", str(self.port)]
        for lora in loras:
            args += ["--lora", str(lora)]
        self.log = open(work / "llama-server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = start_tied(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if self._get("/health").get("status") == "ok":
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start; see {self.log.name}")
            time.sleep(0.3)

    def _get(self, path: str) -> dict[str, Any]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path)
        body = conn.getresponse().read()
        conn.close()
        return dict(json.loads(body or b"{}"))

    def stream(self, adapter: str, tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
        """One streamed /completion of exactly ``tokens`` tokens (ignore_eos) on ``adapter`` ("" = none)."""
        import http.client

        body = json.dumps({"prompt": prompt, "n_predict": tokens, "ignore_eos": True, "stream": True, "cache_prompt": False,
                           "temperature": 0.0, "lora": [{"id": i, "scale": 1.0 if n == adapter else 0.0}
                                                        for i, n in enumerate(self.names)]})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        sent = time.perf_counter()
        conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        stamps: list[float] = []
        produced = 0
        for line in response:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content") or event.get("tokens"):
                stamps.append(time.perf_counter())
            if event.get("stop"):
                produced = int(event.get("tokens_predicted") or event.get("timings", {}).get("predicted_n", 0))
                break
        conn.close()
        assert produced == tokens and stamps, f"llama-server produced {produced} tokens, not {tokens}: unequal work"
        return {"sent": sent, "first": stamps[0], "end": stamps[-1], "tokens": tokens}

    def run_streams(self, adapters: list[str], tokens: int) -> dict[str, Any]:
        with ThreadPoolExecutor(len(adapters)) as pool:
            records = list(pool.map(lambda a: self.stream(a, tokens), adapters))
        wall = max(r["end"] for r in records) - min(r["sent"] for r in records)
        return {"tok_s": sum(r["tokens"] for r in records) / wall,
                "ttft_ms": [(r["first"] - r["sent"]) * 1000 for r in records]}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def peer_runs(args: argparse.Namespace, client: Any, manifest: Any, threads: int, levels: list[int], workdir: Path,
              console: Any) -> dict[str, Any]:
    """Us and llama-server (--parallel max(levels)) on the demo adapters mixed, interleaved round by round."""
    from slmops_build.adapters import load_peft_adapter

    demo = [n for n in ("tone", "extract") if n in manifest.adapters and manifest.adapters[n].source_run]
    if len(demo) < 2 or args.llama_convert is None:
        return {"skipped": "needs the demo adapters' train runs and --llama-convert"}
    peft = {n: load_peft_adapter(n, manifest.adapters[n].source_run, None, None).adapter_dir for n in demo}
    peer = LlamaServer(args.llama_server, args.llama_convert, peft, threads, max(levels), workdir)
    samples: dict[str, list[float]] = {}
    ttft: dict[str, list[float]] = {}
    try:
        peer.run_streams(demo, 16)  # warm-up
        for r in range(args.rounds):
            console.print(f"llama-server round {r + 1}/{args.rounds}")
            for level in levels:
                mix = [demo[i % len(demo)] for i in range(max(level, len(demo)))]
                for side, runs in (("slmops", lambda a: run_streams(client, a, args.tokens)),
                                   ("llama_server", lambda a: peer.run_streams(a, args.tokens))):
                    if level == 1:
                        started = time.perf_counter()
                        results = [runs([a]) for a in demo]
                        tok_s = len(demo) * args.tokens / (time.perf_counter() - started)
                        times = [t for res in results for t in res["ttft_ms"]]
                    else:
                        result = runs(mix[:level])
                        tok_s, times = result["tok_s"], result["ttft_ms"]
                    samples.setdefault(f"{side}@{level}", []).append(tok_s)
                    ttft.setdefault(f"{side}@{level}", []).extend(times)
    finally:
        peer.stop()
    return {"adapters": demo, "slots": max(levels), "tok_s": {k: round(statistics.median(v), 2) for k, v in samples.items()},
            "ttft_ms_p50": {k: round(pct(v, 50), 2) for k, v in ttft.items()},
            "note": "mixed demo adapters, raw prompt, forced lengths, interleaved; llama-server gets per-request LoRA scales"}


def readme_block(report: dict[str, Any]) -> str:
    """The README's concurrency figures, from a results JSON of this script."""
    tok, ratios, adapters = report["tok_s"], report["ratios"], report["adapters"]
    levels = sorted({int(k.split("@")[1]) for k in tok if k.split("@")[0] in ("none", "one", "mixed")})
    names = list(adapters)
    synthetic = [n for n, a in adapters.items() if a["synthetic"]]
    mixes = {"none": "no adapter", "one": f"all on {names[0]}", "mixed": f"mixed: {', '.join(names)}"}
    head = "| aggregate decode tok/s | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}" for n in levels) + " |"
    rows = [head, "|" + "---|" * (1 + len(levels))]
    for key, label in mixes.items():
        cells = [f"{tok[f'{key}@{n}']}" + (f" ({ratios[f'{key}@{n}']:.2f}x)" if n > 1 else "") for n in levels]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    one = names[0]
    ttft, long = report["ttft_ms"], report["long_prompt"]
    met = report.get("goals_met", {})
    missed = [k for k, v in met.items() if not v]
    lines = [
        f"`{report.get('command', 'bench/bench_batching.py')}`" + (f" ({report['bundle_note']})" if report.get("bundle_note") else "")
        + f"; `slmops serve` with its defaults, {report['threads']} "
        f"threads, {report['tokens']} forced tokens per stream, {report['rounds']} interleaved rounds, medians; "
        f"load average {report['load_average_before'][0]:.1f} before, {report['load_average_after'][0]:.1f} after "
        "(2-core x86_64). Ratios are against 1 stream of the same mix (for the mix, one stream at a time "
        f"cycling through its adapters). {', '.join(synthetic) + ' are synthetic adapters (bench/synthetic.py: same shapes as trained ones, random values); ' if synthetic else ''}"
        "goals: >= 2.0x at 4 streams, >= 2.6x at 8.",
        "", *rows, "",
        f"- A lone stream against onnxruntime-genai's og.Generator in-process (the engine before batching, no gRPC on "
        f"its side): {tok['server_decode@none']} vs {tok['og_decode@none']} tok/s without adapter "
        f"({ratios['single_vs_og@none']:.2f}x), {tok[f'server_decode@{one}']} vs {tok[f'og_decode@{one}']} with {one} "
        f"({ratios[f'single_vs_og@{one}']:.2f}x); goal >= 0.97x."
        + (f" For scale: {report['before_batching_note']}." if report.get("before_batching_note") else ""),
        f"- Time to first token: {ttft['idle_p50']} ms idle, {ttft['busy4_p50']} ms while 4 streams decode "
        f"({ratios['ttft_busy_vs_idle']:.2f}x; goal <= 2x).",
        f"- A {long.get('prompt_tokens', '?')}-token prompt arriving while 4 streams decode: prefilled in "
        f"{long.get('prefill_chunks', '?')} chunks over {long['prefill_wall_ms']} ms "
        f"({long['prefill_wall_ms'] / max(1, long.get('prefill_chunks') or 1):.0f} ms per chunk and step), decode steps "
        f"between them; the longest pause of a running stream meanwhile was {long['max_gap_ms_during']} ms "
        f"(their usual gap: {long['gap_ms_p50_before']} ms).",
    ]
    peer = report.get("llama_server", {})
    if "tok_s" in peer:
        peer_levels = sorted({int(k.split("@")[1]) for k in peer["tok_s"]})
        lines += ["", f"Beside llama.cpp's llama-server (`-np {peer['slots']}`, per-request LoRA scales, the same model as "
                  f"Q4_1 GGUF, its adapters converted by llama.cpp), mixed {' / '.join(peer['adapters'])} requests, "
                  "same run, interleaved:", "",
                  "| mixed adapters | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}: tok/s, TTFT p50" for n in peer_levels) + " |",
                  "|" + "---|" * (1 + len(peer_levels))]
        for side, label in (("slmops", "slmops serve"), ("llama_server", "llama-server")):
            lines.append(f"| {label} | " + " | ".join(f"{peer['tok_s'][f'{side}@{n}']}, {peer['ttft_ms_p50'][f'{side}@{n}']:.0f} ms"
                                                      for n in peer_levels) + " |")
    if missed:
        lines.append(f"- Goals not met in this run: {', '.join(missed)}.")
    parity_report = report.get("parity", {})
    if "rows" in parity_report:
        diffs = parity_report["differences"]
        margins = ", ".join(f"{d['top2_logit_margin_alone']}" for d in diffs)
        note = f" ({parity_report['note']})" if parity_report.get("note") else ""
        lines.append(f"- Greedy answers of the demo adapters' {parity_report['split']} rows, alone vs all at once "
                     f"(batches of 8){note}: {parity_report['identical']}/{parity_report['rows']} identical"
                     + (f"; each difference starts at a near-tie (top-2 logit margin {margins} when run alone)"
                        if diffs else "") + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--tokens", type=int, default=96, help="forced tokens per stream")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--long-prompt-tokens", type=int, default=1500)
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="llama.cpp's llama-server binary: measure it beside us on the demo adapters (not in CI)")
    parser.add_argument("--llama-convert", type=Path, default=None,
                        help="llama.cpp source folder with convert_lora_to_gguf.py and gguf-py/")
    parser.add_argument("--parity-split", default="eval", help="demo adapters' rows for the alone-vs-batched check")
    parser.add_argument("--parity-rows", type=int, default=50)
    parser.add_argument("--parity-only", type=Path, default=None,
                        help="run only the parity check on BUNDLE and add it to this existing results JSON")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "batching.json")
    args = parser.parse_args(argv)
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)

    from rich.console import Console
    from slmops_serve.client import SlmopsClient
    from slmops_serve.engine import session_threads

    from slmops.bundle import read_manifest

    console = Console(stderr=True)
    bundle = args.bundle.resolve()
    if args.parity_only is not None:
        existing = json.loads(args.parity_only.read_text())
        existing["parity"] = {**parity(bundle, args.parity_split, args.parity_rows), "bundle": str(bundle),
                              "command": "python bench/bench_batching.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        args.parity_only.write_text(json.dumps(existing, indent=2) + "\n")
        print(json.dumps({k: v for k, v in existing["parity"].items() if k != "differences"}, indent=2))
        return 0
    manifest = read_manifest(bundle)
    model_dir = bundle / manifest.model_dir
    threads = session_threads(model_dir, None) or 1
    levels = [int(x) for x in args.streams.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="slmops-bench-batching-"))
    adapter_dir = workdir / "adapters"
    adapter_dir.mkdir()
    files: dict[str, Path] = {}
    synthetic: dict[str, bool] = {}
    for name, info in manifest.adapters.items():
        files[name] = Path(shutil.copy(bundle / info.file, adapter_dir / f"{name}.onnx_adapter"))
        synthetic[name] = False
    for name, (modules, rank) in EXTRA.items():
        if len(files) >= 4:
            break
        files[name] = synthetic_adapter(manifest.lora_template, modules, rank, adapter_dir / f"{name}.onnx_adapter")
        synthetic[name] = True
    mix = list(files)[:4]
    one = mix[0]
    report: dict[str, Any] = {
        "bundle": str(bundle), "target": manifest.target.model_dump(), "threads": threads, "tokens": args.tokens,
        "rounds": args.rounds, "prompt": PROMPT, "server_flags": "defaults (no tuning flags)",
        "adapters": {n: {"synthetic": synthetic[n], "bytes": files[n].stat().st_size} for n in mix},
        "versions": versions(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before": list(os.getloadavg()), "goals": GOALS,
        "command": "python bench/bench_batching.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    server = ServerProcess(bundle, adapter_dir, None, workdir / "server.log")
    try:
        with SlmopsClient(f"127.0.0.1:{server.port}", timeout=600) as client:
            server.wait_ready(client)
            for name in mix:
                if synthetic[name]:
                    client.load_adapter(name, path=files[name].name)
            # onnxruntime-genai, one og.Generator per request: the independent peer (og_reference.py)
            og_single = OgReference(model_dir, threads, {n: files[n] for n in mix})
            console.print("warm-up")
            for adapters in ([""], [one], mix, mix * 2):
                run_streams(client, adapters, 16)
            og_single.decode_tps(PROMPT, one, 16)
            mixes = {"none": lambda n: [""] * n, "one": lambda n: [one] * n, "mixed": lambda n: [mix[i % 4] for i in range(n)]}
            samples: dict[str, list[float]] = {}
            ttft: dict[str, list[float]] = {}
            for r in range(args.rounds):
                console.print(f"round {r + 1}/{args.rounds}: streams {levels} x {list(mixes)}; og.Generator")
                for mix_name, make in mixes.items():
                    for level in levels:
                        key = f"{mix_name}@{level}"
                        if level == 1 and mix_name == "mixed":
                            samples.setdefault(key, []).append(run_sequential(client, mix, args.tokens))
                            continue
                        result = run_streams(client, make(level), args.tokens)
                        samples.setdefault(key, []).append(result["tok_s"])
                        ttft.setdefault(key, []).extend(result["ttft_ms"])
                # a lone stream's decode rate, server (its own measure) vs og in-process, interleaved
                for adapter in ("", one):
                    label = adapter or "none"
                    served = timed_stream(client, adapter, args.tokens)
                    samples.setdefault(f"server_decode@{label}", []).append(
                        (args.tokens - 1) / (served["end"] - served["first"]))
                    samples.setdefault(f"og_decode@{label}", []).append(og_single.decode_tps(PROMPT, adapter, args.tokens))
            med = {k: statistics.median(v) for k, v in samples.items()}
            report["tok_s"] = {k: round(v, 2) for k, v in med.items()}
            report["tok_s_all"] = {k: [round(x, 2) for x in v] for k, v in samples.items()}
            ratios: dict[str, float] = {}
            for mix_name in mixes:
                for level in levels[1:]:
                    ratios[f"{mix_name}@{level}"] = round(med[f"{mix_name}@{level}"] / med[f"{mix_name}@1"], 3)
            for label in ("none", one):
                ratios[f"single_vs_og@{label}"] = round(med[f"server_decode@{label}"] / med[f"og_decode@{label}"], 3)

            console.print("time to first token: idle vs 4 busy streams")
            idle_ms, busy_ms = [], []
            for _ in range(5):
                probe = timed_stream(client, one, 4)
                idle_ms.append((probe["first"] - probe["sent"]) * 1000)
            stop = threading.Event()

            def keep_busy(adapter: str) -> None:
                while not stop.is_set():
                    timed_stream(client, adapter, args.tokens)

            with ThreadPoolExecutor(4) as pool:
                busy = [pool.submit(keep_busy, mix[i % 4]) for i in range(4)]
                time.sleep(1.0)
                for _ in range(5):
                    probe = timed_stream(client, one, 4)
                    busy_ms.append((probe["first"] - probe["sent"]) * 1000)
                    time.sleep(0.2)
                stop.set()
                for f in busy:
                    f.result()
            report["ttft_ms"] = {"idle_p50": round(pct(idle_ms, 50), 2), "busy4_p50": round(pct(busy_ms, 50), 2),
                                 "idle": [round(x, 2) for x in idle_ms], "busy4": [round(x, 2) for x in busy_ms],
                                 "concurrent_streams_p50": {k: round(pct(v, 50), 2) for k, v in ttft.items()}}
            ratios["ttft_busy_vs_idle"] = round(pct(busy_ms, 50) / pct(idle_ms, 50), 3)

            console.print("a long prompt arriving while 4 streams decode")
            long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * (args.long_prompt_tokens // 10))
            with ThreadPoolExecutor(5) as pool:
                running = [pool.submit(timed_stream, client, mix[i % 4], args.tokens * 2) for i in range(4)]
                time.sleep(0.5)
                started = time.perf_counter()
                long_run = pool.submit(timed_stream, client, one, 4, long_prompt).result()
                records = [f.result() for f in running]
            window = (started, long_run["first"])
            gaps = [b - a for r in records for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)
                    if window[0] <= b <= window[1] + 0.05]
            normal = [b - a for r in records for a, b in zip(r["stamps"], r["stamps"][1:], strict=False) if b < window[0]]
            chunk = 256  # the server's default --prefill-chunk (this bench passes no tuning flags)
            report["long_prompt"] = {"prompt_chars": len(long_prompt), "prompt_tokens": long_run["prompt_tokens"],
                                     "prefill_chunks": -(-long_run["prompt_tokens"] // chunk),
                                     "prefill_wall_ms": round((window[1] - window[0]) * 1000, 1),
                                     "max_gap_ms_during": round(max(gaps) * 1000, 1) if gaps else None,
                                     "gap_ms_p50_before": round(pct(normal, 50) * 1000, 1) if normal else None,
                                     "streams_running": 4}
            if args.llama_server is not None:
                report["llama_server"] = peer_runs(args, client, manifest, threads, levels, workdir, console)
    finally:
        report["server_exit_code"] = server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"greedy parity: demo adapters' {args.parity_split} rows alone vs batched")
    report["parity"] = parity(bundle, args.parity_split, args.parity_rows)
    report["ratios"] = ratios
    report["load_average_after"] = list(os.getloadavg())
    report["goals_met"] = {
        **{k: v >= (GOALS["x4"] if k.endswith("@4") else GOALS["x8"]) for k, v in ratios.items() if "@" in k and "og" not in k},
        **{k: v >= GOALS["single_vs_og"] for k, v in ratios.items() if k.startswith("single_vs_og")},
        "ttft_busy_vs_idle": ratios["ttft_busy_vs_idle"] <= GOALS["ttft_busy_vs_idle"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"tok_s": report["tok_s"], "ratios": ratios, "ttft_ms": {k: report["ttft_ms"][k] for k in
                                                                              ("idle_p50", "busy4_p50")},
                      "long_prompt": report["long_prompt"], "goals_met": report["goals_met"],
                      "parity": {k: v for k, v in report["parity"].items() if k != "differences"}}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
