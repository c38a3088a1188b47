"""`slmops run --config`: olive workflow configs in both forms -> the train and build stages (plans only;
tests/e2e/test_olive_guide.py runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from slmops_ops.olive_run import plan_from_config

from slmops.errors import SlmopsUsageError


def plan(config: dict[str, Any], tmp_path: Path) -> Any:
    return plan_from_config(config, str(tmp_path / "olive-config.yaml"), tmp_path)


def current_olive(tmp_path: Path) -> dict[str, Any]:
    """Current olive's form: input_model, inline pass fields, a list of data configs, an eval split."""
    (tmp_path / "data.jsonl").write_text('{"q": "a", "a": "b"}\n')
    return {
        "input_model": {"type": "HfModel", "model_path": "default", "load_kwargs": {"trust_remote_code": True,
                                                                                    "attn_implementation": "eager"}},
        "systems": {"local_system": {"type": "LocalSystem",
                                     "accelerators": [{"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}]}},
        "data_configs": [{"name": "train_data", "type": "HuggingfaceContainer",
                          "load_dataset_config": {"data_name": "json", "data_files": ["data.jsonl"], "split": "train[:90%]"},
                          "pre_process_data_config": {"text_template": "{q} {a}", "max_seq_len": 256}},
                         {"name": "eval_data", "type": "HuggingfaceContainer",
                          "load_dataset_config": {"data_name": "json", "data_files": ["data.jsonl"], "split": "train[90%:]"}}],
        "passes": {"f": {"type": "QLoRA", "lora_r": 32, "lora_alpha": 64, "train_data_config": "train_data",
                         "eval_data_config": "eval_data", "training_args": {"max_steps": 5, "learning_rate": 1e-4}},
                   "m": {"type": "ModelBuilder", "precision": "fp16"},
                   "e": {"type": "ExtractAdapters", "save_format": "onnx_adapter"}},
        "host": "local_system", "target": "local_system",
        "output_dir": "out/qlora", "log_severity_level": 1,
    }


def test_current_olive_form_maps_to_train_and_build(tmp_path: Path) -> None:
    p = plan(current_olive(tmp_path), tmp_path)
    assert p.train is not None and p.build is not None and p.log_level == 1
    t = p.train
    assert (t["method"], t["lora_r"], t["lora_alpha"], t["max_steps"], t["trust_remote_code"]) == ("qlora", 32, 64, 5, True)
    assert t["data_files"] == [str(tmp_path / "data.jsonl")] and t["data_name"] == "json"
    assert (t["train_split"], t["eval_split"], t["max_seq_len"]) == ("train[:90%]", "train[90%:]", 256)
    assert t["output_path"] == "out/qlora"
    b = p.build
    assert (b["precision"], b["device"], b["provider"]) == ("fp16", "gpu", "CUDAExecutionProvider")
    assert b["adapters"] == {"qlora": "out/qlora"} and b["output_path"] == "out/qlora/bundle"


def test_the_train_values_validate_as_a_train_config(tmp_path: Path) -> None:
    from slmops_train.config import build_config

    cfg = build_config(plan(current_olive(tmp_path), tmp_path).train)
    assert cfg.data_name is None and cfg.method == "qlora"  # `json` names the files' builder


def test_quantization_pass_and_a_build_only_config(tmp_path: Path) -> None:
    config = {"input_model": {"type": "HfModel", "model_path": "m", "adapter_path": "runs/tone/adapter"},
              "passes": {"conv": {"type": "OnnxConversion"},
                         "q": {"type": "OnnxMatMul4Quantizer", "block_size": 32, "accuracy_level": 4}},
              "output_dir": "dist/x"}
    p = plan(config, tmp_path)
    assert p.train is None and p.build is not None
    assert p.build["precision"] == "int4" and p.build["extra_options"] == {"block_size": "32", "accuracy_level": "4"}
    assert p.build["adapters"] == ["runs/tone/adapter"] and p.build["output_path"] == "dist/x"


@pytest.mark.parametrize("change, words", [
    (lambda c: c["passes"].update(s={"type": "OnnxStaticQuantization"}), "pass type 'OnnxStaticQuantization'"),
    (lambda c: c["passes"]["f"].update(lora_typo=3), "passes.f.lora_typo"),
    (lambda c: c["passes"]["f"]["training_args"].update(max_grad_norm=1.0), "max_grad_norm"),
    (lambda c: c.update(evaluators={}), "evaluators"),
    (lambda c: c["input_model"].update(type="OnnxModel"), "OnnxModel"),
    (lambda c: c["passes"]["e"].update(save_format="numpy"), "save_format 'numpy'"),
    (lambda c: c["systems"]["local_system"].update(type="AzureML"), "LocalSystem"),
    (lambda c: c["passes"]["f"].update(train_data_config="nope"), "'nope'"),
    (lambda c: c["passes"]["m"].update(precision="int3"), "int3"),
])
def test_what_does_not_map_is_refused_by_name(change: Any, words: str, tmp_path: Path) -> None:
    config = current_olive(tmp_path)
    change(config)
    with pytest.raises(SlmopsUsageError) as info:
        plan(config, tmp_path)
    assert words in str(info.value) and "olive-config.yaml" in str(info.value)
