"""slmops' int4 quantizer: lossless on weights already on a Q4_1/Q8_0 grid (GGUF-derived models),
LoRA MatMuls stay float; the builder's quantizer stays reachable with quantizer=builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slmops.errors import SlmopsUsageError


@pytest.fixture(scope="session")
def grid_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every decoder linear snapped to a Q4_1 grid and the (tied) embedding
    to a Q8_0 grid, blocks of 32 along the input dim: what a model converted from a GGUF holds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("grid-model")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 2:
                continue
            blocks = param.reshape(param.shape[0], -1, 32)
            if "embed_tokens" in name:
                d = (blocks.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)  # all-zero rows (padding) stay 0
                snapped = torch.round(blocks / d) * d
            else:
                lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
                d = ((hi - lo) / 15).clamp_min(1e-12)
                snapped = lo + torch.round((blocks - lo) / d) * d
            param.copy_(snapped.reshape(param.shape))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


def _logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from slmops_build.validate import OrtScorer

    return np.asarray(OrtScorer(model_dir).logits(ids))


def test_int4_is_lossless_on_a_q4_grid(grid_model_dir: Path, tmp_path: Path) -> None:
    import onnx
    from slmops_build.export import export_base_model

    from slmops.targets import get_target

    report: dict = {}
    fp32 = export_base_model(grid_model_dir, tmp_path / "fp32", get_target("cpu", precision="fp32"), None, in_process=True)
    # accuracy_level=1 keeps activations float, so only the weight encoding is compared
    int4 = export_base_model(grid_model_dir, tmp_path / "int4", get_target("cpu", precision="int4"), None,
                             {"accuracy_level": "1", "head_accuracy_level": "1", "offsets": "exact"}, in_process=True, report=report)
    assert fp32.inputs == int4.inputs and report["quantizer"] == "slmops"
    stats = report["quantization"]
    assert stats["matmuls"] == 2 * 4 + 1 and stats["embedding"] == "int8" and stats["kept_float"] == []
    assert stats["offsets"] == "exact"
    ids = [5, 60, 120, 33, 250, 17, 99, 42, 7, 300]
    np.testing.assert_allclose(_logits(tmp_path / "int4", ids), _logits(tmp_path / "fp32", ids), atol=2e-4, rtol=1e-4)
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False)
    ops = {n.name: n.op_type for n in graph.graph.node}
    assert ops["/model/layers.0/attn/qkv_proj/MatMul_Q4"] == "MatMulNBits"
    assert ops["/model/layers.0/attn/qkv_proj/lora_A/MatMul"] == "MatMul"
    assert ops["/model/layers.0/attn/qkv_proj/MatMul/offsets"] == "MatMul"
    assert ops["/lm_head/MatMul_Q8"] == "MatMulNBits"
    assert "GatherBlockQuantized" in ops.values()
    # the default folds the offsets into the MatMulNBits (4-bit D): near-lossless, one MatMulNBits
    export_base_model(grid_model_dir, tmp_path / "folded", get_target("cpu", precision="int4"), None,
                      {"accuracy_level": "1", "head_accuracy_level": "1"}, in_process=True)
    folded = _logits(tmp_path / "folded", ids)
    np.testing.assert_allclose(folded, _logits(tmp_path / "fp32", ids), atol=5e-3)
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "folded" / "model.onnx"), load_external_data=False).graph.node}
    assert ops["/model/layers.0/attn/qkv_proj/MatMul/with_block_sums"] == "Concat" and not any(n.endswith("/offsets") for n in ops)
    # dropping the offsets (a rounded zero point, like the builder) is visibly worse
    export_base_model(grid_model_dir, tmp_path / "none", get_target("cpu", precision="int4"), None,
                      {"accuracy_level": "1", "head_accuracy_level": "1", "offsets": "none"}, in_process=True)
    fp32_logits = _logits(tmp_path / "fp32", ids)
    assert np.abs(_logits(tmp_path / "none", ids) - fp32_logits).max() > 5 * np.abs(folded - fp32_logits).max()
    # default accuracy level (int8 activations): close, not exact
    export_base_model(grid_model_dir, tmp_path / "int4a4", get_target("cpu", precision="int4"), None, in_process=True)
    # accuracy_level=1 alone leaves the int8 lm_head on int8 activations (no fast fp32 kernel for it)
    export_base_model(grid_model_dir, tmp_path / "a1", get_target("cpu", precision="int4"), None, {"accuracy_level": "1"},
                      in_process=True)
    levels = {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level")
              for n in onnx.load(str(tmp_path / "a1" / "model.onnx"), load_external_data=False).graph.node if n.op_type == "MatMulNBits"}
    assert levels.pop("/lm_head/MatMul_Q8") == 4 and set(levels.values()) == {1}
    np.testing.assert_allclose(_logits(tmp_path / "int4a4", ids), fp32_logits, atol=0.05)


def test_builder_quantizer_is_reachable(tiny_model_dir: Path, tmp_path: Path) -> None:
    import onnx
    from slmops_build.export import export_base_model

    from slmops.targets import get_target

    report: dict = {}
    export_base_model(tiny_model_dir, tmp_path / "m", get_target("cpu"), None, {"quantizer": "builder", "block_size": "16"},
                      in_process=True, report=report)
    assert report["quantizer"] == "builder"
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a.i == 16 for n in nbits for a in n.attribute if a.name == "block_size")
    assert not any(n.name.endswith("/offsets") for n in graph.graph.node)
    # LoRA MatMuls stay float (not quantized); the row-mask Mul (ABI 3) sits between A and B
    assert {n.op_type for n in graph.graph.node if "/lora_" in n.name and n.op_type != "Add"} == {"MatMul", "Mul"}


def test_quantizer_options_are_checked() -> None:
    from slmops_build.quantize import builder_extra_options, quantizer_for

    from slmops.targets import get_target

    cpu = get_target("cpu")
    with pytest.raises(SlmopsUsageError, match="quantizer=builder"):
        quantizer_for(cpu, {"algo_config": "k_quant"})
    with pytest.raises(SlmopsUsageError, match="not one of"):
        quantizer_for(cpu, {"quantizer": "gptq"})
    assert quantizer_for(get_target("cuda"), {}) is None  # fp16: nothing to quantize
    assert quantizer_for(get_target("cuda", precision="int4"), {}) == "builder"
    # the deprecated int4_* names are translated (the 0.18 builder ignores them)
    opts = builder_extra_options(cpu, {"quantizer": "builder", "int4_block_size": "64"})
    assert opts["block_size"] == "64" and "int4_block_size" not in opts and "quantizer" not in opts
    assert "block_size" not in builder_extra_options(cpu, {})  # slmops' quantizer: the builder exports fp32
    with pytest.raises(SlmopsUsageError, match="offsets=fast is not one of"):
        from slmops_build.quantize import quantize_graph

        quantize_graph(Path("/nonexistent"), 4, {"offsets": "fast"})
