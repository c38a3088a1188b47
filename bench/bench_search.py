"""The quantization search of the demo bundle: the table, the pick, and the pick's test-row accuracy
against PyTorch fp32+PEFT (rows neither training nor the search saw).

    .venv/bin/python bench/bench_search.py --build /tmp/search-cpu --out bench/results/search_cpu.json

``--build DIR`` runs ``slmops build --search --test_check`` on the demo runs (runs/tone,
runs/extract) into DIR first and times it; without it, ``--bundle DIR`` reads a bundle built that
way. The results go through ``beside_committed`` (a committed name becomes NAME.new.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from readme_figures import beside_committed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build(out: Path) -> float:
    cmd = [sys.executable, "-m", "slmops.cli", "build", "--target", "cpu", "--adapter", "tone=runs/tone",
           "--adapter", "extract=runs/extract", "--search", "--test_check", "--output_path", str(out), "--overwrite"]
    started = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    return round(time.time() - started, 1)


def collect(bundle: Path, build_s: float | None, note: str = "") -> dict[str, Any]:
    manifest = json.loads((bundle / "bundle.json").read_text())
    search = manifest["build"]["search"]
    validation = manifest["validation"]
    rows = []
    for row in search["candidates"]:
        rows.append({"name": row["name"], "note": row["note"], "options": row["options"],
                     "within_budget": row["within_budget"], "outside_budget": row["outside_budget"],
                     "adapters": row["quality"]["adapters"], "ppl_increase_pct": row["quality"]["ppl_increase_pct"],
                     "speed": row["speed"], "speed_vs_default": row["speed_vs_default"]})
    config = manifest["build"].get("config", {})
    command = "slmops build --target cpu --adapter tone=runs/tone --adapter extract=runs/extract --search"
    if config.get("validate_rows"):
        command += f" --validate_rows {config['validate_rows']}"
    if config.get("test_check"):
        command += " --test_check"
    return {
        "command": command,
        "budget": search["budget"], "eval_rows": search["rows"], "speed_method": search["speed_method"],
        "quality_method": search["quality_method"], "candidates": rows, "pareto_front": search["pareto_front"],
        "pick": search["pick"], "reason": search["reason"], "search_timings": search["timings"],
        "validation_eval": {n: {k: e.get(k) for k in ("metric", "bundle", "pytorch", "drop_points", "agreement", "rows")}
                            for n, e in validation.get("adapters", {}).items()},
        "test_rows": validation.get("test_rows"),
        "build_timings": manifest["build"].get("timings"),
        "build_wall_s": build_s,
        "versions": {"onnxruntime": manifest["producer"].get("onnxruntime"), "python": platform.python_version(),
                     "cpus": os.cpu_count(), "machine": platform.machine()},
        "note": "measured on a 2-core machine shared with other jobs (load ~10): speeds are relative within "
                "one interleaved run, absolute tok/s are low" + (f"; {note}" if note else ""),
    }


def readme_block(data: dict[str, Any]) -> str:
    """The README's `figures:search` block."""
    adapters = list(data["candidates"][0]["adapters"]) if data["candidates"] else []
    head = ("| candidate | " + " | ".join(f"{a} agreement" for a in adapters) + " | "
            + " | ".join(f"{a} drop (pts)" for a in adapters) + " | ppl | tok/s 1 stream | tok/s 4 mixed | vs default | budget |")
    rows = [head, "|" + "---|" * (7 + 2 * len(adapters))]
    for c in data["candidates"]:
        name = f"**{c['name']}** (pick)" if c["name"] == data["pick"] else c["name"]
        rows.append(f"| {name} | " + " | ".join(f"{c['adapters'][a]['rows_same']}/{c['adapters'][a]['rows']}" for a in adapters)
                    + " | " + " | ".join(f"{c['adapters'][a]['drop_points']:g} ±{c['adapters'][a]['noise_margin_points']:g}"
                                         for a in adapters)
                    + f" | +{c['ppl_increase_pct']:.2f}% | {c['speed']['one_stream_mean']} | {c['speed'].get('mixed4', '-')} "
                    f"| {c['speed_vs_default']:.2f}x | {'ok' if c['within_budget'] else 'out'} |")
    test = data.get("test_rows") or {}
    lines = [f"| {n} | {e['metric']} | {e['bundle']:.3f} | {e['pytorch']:.3f} | {e['drop_points']:g} | {e['rows_same']}/{e['rows']} |"
             for n, e in (test.get("adapters") or {}).items()]
    test_table = ("\n\nThe pick on the test rows (unseen by training and the search):\n\n"
                  "| adapter | metric | bundle | PyTorch | drop (pts) | answers identical |\n|---|---|---|---|---|---|\n"
                  + "\n".join(lines)) if lines else ""
    timings = data.get("search_timings", {})
    return (f"`bench/results/search_cpu.json` (`{data['command']}`); budget: drop <= "
            f"{data['budget']['max_accuracy_drop_points']} points beyond the noise, agreement >= "
            f"{data['budget']['min_agreement']:.0%}; eval rows {data['eval_rows']}. Pick: {data['reason']}. "
            f"The search took {timings.get('total_s', '?')} s.\n\n" + "\n".join(rows) + test_table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=None, help="build the searched demo bundle here first")
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle built with --search --test_check")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/search_cpu.json")
    parser.add_argument("--note", default="", help="a remark on this run, kept in the JSON")
    args = parser.parse_args()
    if (args.build is None) == (args.bundle is None):
        parser.error("--build DIR or --bundle DIR (one of them)")
    build_s = build(args.build) if args.build else None
    data = collect(args.build or args.bundle, build_s, args.note)
    out = beside_committed(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)
    print(readme_block(data))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
