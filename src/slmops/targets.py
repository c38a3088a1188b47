"""Hardware targets: named profiles of execution provider, precision and builder options.

Add a row to TARGETS to support a new device class (dml, webgpu, openvino ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from slmops.errors import SlmopsUsageError

PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class Target:
    name: str
    execution_provider: str  # onnxruntime-genai / model builder name: cpu, cuda, dml, webgpu
    provider: str  # onnxruntime provider name, as olive's --provider takes it
    precision: str  # base model precision
    adapter_dtype: str  # dtype of .onnx_adapter tensors; must match the graph's LoRA inputs
    builder_options: dict[str, Any] = field(default_factory=dict)  # --extra_options of the builder
    session_options: dict[str, Any] = field(default_factory=dict)  # genai_config.json session_options

    def with_precision(self, precision: str | None) -> Target:
        if precision is None or precision == self.precision:
            return self
        if precision not in PRECISIONS:
            raise SlmopsUsageError("--precision", f"'{precision}' is not one of {list(PRECISIONS)}")
        return replace(self, precision=precision)


TARGETS: dict[str, Target] = {
    "cpu": Target(
        name="cpu", execution_provider="cpu", provider="CPUExecutionProvider", precision="int4",
        adapter_dtype="float32",
        builder_options={"int4_accuracy_level": 4, "int4_block_size": 32},
        session_options={"intra_op_num_threads": 2},
    ),
    "cuda": Target(
        name="cuda", execution_provider="cuda", provider="CUDAExecutionProvider", precision="fp16",
        adapter_dtype="float16",
    ),
}
PROVIDER_TO_TARGET = {t.provider: name for name, t in TARGETS.items()}
DEVICE_TO_TARGET = {"cpu": "cpu", "gpu": "cuda"}


def get_target(name: str | None = None, device: str | None = None, provider: str | None = None,
               precision: str | None = None) -> Target:
    """Resolve ``--target`` (or olive's ``--device``/``--provider``) and ``--precision``."""
    if name is None and provider is not None:
        if provider not in PROVIDER_TO_TARGET:
            raise SlmopsUsageError("--provider", f"'{provider}' is not one of {sorted(PROVIDER_TO_TARGET)}")
        name = PROVIDER_TO_TARGET[provider]
    if name is None and device is not None:
        if device not in DEVICE_TO_TARGET:
            raise SlmopsUsageError("--device", f"'{device}' is not one of {sorted(DEVICE_TO_TARGET)}")
        name = DEVICE_TO_TARGET[device]
    name = name or "cpu"
    if name not in TARGETS:
        raise SlmopsUsageError("--target", f"unknown target '{name}'; choose one of {sorted(TARGETS)}")
    return TARGETS[name].with_precision(precision)
