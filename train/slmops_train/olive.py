"""``olive finetune``'s options on ``slmops train`` / ``slmops finetune``.

Olive's finetune takes its own options (olive/cli/finetune.py) and passes any other ``--name
value`` to transformers' ``TrainingArguments``. slmops honours the ones its TrainConfig has (same
names), the olive-only ones below, and refuses the rest in one line that says why and what to use.
"""

from __future__ import annotations

import os
import re
from typing import Any

import click

from slmops.clickutil import apply_log_level
from slmops.errors import SlmopsUsageError

REMOTE = "slmops runs on this machine (no AzureML remote runs or shared caches); leave it out"

#: olive finetune options slmops cannot honour -> why, and what to use instead
REFUSED: dict[str, str] = {
    "--precision": "olive's precision of the ONNX model; finetune writes a PyTorch adapter: pass --precision to "
                   "`slmops auto-opt` instead",
    "--use_ort_genai": "finetune writes a PyTorch adapter and <out>/model; make the ONNX Runtime GenAI model with "
                       "`slmops auto-opt --model_name_or_path <out>/model --adapter_path <out>/adapter`",
    "--test": "no random test model: pass a small local model folder with --model_name_or_path",
    "--train_subset": "dataset configs (subsets) are not supported; pass the files with --data_files",
    "--eval_subset": "dataset configs (subsets) are not supported; pass the files with --data_files",
    "--subset": "dataset configs (subsets) are not supported; pass the files with --data_files",
    "--add_special_tokens": "slmops adds the tokenizer's BOS/EOS itself; leave it out",
    "--batch_size": "use --per_device_train_batch_size (and --per_device_eval_batch_size)",
    "--input_cols": "use --text_template '{col1} ... {col2}' or --input_field/--output_field",
    "--resource_group": REMOTE, "--workspace_name": REMOTE, "--keyvault_name": REMOTE, "--aml_compute": REMOTE,
    "--account_name": REMOTE, "--container_name": REMOTE,
    "--resume_from_checkpoint": "use --resume (continues from the last checkpoint of the same --output_path)",
    "--output_dir": "use --output_path (olive's name)",
    "--do_train": "slmops always trains; leave it out", "--do_eval": "use --eval_split (or --eval_steps)",
}
TORCH_DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("text-generation", "text-generation-with-past")


def unescape(text: str | None) -> str | None:
    r"""olive's ``unescaped_str``: ``\n``, ``\t``, ``\r`` and ``\\`` typed in a shell-quoted value."""
    if text is None:
        return None
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def explain_unknown(key: str) -> str | None:
    """An unknown option that is a transformers TrainingArguments field gets its own reason."""
    try:
        from transformers import TrainingArguments
    except ImportError:
        return None
    if key in TrainingArguments.__dataclass_fields__:
        return ("a transformers TrainingArguments option that slmops does not pass on; "
                "`slmops finetune --help` lists the training options it honours")
    return None


def olive_finetune_options(func: Any) -> Any:
    """The olive-only options of ``olive finetune`` that slmops honours."""
    options = [
        click.option("--log_level", type=click.IntRange(0, 4), default=None, help="olive's logging level: 0 DEBUG, 1 INFO, 2 WARNING, 3 ERROR, 4 CRITICAL  [default: 3]"),
        click.option("--task_name", type=click.Choice(["auto", "classification", "generation"]), default=None,
                     help="alias of --task_type: classification (label answers: accuracy/F1) or generation (ROUGE/BLEU)"),
        click.option("-t", "--task", "hf_task", type=str, default=None, help="olive's Hugging Face task; slmops fine-tunes causal LMs: text-generation only  [default: text-generation]"),
        click.option("--torch_dtype", type=click.Choice(TORCH_DTYPES), default=None, help="dtype of the base weights in training; slmops trains float32 (use --bf16/--fp16 for mixed precision)  [default: float32]"),
        click.option("--tempdir", type=str, default=None, help="root folder for temporary files (sets TMPDIR)"),
        click.option("--clean", is_flag=True, default=None,
                     help="start from scratch: slmops keeps no workflow cache, so this only refuses --resume"),
        click.option("--dry_run", is_flag=True, default=None, help="print the resolved training options (YAML) and stop"),
        click.option("--save_config_file", is_flag=True, default=None,
                     help="also write the resolved options to <output_path>/config.yaml (a `slmops train -c` file)"),
        click.option("--json", "as_json", is_flag=True, default=None, help="print the run summary as JSON on stdout"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def apply_olive_options(options: dict[str, Any]) -> dict[str, Any]:
    """Honour (and remove) the olive-only options; return what the train command itself reads."""
    apply_log_level(options.pop("log_level", None))
    task_name = options.pop("task_name", None)
    if task_name is not None:
        if options.get("task_type") not in (None, task_name):
            raise SlmopsUsageError("--task_name", f"'{task_name}' contradicts --task_type {options['task_type']}; pass one")
        options["task_type"] = task_name
    hf_task = options.pop("hf_task", None)
    if hf_task is not None and hf_task not in TASKS:
        raise SlmopsUsageError("--task", f"'{hf_task}' is not supported: slmops fine-tunes causal LMs ({', '.join(TASKS)})")
    dtype = options.pop("torch_dtype", None)
    if dtype not in (None, "float32"):
        raise SlmopsUsageError("--torch_dtype", f"{dtype} base weights are not supported: slmops trains LoRA on float32 "
                               "weights; for mixed precision pass --bf16 true (or --fp16 true on a GPU)")
    tempdir = options.pop("tempdir", None)
    if tempdir:
        import tempfile

        os.makedirs(tempdir, exist_ok=True)
        os.environ["TMPDIR"] = tempfile.tempdir = os.path.abspath(tempdir)
    if options.pop("clean", None) and options.get("resume"):
        raise SlmopsUsageError("--clean", "--clean starts from scratch and --resume continues a run; pass one")
    for key in ("text_template", "system_prompt"):
        if options.get(key) is not None:
            options[key] = unescape(options[key])
    return options
