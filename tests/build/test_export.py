"""Export: LoRA inputs with symbolic rank and rank-0 defaults; adapters equal the builder's own
baked weights; no adapter = the plain base model; fp32 + adapter = PyTorch+PEFT exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.build.conftest import PROMPTS, Export

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _baked(model_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if ".lora_" in i.name}


def test_lora_inputs_have_symbolic_rank_and_rank0_defaults(lora_export: Export) -> None:
    import onnx

    model = onnx.load(str(lora_export.model_dir / "model.onnx"))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    lora = {n: s for n, s in inputs.items() if ".lora_" in n}
    assert len(lora) == 2 * len(MODULES) * 2  # 2 layers, 7 modules, A and B
    assert lora["model.layers.0.attn.q_proj.lora_A.MatMul.weight"] == [64, "lora_r"]
    assert lora["model.layers.1.mlp.down_proj.lora_B.MatMul.weight"] == ["lora_r", 64]
    for name, shape in lora.items():
        default = inits[name]
        assert default == ([shape[0], 0] if ".lora_A." in name else [0, shape[1]]), name
    template = lora_export.template
    assert template.modules == MODULES and template.num_layers == 2 and template.dtype == "float32"
    assert {i.name: i.shape for i in template.inputs} == lora
    # the rank-0 rewrite keeps no LoRA bytes: the data file is no bigger than the raw export's
    assert (lora_export.model_dir / "model.onnx.data").stat().st_size <= (lora_export.work / "raw" / "model.onnx.data").stat().st_size


def test_genai_config_sets_threads(lora_export: Export) -> None:
    import json

    config = json.loads((lora_export.model_dir / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2


def test_converted_template_equals_builder_weights(lora_export: Export, tmp_path: Path) -> None:
    from slmops_build.adapters import convert_adapter, read_onnx_adapter

    info = convert_adapter(lora_export.work / "template_adapter", lora_export.template, "float32", tmp_path / "t.onnx_adapter")
    converted = read_onnx_adapter(tmp_path / "t.onnx_adapter")
    baked = _baked(lora_export.work / "raw" / "model.onnx")
    assert set(converted) == set(baked) == lora_export.template.input_names()
    for name, array in baked.items():
        assert converted[name].dtype == array.dtype and np.array_equal(converted[name], array), name
    assert info.rank == 1 and info.target_modules == sorted(MODULES)


def test_converted_trained_adapter_equals_builder_weights(tiny_model_dir: Path, tiny_runs: dict[str, Path],
                                                          lora_export: Export, tmp_path: Path) -> None:
    """A trained adapter (alpha/r = 2) through the builder's own adapter_path= baking vs our conversion."""
    from slmops_build.adapters import convert_adapter, read_onnx_adapter
    from slmops_build.export import run_builder

    from slmops.targets import get_target

    adapter = tiny_runs["extract"] / "adapter"
    run_builder(tiny_model_dir, tmp_path / "raw", get_target("cpu", precision="fp32"), adapter_path=adapter, in_process=True)
    baked = _baked(tmp_path / "raw" / "model.onnx")
    info = convert_adapter(adapter, lora_export.template, "float32", tmp_path / "extract.onnx_adapter")
    converted = read_onnx_adapter(tmp_path / "extract.onnx_adapter")
    assert set(converted) == set(baked) and len(baked) == 28
    for name, array in baked.items():
        assert np.array_equal(converted[name], array), name
    assert info.rank == 8 and info.alpha == 16


def _ort_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from slmops_build.validate import OrtScorer

    return np.asarray(OrtScorer(model_dir).logits(ids))


def test_rank0_default_is_the_plain_base_model(lora_export: Export, plain_export: Path) -> None:
    from slmops_build.validate import OgRunner

    ids = [5, 60, 120, 33, 250, 17, 99, 42]
    np.testing.assert_allclose(_ort_logits(lora_export.model_dir, ids), _ort_logits(plain_export, ids), atol=1e-4, rtol=1e-4)
    lora, plain = OgRunner(lora_export.model_dir), OgRunner(plain_export)
    for prompt_ids in ([5, 60, 120], ids):
        assert lora.generate(prompt_ids, 16) == plain.generate(prompt_ids, 16)


@pytest.mark.parametrize("name", ["tone", "extract"])
def test_fp32_bundle_reproduces_peft_greedy_tokens(name: str, tiny_model_dir: Path, tiny_runs: dict[str, Path],
                                                   lora_export: Export, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from slmops_build.adapters import convert_adapter
    from slmops_build.validate import OgRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter_dir = tiny_runs[name] / "adapter"
    path = tmp_path / f"{name}.onnx_adapter"
    convert_adapter(adapter_dir, lora_export.template, "float32", path)
    runner = OgRunner(lora_export.model_dir)
    runner.load(name, path)
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
