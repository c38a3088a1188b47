"""Quantization settings for the model builder.

The onnxruntime-genai builder quantizes itself (MatMulNBits for int4/int8); this module decides
what it is told: the target's ``builder_options`` (block size, accuracy level ...), the user's
``--extra_option k=v`` on top, and the LoRA MatMuls excluded so adapters stay float. Any builder
option is reachable, e.g. ``--extra_option int4_algo_config=k_quant`` or ``int4_block_size=64``.
"""

from __future__ import annotations

from typing import Any

from slmops.errors import SlmopsUsageError
from slmops.targets import Target

# Precisions the builder supports per execution provider (its own table, restricted to ours).
VALID_PRECISIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "int8", "int4"),
    "cuda": ("fp32", "fp16", "int8", "int4"),
    "dml": ("fp16", "int4"),
    "webgpu": ("fp32", "fp16", "int8", "int4"),
}
QUANTIZED = ("int4", "int8")
# Options slmops sets itself; a user value would break the adapter ABI.
RESERVED_OPTIONS = ("adapter_path", "config_only", "exclude_embeds", "include_hidden_states")


def check_precision(target: Target) -> None:
    allowed = VALID_PRECISIONS.get(target.execution_provider)
    if allowed is not None and target.precision not in allowed:
        raise SlmopsUsageError(
            "--precision",
            f"{target.precision} is not supported on the {target.name} target ({target.execution_provider}); choose one of {list(allowed)}",
        )


def parse_extra_options(items: list[str] | tuple[str, ...] | dict[str, Any] | None) -> dict[str, str]:
    """``["k=v", ...]`` (CLI) or a mapping (YAML) -> ``{k: v}``; errors name ``--extra_option``."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = {str(k): _text(v) for k, v in items.items()}
    else:
        pairs = {}
        for item in items:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise SlmopsUsageError("--extra_option", f"'{item}' is not KEY=VALUE, e.g. int4_block_size=64")
            pairs[key.strip()] = value.strip()
    bad = sorted(set(pairs) & set(RESERVED_OPTIONS))
    if bad:
        raise SlmopsUsageError("--extra_option", f"{bad} are set by slmops itself (the adapter ABI depends on them); drop them")
    return pairs


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def builder_extra_options(target: Target, lora_nodes: list[str], extra_options: dict[str, str]) -> dict[str, str]:
    """The builder's ``--extra_options``: target profile, then user options, then LoRA exclusions."""
    options = {k: _text(v) for k, v in target.builder_options.items()}
    options.update(extra_options)
    if target.precision in QUANTIZED and lora_nodes:
        excluded = [n for n in options.get("nodes_to_exclude", "").split(",") if n]
        options["nodes_to_exclude"] = ",".join(excluded + [n for n in lora_nodes if n not in excluded])
    return options
