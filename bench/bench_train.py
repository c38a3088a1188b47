"""Training speed: ``slmops train`` against a plain transformers Trainer + PEFT loop and TRL's
``SFTTrainer`` (completion-only loss), same work.

Both sides train the same adapter on the same rows with the same settings (the demo ``tone``
adapter of examples/train.yaml by default: LoRA r=8 alpha 16 on all linear layers, dropout 0.05, batch 8, the
chat template, answer-only loss, max_seq_len 128, AdamW, cosine schedule, no evaluation), each
in a fresh subprocess, in interleaved order (A B, B A, ...), so a busy shared CPU slows both
alike. The figure is training seconds per optimizer step (``trainer.train()`` wall time / steps,
model loading excluded) and the tokens each side fed (real and padded), to show the work is equal.

    .venv/bin/pip install "trl==1.16.0"   # for the trl side only (not a dependency of slmops)
    .venv/bin/python bench/bench_train.py --steps 10 --repeats 2 --threads 1 --out bench/results/train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("slmops", "plain", "trl")


def demo_config(adapter: str, steps: int, out: Path, overrides: dict[str, Any] | None = None) -> Any:
    from slmops_train.config import configs_from_yaml

    configs = configs_from_yaml(REPO / "examples" / "train.yaml", {
        "max_steps": steps, "eval_split": "none", "test_split": "none", "output_path": str(out), "overwrite": True,
        "early_stopping_patience": None, "eval_steps": None, **(overrides or {})})
    return next(c for c in configs if c.run_name() == adapter)


def run_slmops(adapter: str, steps: int, work: Path) -> dict[str, Any]:
    """Our train(), as `make train` runs it (progress lines, TensorBoard, checkpoints) without evaluation."""
    from slmops_train.recipe import train

    result = train(demo_config(adapter, steps, work / adapter))
    perf = result.record["performance"]
    return {"s_per_step": perf["s_per_step"], "steps": perf["steps"], "train_s": perf["train_time_s"],
            "tokens": perf["tokens_seen"]}


def run_plain(adapter: str, steps: int, work: Path) -> dict[str, Any]:
    """The textbook loop: AutoModel + get_peft_model + Trainer + DataCollatorForSeq2Seq."""
    import datasets
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from slmops.models import resolve_model_path

    config = demo_config(adapter, steps, work / "unused")
    set_seed(config.seed)
    model_path = resolve_model_path(config.model_name_or_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    rows = []
    for messages, answer in conversations(config):
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)[:config.max_seq_len]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": ([-100] * len(p_ids) + a_ids)[:config.max_seq_len]})
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(config))
    fed = {"tokens": 0, "padded": 0}
    counting_collate = counting(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), fed)

    args = TrainingArguments(output_dir=str(work / "plain"), **trainer_args(config, steps))
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), data_collator=counting_collate)
    return timed_train(trainer, steps, fed)


def conversations(config: Any) -> list[tuple[list[dict[str, str]], str]]:
    """(user messages, answer) of each training row, rendered from the config's text template."""
    import datasets
    from slmops_train.data import parse_data_files

    template = str(config.text_template)
    answer_field = template.rsplit("{", 1)[1].rstrip("}")
    prompt_template = template[:template.rindex("{" + answer_field + "}")]
    return [([{"role": "user", "content": prompt_template.format(**row).strip()}], row[answer_field])
            for row in datasets.load_dataset("json", data_files=parse_data_files(config.data_files)[1]["train"], split="train")]


def lora_config(config: Any) -> Any:
    from peft import LoraConfig

    modules = config.target_modules if config.target_modules != ["all-linear"] else "all-linear"
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=modules, bias="none", task_type="CAUSAL_LM")


def counting(collate: Any, fed: dict[str, int]) -> Any:
    """``collate`` that also counts the real and padded tokens it fed."""
    def counting_collate(features: list[dict[str, Any]]) -> Any:
        batch = collate(features)
        fed["tokens"] += int(batch["attention_mask"].sum())
        fed["padded"] += int(batch["attention_mask"].numel())
        return batch
    return counting_collate


def trainer_args(config: Any, steps: int) -> dict[str, Any]:
    """The TrainingArguments both textbook sides share: the demo config's optimizer settings, no saving."""
    return {"max_steps": steps, "per_device_train_batch_size": config.per_device_train_batch_size,
            "learning_rate": config.learning_rate, "lr_scheduler_type": config.lr_scheduler_type,
            "warmup_steps": config.warmup_steps, "logging_steps": config.logging_steps, "save_strategy": "no",
            "report_to": "none", "disable_tqdm": True, "seed": config.seed, "data_seed": config.seed, "use_cpu": True}


def timed_train(trainer: Any, steps: int, fed: dict[str, int]) -> dict[str, Any]:
    """``trainer.train()`` wall time per step, and the tokens its collator fed."""
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    return {"s_per_step": round(seconds / steps, 4), "steps": trainer.state.global_step, "train_s": round(seconds, 2),
            "tokens": fed["tokens"], "padded_tokens": fed["padded"]}


def run_trl(adapter: str, steps: int, work: Path) -> dict[str, Any]:
    """TRL's SFTTrainer on prompt-completion conversations: it applies the chat template and masks
    the prompt itself (completion_only_loss); PEFT via its peft_config. No packing (as the demo)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from slmops.models import resolve_model_path

    config = demo_config(adapter, steps, work / "unused")
    set_seed(config.seed)
    model_path = resolve_model_path(config.model_name_or_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [{"prompt": messages, "completion": [{"role": "assistant", "content": answer}]}
            for messages, answer in conversations(config)]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    args = SFTConfig(output_dir=str(work / "trl"), **trainer_args(config, steps),
                     max_length=config.max_seq_len, completion_only_loss=True, packing=False,
                     bf16=False, gradient_checkpointing=False)  # TRL's defaults are bf16 + checkpointing; ours fp32, none
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora_config(config))
    fed = {"tokens": 0, "padded": 0}
    trainer.data_collator = counting(trainer.data_collator, fed)
    return timed_train(trainer, steps, fed)


def child(variant: str, adapter: str, steps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        result = {"slmops": run_slmops, "plain": run_plain, "trl": run_trl}[variant](adapter, steps, Path(tmp))
    print("RESULT " + json.dumps({"variant": variant, **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="tone", help="adapter of examples/train.yaml whose settings both sides use")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of both sides (default: torch's own choice)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)
    if args.child:
        child(args.child, args.adapter, args.steps)
        return
    variants = tuple(v for v in VARIANTS if v in args.variants.split(","))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for rep in range(args.repeats):
        for variant in variants if rep % 2 == 0 else tuple(reversed(variants)):
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--adapter", args.adapter, "--steps", str(args.steps)],
                                  capture_output=True, text=True, env=env, cwd=REPO)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            runs[variant].append(result)
            print(f"repeat {rep + 1} {variant}: {result['s_per_step']} s/step", flush=True)
    medians = {v: statistics.median(r["s_per_step"] for r in runs[v]) for v in variants}
    ratios = {f"ratio_slmops_over_{v}": round(medians["slmops"] / medians[v], 3) for v in variants if v != "slmops" and "slmops" in medians}
    summary = {
        "adapter": args.adapter, "steps": args.steps, "repeats": args.repeats, "cpu_count": os.cpu_count(), "threads": args.threads,
        "median_s_per_step": medians, **ratios,
        "runs": runs,
        "note": "interleaved subprocess runs on a possibly shared CPU; compare the two within this file only",
    }
    print(json.dumps({"median_s_per_step": medians, **ratios}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
