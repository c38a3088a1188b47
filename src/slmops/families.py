"""The model families slmops takes from train to serve, in one table.

What differs between families for us is small and lives here: the PEFT names of a decoder layer's
linear projections, and how they land in the onnxruntime-genai model builder's graph (q/k/v packed
into one ``qkv_proj`` MatMul and gate/up into one ``gate_up_proj``, in output order). What differs
inside the graph (biases, scaled embeddings, tied heads, head_dim, qk-norm, softcaps, sliding windows,
rope scaling) the builder exports from the model's config, and the runner runs as the graph says.

A family is checked end to end by tests/e2e/test_families.py (train -> build -> serve, served greedy
tokens with an adapter equal to transformers+PEFT, alone and in a mixed batch); a model whose
architecture is not in this table is refused by ``slmops build`` before any work, with this list.
Light on purpose (no torch): the build CLI checks the family at the door.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsUsageError

LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# graph projection -> PEFT modules packed into it, in output-column order
LLAMA_PACKING: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",),
}
# Phi-3 keeps q/k/v and gate/up fused in PyTorch too: PEFT adapts the fused modules, whose output
# columns are already the graph's ([q | k | v], [gate | up]), so each maps onto one projection whole.
PHI3_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PHI3_PACKING: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("qkv_proj",), "o_proj": ("o_proj",), "gate_up_proj": ("gate_up_proj",), "down_proj": ("down_proj",),
}
# PEFT module -> the builder's group in node names (/model/layers.{i}/{attn|mlp}/...)
GROUPS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn", "qkv_proj": "attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "gate_up_proj": "mlp"}


@dataclass(frozen=True)
class Family:
    """One model family: its transformers ``model_type``, the builder's architecture name, and the
    adapter ABI's module layout."""

    model_type: str
    architecture: str  # config.json "architectures"[0] that the builder exports
    label: str  # what users call it
    modules: tuple[str, ...] = LLAMA_MODULES
    packing: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_PACKING))
    notes: str = ""

    def projection_of(self, module: str) -> str:
        """The graph projection a PEFT module lands in (``v_proj`` -> ``qkv_proj``)."""
        return next(p for p, members in self.packing.items() if module in members)

    def members(self, projection: str) -> tuple[str, ...]:
        """The PEFT modules packed in a graph projection (its own name when it holds one module)."""
        return self.packing.get(projection, (projection,))

    def order(self, modules: Any) -> list[str]:
        """``modules`` in this family's ABI order (unknown names last, sorted)."""
        known = [m for m in self.modules if m in set(modules)]
        return known + sorted(set(modules) - set(self.modules))


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "Llama (1-3.x, incl. llama3 rope scaling; SmolLM2)"),
    Family("mistral", "MistralForCausalLM", "Mistral (sliding window)"),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2 / Qwen2.5 (q/k/v biases)"),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3 (qk-norm, head_dim != hidden/heads)"),
    Family("phi3", "Phi3ForCausalLM", "Phi-3 / Phi-3.5 / Phi-4-mini (fused qkv_proj, gate_up_proj)",
           modules=PHI3_MODULES, packing=dict(PHI3_PACKING)),
    Family("gemma", "GemmaForCausalLM", "Gemma (scaled embeddings, GeLU)"),
    Family("gemma2", "Gemma2ForCausalLM", "Gemma 2 (alternating sliding window, softcaps)"),
    Family("gemma3_text", "Gemma3ForCausalLM", "Gemma 3 text (sliding window pattern, local rope, qk-norm)"),
    Family("smollm3", "SmolLM3ForCausalLM", "SmolLM3 (no rope on some layers)"),
    Family("granite", "GraniteForCausalLM", "Granite 3.x (embedding, attention, residual and logits multipliers)"),
)}


def supported_list() -> str:
    return ", ".join(FAMILIES)


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SlmopsUsageError("--model_name_or_path", f"{path} cannot be read ({type(exc).__name__}); pass a Hugging "
                               "Face model folder") from exc
    return config


def family_of(model_dir: str | Path, option: str = "--model_name_or_path") -> Family:
    """The family of the HF model folder ``model_dir``; a SlmopsUsageError naming the supported
    families when slmops cannot take it through the build."""
    config = read_model_config(model_dir)
    model_type = str(config.get("model_type", ""))
    architectures = config.get("architectures") or []
    family = FAMILIES.get(model_type)
    if family is None:
        raise SlmopsUsageError(option, f"model_type '{model_type or '?'}' ({', '.join(architectures) or 'no architectures'}) "
                               f"is not a family slmops builds; supported: {supported_list()}")
    if architectures and architectures[0] != family.architecture:
        raise SlmopsUsageError(option, f"architecture {architectures[0]} of model_type '{model_type}' is not exported by "
                               f"the model builder (it takes {family.architecture}); supported: {supported_list()}")
    return family


def family_or_none(model_dir: str | Path) -> Family | None:
    try:
        return family_of(model_dir)
    except SlmopsUsageError:
        return None


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config (multimodal configs nest it under ``text_config``)."""
    return {**config, **(config.get("text_config") or {})}


def module_sizes(model_dir: str | Path, family: Family) -> dict[str, int]:
    """Output width of every PEFT module of ``family``, from the model's config.json."""
    config = text_config(read_model_config(model_dir))
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "qkv_proj": q + 2 * kv, "o_proj": hidden,
            "gate_proj": inter, "up_proj": inter, "gate_up_proj": 2 * inter, "down_proj": hidden}
