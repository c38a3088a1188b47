"""PEFT adapter checks and conversion: every bad adapter is refused with a message naming it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from slmops.errors import SlmopsUsageError
from slmops.models import model_weights_sha256
from tests.build.conftest import Export


def _copy_adapter(tiny_runs: dict[str, Path], tmp_path: Path, name: str = "tone") -> Path:
    dst = tmp_path / name
    shutil.copytree(tiny_runs[name], dst)
    return dst / "adapter"


def test_run_folder_resolves_to_its_adapter(tiny_runs: dict[str, Path], tiny_model_dir: Path) -> None:
    from slmops_build.adapters import load_peft_adapter, parse_adapter_specs

    adapter = load_peft_adapter("tone", tiny_runs["tone"], model_weights_sha256(tiny_model_dir), None)
    assert adapter.adapter_dir == tiny_runs["tone"] / "adapter"
    assert adapter.run_dir == tiny_runs["tone"] and adapter.modules == ["q_proj", "v_proj"]
    assert parse_adapter_specs(["a=x/y", "runs/extract", "runs/tone/adapter"]) == {
        "a": "x/y", "extract": "runs/extract", "tone": "runs/tone/adapter"}
    with pytest.raises(SlmopsUsageError, match="twice"):
        parse_adapter_specs(["a=x", "a=y"])


@pytest.mark.parametrize("case", ["no_config", "dora", "base_sha", "corrupt", "outside_abi", "modules_to_save"])
def test_bad_adapters_are_refused(case: str, tiny_runs: dict[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    from slmops_build.adapters import load_peft_adapter

    adapter = _copy_adapter(tiny_runs, tmp_path, "extract" if case == "outside_abi" else "tone")
    abi = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    expected = {"no_config": "has no adapter_config.json", "dora": "DoRA", "base_sha": "sha256",
                "corrupt": "cannot be read", "outside_abi": "outside the bundle's adapter ABI",
                "modules_to_save": "modules_to_save"}[case]
    if case == "no_config":
        (adapter / "adapter_config.json").unlink()
    elif case == "dora":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    elif case == "base_sha":
        (adapter / "slmops_adapter.json").write_text(json.dumps({"base_model_sha256": "0" * 64}))
    elif case == "corrupt":
        (adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    elif case == "outside_abi":
        abi = ["q_proj", "v_proj"]
    elif case == "modules_to_save":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        import torch

        tensors["base_model.model.lm_head.weight"] = torch.zeros(4, 4)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(SlmopsUsageError) as exc:
        load_peft_adapter("tone", adapter, model_weights_sha256(tiny_model_dir), abi)
    assert exc.value.option == "--adapter" and expected in exc.value.message
    assert "'tone'" in exc.value.message


def test_dora_is_accepted_for_merge(tiny_runs: dict[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    from slmops_build.adapters import load_peft_adapter

    adapter = _copy_adapter(tiny_runs, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert load_peft_adapter("tone", adapter, None, None, merge=True).modules == ["q_proj", "v_proj"]


def test_scales_follow_peft(tiny_runs: dict[str, Path], lora_export: Export, tmp_path: Path) -> None:
    """B is scaled by alpha/r, alpha/sqrt(r) with rsLoRA, alpha_pattern per module; A is only transposed."""
    from safetensors.torch import load_file
    from slmops_build.adapters import convert_adapter, lora_scale

    from slmops.contract import read_adapter_tensors

    assert lora_scale({"lora_alpha": 16}, "layers.0.q_proj", 8) == 2.0
    assert lora_scale({"lora_alpha": 16, "use_rslora": True}, "layers.0.q_proj", 4) == 8.0
    assert lora_scale({"lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}, "layers.0.v_proj", 4) == 1.0
    adapter = _copy_adapter(tiny_runs, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    convert_adapter(adapter, lora_export.template, "float32", tmp_path / "rs.onnx_adapter")
    arrays = read_adapter_tensors(tmp_path / "rs.onnx_adapter")
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    a = peft["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].numpy()
    b = peft["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].numpy()
    qa = peft["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].numpy()
    qb = peft["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].numpy()
    # ABI 2: q and v share the packed qkv pair: A = [A_q.T | A_v.T], B block-diagonal in q's and v's columns
    packed_a = arrays["model.layers.1.attn.qkv_proj.lora_A.MatMul.weight"]
    packed_b = arrays["model.layers.1.attn.qkv_proj.lora_B.MatMul.weight"]
    _, q_cols = lora_export.template.projection_of("q_proj")
    _, v_cols = lora_export.template.projection_of("v_proj")
    scale = 8 / math.sqrt(4)
    assert np.array_equal(packed_a, np.concatenate([qa.T, a.T], axis=1))
    expected_b = np.zeros((8, packed_b.shape[1]), np.float32)
    expected_b[:4, q_cols.offset:q_cols.offset + q_cols.size] = (qb * scale).T
    expected_b[4:, v_cols.offset:v_cols.offset + v_cols.size] = (b * scale).T
    np.testing.assert_allclose(packed_b, expected_b, rtol=1e-6)
    assert len(arrays) == 4  # qkv x 2 layers x A,B: the other projections keep their rank-0 defaults


def test_fp16_adapter_and_shape_mismatch(tiny_runs: dict[str, Path], lora_export: Export, tmp_path: Path) -> None:
    from slmops_build.adapters import convert_adapter

    from slmops.bundle import LoraInput
    from slmops.contract import read_adapter_tensors

    info = convert_adapter(tiny_runs["tone"], lora_export.template, "float16", tmp_path / "h.onnx_adapter")
    assert info.dtype == "float16"
    assert {str(v.dtype) for v in read_adapter_tensors(tmp_path / "h.onnx_adapter").values()} == {"float16"}
    wrong = lora_export.template.model_copy(deep=True)
    wrong.inputs = [LoraInput(name=i.name, shape=[128, "lora_r"] if ".lora_A." in i.name else i.shape) for i in wrong.inputs]
    with pytest.raises(SlmopsUsageError, match="another base model"):
        convert_adapter(tiny_runs["tone"], wrong, "float32", tmp_path / "w.onnx_adapter")
