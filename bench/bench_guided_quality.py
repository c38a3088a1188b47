"""The extract adapter's quality with and without its JSON schema (structured output), on its eval rows.

    .venv/bin/python bench/bench_guided_quality.py dist/bundles/cpu --out bench/results/guided_quality_cpu.json

Greedy answers through the server's engine in-process, each row unguided and json_schema-guided;
scored against the reference JSON: exact match, schema-valid JSON, ROUGE-L (rouge-score).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_http import EXTRACT_SCHEMA  # noqa: E402

TEMPLATE = "Extract city, date and guests as JSON: {request}"  # examples/train.yaml's extract prompt


def schema_valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (isinstance(value, dict) and set(value) == {"city", "date", "guests"} and isinstance(value["guests"], int)
            and isinstance(value["city"], str) and isinstance(value["date"], str))


def same_json(text: str, reference: str) -> bool:
    try:
        return bool(json.loads(text) == json.loads(reference))
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--split", default="eval")
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "guided_quality_cpu.json")
    args = parser.parse_args(argv)
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)

    from rouge_score import rouge_scorer
    from slmops_serve.config import ServeConfig
    from slmops_serve.engine import Engine, GenerationRequest

    rows = [json.loads(line) for line in (REPO / "examples" / "extract" / f"{args.split}.jsonl").read_text().splitlines()]
    rows = rows[: args.rows]
    engine = Engine(ServeConfig(bundle_dir=str(args.bundle), metrics_port=None, max_queue=2 * len(rows)))
    engine.load()
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    results: dict[str, Any] = {}
    try:
        for mode in ("unguided", "json_schema"):
            guidance = {"guidance_kind": "json_schema", "guidance": json.dumps(EXTRACT_SCHEMA)} if mode == "json_schema" else {}
            gens = [engine.submit(GenerationRequest(messages=[{"role": "user", "content": TEMPLATE.format(**row)}],
                                                    adapter="extract", max_new_tokens=48, **guidance)) for row in rows]
            texts = [g.result().text.strip() for g in gens]
            refs = [row["json"] for row in rows]
            results[mode] = {
                "exact_match": round(sum(t == r for t, r in zip(texts, refs, strict=True)) / len(rows), 4),
                "same_json_value": round(sum(same_json(t, r) for t, r in zip(texts, refs, strict=True)) / len(rows), 4),
                "schema_valid": round(sum(schema_valid(t) for t in texts) / len(rows), 4),
                "rougeL_f": round(sum(scorer.score(r, t)["rougeL"].fmeasure for t, r in zip(texts, refs, strict=True))
                                  / len(rows), 4),
                "examples": texts[:3],
            }
    finally:
        engine.close()
    report = {"bundle": str(args.bundle), "adapter": "extract", "split": args.split, "rows": len(rows),
              "schema": EXTRACT_SCHEMA, "results": results,
              "command": "python bench/bench_guided_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({m: {k: v for k, v in r.items() if k != "examples"} for m, r in results.items()}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
