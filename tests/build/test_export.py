"""Export: packed LoRA inputs (ABI 2) with symbolic rank and rank-0 defaults; packed adapters give
PEFT's logits; no adapter = the plain base model; fp32 + adapter = PyTorch+PEFT greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.build.conftest import PROMPTS, Export

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_lora_inputs_have_symbolic_rank_and_rank0_defaults(lora_export: Export) -> None:
    import onnx

    model = onnx.load(str(lora_export.model_dir / "model.onnx"))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    lora = {n: s for n, s in inputs.items() if ".lora_" in n}
    assert len(lora) == 2 * 4 * 2  # 2 layers, 4 packed projections (qkv, o, gate_up, down), A and B
    # each pair has its own symbolic rank (a shared name would make onnxruntime reuse buffers across
    # pairs of different ranks) and B's columns are symbolic too (its [0, 1] default broadcasts)
    assert lora["model.layers.0.attn.qkv_proj.lora_A.MatMul.weight"] == [64, "lora_r.0.qkv_proj"]
    assert lora["model.layers.1.mlp.down_proj.lora_B.MatMul.weight"] == ["lora_r.1.down_proj", "lora_out.1.down_proj"]
    assert len({dim for shape in lora.values() for dim in shape if isinstance(dim, str)}) == 2 * 4 * 2
    for name, shape in lora.items():
        assert inits[name] == ([shape[0], 0] if ".lora_A." in name else [0, 1]), name
    template = lora_export.template
    assert template.modules == MODULES and template.num_layers == 2 and template.dtype == "float32"
    abi = {i.name: i.shape for i in template.inputs}
    assert set(abi) == set(lora) and abi["model.layers.1.mlp.down_proj.lora_B.MatMul.weight"] == ["lora_r.1.down_proj", 64]
    assert abi["model.layers.0.attn.qkv_proj.lora_B.MatMul.weight"][1] == sum(m.size for m in template.projections["qkv_proj"])
    assert list(template.projections) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert [m.module for m in template.projections["qkv_proj"]] == ["q_proj", "k_proj", "v_proj"]
    assert [m.module for m in template.projections["gate_up_proj"]] == ["gate_proj", "up_proj"]
    # the base projections stay fused: one MatMul for q,k,v and one for gate,up per layer
    ops = {n.name: n.op_type for n in model.graph.node}
    assert "/model/layers.0/attn/qkv_proj/MatMul" in ops and "/model/layers.0/mlp/gate_up_proj/MatMul" in ops
    assert not any("/q_proj/" in n or n.endswith("/gate_proj/MatMul") for n in ops)
    # rank-0 defaults keep no LoRA bytes: the data file is no bigger than the raw export's
    assert (lora_export.model_dir / "model.onnx.data").stat().st_size <= (lora_export.work / "raw" / "model.onnx.data").stat().st_size


def test_genai_config_sets_threads(lora_export: Export) -> None:
    import json

    config = json.loads((lora_export.model_dir / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2


def _ort_logits(model_dir: Path, ids: list[int], adapter: dict[str, np.ndarray] | None = None) -> np.ndarray:
    from slmops_build.validate import OrtScorer

    return np.asarray(OrtScorer(model_dir).logits(ids, adapter))


@pytest.mark.parametrize("name", ["tone", "extract"])
def test_packed_adapter_logits_equal_peft(name: str, tiny_model_dir: Path, tiny_runs: dict[str, Path],
                                          lora_export: Export, tmp_path: Path) -> None:
    """ABI 2: the packed qkv / gate_up LoRA pairs (A concatenated, B block-diagonal) compute exactly
    PEFT's per-module LoRA (tone: q,v r=4 alpha 8; extract: all 7 modules r=8 alpha 16)."""
    import torch
    from peft import PeftModel
    from slmops_build.adapters import convert_adapter
    from transformers import AutoModelForCausalLM

    from slmops.contract import read_adapter_tensors

    adapter_dir = tiny_runs[name] / "adapter"
    info = convert_adapter(adapter_dir, lora_export.template, "float32", tmp_path / "a.onnx_adapter")
    arrays = read_adapter_tensors(tmp_path / "a.onnx_adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(adapter_dir))
    ids = [5, 60, 120, 33, 250, 17, 99, 42]
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_ort_logits(lora_export.model_dir, ids, arrays), expected, atol=2e-4, rtol=1e-4)
    if name == "tone":
        assert set(arrays) == {f"model.layers.{i}.attn.qkv_proj.lora_{w}.MatMul.weight" for i in range(2) for w in "AB"}
        assert (info.rank, info.target_modules) == (4, ["q_proj", "v_proj"])
    else:
        assert len(arrays) == 2 * 4 * 2 and info.rank == 8 and info.target_modules == MODULES


def test_rank0_default_is_the_plain_base_model(lora_export: Export, plain_export: Path) -> None:
    from slmops.runtime import LocalModel

    ids = [5, 60, 120, 33, 250, 17, 99, 42]
    np.testing.assert_allclose(_ort_logits(lora_export.model_dir, ids), _ort_logits(plain_export, ids), atol=1e-4, rtol=1e-4)
    lora, plain = LocalModel(lora_export.model_dir, lora_export.template), LocalModel(plain_export)
    for prompt_ids in ([5, 60, 120], ids):
        assert lora.generate(prompt_ids, 16) == plain.generate(prompt_ids, 16)


@pytest.mark.parametrize("name", ["tone", "extract"])
def test_fp32_bundle_reproduces_peft_greedy_tokens(name: str, tiny_model_dir: Path, tiny_runs: dict[str, Path],
                                                   lora_export: Export, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from slmops_build.adapters import convert_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from slmops.runtime import LocalModel

    adapter_dir = tiny_runs[name] / "adapter"
    path = tmp_path / f"{name}.onnx_adapter"
    convert_adapter(adapter_dir, lora_export.template, "float32", path)
    runner = LocalModel(lora_export.model_dir, lora_export.template)  # the server's decode loop, as validation runs it
    runner.load_adapter(name, path)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(adapter_dir))
    model.eval()
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=config)[0, len(ids):].tolist()
        expected = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        assert runner.generate(ids, 12, adapter=name) == expected
        assert np.abs(runner.last_logits(ids, name) - runner.last_logits(ids)).max() > 1e-3
