"""Collect the demo adapters' figures and where the first run's time goes into one JSON.

Reads each run's run.json (train / eval / test figures, steps, seconds) and the bundle's
bundle.json (build timings), plus any ``--timing NAME=SECONDS`` measured outside (install, the
whole ``make bundle``), and writes ``bench/results/demo_cpu.json`` for the README.

    .venv/bin/python bench/demo_report.py runs/tone runs/extract --bundle dist/bundles/cpu \\
        --timing "make bundle (total)=612" --note "2 cores shared with other jobs"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KEEP = ("loss", "perplexity", "accuracy", "macro_f1", "rouge_l", "bleu", "exact_match")


def adapter_entry(run_dir: Path, scores: dict[str, Any], label: str) -> dict[str, Any]:
    """One adapter's figures; ``scores`` (bench/score_run.py output) adds splits a run did not score itself."""
    record = json.loads((run_dir / "run.json").read_text())
    perf = record["performance"]
    metrics = record["metrics"]
    metric = (metrics.get("metric_for_best_model") or record["config"]["metric_for_best_model"]).removeprefix("eval_")
    figures = dict(metrics.get("figures") or {})
    if "eval" not in figures and metrics.get("final"):  # a run from before run.json had figures
        best = metrics.get("best_checkpoint_metric")
        step = next((e["step"] for e in metrics.get("evals", []) if best is not None and e.get(f"eval_{metric}") == best), None)
        figures["eval"] = {"rows": record["dataset"]["eval_rows"], "step": step,
                           **{k.removeprefix("eval_"): v for k, v in metrics["final"].items() if k.removeprefix("eval_") in KEEP}}
    if label in scores and scores[label]["split"] not in figures:
        score = scores[label]
        figures[score["split"]] = {"rows": score["rows"], **{k: score[k] for k in KEEP if k in score}, "scored_by": "bench/score_run.py"}
    figures = {k: figures[k] for k in ("train", "eval", "test") if k in figures}
    return {
        "metric": metric,
        "figures": figures,
        "steps": perf["steps"],
        "kept_step": (figures.get("eval") or {}).get("step"),
        "evals_during_training": len(metrics.get("evals", [])),
        "s_per_step": perf["s_per_step"],
        "train_time_s": perf["train_time_s"],
        "final_figures_s": perf.get("final_figures_s"),
        "wall_time_s": perf["wall_time_s"],
        "config": {k: record["config"][k] for k in ("max_steps", "eval_steps", "eval_generate_limit", "per_device_train_batch_size",
                                                     "lora_r", "target_modules", "learning_rate", "packing")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, or LABEL=FOLDER")
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--timing", action="append", default=[], help="NAME=SECONDS measured outside (repeatable)")
    parser.add_argument("--note", default="")
    parser.add_argument("--scores", type=Path, action="append", default=[], help="bench/score_run.py JSON (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/demo_cpu.json"))
    args = parser.parse_args()
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)
    scores: dict[str, Any] = {}
    for path in args.scores:
        scores.update(json.loads(path.read_text()))
    adapters = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        run = Path(folder)
        adapters[label or run.name] = adapter_entry(run, scores, label or run.name)
    timings: dict[str, float] = {f"train {name} (wall)": a["wall_time_s"] for name, a in adapters.items()}
    if args.bundle is not None:
        manifest = json.loads((args.bundle / "bundle.json").read_text())
        timings.update({f"build: {k.removesuffix('_s')}": v for k, v in manifest["build"]["timings"].items()})
    for item in args.timing:
        name, _, seconds = item.rpartition("=")
        timings[name] = float(seconds)
    out = {"note": args.note, "adapters": adapters, "timings": timings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
