"""Synthetic .onnx_adapter files of a chosen rank and module set, in a bundle's adapter ABI.

Speed depends on an adapter's shapes, not on its trained values, so benchmarks that need more
adapters than a bundle ships (e.g. 4 different ranks/modules) make them here. The values are
small random numbers; files are marked synthetic in every results JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.contract import numpy_dtype, parse_lora_input, write_adapter_tensors

write_adapter = write_adapter_tensors  # the one .onnx_adapter writer, under the name tests import


def synthetic_adapter(template: Any, modules: list[str], rank: int, path: Path, seed: int = 0, scale: float = 0.02) -> Path:
    """Write an adapter with LoRA rank ``rank`` on ``modules`` (PEFT names, e.g. ["o_proj", "down_proj"])
    laid out as the bundle's ``template`` (LoraTemplate) packs them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(template.dtype)
    shapes = {i.name: i.shape for i in template.inputs}
    arrays: dict[str, Any] = {}
    for name, shape in shapes.items():
        parsed = parse_lora_input(name)
        if parsed is None or parsed.side != "A":
            continue
        projection, b_name = parsed.projection, parsed.side_name("B")
        members = template.projections.get(projection, [])
        chosen = [m for m in members if m.module in modules]
        if not chosen:
            continue
        in_dim, out_dim = int(shape[0]), int(shapes[b_name][1])
        a = (rng.standard_normal((in_dim, rank * len(chosen))) * scale).astype(dtype)
        b = np.zeros((rank * len(chosen), out_dim), dtype)
        for i, member in enumerate(chosen):
            b[i * rank:(i + 1) * rank, member.offset:member.offset + member.size] = \
                (rng.standard_normal((rank, member.size)) * scale).astype(dtype)
        arrays[name] = a
        arrays[b_name] = b
    if not arrays:
        raise ValueError(f"the bundle has no LoRA inputs for {modules}")
    return write_adapter(arrays, path)
