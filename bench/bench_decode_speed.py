"""Decode speed of several bundles of one model, interleaved: e.g. the cpu target's int4 MatMuls
with int8 activations (accuracy_level 4, the default) against fp32 activations (level 1).

Each bundle is loaded once in the server's decode loop (``slmops.runtime.LocalModel``); every round
generates exactly ``--tokens`` greedy tokens per bundle, without an adapter and with each
``--adapter``, in alternating bundle order; the first round is a warm-up. Medians of decode tok/s.

    .venv/bin/slmops build --target cpu --adapter tone=runs/tone -o /tmp/level1 --extra_option accuracy_level=1
    .venv/bin/python bench/bench_decode_speed.py level4=dist/bundles/cpu level1=/tmp/level1 --adapter tone \\
        --out bench/results/accuracy_level_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_build import decode_speed  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint, in five sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", help="LABEL=BUNDLE_DIR")
    parser.add_argument("--adapter", action="append", default=[], help="adapter of every bundle (repeatable)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)

    from slmops.bundle import read_manifest
    from slmops.contract import package_versions
    from slmops.runtime import LocalModel

    models: dict[str, Any] = {}
    for spec in args.bundles:
        label, _, path = spec.partition("=")
        bundle = Path(path)
        manifest = read_manifest(bundle)
        model = LocalModel(bundle / manifest.model_dir, manifest.lora_template, threads=args.threads)
        for name in args.adapter:
            model.load_adapter(name, bundle / manifest.adapters[name].file)
        models[label] = model
    cases = [None, *args.adapter]
    ids = next(iter(models.values())).prompt_ids(PROMPT)
    tok_s: dict[str, dict[str, list[float]]] = {label: {c or "base": [] for c in cases} for label in models}
    for r in range(args.rounds + 1):
        for label in models if r % 2 == 0 else reversed(list(models)):
            for case in cases:
                speed, _ = decode_speed(models[label], ids, args.tokens, case)
                if r:  # round 0 warms up
                    tok_s[label][case or "base"].append(round(speed, 1))
        print(f"round {r}/{args.rounds}", flush=True)
    medians = {label: {c: statistics.median(v) for c, v in runs.items()} for label, runs in tok_s.items()}
    first = next(iter(medians))
    result = {
        "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads, "bundles": dict(b.split("=", 1) for b in args.bundles),
        "median_decode_tok_s": medians,
        f"vs_{first}": {label: {c: round(v / medians[first][c], 3) for c, v in m.items()} for label, m in medians.items()},
        "runs": tok_s,
        "versions": {**package_versions(["onnxruntime"]), "python": platform.python_version(), "cpus": os.cpu_count(),
                     "machine": platform.machine()},
    }
    print(json.dumps({k: result[k] for k in ("median_decode_tok_s", f"vs_{first}")}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
