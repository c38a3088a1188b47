"""The Olive SLMOps guide's commands (../shared/design/olive-guide.md), typed with `olive` replaced by
`slmops`, through the real entry point: hub ids are swapped for the default model, which here is the
tiny test model (a prepared default in a temp SLMOPS_CACHE), hub datasets for local files in olive's
own form (`--data_name json --data_files FILE`), and `--max_steps` is 2. Each command must exit 0 and
leave the files the guide's next command reads."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from slmops.defaults import DEFAULT_MODEL_NAME
from slmops.fsutil import sha256_files
from tests.conftest import EXAMPLES, run_cli, write_jsonl

LLAMA_TEMPLATE = ("<|start_header_id|>user<|end_header_id|>\\n{phrase}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\\n{tone}")
GUIDE_DATASET = [
    {"input": "What is machine learning?",
     "output": "Machine learning is a subset of artificial intelligence that enables computers to learn and improve "
               "from experience without being explicitly programmed."},
    {"input": "Explain neural networks",
     "output": "Neural networks are computing systems inspired by biological neural networks that learn from data "
               "through interconnected nodes or neurons."},
]


@pytest.fixture(scope="module")
def guide(tiny_model_dir: Path, tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A working folder (the user's cwd) and an environment whose default model is the tiny model."""
    root = tmp_path_factory.mktemp("guide")
    cache = root / "cache"
    default = cache / "models" / DEFAULT_MODEL_NAME
    shutil.copytree(tiny_model_dir, default)
    (default / "slmops_model.json").write_text(json.dumps(
        {"name": DEFAULT_MODEL_NAME, "source": "tests", "weights_sha256": sha256_files(sorted(default.glob("*.safetensors")))}))
    work = root / "work"
    work.mkdir()
    # tiny-codes in olive's QLoRA example has 4224+ rows; ours repeats three short ones
    langs = [("python", "Add two numbers", "def add(a, b): return a + b"),
             ("c", "Return zero", "int f(void) { return 0; }"),
             ("go", "Print hello", 'fmt.Println("hello")')]
    write_jsonl(work / "tiny-codes.jsonl", [
        {"programming_language": lang, "prompt": prompt, "response": response}
        for i in range(4224) for lang, prompt, response in [langs[i % 3]]])
    (work / "dataset.json").write_text(json.dumps(GUIDE_DATASET, indent=2))
    env = {"SLMOPS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return {"work": work, "env": env, "default": default, "tone": tiny_data["tone_train"],
            "extract": tiny_data["extract_train"]}


def slmops(guide: dict[str, Any], *args: str, timeout: int = 600) -> Any:
    proc = run_cli(list(args), cwd=guide["work"], env=guide["env"], timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def ok(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_1_basic_finetune_leaves_model_beside_adapter(guide: dict[str, Any]) -> None:
    ok(slmops(guide, "finetune",
              "--model_name_or_path", "default",  # meta-llama/Llama-3.2-1B-Instruct offline
              "--trust_remote_code",
              "--output_path", "models/llama/ft",
              "--data_name", "json", "--data_files", str(guide["tone"]),  # xxyyzzz/phrase_classification
              "--text_template", LLAMA_TEMPLATE,
              "--method", "lora",
              "--max_steps", "2",
              "--log_level", "1"))
    out = guide["work"] / "models/llama/ft"
    assert (out / "adapter" / "adapter_config.json").is_file()
    model = out / "model"
    # a link to the base, not a copy
    assert model.is_symlink() and model.resolve() == guide["default"].resolve()
    assert (model / "config.json").is_file()
    record = json.loads((out / "run.json").read_text())
    # `\n` typed in a shell-quoted template is a newline, as olive's unescaped_str makes it
    assert "<|end_header_id|>\n{phrase}" in record["config"]["text_template"]
    assert record["config"]["trust_remote_code"] is True


def test_2_auto_opt_reads_the_finetune_output(guide: dict[str, Any]) -> None:
    ok(slmops(guide, "auto-opt",
              "--model_name_or_path", "models/llama/ft/model",
              "--adapter_path", "models/llama/ft/adapter",
              "--device", "cpu",
              "--provider", "CPUExecutionProvider",
              "--use_ort_genai",
              "--output_path", "models/llama/onnx",
              "--log_level", "1"))
    out = guide["work"] / "models/llama/onnx"
    manifest = json.loads((out / "bundle.json").read_text())
    assert (out / "model" / "genai_config.json").is_file()
    assert (out / "adapters" / "ft.onnx_adapter").is_file() and "ft" in manifest["adapters"]
    assert manifest["target"]["provider"] in (None, "CPUExecutionProvider") and manifest["target"]["name"] == "cpu"


def test_2b_auto_opt_reads_a_finetune_output_folder_as_olive_reads_a_previous_output(guide: dict[str, Any]) -> None:
    ok(slmops(guide, "auto-opt", "-m", "models/llama/ft", "--output_path", "models/llama/onnx-from-folder",
              "--precision", "fp32", "--no-validate"))
    manifest = json.loads((guide["work"] / "models/llama/onnx-from-folder/bundle.json").read_text())
    assert list(manifest["adapters"]) == ["ft"] and manifest["target"]["precision"] == "fp32"


def _guide_config(guide: dict[str, Any], **lora: Any) -> Path:
    """The guide's olive-config.yaml: DialoGPT -> default model (Llama modules), the guide's JSON dataset."""
    import yaml

    config = {
        "model": {"type": "PyTorchModel", "config": {"model_path": "default", "task": "text-generation"}},
        "data_configs": [{
            "name": "custom_dataset", "type": "HuggingfaceContainer",
            "load_dataset_config": {"data_files": "dataset.json", "split": "train"},
            "pre_process_data_config": {"text_template": "User: {input}\nAssistant: {output}"},
        }],
        "passes": {"lora": {"type": "LoRA", "config": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
                                                       "training_args": {"max_steps": 2}, **lora}}},
    }
    path = guide["work"] / "olive-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_3_run_config_setup_then_run(guide: dict[str, Any]) -> None:
    _guide_config(guide)
    setup = ok(slmops(guide, "run", "--config", "olive-config.yaml", "--setup"))
    assert "--setup only sets up" in setup.stderr
    assert not (guide["work"] / "runs" / "olive-config").exists()  # setup does not run the workflow
    ok(slmops(guide, "run", "--config", "olive-config.yaml"))
    out = guide["work"] / "runs" / "olive-config"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model").is_symlink()
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["lora_r"] == 16 and record["config"]["lora_alpha"] == 32
    assert record["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert record["config"]["text_template"] == "User: {input}\nAssistant: {output}"


def test_3b_guide_config_with_modules_to_save_is_refused_in_one_line(guide: dict[str, Any]) -> None:
    _guide_config(guide, modules_to_save=["ln_f", "lm_head"])
    proc = slmops(guide, "run", "--config", "olive-config.yaml", "-o", "runs/refused")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "modules_to_save" in proc.stderr, proc.stderr
    assert not (guide["work"] / "runs" / "refused").exists()


def test_3c_regularization_and_performance_options(guide: dict[str, Any]) -> None:
    """The guide's LoRA-pass regularization (lora_dropout, weight_decay) and training_config snippets."""
    import yaml

    path = _guide_config(guide, lora_alpha=16, lora_dropout=0.1, weight_decay=0.01)
    config = yaml.safe_load(path.read_text())
    config["training_config"] = {"fp16": False, "dataloader_num_workers": 1, "optim": "adamw_torch",
                                 "lr_scheduler_type": "cosine"}
    path.write_text(yaml.safe_dump(config))
    ok(slmops(guide, "run", "--config", "olive-config.yaml", "-o", "runs/regularized"))
    cfg = json.loads((guide["work"] / "runs/regularized/run.json").read_text())["config"]
    assert (cfg["lora_dropout"], cfg["weight_decay"], cfg["lora_alpha"]) == (0.1, 0.01, 16)
    assert (cfg["dataloader_num_workers"], cfg["optim"], cfg["lr_scheduler_type"]) == (1, "adamw_torch", "cosine")
    # fp16 on a machine without CUDA: refused in one line, not accepted and ignored
    config["training_config"]["fp16"] = True
    path.write_text(yaml.safe_dump(config))
    import torch

    if not torch.cuda.is_available():
        proc = slmops(guide, "run", "--config", "olive-config.yaml", "-o", "runs/fp16")
        assert proc.returncode == 2 and "--fp16" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_4_qlora_finetune(guide: dict[str, Any]) -> None:
    ok(slmops(guide, "finetune",
              "--method", "qlora",
              "--model_name_or_path", "default",  # meta-llama/Meta-Llama-3-8B
              "--data_name", "json", "--data_files", "tiny-codes.jsonl",  # nampdn-ai/tiny-codes
              "--train_split", "train[:4096]",
              "--eval_split", "train[4096:4224]",
              "--text_template", "### Language: {programming_language} \\n### Question: {prompt} \\n### Answer: {response}",
              "--per_device_train_batch_size", "16",
              "--per_device_eval_batch_size", "16",
              "--max_steps", "2",
              "--logging_steps", "50",
              "--output_path", "adapters/tiny-codes"))
    record = json.loads((guide["work"] / "adapters/tiny-codes/run.json").read_text())
    assert record["config"]["method"] == "qlora" and record["performance"]["steps"] == 2
    assert record["dataset"]["eval_rows"] == 128 if "eval_rows" in record["dataset"] else True
    assert (guide["work"] / "adapters/tiny-codes/model").is_symlink()


def test_5_several_adapters_then_one_multi_adapter_model(guide: dict[str, Any]) -> None:
    data = {"classifier": (guide["tone"], "Tone of: {phrase}\\n{tone}"),
            "generator": (guide["extract"], "Extract: {request}\\n{json}")}
    for task, out in (("classification", "classifier"), ("generation", "generator")):
        files, template = data[out]
        ok(slmops(guide, "finetune", "--method", "lora", "--task_name", task, "--output_path", f"adapters/{out}",
                  "--data_name", "json", "--data_files", str(files), "--text_template", template, "--max_steps", "2"))
        record = json.loads((guide["work"] / f"adapters/{out}/run.json").read_text())
        assert record["task"]["type"] == task
    base = guide["work"] / "models" / "base"
    base.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(guide["default"], base)
    ok(slmops(guide, "generate-adapter",
              "--base_model_path", "models/base",
              "--adapter_paths", "adapters/classifier,adapters/generator",
              "--output_path", "models/multi-adapter"))
    out = guide["work"] / "models/multi-adapter"
    manifest = json.loads((out / "bundle.json").read_text())
    assert sorted(manifest["adapters"]) == ["classifier", "generator"]
    assert (out / "adapters" / "classifier.onnx_adapter").is_file() and (out / "adapters" / "generator.onnx_adapter").is_file()


def test_6_logging_and_tensorboard(guide: dict[str, Any]) -> None:
    ok(slmops(guide, "finetune",
              "--logging_steps", "10",
              "--eval_steps", "50",
              "--save_steps", "100",
              "--logging_dir", "./logs",
              "--report_to", "tensorboard",
              "--data_name", "json", "--data_files", str(guide["tone"]), "--text_template", "Tone of: {phrase}\\n{tone}",
              "--max_steps", "2", "--output_path", "runs/logged"))
    assert list((guide["work"] / "logs").glob("events.out.tfevents.*"))
    # a reporter slmops does not have is refused in one line, not accepted and ignored
    proc = slmops(guide, "finetune", "--report_to", "wandb", "--data_name", "json", "--data_files", str(guide["tone"]),
                  "--max_steps", "2", "--output_path", "runs/wandb")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--report_to" in proc.stderr, proc.stderr
    assert not (guide["work"] / "runs" / "wandb").exists()


def test_7_memory_efficient_training(guide: dict[str, Any]) -> None:
    ok(slmops(guide, "finetune",
              "--method", "qlora",
              "--gradient_checkpointing", "true",
              "--per_device_train_batch_size", "1",
              "--gradient_accumulation_steps", "16",
              "--data_name", "json", "--data_files", str(guide["tone"]), "--text_template", "Tone of: {phrase}\\n{tone}",
              "--max_steps", "2", "--output_path", "runs/memory"))
    cfg = json.loads((guide["work"] / "runs/memory/run.json").read_text())["config"]
    assert cfg["gradient_checkpointing"] is True and cfg["gradient_accumulation_steps"] == 16
    # and the false form
    proc = ok(slmops(guide, "finetune", "--gradient_checkpointing", "false", "--data_name", "json", "--data_files",
                     str(guide["tone"]), "--max_steps", "2", "--dry_run"))
    assert "gradient_checkpointing" not in proc.stdout  # false is the default: nothing differs


def test_hyperparameter_search_yaml_in_the_guides_format(guide: dict[str, Any]) -> None:
    (guide["work"] / "hyperparameter-search.yaml").write_text(
        "search_strategy:\n  type: \"random\"\n  num_trials: 2\n\n"  # the guide says 20
        "search_space:\n  learning_rate:\n    type: \"float\"\n    low: 1e-6\n    high: 1e-3\n    log: true\n  \n"
        "  lora_r:\n    type: \"int\"\n    low: 8\n    high: 64\n  \n"
        "  batch_size:\n    type: \"choice\"\n    values: [8, 16, 32]\n")
    ok(slmops(guide, "finetune", "--search", "hyperparameter-search.yaml", "--data_name", "json", "--data_files",
              str(guide["tone"]), "--text_template", "Tone of: {phrase}\\n{tone}", "--max_steps", "2",
              "--output_path", "runs/search"))
    out = guide["work"] / "runs/search"
    trials = json.loads((out / "trials.json").read_text())
    assert trials["sampler"] == "random" and trials["n_trials"] == 2 and len(trials["trials"]) == 2
    for row in trials["trials"]:
        assert 1e-6 <= row["learning_rate"] <= 1e-3 and 8 <= row["lora_r"] <= 64
        assert row["per_device_train_batch_size"] in (8, 16, 32)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model").is_symlink()


def test_a_hub_id_offline_fails_fast_in_one_line(guide: dict[str, Any]) -> None:
    started = time.time()
    proc = slmops(guide, "finetune", "--model_name_or_path", "meta-llama/Llama-3.2-1B-Instruct", "--data_name", "json",
                  "--data_files", str(guide["tone"]), "--max_steps", "2", "--output_path", "runs/hub")
    assert time.time() - started < 10 + 8  # 10 s, plus the interpreter start of a busy test machine
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--model_name_or_path" in proc.stderr and "meta-llama/Llama-3.2-1B-Instruct" in proc.stderr


def test_unknown_and_refused_options_are_listed_at_once(guide: dict[str, Any]) -> None:
    proc = slmops(guide, "finetune", "--data_files", str(guide["tone"]), "--lora-rank", "4", "--bogus", "--max_grad_norm",
                  "1.0", "--use_ort_genai", "--max-steps", "2")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    for name in ("--lora-rank", "--bogus", "--max_grad_norm", "--use_ort_genai"):
        assert name in proc.stderr
    assert "auto-opt" in proc.stderr  # what to use instead of --use_ort_genai


def test_examples_olive_config_plans(guide: dict[str, Any]) -> None:
    """examples/olive-config.yaml maps onto a train and a build stage (checked without running them)."""
    from slmops_ops.olive_run import plan_from_config

    from slmops.configfile import load_yaml

    path = EXAMPLES / "olive-config.yaml"
    plan = plan_from_config(load_yaml(path), str(path), path.parent)
    assert plan.train is not None and plan.build is not None
    assert plan.train["lora_r"] == 16 and plan.train["data_files"] == [str(EXAMPLES / "tone" / "train.jsonl")]
    assert plan.build["precision"] == "int4" and plan.build["provider"] == "CPUExecutionProvider"
    assert plan.build["output_path"].endswith("olive-tone/bundle")
