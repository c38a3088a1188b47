"""Does the build gate's expected agreement predict the flips on rows it never saw? (issue 23)

    .venv/bin/python bench/bench_gate_calibration.py dist/bundles/cpu --adapter tone=runs/tone \\
        --out bench/results/gate_calibration_cpu.json

For one adapter of a built bundle, on its eval rows (what the gate sees) and its test rows (what it
does not): PyTorch fp32+PEFT's greedy answers and answer margins, the bundle's margins on the same
tokens (teacher-forced), the rms margin shift, the flips observed (a bundle margin below 0) and the
flips expected from the margins (validate.expected_agreement's Gaussian model, and the same with the
shifts' empirical distribution), and the expected accuracy drop in points (flips of rows PyTorch
answers right).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from readme_figures import beside_committed  # noqa: E402


def measure(bundle: Path, name: str, run: Path) -> dict[str, Any]:
    import torch
    from slmops_build.adapters import load_peft_adapter
    from slmops_build.validate import (
        Bounds,
        OrtScorer,
        _load_peft,
        _phi,
        answer_margins,
        eval_set,
        quiet_transformers,
        row_scores,
        torch_greedy,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops import contract
    from slmops.bundle import read_manifest

    quiet_transformers()
    manifest = read_manifest(bundle)
    adapter = load_peft_adapter(name, run, None, None)
    hf = Path(adapter.record["base_model"]["resolved_path"]) if adapter.record else None
    assert hf is not None and hf.is_dir(), "the run's base model folder is gone"
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = _load_peft(AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval(), {name: adapter})
    model.set_adapter(name)
    scorer = OrtScorer(bundle / manifest.model_dir, threads=2)
    feeds = contract.check_adapter_file(bundle / manifest.adapters[name].file, manifest.lora_template).tensors
    eos = {tokenizer.eos_token_id}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, Any] = {}
    for split in ("eval", "test"):
        data = eval_set(adapter, tokenizer, Bounds(split=split))
        prompts = [list(tokenizer(p, add_special_tokens=not data.chat)["input_ids"]) for p in data.prompts]
        ref = torch_greedy(model, prompts, data.max_new_tokens, eos, pad, 8)
        _, correct = row_scores([tokenizer.decode(t, skip_special_tokens=True).strip() for t in ref.tokens],
                                data.references, data.label_task)
        bundle_margins = [answer_margins(scorer.logits(ids + path, feeds)[len(ids) - 1:], path)
                          for ids, path in zip(prompts, ref.paths, strict=True)]
        shifts = np.array([b - t for bm, tm in zip(bundle_margins, ref.margins, strict=True)
                           for b, t in zip(bm, tm, strict=True)])
        sigma = float(math.sqrt((shifts ** 2).mean()))
        keep_gauss = [math.prod(_phi(m / sigma) for m in ms) for ms in ref.margins]
        keep_empirical = [math.prod(float((shifts > -m).mean()) for m in ms) for ms in ref.margins]
        out[split] = {
            "rows": len(prompts), "margin_shift_rms": round(sigma, 4),
            "shift_kurtosis": round(float(((shifts / sigma) ** 4).mean()), 2),
            "flips_observed": sum(1 for bm in bundle_margins if min(bm) < 0),
            "flips_expected_gaussian": round(sum(1 - k for k in keep_gauss), 2),
            "flips_expected_empirical": round(sum(1 - k for k in keep_empirical), 2),
            "expected_agreement_gaussian": round(float(np.mean(keep_gauss)), 4),
            "expected_drop_points_gaussian": round(100 * float(np.mean([c * (1 - k) for c, k in zip(correct, keep_gauss, strict=True)])), 2),
            "smallest_pytorch_margins": sorted(round(min(m), 3) for m in ref.margins if m)[:8],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--adapter", required=True, help="NAME=RUN_DIR (the bundle's adapter and its train run)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    name, _, run = args.adapter.partition("=")
    result = {"command": " ".join(["bench/bench_gate_calibration.py", *sys.argv[1:]]), "note": args.note,
              "bundle_precision": json.loads((args.bundle / "bundle.json").read_text())["target"]["precision"],
              "adapter": name, "splits": measure(args.bundle, name, Path(run))}
    out = beside_committed(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["splits"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
