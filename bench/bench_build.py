"""Benchmark the build stage on a real model (run by hand; not part of the test suite).

For each precision: export time, bundle size relative to fp32, base perplexity vs PyTorch fp32.
For the cpu target's precision (int4 by default): decode tokens/s of the LoRA-input graph without
an adapter and with each adapter, vs a plain graph without LoRA inputs (medians of interleaved
runs, pinned thread count), decoded by the server's runner (slmops.runtime). Prints ratios and
writes JSON.

    .venv/bin/python bench/bench_build.py --adapter tone=runs/tone --adapter extract=runs/extract
    .venv/bin/python bench/bench_build.py --precisions int4 --repeats 5 --out bench/results/build.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Classify the tone of this phrase as joy, sadness, anger, fear or surprise: I can't believe it worked on the first try!"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ppl_texts(adapters: dict[str, Any], tokenizer: Any, rows: int) -> list[tuple[str, bool]]:
    from slmops_build.validate import FALLBACK_TEXTS, Bounds, eval_set

    texts: list[tuple[str, bool]] = []
    for adapter in adapters.values():
        data = eval_set(adapter, tokenizer, Bounds(rows=rows))
        if not data.skipped:
            texts += [(t, data.chat) for t in data.texts]
    return texts or [(t, False) for t in FALLBACK_TEXTS]


def perplexities(model_dir: Path, hf_dir: str, texts: list[tuple[str, bool]], threads: int,
                 torch_cache: dict[str, Any]) -> tuple[float, float]:
    """(ONNX ppl, PyTorch fp32 ppl) of the base model on ``texts``."""
    import torch
    from slmops_build.validate import MAX_PPL_TOKENS, OrtScorer, _nll, _ppl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    scorer = OrtScorer(model_dir, threads=threads)
    onnx_nll = []
    encoded = [list(tok(t, add_special_tokens=not chat)["input_ids"])[:MAX_PPL_TOKENS] for t, chat in texts]
    for ids in encoded:
        onnx_nll.append(_nll(scorer.logits(ids), ids))
    if "ppl" not in torch_cache:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            torch_cache["ppl"] = _ppl([_nll(model(input_ids=torch.tensor([ids])).logits[0].numpy(), ids) for ids in encoded])
    return _ppl(onnx_nll), float(torch_cache["ppl"])


def decode_speed(model: Any, ids: list[int], new_tokens: int, adapter: str | None) -> tuple[float, float]:
    """(decode tok/s, prefill ms) of one greedy generation of exactly ``new_tokens`` tokens with the
    server's decode loop (``model``: a slmops.runtime.LocalModel)."""
    t0 = time.perf_counter()
    tokens = model.stream(ids, new_tokens, adapter=adapter, stop_at_eos=False)
    next(tokens)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in tokens)
    t2 = time.perf_counter()
    return (n - 1) / (t2 - t1), (t1 - t0) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model_name_or_path", default="default")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=PATH (PEFT adapter or run folder)")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--speed_precision", default="int4", help="precision of the decode-speed comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl_rows", type=int, default=16)
    parser.add_argument("--extra_option", action="append", default=[], help="builder KEY=VALUE")
    parser.add_argument("--out", default="bench/results/bench_build.json")
    parser.add_argument("--keep", default=None, help="keep the exported models in this folder")
    args = parser.parse_args()
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)

    from dataclasses import replace

    from slmops_build.adapters import convert_adapter, load_peft_adapter, parse_adapter_specs
    from slmops_build.export import export_base_model
    from slmops_build.quantize import parse_extra_options
    from slmops_build.validate import quiet_transformers
    from transformers import AutoTokenizer

    from slmops.models import model_weights_sha256, resolve_model_path
    from slmops.targets import get_target

    quiet_transformers()
    hf_dir = resolve_model_path(args.model_name_or_path)
    base_sha = model_weights_sha256(hf_dir)
    adapters = {n: load_peft_adapter(n, p, base_sha, None) for n, p in parse_adapter_specs(args.adapter).items()}
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    texts = ppl_texts(adapters, tokenizer, args.ppl_rows)
    extra = parse_extra_options(args.extra_option)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="slmops-bench-build-"))
    root.mkdir(parents=True, exist_ok=True)
    threads = {"intra_op_num_threads": args.threads}
    results: dict[str, Any] = {"model": hf_dir, "threads": args.threads, "precisions": {}, "speed": {}}
    torch_cache: dict[str, Any] = {}
    try:
        exported: dict[str, Path] = {}
        templates: dict[str, Any] = {}
        for precision in [p for p in args.precisions.split(",") if p]:
            target = replace(get_target("cpu", precision=precision), session_options=threads)
            out = root / f"lora-{precision}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.time()
            report: dict[str, Any] = {}
            template = export_base_model(hf_dir, out / "model", target, None, extra, report=report)
            export_s = time.time() - t0
            for name, adapter in adapters.items():
                convert_adapter(adapter.adapter_dir, template, template.dtype, out / "adapters" / f"{name}.onnx_adapter", name)
            ppl, ppl_fp32 = perplexities(out / "model", hf_dir, texts, args.threads, torch_cache)
            results["precisions"][precision] = {
                "export_s": round(export_s, 1), "quantizer": report.get("quantizer"), "bundle_bytes": dir_size(out), "model_bytes": dir_size(out / "model"),
                "ppl": round(ppl, 4), "ppl_pytorch_fp32": round(ppl_fp32, 4), "ppl_increase_pct": round((ppl / ppl_fp32 - 1) * 100, 2),
            }
            exported[precision] = out
            templates[precision] = template
            print(f"{precision}: export {export_s:.1f}s, bundle {dir_size(out) / 1e6:.1f} MB, ppl {ppl:.3f} (fp32 PyTorch {ppl_fp32:.3f})")
        fp32 = results["precisions"].get("fp32")
        for stats in results["precisions"].values():
            if fp32:
                stats["size_vs_fp32"] = round(stats["bundle_bytes"] / fp32["bundle_bytes"], 3)

        # Decode speed: plain graph vs LoRA-input graph (no adapter, each adapter), interleaved,
        # with the server's runner (one row).
        from slmops.runtime import LocalModel

        sp = args.speed_precision
        if sp not in exported:
            return
        target = replace(get_target("cpu", precision=sp), session_options=threads)
        plain_dir = root / f"plain-{sp}" / "model"
        shutil.rmtree(plain_dir.parent, ignore_errors=True)
        t0 = time.time()
        export_base_model(hf_dir, plain_dir, target, None, extra, with_lora=False)
        results["speed"]["plain_export_s"] = round(time.time() - t0, 1)
        results["speed"]["plain_model_bytes"] = dir_size(plain_dir)
        plain = LocalModel(plain_dir, None, threads=args.threads)
        lora = LocalModel(exported[sp] / "model", templates[sp], threads=args.threads)
        for name in adapters:
            lora.load_adapter(name, exported[sp] / "adapters" / f"{name}.onnx_adapter")
        chat = bool(getattr(tokenizer, "chat_template", None))
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=False) if chat else PROMPT
        ids = list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
        variants: dict[str, tuple[LocalModel, str | None]] = {"plain": (plain, None), "lora_graph_no_adapter": (lora, None)}
        variants.update({f"lora_graph+{n}": (lora, n) for n in adapters})
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for model, active in variants.values():  # warm-up
            decode_speed(model, ids, 8, active)
        for _ in range(args.repeats):
            for key, (model, active) in variants.items():
                runs[key].append(decode_speed(model, ids, args.new_tokens, active))
        base_tps = statistics.median(r[0] for r in runs["plain"])
        results["speed"].update(precision=sp, prompt_tokens=len(ids), new_tokens=args.new_tokens, repeats=args.repeats)
        for key, values in runs.items():
            tps = statistics.median(v[0] for v in values)
            prefill = statistics.median(v[1] for v in values)
            results["speed"][key] = {"decode_tok_s": round(tps, 1), "prefill_ms": round(prefill, 1), "vs_plain": round(tps / base_tps, 3)}
            print(f"{sp} {key}: {tps:.1f} tok/s ({tps / base_tps:.2f}x plain), prefill {prefill:.0f} ms")
    finally:
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out_path}")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
