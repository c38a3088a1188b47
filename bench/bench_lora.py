"""Adapter speed and quality gap of a bundle (run by hand; not part of the test suite).

Speed (decode tokens/s, fixed length, threads pinned, interleaved repeats, medians):
  * ``plain``: the same base graph and quantization WITHOUT LoRA inputs (the ceiling: a merged
    single-adapter bundle has exactly this graph and speed);
  * ``plain_builder_int4``: the onnxruntime-genai builder's own int4 graph (its fastest, lossier);
  * ``bundle``: the bundle's LoRA-input graph with no adapter and with each of its adapters;
  * the same three through the gRPC server (GenerateStream, ``min_new_tokens`` = fixed length).
Quality on the adapters' test rows (``test_split`` of their runs: rows that neither training nor
checkpoint selection saw): bundle vs PyTorch fp32+PEFT (accuracy / ROUGE-L) and base perplexity vs
fp32. ``--peers``: llama.cpp (llama-cpp-python) on the Q4_1 GGUF the default model comes from,
adapters converted with llama.cpp's convert_lora_to_gguf.py; its decode runs join the same
interleaved, warmed-up repeats as every other case (loaded ``--instances`` times, like them).

    make bench-lora                  # .venv/bin/python bench/bench_lora.py dist/bundles/cpu
    make bench-peers                 # + llama.cpp (installs llama-cpp-python: ~9 min compile)

Writes JSON (``--out``) and prints a markdown table of ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_build import decode_speed as decode_run  # noqa: E402  (fixed-length greedy run: tok/s, prefill ms)
from bench_serve import ServerProcess, versions  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint, in five sentences."
GOALS = {"adapter_vs_plain": 0.90, "no_adapter_vs_plain": 0.97, "grpc_within": 0.05, "accuracy_points": 1.0, "ppl_pct": 5.0}


def stream_run(client: Any, prompt_messages: list[dict[str, str]], adapter: str, new_tokens: int) -> float:
    """Decode tok/s of one GenerateStream seen by the client (first chunk to last)."""
    first = last = None
    tokens = 0
    for chunk in client.generate_stream(messages=prompt_messages, adapter=adapter, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens):
        now = time.perf_counter()
        first = first or now
        last = now
        tokens = chunk.usage.completion_tokens or tokens
    assert first is not None and last is not None and tokens == new_tokens, tokens
    return (tokens - 1) / (last - first)


def export_baselines(hf_dir: str, work: Path, manifest: Any) -> dict[str, Path]:
    from slmops_build.export import export_base_model

    from slmops.targets import get_target

    target = get_target(manifest.target.name, precision=manifest.target.precision)
    extra = dict(manifest.build.get("config", {}).get("extra_options") or {})
    out = {"plain": work / "plain", "plain_builder_int4": work / "plain_builder_int4"}
    if not (out["plain"] / "model.onnx").is_file():
        export_base_model(hf_dir, out["plain"], target, None, extra, with_lora=False)
    if not (out["plain_builder_int4"] / "model.onnx").is_file():
        export_base_model(hf_dir, out["plain_builder_int4"], get_target(manifest.target.name, precision="int4"), None,
                          {"quantizer": "builder"}, with_lora=False)
    return out


def bench_speed(bundle: Path, manifest: Any, baselines: dict[str, Path], ids: list[int], messages: list[dict[str, str]],
                args: argparse.Namespace, peers: dict[str, list[Callable[[int], float]]] | None = None) -> dict[str, Any]:
    """Interleaved decode speed of every case (decoded by the server's runner, slmops.runtime);
    ``peers``: case -> one runner per loaded instance (``runner(new_tokens) -> tok/s``), warmed up
    and interleaved with the rest."""
    from slmops_serve.client import SlmopsClient

    from slmops.runtime import LocalModel

    names = list(manifest.adapters)
    # Every graph is loaded --instances times and each instance runs every repeat: on this kind of
    # machine one instance of the SAME graph can run a few % faster than another (where its weights
    # landed in memory), which would otherwise bias a ratio.
    cases: dict[str, list[tuple[Any, str | None]]] = {}
    for _ in range(args.instances):
        for key, path in baselines.items():
            cases.setdefault(key, []).append((LocalModel(path, None, threads=args.threads), None))
        lora = LocalModel(bundle / manifest.model_dir, manifest.lora_template, threads=args.threads)
        for name, info in manifest.adapters.items():
            lora.load_adapter(name, bundle / info.file)
        cases.setdefault("bundle", []).append((lora, None))
        for n in names:
            cases.setdefault(f"bundle+{n}", []).append((lora, n))
    peers = peers or {}
    runs: dict[str, list[float]] = {key: [] for key in [*cases, *peers]}
    prefill: dict[str, list[float]] = {key: [] for key in cases}
    server = client = None
    if not args.no_grpc:
        server = ServerProcess(bundle, bundle / "adapters", args.threads, Path(args.work) / "server.log")
        client = SlmopsClient(f"127.0.0.1:{server.port}", timeout=600)
        server.wait_ready(client)
        runs.update({"grpc": [], **{f"grpc+{n}": [] for n in names}})
    try:
        for instances in cases.values():  # warm-up
            for model, adapter in instances:
                decode_run(model, ids, 8, adapter)
        for runners in peers.values():
            for runner in runners:
                runner(8)
        if client is not None:
            for adapter in ["", *names]:
                stream_run(client, messages, adapter, 8)
        for rep in range(args.repeats):
            order = list(cases) + list(peers) + ([k for k in runs if k.startswith("grpc")] if client else [])
            for key in order if rep % 2 == 0 else reversed(order):  # interleaved, alternating order
                if key in peers:
                    runs[key] += [runner(args.new_tokens) for runner in peers[key]]
                elif key.startswith("grpc"):
                    adapter = key.partition("+")[2]
                    runs[key].append(stream_run(client, messages, adapter, args.new_tokens))
                else:
                    for model, active in cases[key]:
                        tps, ms = decode_run(model, ids, args.new_tokens, active)
                        runs[key].append(tps)
                        prefill[key].append(ms)
            print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
    med = {key: statistics.median(values) for key, values in runs.items()}
    plain = med["plain"]
    result: dict[str, Any] = {"threads": args.threads, "new_tokens": args.new_tokens, "prompt_tokens": len(ids),
                              "repeats": args.repeats, "instances": args.instances, "decode_tok_s": {k: round(v, 1) for k, v in med.items()},
                              "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                              "prefill_ms": {k: round(statistics.median(v), 1) for k, v in prefill.items() if v}}
    ratios = {k: round(v / plain, 3) for k, v in med.items()}
    result["vs_plain"] = ratios
    result["vs_plain_builder_int4"] = {k: round(v / med["plain_builder_int4"], 3) for k, v in med.items()}
    if client is not None:
        # the gRPC ratio vs the in-process ratio of the same case: goal within 5%
        result["grpc_vs_inprocess"] = {
            key: round(med[key] / med[key.replace("grpc", "bundle", 1)], 3) for key in med if key.startswith("grpc")}
    return result


def bench_quality(bundle: Path, manifest: Any, hf_dir: str, rows: int | None) -> dict[str, Any]:
    from slmops_build.adapters import load_peft_adapter
    from slmops_build.validate import Bounds, validate_bundle

    from slmops.targets import get_target

    target = get_target(manifest.target.name, precision=manifest.target.precision)
    adapters = {name: (load_peft_adapter(name, info.source_run, None, None), bundle / info.file)
                for name, info in manifest.adapters.items() if info.source_run}
    report = validate_bundle(bundle, hf_dir, manifest.lora_template, target, adapters,
                             Bounds(rows=rows, max_accuracy_drop=GOALS["accuracy_points"], max_ppl_increase=GOALS["ppl_pct"],
                                    ppl_texts=rows or 50, split="test"))
    return report


class LlamaCpp:
    """llama.cpp on the Q4_1 GGUF + adapters converted by its own convert_lora_to_gguf.py."""

    def __init__(self, manifest: Any, hf_dir: str, convert_dir: Path, work: Path, args: argparse.Namespace) -> None:
        import llama_cpp
        from slmops_build.adapters import load_peft_adapter

        from slmops.models import default_gguf_path

        gguf = default_gguf_path()
        self.info: dict[str, Any] = {"llama_cpp_python": llama_cpp.__version__, "gguf": str(gguf), "adapters": {}}
        self.peft = {name: load_peft_adapter(name, info.source_run, None, None) for name, info in manifest.adapters.items()}
        lora_files = {name: convert_lora(adapter.adapter_dir, hf_dir, convert_dir, work / f"{name}.lora.gguf")
                      for name, adapter in self.peft.items()}

        def load(lora: Path | None) -> Any:
            kwargs = {"lora_path": str(lora)} if lora else {}
            return llama_cpp.Llama(model_path=str(gguf), n_threads=args.threads, n_ctx=1024, verbose=False, **kwargs)

        # as many loads of each as the ONNX graphs get (--instances): the same placement effects
        self.instances: dict[str, list[Any]] = {"llama_cpp": [load(None) for _ in range(args.instances)]}
        for name, path in lora_files.items():
            self.instances[f"llama_cpp+{name}"] = [load(path) for _ in range(args.instances)]
        self.eos = {int(self.instances["llama_cpp"][0].token_eos())}

    def generate(self, llm: Any, prompt: list[int], max_new: int, fixed: bool = False) -> tuple[list[int], float]:
        llm.reset()
        tokens: list[int] = []
        first = ended = 0.0
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            first = first or now
            ended = now
            if token in self.eos and not fixed:
                break
            tokens.append(int(token))
            if len(tokens) >= max_new:
                break
        return tokens, (len(tokens) - 1) / max(ended - first, 1e-9)

    def speed_runners(self, ids: list[int]) -> dict[str, list[Callable[[int], float]]]:
        """Fixed-length decode runners for bench_speed's interleaved loop."""
        def runner(llm: Any) -> Callable[[int], float]:
            return lambda new_tokens: self.generate(llm, ids, new_tokens, fixed=True)[1]

        return {key: [runner(llm) for llm in llms] for key, llms in self.instances.items()}

    def quality(self, hf_dir: str, rows: int | None) -> dict[str, Any]:
        """Task score of each adapter on its run's test rows (as bench_quality scores the bundle)."""
        from slmops_build.validate import Bounds, eval_set, task_score
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        for name, adapter in self.peft.items():
            data = eval_set(adapter, tokenizer, Bounds(rows=rows, split="test"))
            answers = []
            for prompt in data.prompts:
                prompt_ids = list(tokenizer(prompt, add_special_tokens=not data.chat)["input_ids"])
                tokens, _ = self.generate(self.instances[f"llama_cpp+{name}"][0], prompt_ids, data.max_new_tokens)
                answers.append(str(tokenizer.decode(tokens, skip_special_tokens=True)).strip())
            metric, score = task_score(answers, data.references, data.label_task)
            self.info["adapters"][name] = {"metric": metric, "llama_cpp": round(score, 4), "rows": len(answers)}
        return self.info


def convert_lora(adapter_dir: Path, hf_dir: str, convert_dir: Path, dest: Path) -> Path:
    """PEFT adapter -> GGUF LoRA with llama.cpp's own converter (kept in the work folder)."""
    if not dest.is_file():
        cmd = [sys.executable, str(convert_dir / "convert_lora_to_gguf.py"), "--base", hf_dir, "--outfile", str(dest),
               "--outtype", "f32", str(adapter_dir)]
        # llama.cpp's gguf-py first: the converter expects its own gguf version
        env = {**os.environ, "PYTHONPATH": str(convert_dir / "gguf-py"), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"convert_lora_to_gguf.py failed for {adapter_dir}:\n{proc.stderr[-2000:]}")
    return dest


def table(result: dict[str, Any]) -> str:
    speed = result.get("speed", {})
    lines = ["| case | decode tok/s | vs plain (same quantization) | vs builder int4 plain |", "|---|---|---|---|"]
    for key, tps in speed.get("decode_tok_s", {}).items():
        lines.append(f"| {key} | {tps} | {speed['vs_plain'][key]:.3f} | {speed['vs_plain_builder_int4'][key]:.3f} |")
    if "grpc_vs_inprocess" in speed:
        lines += ["", "| gRPC / in-process (same case) | ratio |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in speed["grpc_vs_inprocess"].items()]
    quality = result.get("quality", {})
    peers = result.get("llama_cpp", {}).get("adapters", {})
    if quality.get("adapters"):
        lines += ["", "| adapter | metric | bundle int4 | PyTorch fp32+PEFT | llama.cpp Q4_1 | rows |", "|---|---|---|---|---|---|"]
        for name, entry in quality["adapters"].items():
            peer = peers.get(name, {}).get("llama_cpp", "-")
            lines.append(f"| {name} | {entry.get('metric')} | {entry.get('bundle')} | {entry.get('pytorch')} | {peer} | {entry.get('rows')} |")
    if quality.get("perplexity"):
        ppl = quality["perplexity"]
        lines.append(f"\nbase perplexity: bundle {ppl.get(result['precision'])} vs fp32 {ppl['fp32']} ({ppl['increase_pct']:+.2f}%)")
    if "llama_cpp" in result:
        lines.append(f"llama.cpp decode tok/s: {result['llama_cpp']['decode_tok_s']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--instances", type=int, default=2, help="loads of each graph (each runs every repeat)")
    parser.add_argument("--rows", type=int, default=None, help="test rows per adapter (default: all of them)")
    parser.add_argument("--no-grpc", dest="no_grpc", action="store_true")
    parser.add_argument("--no-quality", dest="no_quality", action="store_true")
    parser.add_argument("--no-speed", dest="no_speed", action="store_true")
    parser.add_argument("--peers", action="store_true", help="add llama.cpp (needs llama-cpp-python: make bench-peers)")
    parser.add_argument("--llama-convert", dest="llama_convert", type=Path, default=None,
                        help="llama.cpp source folder with convert_lora_to_gguf.py and gguf-py/")
    parser.add_argument("--work", default=None, help="folder for the baseline graphs (kept; default: a temp folder)")
    parser.add_argument("--out", default="bench/results/lora.json")
    args = parser.parse_args()
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)

    from slmops_build.validate import quiet_transformers
    from transformers import AutoTokenizer

    from slmops.bundle import read_manifest
    from slmops.models import resolve_model_path

    quiet_transformers()
    bundle = args.bundle
    manifest = read_manifest(bundle)
    hf_dir = str(resolve_model_path(manifest.build.get("model_path") or manifest.base_model.source))
    own_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="slmops-bench-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": PROMPT}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    result: dict[str, Any] = {"bundle": str(bundle), "model": hf_dir, "precision": manifest.target.precision,
                              "abi_version": manifest.lora_template.abi_version, "goals": GOALS, "versions": versions(),
                              "adapters": {n: {"rank": a.rank, "modules": a.target_modules} for n, a in manifest.adapters.items()}}
    out_path = Path(args.out)
    try:
        llama = None
        if args.peers:
            if args.llama_convert is None:
                raise SystemExit("--peers needs --llama-convert DIR (make bench-peers sets it)")
            print("llama.cpp: converting adapters, loading the GGUF", flush=True)
            llama = LlamaCpp(manifest, hf_dir, args.llama_convert, work, args)
        if not args.no_speed:
            t0 = time.time()
            baselines = export_baselines(hf_dir, work, manifest)
            result["baseline_export_s"] = round(time.time() - t0, 1)
            print(f"speed: {args.repeats} interleaved repeats x {args.instances} instances of {args.new_tokens} tokens, "
                  f"{args.threads} threads", flush=True)
            result["speed"] = bench_speed(bundle, manifest, baselines, ids, messages, args,
                                          peers=llama.speed_runners(ids) if llama else None)
        if not args.no_quality:
            print(f"quality: {args.rows or 'all'} test rows per adapter, bundle vs PyTorch fp32+PEFT", flush=True)
            result["quality"] = bench_quality(bundle, manifest, hf_dir, args.rows)
        if llama is not None:
            print("llama.cpp: quality on the same test rows", flush=True)
            result["llama_cpp"] = llama.quality(hf_dir, args.rows)
            if "speed" in result:  # its speeds come from the interleaved loop above
                result["llama_cpp"]["decode_tok_s"] = {k: v for k, v in result["speed"]["decode_tok_s"].items()
                                                       if k.startswith("llama_cpp")}
    finally:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        print(table(result))
        print(f"wrote {out_path}")
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
