"""The README's measured figures, rendered from the committed results JSON (bench/results/).

Each block sits between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->`` in README.md and is
written only by this script, so every number in it comes from a file under bench/results/:

    .venv/bin/python bench/readme_figures.py           # rewrite the blocks
    .venv/bin/python bench/readme_figures.py --check   # exit 1 if a block differs (tests run this)
    .venv/bin/python bench/readme_figures.py --accept  # `make figures`: a benchmark's new results become
                                                       # the committed ones, then rewrite the blocks

A benchmark never writes a committed results file: its ``--out bench/results/NAME.json`` becomes
``NAME.new.json`` beside it (:func:`beside_committed`, gitignored), so running one never breaks
`make test`; ``--accept`` is the explicit step that updates the committed figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"


NEW_SUFFIX = ".new.json"


def beside_committed(out: str | Path, results: Path = RESULTS) -> Path:
    """Where a bench writes its results: ``out`` itself, unless it is a results file in bench/results/
    (what the README's figures are rendered from, and `make test` compares them with): then
    ``NAME.new.json`` beside it, so running a benchmark never changes the committed figures.
    ``readme_figures.py --accept`` (``make figures``) makes the new files the committed ones."""
    path = Path(out)
    if path.resolve().parent != results.resolve() or path.name.endswith(NEW_SUFFIX):
        return path
    new = path.with_name(path.name.removesuffix(".json") + NEW_SUFFIX)
    print(f"results go to {new}, beside the committed {path.name}; `make figures` makes them the README's",
          file=sys.stderr, flush=True)
    return new


def committed_of(path: str | Path) -> Path:
    """The committed results file a ``NAME.new.json`` stands beside (``path`` itself otherwise)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(NEW_SUFFIX) + ".json") if path.name.endswith(NEW_SUFFIX) else path


def accept(results: Path = RESULTS) -> list[str]:
    """Move every ``NAME.new.json`` over ``NAME.json`` (the explicit step after a benchmark run);
    returns the names accepted."""
    done = []
    for new in sorted(results.glob("*" + NEW_SUFFIX)):
        os.replace(new, committed_of(new))
        done.append(committed_of(new).name)
    return done


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


def speculation() -> str:
    """Speculative decoding off vs on per stream, acceptance, parity (bench/bench_speculation.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_speculation import readme_block

    return readme_block(_load("speculation_cpu.json"))


def batching() -> str:
    """Continuous batching: streams x adapters, lone stream vs og, TTFT, parity (bench/bench_batching.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_batching import readme_block

    return readme_block(_load("batching_cpu.json"))


FAMILY_COLUMNS = {"train": "train (default modules)", "build_fp32": "build fp32", "serve": "serve + adapter",
                  "parity": "= PyTorch+PEFT", "batch": "mixed batch = PyTorch", "build_int8": "int8 gate",
                  "build_int4": "int4 gate"}


def families() -> str:
    """Model families through train -> build -> serve (tests/e2e/test_families.py's results)."""
    from slmops.families import FAMILIES

    data = _load("families_cpu.json")
    rows = ["| case | model_type | " + " | ".join(FAMILY_COLUMNS.values()) + " |", "|" + "---|" * (2 + len(FAMILY_COLUMNS))]
    for case, checks in data["families"].items():
        cells = ["yes" if checks.get(k) else "**no**" for k in FAMILY_COLUMNS]
        rows.append(f"| {case} | {checks.get('model_type', '?')} | " + " | ".join(cells) + " |")
    labels = "; ".join(f"`{t}`: {f.label}" for t, f in FAMILIES.items())
    return (f"`bench/results/families_cpu.json`, written by `{data['command']}`; tiny random models, "
            f"a prompt of more than 64 tokens, 32-token sliding windows.\n\n" + "\n".join(rows) +
            f"\n\nFamilies: {labels}.")


def search() -> str:
    """The quantization search of the demo bundle and its test-row check (bench/bench_search.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_search import readme_block

    return readme_block(_load("search_cpu.json"))


def fleet() -> str:
    """Fleet rollouts on a real 3-node swarm (bench/bench_fleet.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_fleet import readme_block

    return readme_block(_load("fleet_cpu.json"))


def faults() -> str:
    """kill -9 of the server during an upload and of a build, a full disk (bench/bench_faults.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_faults import readme_block

    return readme_block(_load("faults_cpu.json"))


def soak() -> str:
    """The 30-minute soak over 200 adapters under --adapter-memory (bench/bench_soak.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_soak import readme_block

    return readme_block(_load("soak_cpu.json"))


BLOCKS: dict[str, Callable[[], str]] = {
    "faults": faults,
    "soak": soak,
    "families": families,
    "fleet": fleet,
    "search": search,
    "batching": batching,
    "speculation": speculation,
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


def _sizes(sizes: dict[str, int]) -> str:
    return " / ".join(f"{mb} MB {arch}" for arch, mb in sizes.items())


def image_sizes() -> str:
    """The images' sizes (bench/results/images.json; scripts/ci_containers.sh measures them), in the
    README and in dockerfiles/README.md."""
    data = _load("images.json")
    images = data["images"]
    serve = images["slmops-serve"]
    goal = data.get("goals", {}).get("slmops-serve")
    return (f"Image sizes (uncompressed, `bench/results/images.json`): `slmops-serve` {_sizes(serve)} without a bundle"
            + (f" (goal < {goal} MB)" if goal else "") + ", "
            + ", ".join(f"`{name}` {_sizes(sizes)}" for name, sizes in images.items() if name not in ("slmops-serve", "slmops-base"))
            + (f"; the local base image {_sizes(images['slmops-base'])}" if "slmops-base" in images else "") + ".")


def targets() -> str:
    """The build targets, from the code that defines them (src/slmops/targets.py)."""
    from slmops.targets import TARGETS

    rows = ["| target | built for | provider | base | adapters | intra-op threads |", "|---|---|---|---|---|---|"]
    for name, t in TARGETS.items():
        rows.append(f"| `{name}` | {t.arch} | {t.provider} | {t.precision} | {t.adapter_dtype} | "
                    f"{t.session_options.get('intra_op_num_threads', 'onnxruntime default')} |")
    return "Targets (`src/slmops/targets.py`; `slmops targets` prints their builder options too):\n\n" + "\n".join(rows)


# Blocks rendered from one source into more than one document.
BLOCKS.update({"image-sizes": image_sizes, "targets": targets})
# Documents whose blocks this script renders (every block may appear in any of them).
DOCS = [README, REPO / "dockerfiles" / "README.md"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's blocks differ from the JSON")
    parser.add_argument("--accept", action="store_true",
                        help="first make every bench/results/NAME.new.json (a benchmark's run) the committed NAME.json")
    args = parser.parse_args()
    if args.accept:
        for name in accept():
            print(f"bench/results/{name}: replaced by its .new.json")
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = render(text)
        if new == text:
            continue
        if args.check:
            stale.append(doc.relative_to(REPO).as_posix())
        else:
            doc.write_text(new)
            print(f"{doc.relative_to(REPO)}: figures re-rendered")
    if stale:
        print(f"{', '.join(stale)}: figures differ from bench/results/*.json; run: .venv/bin/python bench/readme_figures.py",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
