"""The README's measured figures, rendered from the committed results JSON (bench/results/).

Each block sits between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->`` in README.md and is
written only by this script, so every number in it comes from a file under bench/results/:

    .venv/bin/python bench/readme_figures.py           # rewrite the blocks
    .venv/bin/python bench/readme_figures.py --check   # exit 1 if a block differs (tests run this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"


def _load(name: str) -> dict[str, Any]:
    return dict(json.loads((RESULTS / name).read_text()))


def _x(value: float) -> str:
    return f"{value:.2f}x"


def lora_speed() -> str:
    """Decode speed table of bench_lora.py (the committed peers run)."""
    data = _load("lora_peers_cpu.json")
    speed = data["speed"]
    tps, ratio = speed["decode_tok_s"], speed["vs_plain"]
    names = list(data["adapters"])
    head = "| decode, tok/s | no adapter | " + " | ".join(
        f"+ {n} (r={a['rank']} {','.join(m.removesuffix('_proj') for m in a['modules'])})" for n, a in data["adapters"].items()) + " |"
    rows = [head, "|" + "---|" * (2 + len(names))]
    dash = " | -" * len(names)
    rows.append(f"| plain int4 graph, same quantization (ceiling) | {tps['plain']}{dash} |")
    rows.append("| bundle, in-process | " + " | ".join(
        f"{tps[k]} ({_x(ratio[k])})" for k in ["bundle", *(f"bundle+{n}" for n in names)]) + " |")
    if "grpc_vs_inprocess" in speed:
        g = speed["grpc_vs_inprocess"]
        rows.append("| bundle, through gRPC (GenerateStream) | " + " | ".join(
            f"{tps[k]} ({_x(g[k])} in-process)" for k in ["grpc", *(f"grpc+{n}" for n in names)]) + " |")
    rows.append(f"| builder's own int4 graph (lossier) | {tps['plain_builder_int4']}{dash} |")
    note = ""
    llama = data.get("llama_cpp", {}).get("decode_tok_s", {})
    if "llama_cpp" in tps:  # interleaved with the rest (bench_lora since issue 11)
        rows.append("| llama.cpp, Q4_1 GGUF + GGUF LoRA | " + " | ".join(
            str(tps[k]) for k in ["llama_cpp", *(f"llama_cpp+{n}" for n in names)]) + " |")
    elif llama:
        rows.append("| llama.cpp, Q4_1 GGUF + GGUF LoRA (cold, see note) | " + " | ".join(
            str(llama.get(k, "-")) for k in ["base", *names]) + " |")
        note = ("\n\nThe llama.cpp row of this file was measured the old way: one cold pass after the "
                "interleaved ONNX runs, so it is not comparable with the rows above. bench_lora.py now "
                "interleaves it with warm-up like the others; `make bench-peers` refreshes it.")
    caption = (f"{speed['new_tokens']} forced tokens, {speed['threads']} threads, {speed['repeats']} interleaved "
               f"repeats x {speed['instances']} loads of each graph, medians; adapter ABI {data['abi_version']}; "
               f"`bench/results/lora_peers_cpu.json`, {data['versions']['cpus']}-core {data['versions']['machine']}.")
    return caption + "\n\n" + "\n".join(rows) + note


def _test_rows(source: str) -> bool:
    """Whether a validation entry's ``eval_source`` names the test split: ``runs/tone (test)`` (run.json v1)
    or ``tone/validation/test.jsonl (test split 'test')`` (v2)."""
    return source.endswith("(test)") or "(test split " in source


def _quality_source() -> tuple[str, dict[str, Any], bool]:
    """(file, data, on test rows?): the first of the peers run (it adds llama.cpp's column) and `make
    bench-lora`'s lora_cpu.json that scored the test rows, else whichever exists."""
    found: list[tuple[str, dict[str, Any], bool]] = []
    for name in ("lora_peers_cpu.json", "lora_cpu.json"):
        if (RESULTS / name).is_file():
            data = _load(name)
            adapters = data.get("quality", {}).get("adapters", {})
            on_test = bool(adapters) and all(_test_rows(str(a.get("eval_source", ""))) for a in adapters.values())
            found.append((name, data, on_test))
    for entry in found:
        if entry[2]:
            return entry
    if found:
        return found[0]
    raise FileNotFoundError("no bench/results/lora_cpu.json or lora_peers_cpu.json")


def lora_quality() -> str:
    """Quality table of the bundle's adapters: bundle int4 vs PyTorch fp32+PEFT (and llama.cpp)."""
    name, data, on_test = _quality_source()
    quality = data["quality"]
    peers = data.get("llama_cpp", {}).get("adapters", {})
    rows_label = "test rows (unseen by training and selection)" if on_test else "eval rows (they also chose the checkpoint)"
    rows = [f"| {rows_label} | rows | bundle {data['precision']} | PyTorch fp32+PEFT | answers identical |"
            + (" llama.cpp Q4_1 |" if peers else ""),
            "|---|---|---|---|---|" + ("---|" if peers else "")]
    for adapter, entry in quality["adapters"].items():
        same = round(entry["token_agreement"] * entry["rows"])
        line = (f"| {adapter} {entry['metric'].replace('_', '-')} | {entry['rows']} | {entry['bundle']:.2f} | {entry['pytorch']:.2f} | "
                f"{same}/{entry['rows']} |")
        if peers:
            line += f" {peers.get(adapter, {}).get('llama_cpp', '-')} |"
        rows.append(line)
    ppl = quality.get("perplexity")
    tail = ""
    if ppl:
        tail = (f"\n\nBase perplexity, bundle {data['precision']} vs fp32: {ppl['increase_pct']:+.2f}% "
                f"({ppl['texts']} texts, {ppl['tokens']} tokens).")
    if not on_test:
        tail += ("\n\nThese rows are the eval rows, which also picked each adapter's checkpoint, so they "
                 "flatter the adapters; the demo's test figures are in the next section, and `make bench-lora` "
                 "rescores the bundle on the test rows (lora_cpu.json, which then replaces this table).")
    return f"`bench/results/{name}`:\n\n" + "\n".join(rows) + tail


def demo_figures() -> str:
    """Train / eval / test figures of the demo adapters (bench/demo_report.py), one table per JSON."""
    lines: list[str] = []
    for name in ("demo_before_cpu.json", "demo_cpu.json"):
        if not (RESULTS / name).is_file():
            continue
        data = _load(name)
        lines += [f"`bench/results/{name}`: {data.get('note', '')}", "",
                  "| adapter | metric | train sample | eval (chose the checkpoint) | test (unseen) | steps (kept) | evals |",
                  "|---|---|---|---|---|---|---|"]
        for adapter, a in data["adapters"].items():
            metric = a["metric"]
            fig = a["figures"]

            def cell(split: str, fig: dict[str, Any] = fig, metric: str = metric) -> str:
                return f"{fig[split][metric]:.2f} ({fig[split]['rows']} rows)" if split in fig and metric in fig[split] else "-"

            lines.append(f"| {adapter} | {metric.replace('_', ' ')} | {cell('train')} | {cell('eval')} | {cell('test')} | "
                         f"{a['steps']} ({a['kept_step']}) | {a['evals_during_training']} |")
        lines.append("")
    if not lines:
        raise FileNotFoundError("no demo JSON")
    return "\n".join(lines).rstrip()


def train_speed() -> str:
    """slmops train vs a plain transformers Trainer + PEFT loop (bench/bench_train.py)."""
    data = _load("train_cpu.json")
    med = data["median_s_per_step"]
    runs = data["runs"]
    pairs = ", ".join(f"{a['s_per_step']} vs {b['s_per_step']}" for a, b in zip(runs["slmops"], runs["plain"], strict=True))
    threads = f"{data['threads']} thread(s) each" if data.get("threads") else "default threads"
    text = (f"`bench/results/train_cpu.json`: {data['adapter']} settings, {data['steps']} steps, {threads}, {data['repeats']} "
            f"interleaved subprocess runs per side: slmops {med['slmops']:.2f} s/step, plain Trainer+PEFT {med['plain']:.2f} s/step, "
            f"**{data['ratio_slmops_over_plain']:.2f}x** (runs in order: {pairs}); training tokens fed "
            f"{runs['slmops'][0]['tokens']} vs {runs['plain'][0]['tokens']}")
    if "trl" in med:
        text += (f"; TRL's SFTTrainer (completion-only loss, no packing, fp32, no checkpointing) {med['trl']:.2f} s/step, "
                 f"slmops/TRL **{data['ratio_slmops_over_trl']:.2f}x**, {runs['trl'][0]['tokens']} tokens fed")
    return text + "."


def first_run() -> str:
    """Where the first `make bundle` spends its time (demo_cpu.json's timings, bench/demo_report.py)."""
    data = _load("demo_cpu.json")
    rows = ["| step | seconds |", "|---|---|"]
    rows += [f"| {name} | {seconds:.0f} |" for name, seconds in data["timings"].items()]
    return "`bench/results/demo_cpu.json`:\n\n" + "\n".join(rows)


def batching() -> str:
    """Continuous batching: streams x adapters, lone stream vs og, TTFT, parity (bench/bench_batching.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_batching import readme_block

    return readme_block(_load("batching_cpu.json"))


BLOCKS: dict[str, Callable[[], str]] = {
    "batching": batching,
    "lora-speed": lora_speed, "lora-quality": lora_quality, "demo": demo_figures, "first-run": first_run,
    "train-speed": train_speed,
}


def render(text: str) -> str:
    """README text with every known block re-rendered (blocks whose JSON is missing are left as they are)."""
    for name, func in BLOCKS.items():
        pattern = re.compile(rf"(<!-- figures:{name} -->\n)(?:.*?\n)?(<!-- /figures:{name} -->)", re.S)
        if not pattern.search(text):
            continue
        try:
            body = func()
        except FileNotFoundError:
            continue
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's blocks differ from the JSON")
    args = parser.parse_args()
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md figures differ from bench/results/*.json; run: .venv/bin/python bench/readme_figures.py",
                  file=sys.stderr)
            sys.exit(1)
        return
    README.write_text(new)


if __name__ == "__main__":
    main()
