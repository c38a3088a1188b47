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
    # Docker platform architecture the bundle is built for (amd64, arm64): serve and deploy refuse
    # another one (slmops.platforms). The ONNX files themselves are portable; the settings are not.
    arch: str = "amd64"

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
    # Edge boards: Raspberry Pi 5 (Cortex-A76), Jetson Orin (Cortex-A78AE), Graviton/Ampere
    # (Neoverse). Why these settings, from onnxruntime's MatMulNBits and MLAS sources (1.2x-1.3x):
    # * accuracy_level 4 (int8 activations, SQNBIT_CompInt8): on arm64 MLAS quantizes each
    #   activation block to int8 and runs the 4-bit weights through SDOT (dotprod) / USMMLA (i8mm)
    #   kernels, and through Arm's KleidiAI micro-kernels (qai8dxp x qsi4c32p, asymmetric blocks
    #   via a zero-point correction) where the CPU has dotprod, i8mm or SME2. Where it has none of
    #   them (Cortex-A72, i.e. a Pi 4) MatMulNBits falls back to the fp32 kernel by itself
    #   (GetComputeType), so level 4 is never slower than level 1. Level 2 (fp16) only applies to
    #   fp16 graphs; ours are fp32-io on CPU.
    # * block_size 32: KleidiAI's 4-bit kernels need block % 32 == 0 and K % block == 0 (the
    #   folded offsets keep K a multiple of the block), and 32 is what keeps the default model
    #   exact: its GGUF is Q4_1, i.e. 32-weight blocks, so its weights re-quantize losslessly only
    #   on a 32 grid. Larger blocks read fewer scales but lose that; 16 misses KleidiAI.
    # * head_accuracy_level 4: the int8 lm_head's 8-bit blocks have a dotprod/i8mm CompInt8 kernel
    #   on arm64 too (SQ8BitGemm); with level 1 they would be dequantized to fp32 per call.
    # * 4 intra-op threads: the big cores of a Pi 5 / Jetson Orin Nano (4 / 6); `slmops serve
    #   --threads` overrides it per device.
    # Validation on an x86 build host runs x86 kernels; the arm64 answers are checked under
    # emulation (scripts/ci_arm64.sh).
    "cpu-arm64": Target(
        name="cpu-arm64", execution_provider="cpu", provider="CPUExecutionProvider", precision="int4",
        adapter_dtype="float32",
        builder_options={"int4_accuracy_level": 4, "int4_block_size": 32, "head_accuracy_level": 4},
        session_options={"intra_op_num_threads": 4},
        arch="arm64",
    ),
    "cuda": Target(
        name="cuda", execution_provider="cuda", provider="CUDAExecutionProvider", precision="fp16",
        adapter_dtype="float16",
    ),
}
# olive's --provider picks the first target of that provider (cpu, not cpu-arm64).
PROVIDER_TO_TARGET: dict[str, str] = {}
for _name, _target in TARGETS.items():
    PROVIDER_TO_TARGET.setdefault(_target.provider, _name)
DEVICE_TO_TARGET = {"cpu": "cpu", "gpu": "cuda"}


def get_target(name: str | None = None, device: str | None = None, provider: str | None = None,
               precision: str | None = None) -> Target:
    """Resolve ``--target`` (or olive's ``--device``/``--provider``) and ``--precision``."""
    target_name = name
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
    target = TARGETS[name]
    # --target/--device/--provider that name different targets are refused, not resolved by precedence
    clashes = []
    if provider is not None and provider != target.provider:
        clashes.append(f"--provider {provider}")
    if device is not None and device != ("cpu" if target.execution_provider == "cpu" else "gpu"):
        clashes.append(f"--device {device}")
    if clashes:
        chosen = f"--target {name}" if target_name else f"--provider {provider}"
        raise SlmopsUsageError(" and ".join(clashes), f"contradict{'s' if len(clashes) == 1 else ''} {chosen} "
                               f"(target {target.name}: {target.provider}); pass only one of them (`slmops targets` lists them)")
    return target.with_precision(precision)
