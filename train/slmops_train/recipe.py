"""The train stage: ``train(config) -> RunResult``. LoRA/QLoRA on a causal LM with the HF Trainer.

Outputs land in ``runs/<name>/``: ``adapter/`` (PEFT), ``run.json``, ``validation/`` (the eval and
test rows as rendered here, for the build stage: ``slmops.runrecord``), ``loss_curve.png`` and
``tensorboard/``. Work happens in a hidden ``.<name>.partial/`` sibling that keeps checkpoints
for ``--resume`` and is renamed into place only when the run completes; a new run refuses to
delete another run's checkpoints there unless ``--overwrite``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmops.contract import package_versions
from slmops.errors import SlmopsUsageError
from slmops.fsutil import check_output_path, replace_dir
from slmops.models import model_weights_sha256, resolve_model_path
from slmops.runrecord import RUN_JSON, RUN_SCHEMA_VERSION, write_validation_rows
from slmops_train.config import TrainConfig
from slmops_train.data import Collator, PreparedData, prepare_data
from slmops_train.layout import link_base_model
from slmops_train.metrics import greater_is_better, is_label_task, perplexity, task_metrics

ADAPTER_DIR = "adapter"
# Train rows scored after training beside eval and test (an overfitting check, not a quality
# figure): few, because generating answers is most of the scoring time on CPU.
TRAIN_SAMPLE_ROWS = 20


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, float]
    record: dict[str, Any]


# ---- model ---------------------------------------------------------------------------------
def linear_module_names(model: Any) -> set[str]:
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear"):
            names.add(name.split(".")[-1])
    return names


def default_target_modules(model: Any, model_path: str) -> Any:
    """Every linear projection of the decoder layers under the family's own PEFT names (Phi-3's fused
    ``qkv_proj``/``gate_up_proj``, q..down_proj elsewhere), so the default adapter can reach every
    projection the bundle's adapter ABI has; PEFT's ``all-linear`` for a family slmops has no table for."""
    from slmops.families import family_or_none

    family = family_or_none(model_path)
    if family is None:
        return "all-linear"
    present = linear_module_names(model)
    return [m for m in family.modules if m in present] or "all-linear"


def check_qlora_support() -> None:
    try:
        import bitsandbytes.functional as bnbf
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        bnbf.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as exc:  # noqa: BLE001 - any failure means no usable 4-bit kernels
        raise SlmopsUsageError(
            "--method", f"qlora needs bitsandbytes 4-bit support on this device ({type(exc).__name__}: {exc}); "
            "install bitsandbytes>=0.45 or use --method lora",
        ) from exc


def load_model(config: TrainConfig, model_path: str) -> Any:
    """Load the base model (4-bit nf4 for qlora) and wrap it with a fresh LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": config.trust_remote_code}
    if config.method == "qlora":
        check_qlora_support()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False  # no KV cache in training; also lets packed position_ids mask
    targets: Any = config.target_modules
    if targets:
        available = linear_module_names(model)
        unknown = [t for t in targets if t != "all-linear" and t not in available]
        if unknown:
            raise SlmopsUsageError(
                "--target_modules", f"{unknown} not in the model; choose from {sorted(available - {'lm_head'})} or 'all-linear'"
            )
        if targets == ["all-linear"]:
            targets = "all-linear"
    else:
        targets = default_target_modules(model, model_path)
    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    lora_kwargs: dict[str, Any] = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout}
    lora = LoraConfig(**lora_kwargs, target_modules=targets, use_rslora=config.use_rslora, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_loss_fn(path: str) -> Any:
    """``pkg.module:Name`` -> a callable ``(outputs, labels, num_items_in_batch) -> loss``."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise SlmopsUsageError("--loss_fn", f"'{path}' must look like 'package.module:Name'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SlmopsUsageError("--loss_fn", f"cannot import '{path}' ({exc}); check the module is on PYTHONPATH") from exc
    if inspect.isclass(obj):
        obj = obj()
    if not callable(obj):
        raise SlmopsUsageError("--loss_fn", f"'{path}' is not callable")
    return obj


# ---- trainer --------------------------------------------------------------------------------
def _trainer_class() -> Any:
    import torch
    from transformers import Trainer

    class SlmopsTrainer(Trainer):
        """Trainer whose evaluation adds perplexity and task metrics on generated answers, so
        early stopping and best-checkpoint selection can use them."""

        def __init__(self, *args: Any, eval_examples: list[dict[str, str]], label_task: bool,
                     gen_limit: int, gen_max_new_tokens: int, gen_tokenizer: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.eval_examples = eval_examples[:gen_limit]
            # metric prefix -> rows to generate answers for: eval (limited), and after training the
            # test split and a train sample (all their rows)
            self.examples_for: dict[str, list[dict[str, str]]] = {"eval": self.eval_examples}
            self.label_task = label_task
            self.gen_max_new_tokens = gen_max_new_tokens
            self.gen_tokenizer = gen_tokenizer
            self.last_predictions: list[str] = []
            self.predictions: dict[str, list[str]] = {}  # metric prefix -> the last answers
            self.eval_by_step: dict[int, tuple[dict[str, float], list[str]]] = {}  # step -> eval metrics, answers

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            collator: Any = self.data_collator
            counting = getattr(collator, "counting", None)
            if counting is not None:  # eval batches are not training tokens
                collator.counting = False
            try:
                output = super().evaluation_loop(*args, **kwargs)
            finally:
                if counting is not None:
                    collator.counting = counting
            metrics: dict[str, float] = output.metrics if output.metrics is not None else {}
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            if f"{prefix}_loss" in metrics:
                metrics[f"{prefix}_perplexity"] = perplexity(metrics[f"{prefix}_loss"])
            examples = self.examples_for.get(prefix, [])
            if examples:
                answers = self.generate_answers([e["prompt"] for e in examples])
                self.predictions[prefix] = answers
                if prefix == "eval":
                    self.last_predictions = answers
                for key, value in task_metrics(answers, [e["reference"] for e in examples], self.label_task).items():
                    metrics[f"{prefix}_{key}"] = value
            if prefix == "eval":
                self.eval_by_step[self.state.global_step] = (dict(metrics), self.predictions.get("eval", []))
            return output

        @torch.no_grad()
        def generate_answers(self, prompts: list[str], batch_size: int = 16) -> list[str]:
            tok = self.gen_tokenizer
            model: Any = self.model
            was_training = model.training
            model.eval()
            tok.padding_side = "left"
            answers: list[str] = []
            device = next(model.parameters()).device
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=not self.args_chat)
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(
                    **enc, max_new_tokens=self.gen_max_new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
                new = out[:, enc["input_ids"].shape[1]:]
                answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
            tok.padding_side = "right"
            if was_training:
                model.train()  # QLoRA on CPU: 4-bit layers give no gradients in eval mode
            return answers

        args_chat = False

    return SlmopsTrainer


def _progress_callback() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class RichProgressCallback(TrainerCallback):
        def __init__(self, title: str) -> None:
            self.title = title
            self.progress: Progress | None = None
            self.task: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self.progress = Progress(
                    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                )
                self.progress.start()
                self.task = self.progress.add_task(self.title, total=state.max_steps, completed=state.global_step, info="")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if self.progress is not None and logs:
                shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "eval_accuracy", "eval_rouge_l")}
                if shown:
                    info = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
                    self.progress.update(self.task, info=info)
                    if not self.progress.console.is_terminal:  # CI, docker logs: one line per log
                        self.progress.console.print(f"{self.title} step {state.global_step}/{state.max_steps} {info}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return RichProgressCallback


# ---- entry point ----------------------------------------------------------------------------
def _steps_per_epoch(n_rows: int, config: TrainConfig, world_size: int) -> int:
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    return max(1, math.ceil(n_rows / per_step))


def _versions() -> dict[str, str]:
    return package_versions(("slmops", "torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes"),
                            missing=None)


def _checkpointing_arg() -> str:
    from transformers import TrainingArguments

    # transformers 5.x renamed gradient_checkpointing -> activation_checkpointing
    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def check_training_options(config: TrainConfig, cuda: bool) -> None:
    """Refuse, naming the option, what the HF Trainer would reject later with a traceback."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    optims = [o.value for o in OptimizerNames]
    if config.optim not in optims:
        raise SlmopsUsageError("--optim", f"'{config.optim}' is not a transformers optimizer; e.g. adamw_torch, adafactor, sgd")
    schedulers = [s.value for s in SchedulerType]
    if config.lr_scheduler_type not in schedulers:
        raise SlmopsUsageError("--lr_scheduler_type", f"'{config.lr_scheduler_type}' is not one of {schedulers}")
    if config.fp16 and not cuda:
        raise SlmopsUsageError("--fp16", "fp16 mixed precision needs a CUDA GPU; on CPU train in float32 "
                               "(leave --fp16 out) or use --bf16 true")
    if config.fp16 and config.bf16:
        raise SlmopsUsageError("--fp16", "choose one of --fp16 and --bf16")


def train(config: TrainConfig) -> RunResult:
    """Fine-tune one adapter as ``config`` says and write its run folder."""
    import warnings

    import torch
    from transformers import AutoTokenizer, EarlyStoppingCallback, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    # peft still calls transformers' renamed gradient-checkpointing helpers: noise, not a problem.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    started = time.time()
    run_dir = config.run_dir()
    check_output_path(run_dir, config.overwrite)
    work = run_dir.parent / f".{run_dir.name}.partial"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    checkpoints = work / "checkpoints"
    resume_from = get_last_checkpoint(str(checkpoints)) if config.resume and checkpoints.is_dir() else None
    if not resume_from and work.exists():
        check_unfinished_run(work, config.overwrite)
        if rank == 0:
            shutil.rmtree(work)
    loss_fn = load_loss_fn(config.loss_fn) if config.loss_fn else None
    check_training_options(config, torch.cuda.is_available())

    set_seed(config.seed)
    model_path = resolve_model_path(config.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data: PreparedData = prepare_data(config, tokenizer, train_sample_rows=min(config.eval_generate_limit, TRAIN_SAMPLE_ROWS))
    label_task = {"classification": True, "generation": False}.get(config.task_type, is_label_task(data.labels))
    model = load_model(config, model_path)

    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(
        _steps_per_epoch(len(data.train), config, world_size) * config.num_train_epochs
    )
    eval_steps = config.eval_steps
    if config.early_stopping_patience and data.eval is not None and not eval_steps:
        eval_steps = max(1, total_steps // 5)
    eval_during = data.eval is not None and eval_steps is not None
    save_steps = config.save_steps or eval_steps or max(10, total_steps // 5)
    if eval_during and save_steps % eval_steps:  # type: ignore[operator]
        raise SlmopsUsageError("--save_steps", f"{save_steps} must be a multiple of --eval_steps {eval_steps} to keep the best checkpoint")
    metric = config.metric_for_best_model if config.metric_for_best_model.startswith("eval_") else f"eval_{config.metric_for_best_model}"

    checkpointing: dict[str, Any] = {_checkpointing_arg(): config.gradient_checkpointing and config.method != "qlora"}
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        **checkpointing,
        optim=config.optim,
        fp16=config.fp16,
        bf16=config.bf16,
        dataloader_num_workers=config.dataloader_num_workers,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if eval_during else "no",
        eval_steps=eval_steps if eval_during else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=eval_during,
        metric_for_best_model=metric if eval_during else None,
        greater_is_better=greater_is_better(metric) if eval_during else None,
        prediction_loss_only=True,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        ddp_backend=None if torch.cuda.is_available() or world_size == 1 else "gloo",
        ddp_find_unused_parameters=False if world_size > 1 else None,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = Collator(tokenizer.pad_token_id)
    callbacks: list[Any] = []
    if config.progress:
        callbacks.append(_progress_callback()(f"train {config.run_name()}"))
    if rank == 0 and "tensorboard" in config.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        tb_dir = Path(config.logging_dir) if config.logging_dir else work / "tensorboard"
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tb_dir))))
    if config.early_stopping_patience and eval_during:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience, config.early_stopping_threshold))
    ref_tokens = max((len(tokenizer(e["reference"], add_special_tokens=False)["input_ids"]) for e in data.eval_examples), default=16)
    trainer_cls = _trainer_class()
    trainer_cls.args_chat = config.use_chat_template
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, data_collator=collator,
        callbacks=callbacks, compute_loss_func=loss_fn, processing_class=tokenizer,
        eval_examples=data.eval_examples if config.eval_generate_limit else [], label_task=label_task,
        gen_limit=config.eval_generate_limit, gen_max_new_tokens=config.eval_max_new_tokens or ref_tokens + 8,
        gen_tokenizer=tokenizer,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # Our rich bar replaces the default printer/tqdm callbacks; TensorBoard and run.json keep the logs.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    train_started = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - train_started
    figures_started = time.time()
    final_metrics, figures = _final_figures(trainer, data, eval_during)
    figures_seconds = time.time() - figures_started
    tokens = collator.tokens_seen * world_size

    record: dict[str, Any] = {
        "schema_version": RUN_SCHEMA_VERSION,
        "name": config.run_name(),
        "status": "completed",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.model_dump(),
        "base_model": {
            "name_or_path": config.model_name_or_path,
            "resolved_path": model_path,
            "sha256": model_weights_sha256(model_path),
            "architecture": (model.base_model.model.config.architectures or [None])[0],
        },
        "adapter": {"method": config.method, "r": config.lora_r, "alpha": config.lora_alpha,
                    "target_modules": sorted({m.split(".")[-1] for m in model.peft_config["default"].target_modules}),
                    "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        "dataset": {**data.fingerprint, "dropped_rows": data.dropped, "packed_rows": len(data.train) if config.packing else None},
        "task": {"type": "classification" if label_task else "generation", "labels": data.labels if label_task else []},
        "metrics": {
            "final": final_metrics,
            # train sample / eval (the selected checkpoint) / test (never seen by training or selection)
            "figures": figures,
            "train_loss": train_output.training_loss,
            "evals": [h for h in trainer.state.log_history if "eval_loss" in h],
            "train_log": [h for h in trainer.state.log_history if "loss" in h],
            "best_checkpoint_metric": trainer.state.best_metric,
            "metric_for_best_model": metric if eval_during else None,
        },
        "sample_predictions": [
            {"prompt": e["prompt"][-200:], "reference": e["reference"], "prediction": p}
            for e, p in zip(data.eval_examples[:5], trainer.last_predictions[:5], strict=False)
        ],
        "performance": {
            "wall_time_s": round(time.time() - started, 2),
            "train_time_s": round(train_seconds, 2),
            "final_figures_s": round(figures_seconds, 2),
            "steps": trainer.state.global_step,
            "s_per_step": round(train_seconds / max(trainer.state.global_step, 1), 4),
            "tokens_seen": tokens,
            "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds else None,
            "world_size": world_size,
            "resumed_from": Path(resume_from).name if resume_from else None,
        },
        "versions": _versions(),
    }
    if trainer.is_world_process_zero():
        final = work / "final"
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir(parents=True)
        trainer.model.save_pretrained(final / ADAPTER_DIR)
        (final / ADAPTER_DIR / "slmops_adapter.json").write_text(json.dumps(
            {"base_model_sha256": record["base_model"]["sha256"], "base_model": config.model_name_or_path,
             "run": config.run_name()}, indent=2))
        for cb in callbacks:
            if getattr(cb, "tb_writer", None) is not None:
                cb.tb_writer.close()
        if (work / "tensorboard").is_dir():
            shutil.move(str(work / "tensorboard"), final / "tensorboard")
        write_loss_curve(trainer.state.log_history, final / "loss_curve.png", config.run_name())
        link_base_model(final, model_path)  # <out>/model beside <out>/adapter, as olive finetune leaves them
        record["validation"] = write_validation_files(final, config, data)
        (final / RUN_JSON).write_text(json.dumps(record, indent=2, default=str))
        check_output_path(run_dir, config.overwrite)
        replace_dir(final, run_dir)
        shutil.rmtree(work, ignore_errors=True)
    return RunResult(run_dir=run_dir, adapter_dir=run_dir / ADAPTER_DIR, metrics=final_metrics, record=record)


def check_unfinished_run(work: Path, overwrite: bool) -> None:
    """Refuse to delete an unfinished run's checkpoints in ``work`` unless ``overwrite``."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = work / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last and not overwrite:
        raise SlmopsUsageError("--resume", f"'{work}' holds an unfinished run's checkpoints (up to {Path(last).name}); "
                               "pass --resume to continue it, or --overwrite to delete them and start again")


def write_validation_files(run_dir: Path, config: TrainConfig, data: PreparedData) -> dict[str, Any]:
    """``validation/{eval,test}.jsonl`` (rendered prompts, references, texts) and their run.json section."""
    splits = {}
    for split, examples, name in (("eval", data.eval_examples, config.eval_split),
                                  ("test", data.test_examples, config.test_split)):
        if examples:
            splits[split] = {**write_validation_rows(run_dir, split, examples), "split": name}
    return {"chat": config.use_chat_template, "max_new_tokens": config.eval_max_new_tokens, "splits": splits}


def _final_figures(trainer: Any, data: PreparedData, eval_during: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """(eval metrics of the kept checkpoint, {"train", "eval", "test"} figures without prefixes).

    The kept (best) checkpoint was evaluated during training: its metrics and answers are reused
    rather than computed again. The test split and a train sample are scored here, once.
    """
    from transformers import EarlyStoppingCallback

    trainer.remove_callback(EarlyStoppingCallback)  # the scoring below is not a training eval
    best = trainer.state.best_global_step if eval_during else None
    final: dict[str, float] = {}
    if best is not None and best in trainer.eval_by_step:
        final, answers = trainer.eval_by_step[best]
        trainer.last_predictions = answers
    elif data.eval is not None:
        final = trainer.evaluate()
    figures: dict[str, Any] = {}
    for split, dataset, examples, prefix in (("train", data.train_sample, data.train_examples, "train_sample"),
                                             ("test", data.test, data.test_examples, "test")):
        if dataset is None:
            continue
        trainer.examples_for[prefix] = examples or []
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
        figures[split] = {"rows": len(dataset), **_unprefixed(metrics, prefix)}
    if final and data.eval is not None:
        figures["eval"] = {"rows": len(data.eval), "step": best, **_unprefixed(final, "eval")}
    return final, dict(sorted(figures.items(), key=lambda kv: ["train", "eval", "test"].index(kv[0])))


def _unprefixed(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    keep = ("loss", "perplexity", "accuracy", "macro_f1", "rouge_l", "bleu", "exact_match")
    return {k.removeprefix(f"{prefix}_"): v for k, v in metrics.items() if k.removeprefix(f"{prefix}_") in keep}


def write_loss_curve(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"slmops train: {title}")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
