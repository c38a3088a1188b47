"""Speculative decoding on CPU: per-stream decode tok/s with speculation off vs on, same run.

    .venv/bin/python bench/bench_speculation.py dist/bundles/cpu --out bench/results/speculation_cpu.json

Two engines in this process over the same bundle (the server's Engine, its default threads), one
with ``--speculation off``, one with ``--speculation ngram`` (defaults), warmed up, then rounds in
which every case runs on both, in alternating order (interleaved; greedy, natural lengths, so both
produce the same tokens: checked):
  - extract: the demo extract adapter's eval rows (prompt lookup copies spans of the request);
  - extract + json_schema: the same rows with its schema (jump-forward over the tokens it forces);
  - tone: the tone adapter's eval rows (a label and end-of-sequence: speculation must not cost);
  - chat: free chat on the base model (story prompts; goal: never slower);
  - mixed4: 4 concurrent streams, one of each case above, per-stream and aggregate.
Per case: decode tok/s per stream (tokens after the first / time after the first token, summed
over the case's requests, median over rounds), the ratio on/off, the share of drafted tokens
accepted and the mean tokens per verifying step (from the engine's slmops_spec_* metrics).
Then greedy answers of the demo eval and test rows with speculation off vs on (identical?).
Goals (issue 22): extract >= 2.0x per stream, tone and chat >= 1.0x. Results to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_http import EXTRACT_SCHEMA  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"tone": ("tone", "Classify the tone of this phrase as joy, sadness, anger, fear or surprise: {phrase}"),
             "extract": ("extract", "Extract city, date and guests as JSON: {request}")}
CHAT = ["Write a short story about a robot who learns to paint.", "Explain how a bicycle works.",
        "Give me three tips for a job interview.", "Describe a sunny day at the beach."]
GOALS = {"extract": 2.0, "tone": 1.0, "chat": 1.0}
SPEC_COUNTERS = ("slmops_spec_drafted_tokens_total", "slmops_spec_accepted_tokens_total", "slmops_spec_steps_total",
                 "slmops_spec_row_steps_total", "slmops_spec_emitted_tokens_total")


def rows_of(adapter: str, split: str, limit: int | None = None) -> list[list[dict[str, str]]]:
    folder, template = TEMPLATES[adapter]
    lines = (REPO / "examples" / folder / f"{split}.jsonl").read_text().splitlines()[:limit]
    return [[{"role": "user", "content": template.format(**json.loads(line))}] for line in lines]


def requests_of(case: str, rows: int, chat_tokens: int) -> list[dict[str, Any]]:
    """The case's requests (GenerationRequest keyword arguments)."""
    if case == "extract":
        return [dict(messages=m, adapter="extract", max_new_tokens=64) for m in rows_of("extract", "eval", rows)]
    if case == "extract_schema":
        return [dict(messages=m, adapter="extract", max_new_tokens=64, guidance_kind="json_schema",
                     guidance=json.dumps(EXTRACT_SCHEMA)) for m in rows_of("extract", "eval", rows)]
    if case == "tone":
        return [dict(messages=m, adapter="tone", max_new_tokens=16) for m in rows_of("tone", "eval", rows)]
    return [dict(messages=[{"role": "user", "content": p}], max_new_tokens=chat_tokens) for p in CHAT]


def counters(engine: Any) -> dict[str, float]:
    registry = engine.metrics.registry
    out: dict[str, float] = {}
    for name in SPEC_COUNTERS:
        total = 0.0
        for metric in registry.collect():
            for sample in metric.samples:
                if sample.name == name:
                    total += sample.value
        out[name] = total
    return out


def run_one(engine: Any, request: dict[str, Any]) -> dict[str, Any]:
    from slmops_serve.engine import GenerationRequest

    result = engine.generate(GenerationRequest(**request))
    decode_s = (result.total_ms - result.ttft_ms) / 1000
    return {"text": result.text, "tokens": result.completion_tokens, "decode_s": decode_s, "total_ms": result.total_ms}


def per_stream(results: list[dict[str, Any]]) -> float:
    tokens = sum(max(0, r["tokens"] - 1) for r in results)
    seconds = sum(r["decode_s"] for r in results)
    return tokens / seconds if seconds > 0 else 0.0


def run_case(engine: Any, case: str, requests: list[dict[str, Any]]) -> dict[str, Any]:
    before = counters(engine)
    started = time.perf_counter()
    results = [run_one(engine, r) for r in requests]
    wall = time.perf_counter() - started
    after = counters(engine)
    delta = {k: after[k] - before[k] for k in after}
    return {"tok_s": per_stream(results), "wall_s": wall, "texts": [r["text"] for r in results],
            "tokens": sum(r["tokens"] for r in results), "spec": delta}


def run_mixed(engine: Any, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """One request of each case at once (4 streams), repeated over the case's prompts."""
    before = counters(engine)
    streams: list[list[dict[str, Any]]] = [[] for _ in requests]
    started = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(run_one, engine, r) for r in requests]
        for i, f in enumerate(futures):
            streams[i].append(f.result())
    wall = time.perf_counter() - started
    after = counters(engine)
    tokens = sum(s[0]["tokens"] for s in streams)
    return {"per_stream_tok_s": [per_stream(s) for s in streams], "aggregate_tok_s": tokens / wall if wall > 0 else 0.0,
            "texts": [s[0]["text"] for s in streams], "spec": {k: after[k] - before[k] for k in after}}


def spec_summary(deltas: list[dict[str, float]]) -> dict[str, float]:
    total = {k: sum(d[k] for d in deltas) for k in SPEC_COUNTERS}
    drafted, accepted = total["slmops_spec_drafted_tokens_total"], total["slmops_spec_accepted_tokens_total"]
    row_steps = total["slmops_spec_row_steps_total"]
    return {"drafted": int(drafted), "accepted": int(accepted),
            "acceptance": round(accepted / drafted, 3) if drafted else 0.0,
            "tokens_per_verify_step": round(total["slmops_spec_emitted_tokens_total"] / row_steps, 2) if row_steps else 1.0,
            "verify_calls": int(total["slmops_spec_steps_total"])}


def parity(engines: dict[str, Any], splits: list[str], limit: int | None,
           save: Any = None) -> dict[str, Any]:
    """Greedy answers of the demo rows (each alone) with speculation off vs on; extract also with its
    schema. Rows of the sets alternate, and ``save(partial)`` is called every 10 rows (a run cut short
    still reports the rows it compared, marked incomplete)."""
    out: dict[str, Any] = {"rows": 0, "identical": 0, "differences": [], "complete": False}
    sets: list[list[tuple[str, dict[str, Any]]]] = []
    for split in splits:
        for adapter in ("extract", "tone"):
            sets.append([(f"{adapter}/{split}", dict(messages=m, adapter=adapter, max_new_tokens=64))
                         for m in rows_of(adapter, split, limit)])
        sets.append([(f"extract_schema/{split}", dict(messages=m, adapter="extract", max_new_tokens=64,
                                                      guidance_kind="json_schema", guidance=json.dumps(EXTRACT_SCHEMA)))
                     for m in rows_of("extract", split, limit)])
    cases = [item for group in zip(*sets, strict=False) for item in group]
    cases += [item for group in sets for item in group[min(len(g) for g in sets):]]
    by_set: dict[str, list[int]] = {}
    for i, (name, request) in enumerate(cases):
        off = run_one(engines["off"], request)["text"]
        on = run_one(engines["on"], request)["text"]
        out["rows"] += 1
        counts = by_set.setdefault(name, [0, 0])
        counts[1] += 1
        if off == on:
            out["identical"] += 1
            counts[0] += 1
        else:
            out["differences"].append({"set": name, "off": off, "on": on})
        if (i + 1) % 10 == 0:
            out["by_set"] = {k: f"{v[0]}/{v[1]}" for k, v in by_set.items()}
            print(f"parity {i + 1}/{len(cases)}: {out['identical']} identical", file=sys.stderr, flush=True)
            if save is not None:
                save(out)
    out["by_set"] = {k: f"{v[0]}/{v[1]}" for k, v in by_set.items()}
    out["complete"] = True
    return out


def readme_block(report: dict[str, Any]) -> str:
    """The README's speculation figures, from a results JSON of this script."""
    cases = report["cases"]
    labels = {"extract": "extract (demo adapter, eval rows)", "extract_schema": "extract + its JSON schema",
              "tone": "tone (label + end)", "chat": "free chat, base model"}
    rows = ["| per-stream decode tok/s | speculation off | on | on / off | drafts accepted | tokens per verify call |",
            "|---|---|---|---|---|---|"]
    for name, label in labels.items():
        c = cases[name]
        rows.append(f"| {label} | {c['off_tok_s']} | {c['on_tok_s']} | {c['ratio']:.2f}x | "
                    f"{c['spec']['acceptance'] * 100:.0f}% | {c['spec']['tokens_per_verify_step']} |")
    mixed = report["mixed4"]
    rows.append(f"| 4 mixed streams at once (extract, extract + schema, tone, chat), per stream | "
                f"{mixed['off_per_stream_tok_s']} | {mixed['on_per_stream_tok_s']} | {mixed['ratio_per_stream']:.2f}x | "
                f"{mixed['spec']['acceptance'] * 100:.0f}% | {mixed['spec']['tokens_per_verify_step']} |")
    p = report.get("parity", {})
    met = report.get("goals_met", {})
    lines = [
        f"`{report['command']}`: two engines in one process over the demo bundle (int4, demo adapters), "
        f"{report['threads']} threads, greedy, natural lengths, {report['rounds']} interleaved rounds "
        f"(medians); load average {report['load_average_before'][0]:.1f} before, "
        f"{report['load_average_after'][0]:.1f} after (2-core x86_64, shared). Per-stream tok/s = tokens after the "
        "first / time after the first token.", "", *rows, "",
        f"- 4 mixed streams, aggregate: {mixed['off_aggregate_tok_s']} tok/s off, {mixed['on_aggregate_tok_s']} on.",
    ]
    if "rows" in p:
        cut = "" if p.get("complete", True) else " (the run was cut short at the deadline: the rows compared so far)"
        lines.append(f"- Greedy answers{' (`' + report['parity_command'] + '`, run beside the timing)' if report.get('parity_command') else ''}{cut}, speculation off vs on, each row alone ({', '.join(f'{k} {v}' for k, v in p['by_set'].items())}): "
                     f"{p['identical']}/{p['rows']} identical." + (
                         " The differences come from the floating-point noise of a several-token int4 call against a "
                         "one-token call (as a batch of rows against one row); the fp32 test bundle is exact "
                         "(tests/serve/test_speculation.py)." if p["identical"] < p["rows"] else ""))
    if report.get("note"):
        lines.append(f"- {report['note']}")
    missed = [k for k, v in met.items() if not v]
    lines.append(f"- Goals (extract >= 2.0x, tone and chat >= 1.0x): {'all met' if not missed else 'not met: ' + ', '.join(missed)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=6, help="eval rows per case and round")
    parser.add_argument("--chat-tokens", type=int, default=96)
    parser.add_argument("--parity-splits", default="eval,test", help="demo rows compared off vs on ('' = skip)")
    parser.add_argument("--parity-limit", type=int, default=None, help="rows per split and adapter (default all)")
    parser.add_argument("--parity-only", action="store_true", help="only the off-vs-on answers (no timing): run it "
                        "beside a timing run with --parity-splits ''; --merge-parity puts it into that run's JSON")
    parser.add_argument("--merge-parity", type=Path, default=None, help="a --parity-only JSON to merge into --out's "
                        "results (given as the timing run's file)")
    parser.add_argument("--out", default="bench/results/speculation_cpu.json")
    args = parser.parse_args(argv)
    if args.merge_parity is not None:
        report = json.loads(Path(args.out).read_text())
        extra = json.loads(args.merge_parity.read_text())
        report["parity"], report["parity_command"] = extra["parity"], extra["command"]
        tmp = Path(str(args.out) + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(readme_block(report))
        return 0
    from readme_figures import beside_committed
    from slmops_serve.config import ServeConfig
    from slmops_serve.engine import Engine

    out = beside_committed(args.out)
    load_before = os.getloadavg()
    engines = {mode: Engine(ServeConfig(bundle_dir=str(args.bundle), metrics_port=None, speculation=mode,
                                        max_batch=4, max_queue=64, verify_bundle=False))
               for mode in ("off", "ngram")}
    engines["on"] = engines.pop("ngram")
    for engine in engines.values():
        engine.load()
    if args.parity_only:
        try:
            splits = [s for s in args.parity_splits.split(",") if s]
            command = "python bench/bench_speculation.py " + shlex.join(argv if argv is not None else sys.argv[1:])

            def save(partial: dict[str, Any]) -> None:
                tmp = Path(str(out) + ".tmp")
                tmp.write_text(json.dumps({"command": command, "parity": partial}, indent=2) + "\n")
                os.replace(tmp, out)

            report_only = {"command": command, "parity": parity(engines, splits, args.parity_limit, save)}
        finally:
            for engine in engines.values():
                engine.close()
        tmp = Path(str(out) + ".tmp")
        tmp.write_text(json.dumps(report_only, indent=2) + "\n")
        os.replace(tmp, out)
        print(json.dumps({k: v for k, v in report_only["parity"].items() if k != "differences"}))
        return 0
    try:
        names = ["extract", "extract_schema", "tone", "chat"]
        requests = {name: requests_of(name, args.rows, args.chat_tokens) for name in names}
        for engine in engines.values():  # warm: every case once
            for name in names:
                run_one(engine, requests[name][0])
        samples: dict[str, dict[str, list[Any]]] = {n: {"off": [], "on": []} for n in [*names, "mixed4"]}
        mismatched: list[str] = []
        for round_index in range(args.rounds):
            order = ["off", "on"] if round_index % 2 == 0 else ["on", "off"]
            for name in names:
                for mode in order:
                    samples[name][mode].append(run_case(engines[mode], name, requests[name]))
                if samples[name]["off"][-1]["texts"] != samples[name]["on"][-1]["texts"]:
                    mismatched.append(f"{name} round {round_index}")
            mixed = [requests[n][round_index % len(requests[n])] for n in names]
            for mode in order:
                samples["mixed4"][mode].append(run_mixed(engines[mode], mixed))
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{n} {samples[n]['off'][-1]['tok_s']:.0f}->{samples[n]['on'][-1]['tok_s']:.0f}" for n in names),
                file=sys.stderr, flush=True)
        cases: dict[str, Any] = {}
        for name in names:
            off = statistics.median(s["tok_s"] for s in samples[name]["off"])
            on = statistics.median(s["tok_s"] for s in samples[name]["on"])
            cases[name] = {"off_tok_s": round(off, 1), "on_tok_s": round(on, 1), "ratio": round(on / off, 3),
                           "off_tok_s_rounds": [round(s["tok_s"], 1) for s in samples[name]["off"]],
                           "on_tok_s_rounds": [round(s["tok_s"], 1) for s in samples[name]["on"]],
                           "requests_per_round": len(requests[name]), "tokens_per_round": samples[name]["on"][0]["tokens"],
                           "spec": spec_summary([s["spec"] for s in samples[name]["on"]])}
        m_off, m_on = samples["mixed4"]["off"], samples["mixed4"]["on"]
        off_ps = statistics.median(statistics.mean(s["per_stream_tok_s"]) for s in m_off)
        on_ps = statistics.median(statistics.mean(s["per_stream_tok_s"]) for s in m_on)
        mixed_report = {"off_per_stream_tok_s": round(off_ps, 1), "on_per_stream_tok_s": round(on_ps, 1),
                        "ratio_per_stream": round(on_ps / off_ps, 3),
                        "off_aggregate_tok_s": round(statistics.median(s["aggregate_tok_s"] for s in m_off), 1),
                        "on_aggregate_tok_s": round(statistics.median(s["aggregate_tok_s"] for s in m_on), 1),
                        "identical": all(a["texts"] == b["texts"] for a, b in zip(m_off, m_on, strict=True)),
                        "spec": spec_summary([s["spec"] for s in m_on])}
        splits = [s for s in args.parity_splits.split(",") if s]
        parity_report = parity(engines, splits, args.parity_limit) if splits else {}
    finally:
        for engine in engines.values():
            engine.close()
    report = {
        "command": "python bench/bench_speculation.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "bundle": str(args.bundle), "threads": engines["on"].threads, "rounds": args.rounds,
        "settings": {"max_draft": engines["on"].spec.max_draft, "ngram": [engines["on"].spec.ngram_min,
                                                                          engines["on"].spec.ngram_max]},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cases": cases, "mixed4": mixed_report, "timing_rounds_texts_differ": mismatched, "parity": parity_report,
        "goals": GOALS,
        "goals_met": {"extract": cases["extract"]["ratio"] >= GOALS["extract"],
                      "tone": cases["tone"]["ratio"] >= GOALS["tone"], "chat": cases["chat"]["ratio"] >= GOALS["chat"]},
    }
    tmp = Path(str(out) + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(readme_block(report))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
