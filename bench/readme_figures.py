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


def lora_quality() -> str:
    """Quality table of the bundle's adapters on their test rows (bench_lora.py --no-speed)."""
    data = _load("lora_quality_cpu.json")
    quality = data["quality"]
    peers = data.get("llama_cpp", {}).get("adapters", {})
    rows = ["| test rows (unseen in training and selection) | rows | bundle int4 | PyTorch fp32+PEFT | answers identical |"
            + (" llama.cpp Q4_1 |" if peers else ""),
            "|---|---|---|---|---|" + ("---|" if peers else "")]
    for name, entry in quality["adapters"].items():
        same = round(entry["token_agreement"] * entry["rows"])
        line = (f"| {name} {entry['metric'].replace('_', '-')} | {entry['rows']} | {entry['bundle']:.2f} | {entry['pytorch']:.2f} | "
                f"{same}/{entry['rows']} |")
        if peers:
            line += f" {peers.get(name, {}).get('llama_cpp', '-')} |"
        rows.append(line)
    ppl = quality.get("perplexity")
    tail = ""
    if ppl:
        tail = (f"\n\nBase perplexity, bundle {data['precision']} vs fp32: {ppl['increase_pct']:+.2f}% "
                f"({ppl['texts']} texts, {ppl['tokens']} tokens).")
    return "`bench/results/lora_quality_cpu.json`:\n\n" + "\n".join(rows) + tail


def demo_figures() -> str:
    """Train / eval / test figures and timings of the demo adapters (bench/demo_report.py)."""
    data = _load("demo_cpu.json")
    rows = ["| adapter | metric | train sample | eval (selects the checkpoint) | test (unseen) | steps (kept) | s/step | train s | scoring s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, a in data["adapters"].items():
        metric = a["metric"]
        fig = a["figures"]

        def cell(split: str, fig: dict[str, Any] = fig, metric: str = metric) -> str:
            return f"{fig[split][metric]:.2f} ({fig[split]['rows']})" if split in fig else "-"

        rows.append(f"| {name} | {metric.replace('_', '-')} | {cell('train')} | {cell('eval')} | {cell('test')} | "
                    f"{a['steps']} ({a['kept_step']}) | {a['s_per_step']} | {a['train_time_s']} | {a['final_figures_s']} |")
    timing = data.get("timings", {})
    lines = [f"`bench/results/demo_cpu.json` ({data.get('note', '')}):", "", *rows]
    if timing:
        lines += ["", "| stage | seconds |", "|---|---|", *(f"| {k} | {v} |" for k, v in timing.items())]
    return "\n".join(lines)


def train_speed() -> str:
    """slmops train vs a plain transformers Trainer + PEFT loop (bench/bench_train.py)."""
    data = _load("train_cpu.json")
    med = data["median_s_per_step"]
    runs = data["runs"]
    tokens = {v: runs[v][0].get("tokens") for v in runs}
    return (f"`bench/results/train_cpu.json`: {data['adapter']} settings, {data['steps']} steps, {data['repeats']} interleaved "
            f"subprocess runs each: slmops {med['slmops']} s/step, plain Trainer+PEFT {med['plain']} s/step "
            f"(**{data['ratio_slmops_over_plain']:.2f}x**); tokens fed per run {tokens['slmops']} vs {tokens['plain']}. "
            f"{data.get('note', '')}")


def batching() -> str:
    """Continuous batching: streams x adapters, lone stream vs og, TTFT, parity (bench/bench_batching.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_batching import readme_block

    return readme_block(_load("batching_cpu.json"))


BLOCKS: dict[str, Callable[[], str]] = {
    "batching": batching,
    "lora-speed": lora_speed, "lora-quality": lora_quality, "demo": demo_figures, "train-speed": train_speed,
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
