"""``slmops auto-opt`` and ``slmops generate-adapter``: olive's commands, run by ``slmops build``.

Each takes every ``slmops build`` option plus olive's own names (olive/cli/auto_opt.py,
olive/cli/generate_adapter.py): ``--adapter_path``, ``--use_ort_genai``, ``--base_model_path``,
``--adapter_paths a,b`` ... Olive options slmops cannot honour are refused in one line each,
with the reason and what to use instead; none is accepted and ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from slmops.clickutil import apply_log_level
from slmops.errors import SlmopsUsageError
from slmops_build.cli import build_command

TASKS = ("text-generation", "text-generation-with-past")
REMOTE = "slmops builds on this machine (no AzureML remote runs or shared caches); leave it out"
EVAL_DATA = ("olive's evaluation data for a pass search; slmops validates each adapter on its own eval split "
             "(its run.json) and the base on perplexity: leave it out (see --validate_rows)")
COMMON_REFUSED: dict[str, str] = {
    "--model_script": "only Hugging Face causal LMs are supported; pass the model folder with --model_name_or_path",
    "--script_dir": "only Hugging Face causal LMs are supported; pass the model folder with --model_name_or_path",
    "--resource_group": REMOTE, "--workspace_name": REMOTE, "--keyvault_name": REMOTE, "--aml_compute": REMOTE,
    "--account_name": REMOTE, "--container_name": REMOTE,
    "--save_config_file": "slmops writes no olive workflow config; bundle.json records every build setting",
    "--dry_run": "not supported; `slmops targets` shows what each target builds",
    "--test": "no random test model: pass a small local model folder with --model_name_or_path",
}
AUTO_OPT_REFUSED: dict[str, str] = {
    **COMMON_REFUSED,
    "--data_name": EVAL_DATA, "--split": EVAL_DATA, "--subset": EVAL_DATA, "--input_cols": EVAL_DATA,
    "--batch_size": EVAL_DATA,
    "--enable_search": "slmops searches its own quantization candidates against the adapters' answers (--search, on by "
                       "default in auto-opt when the target and runs allow it); pick the target with --target/--device",
    "--seed": "no pass search to seed; leave it out",
    "--use_dynamo_exporter": "slmops exports with the ONNX Runtime GenAI model builder; leave it out",
    "--use_qdq_encoding": "slmops quantizes to MatMulNBits (onnxruntime contrib ops), not QDQ; leave it out",
    "--num_splits": "model splitting is not supported; leave it out",
    "--cost_model": "model splitting is not supported; leave it out",
    "--memory": "no memory-driven splitting; leave it out",
    "--dynamic_to_fixed_shape_dim_param": "fixed shapes (QNN/NPU) are not a slmops target; see `slmops targets`",
    "--dynamic_to_fixed_shape_dim_value": "fixed shapes (QNN/NPU) are not a slmops target; see `slmops targets`",
    "--mixed_precision_overrides_config": "per-node precision overrides are not supported; use --precision",
    "--surgeries": "graph surgeries are not supported; leave them out",
    "--providers_list": "pass one --provider (or --target)",
}


def _build_params(skip: tuple[str, ...] = ()) -> list[click.Parameter]:
    return [p for p in build_command.params if p.name not in skip]


def _common_options() -> list[click.Option]:
    return [
        click.Option(["--log_level"], type=click.IntRange(0, 4), default=None, help="olive's logging level: 0 DEBUG, 1 INFO, 2 WARNING, 3 ERROR, 4 CRITICAL  [default: 3]"),
        click.Option(["--trust_remote_code"], is_flag=True, default=None,
                     help="accepted for olive compatibility: the model builder handles built-in architectures only, "
                          "so no remote model code runs"),
        click.Option(["-t", "--task", "hf_task"], type=str, default=None, help="olive's Hugging Face task; slmops builds causal LMs: text-generation only  [default: text-generation]"),
    ]


def _check_common(options: dict[str, Any]) -> None:
    apply_log_level(options.pop("log_level", None))
    options.pop("trust_remote_code", None)
    task = options.pop("hf_task", None)
    if task is not None and task not in TASKS:
        raise SlmopsUsageError("--task", f"'{task}' is not supported: slmops builds causal LMs ({', '.join(TASKS)})")


def _no_onnx_model(path: str | None, option: str) -> None:
    if path and Path(path).is_dir() and any(Path(path).glob("*.onnx")):
        raise SlmopsUsageError(option, f"'{path}' is an ONNX model; slmops builds from the PyTorch base model and "
                               "PEFT adapters: pass the Hugging Face folder (e.g. <finetune output>/model)")


def _run_build(options: dict[str, Any]) -> Any:
    config_path = options.pop("config_path", None)
    return build_command.callback(config_path=config_path, **options)  # type: ignore[misc]


# ---- auto-opt ---------------------------------------------------------------------------------
def _auto_opt(**options: Any) -> Any:
    _check_common(options)
    for flag in ("use_ort_genai", "use_model_builder"):
        if options.pop(flag, None) is False:
            raise SlmopsUsageError(f"--{flag}", "slmops bundles are always ONNX Runtime GenAI models made by the "
                                   "model builder; leave it out (or true)")
    adapter_path = options.pop("adapter_path", None)
    model = options.get("model_name_or_path")
    if model and (Path(model) / "model").is_dir() and (Path(model) / "adapter").is_dir():
        # a finetune output folder, as olive reads a previous command's output: its base and its adapter
        options["model_name_or_path"] = str(Path(model) / "model")
        if not adapter_path and not options.get("adapter"):
            adapter_path = str(Path(model) / "adapter")
    if adapter_path:
        options["adapter"] = (*(options.get("adapter") or ()), adapter_path)
    _no_onnx_model(options.get("model_name_or_path"), "--model_name_or_path")
    if options.get("search") is None and options.get("precision") in (None, "int4"):
        options["search"] = "auto"  # olive auto-opt searches: measure the quantization when it can
    return _run_build(options)


auto_opt_command = click.Command(
    "auto-opt",
    params=[
        *_build_params(),
        click.Option(["-a", "--adapter_path"], type=str, default=None,
                     help="PEFT adapter folder (e.g. <finetune output>/adapter), named after its run folder; "
                          "--adapter NAME=PATH adds more"),
        click.Option(["--use_ort_genai/--no-use_ort_genai"], default=None, help="always on: a bundle is an ONNX Runtime GenAI model (genai_config.json)  [default: true]"),
        click.Option(["--use_model_builder/--no-use_model_builder"], default=None, help="always on: slmops exports with the ONNX Runtime GenAI model builder  [default: true]"),
        *_common_options(),
    ],
    callback=_auto_opt,
    help="olive auto-opt: build an ONNX Runtime GenAI bundle of --model_name_or_path with --adapter_path "
         "(runs `slmops build`). --precision: fp32, fp16, int8, int4 (default: the target's; olive's is fp32).\n\n"
         "Example: slmops auto-opt --model_name_or_path models/ft/model --adapter_path models/ft/adapter "
         "--device cpu --provider CPUExecutionProvider --use_ort_genai --output_path models/onnx",
    context_settings={"max_content_width": 120},
)
auto_opt_command.refused = AUTO_OPT_REFUSED  # type: ignore[attr-defined]


# ---- generate-adapter -------------------------------------------------------------------------
ADAPTER_TYPES = ("lora", "dora", "loha")
ADAPTER_FORMATS = ("onnx_adapter", "numpy", "safetensors")


def _generate_adapter(**options: Any) -> Any:
    _check_common(options)
    base = options.pop("base_model_path", None)
    if base:
        if options.get("model_name_or_path") not in (None, base):
            raise SlmopsUsageError("--base_model_path", "and --model_name_or_path differ; pass one of them")
        options["model_name_or_path"] = base
    _no_onnx_model(options.get("model_name_or_path"), "--base_model_path" if base else "--model_name_or_path")
    adapter_type = options.pop("adapter_type", None)
    if adapter_type not in (None, "lora"):
        raise SlmopsUsageError("--adapter_type", f"'{adapter_type}' adapters are not supported: slmops bundles take "
                               "LoRA adapters (PEFT, also QLoRA-trained)")
    adapter_format = options.pop("adapter_format", None)
    if adapter_format not in (None, "onnx_adapter"):
        raise SlmopsUsageError("--adapter_format", f"'{adapter_format}' is not served: slmops writes "
                               "adapters/<name>.onnx_adapter, the format onnxruntime-genai loads")
    paths = [p.strip() for v in (options.pop("adapter_paths", None) or ()) for p in str(v).split(",") if p.strip()]
    if paths:
        options["adapter"] = (*(options.get("adapter") or ()), *paths)
    if not options.get("adapter") and not options.get("config_path"):
        raise SlmopsUsageError("--adapter_paths", "no adapters: pass --adapter_paths DIR1,DIR2 (finetune output "
                               "folders or PEFT adapter folders)")
    return _run_build(options)


generate_adapter_command = click.Command(
    "generate-adapter",
    params=[
        *_build_params(),
        click.Option(["--base_model_path"], type=str, default=None,
                     help="the base model's Hugging Face folder (same as --model_name_or_path)"),
        click.Option(["--adapter_paths"], type=str, multiple=True,
                     help="comma list of finetune output or PEFT adapter folders, each named after its folder "
                          "(NAME=PATH names one); repeatable"),
        click.Option(["--adapter_type"], type=click.Choice(ADAPTER_TYPES), default=None, help="lora only (olive's dora/loha are refused)  [default: lora]"),
        click.Option(["--adapter_format"], type=click.Choice(ADAPTER_FORMATS), default=None, help="onnx_adapter only: the format the server loads  [default: onnx_adapter]"),
        *_common_options(),
    ],
    callback=_generate_adapter,
    help="olive generate-adapter: one ONNX model with LoRA inputs plus adapters/<name>.onnx_adapter per "
         "adapter (runs `slmops build`).\n\n"
         "Example: slmops generate-adapter --base_model_path models/base "
         "--adapter_paths adapters/classifier,adapters/generator --output_path models/multi-adapter",
    context_settings={"max_content_width": 120},
)
generate_adapter_command.refused = COMMON_REFUSED  # type: ignore[attr-defined]
