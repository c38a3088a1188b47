"""Score a finished train run on a split it did not train on, with the train stage's own metrics.

For runs made before ``--test_split`` existed (their run.json has no test figures), or to score a
run on other rows: the adapter is loaded onto its base model and evaluated exactly as training
evaluates (loss, perplexity, generated answers -> accuracy / macro F1 or ROUGE-L / BLEU / exact
match), through the same trainer class.

    .venv/bin/python bench/score_run.py runs/tone --data_files test=examples/tone/test.jsonl --split test
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def score_run(run_dir: Path, data_files: list[str], split: str) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from slmops_train.config import TrainConfig
    from slmops_train.data import Collator, prepare_data
    from slmops_train.metrics import is_label_task
    from slmops_train.recipe import _trainer_class
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from slmops.models import resolve_model_path

    record = json.loads((run_dir / "run.json").read_text())
    values = {**record["config"], "test_split": split, "overwrite": True}
    known = {f.split("=", 1)[0] for f in values.get("data_files") or [] if "=" in f}
    values["data_files"] = [*(values.get("data_files") or []), *(f for f in data_files if f.split("=", 1)[0] not in known)]
    config = TrainConfig(**values)
    model_path = resolve_model_path(config.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(config, tokenizer)
    assert data.test is not None and data.test_examples is not None
    label_task = record["task"]["type"] == "classification" if record.get("task") else is_label_task(data.labels)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    ref_tokens = max(len(tokenizer(e["reference"], add_special_tokens=False)["input_ids"]) for e in data.eval_examples or data.test_examples)
    trainer_cls = _trainer_class()
    trainer_cls.args_chat = config.use_chat_template
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=config.per_device_eval_batch_size, report_to="none",
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=True, remove_unused_columns=False,
                                 prediction_loss_only=True)
        trainer = trainer_cls(model=model, args=args, eval_dataset=data.test, data_collator=Collator(tokenizer.pad_token_id),
                              processing_class=tokenizer, eval_examples=[], label_task=label_task, gen_limit=0,
                              gen_max_new_tokens=config.eval_max_new_tokens or ref_tokens + 8, gen_tokenizer=tokenizer)
        trainer.examples_for["test"] = data.test_examples
        started = time.time()
        metrics = trainer.evaluate(eval_dataset=data.test, metric_key_prefix="test")
    keep = ("loss", "perplexity", "accuracy", "macro_f1", "rouge_l", "bleu", "exact_match")
    return {"run": str(run_dir), "split": split, "rows": len(data.test), "seconds": round(time.time() - started, 1),
            **{k.removeprefix("test_"): v for k, v in metrics.items() if k.removeprefix("test_") in keep}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data_files", action="append", default=[],
                        help="SPLIT=FILE to add to the run's data files; '{name}' is the run folder's name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)
    results = {}
    for run in args.runs:
        files = [f.replace("{name}", run.name) for f in args.data_files]
        results[run.name] = score_run(run, files, args.split)
        print(json.dumps(results[run.name]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
