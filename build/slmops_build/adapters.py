"""PEFT LoRA adapter folder -> ``.onnx_adapter`` file that matches a bundle's adapter ABI.

PEFT stores ``lora_A.weight`` as [r, in] and ``lora_B.weight`` as [out, r] and applies
``x @ A.T @ B.T * scale``; the graph's LoRA MatMuls take ``A.T`` ([in, r]) and ``(B * scale).T``
([r, out]), scale = alpha / r (alpha / sqrt(r) with rsLoRA), exactly what the model builder
bakes in. The tensors are named as the graph inputs and written with ``onnxruntime.AdapterFormat``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.bundle import AdapterInfo, LoraTemplate
from slmops.contract import ADAPTER_DTYPES, adapter_name_problem, parse_lora_input, write_adapter_tensors
from slmops.errors import SlmopsUsageError
from slmops.fsutil import portable_path, sha256_file
from slmops.runrecord import RUN_JSON, read_run_record

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SLMOPS_ADAPTER_JSON = "slmops_adapter.json"
# base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
PEFT_KEY_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:[\w.]*\.)?(\w+)\.lora_([AB])\.weight$")


@dataclass
class PeftAdapter:
    """A checked PEFT adapter folder: config, where it came from, which modules it adapts."""

    name: str
    adapter_dir: Path
    config: dict[str, Any]
    modules: list[str]
    run_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None  # the run's run.json (schema checked), when it came from a train run

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.rank))


def resolve_adapter_dir(path: str | Path, name: str = "") -> Path:
    """An adapter folder, or a train run folder holding ``adapter/`` (runs/tone -> runs/tone/adapter)."""
    path = Path(path).expanduser()
    label = f"'{name}' ({path})" if name else f"'{path}'"
    if not path.exists():
        raise SlmopsUsageError("--adapter", f"{label} does not exist; pass a PEFT adapter folder or a train run folder")
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / "adapter" / ADAPTER_CONFIG).is_file():
        return path / "adapter"
    raise SlmopsUsageError(
        "--adapter", f"{label} has no {ADAPTER_CONFIG}; pass a PEFT adapter folder (or a run folder with adapter/)"
    )


def parse_adapter_specs(specs: list[str] | tuple[str, ...] | dict[str, str] | None) -> dict[str, str]:
    """``["tone=runs/tone", "runs/extract"]`` -> ``{"tone": "runs/tone", "extract": "runs/extract"}``."""
    if not specs:
        return {}
    if isinstance(specs, dict):
        pairs = {str(k): str(v) for k, v in specs.items()}
    else:
        pairs = {}
        for spec in specs:
            name, sep, path = str(spec).partition("=")
            if not sep:
                path = name
                resolved = Path(path.rstrip("/"))
                name = resolved.parent.name if resolved.name == "adapter" else resolved.name
            if name in pairs:
                raise SlmopsUsageError("--adapter", f"the name '{name}' is given twice; use NAME=PATH with distinct names")
            pairs[name.strip()] = path.strip()
    for name in pairs:
        problem = adapter_name_problem(name)
        if problem is not None:
            raise SlmopsUsageError("--adapter", f"{problem} (NAME=PATH names it)")
    return pairs


def read_lora_tensors(adapter_dir: Path, option: str = "--adapter", name: str = "") -> dict[str, Any]:
    """The adapter's tensors as torch tensors (safetensors, or a legacy adapter_model.bin)."""
    import torch

    label = f"'{name}' ({adapter_dir})" if name else f"'{adapter_dir}'"
    st_path, bin_path = (adapter_dir / f for f in ADAPTER_WEIGHTS)
    try:
        if st_path.is_file():
            from safetensors.torch import load_file

            tensors: dict[str, Any] = load_file(str(st_path))
            return tensors
        if bin_path.is_file():
            loaded: dict[str, Any] = torch.load(str(bin_path), map_location="cpu", weights_only=True)
            return loaded
    except Exception as exc:  # noqa: BLE001 - any parse error of a corrupt file
        bad = st_path if st_path.is_file() else bin_path
        raise SlmopsUsageError(option, f"{label}: {bad.name} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); re-export the adapter") from exc
    raise SlmopsUsageError(option, f"{label} has no {ADAPTER_WEIGHTS[0]}; pass a PEFT adapter folder")


def lora_pairs(tensors: dict[str, Any], label: str) -> dict[tuple[int, str], dict[str, Any]]:
    """``{(layer, module): {"A": tensor, "B": tensor}}``; any other tensor is refused by name."""
    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    others = []
    for key, tensor in tensors.items():
        match = PEFT_KEY_RE.match(key)
        if not match:
            others.append(key)
            continue
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    if others:
        kinds = "DoRA magnitudes" if any("lora_magnitude" in k for k in others) else (
            "LoRA biases" if any(k.endswith("lora_B.bias") for k in others) else "full modules (modules_to_save) or embedding LoRA")
        raise SlmopsUsageError(
            "--adapter", f"{label} holds {kinds}, e.g. {others[0]}; a runtime adapter carries only LoRA A/B weights: "
            "merge it into the base with --merge NAME",
        )
    incomplete = [f"layers.{k[0]}.{k[1]}" for k, v in pairs.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise SlmopsUsageError("--adapter", f"{label}: {incomplete[0]} lacks its lora_A or lora_B weight; the adapter is incomplete")
    if not pairs:
        raise SlmopsUsageError("--adapter", f"{label} has no LoRA weights")
    return pairs


def load_peft_adapter(name: str, path: str | Path, base_sha256: str | None, abi_modules: list[str] | None,
                      merge: bool = False) -> PeftAdapter:
    """Resolve and check one ``--adapter``; every problem is a SlmopsUsageError naming it.

    ``abi_modules``: the modules the bundle exposes (None: no check, as for ``--merge``).
    """
    adapter_dir = resolve_adapter_dir(path, name)
    label = f"'{name}' ({adapter_dir})"
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlmopsUsageError("--adapter", f"{label}: {ADAPTER_CONFIG} is not valid JSON ({exc})") from exc
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise SlmopsUsageError("--adapter", f"{label} is a {config.get('peft_type')} adapter; only LoRA adapters can be built")
    if config.get("use_dora") and not merge:
        raise SlmopsUsageError(
            "--adapter", f"{label} is a DoRA adapter (use_dora): its magnitude vectors cannot be a runtime LoRA input; "
            f"merge it with --merge {name}, or retrain without DoRA",
        )
    meta = {}
    if (adapter_dir / SLMOPS_ADAPTER_JSON).is_file():
        try:
            meta = json.loads((adapter_dir / SLMOPS_ADAPTER_JSON).read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
    trained_on = meta.get("base_model_sha256")
    if trained_on and base_sha256 and trained_on != base_sha256:
        raise SlmopsUsageError(
            "--adapter", f"{label} was trained on a base model with weights sha256 {trained_on[:12]}..., but "
            f"--model_name_or_path has {base_sha256[:12]}...; build with the model it was trained on, or retrain it",
        )
    tensors = read_lora_tensors(adapter_dir, name=name)
    if merge:
        modules = sorted({k for k in tensors if ".lora_" in k})
        modules = sorted({m.group(2) for k in modules if (m := PEFT_KEY_RE.match(k))})
    else:
        pairs = lora_pairs(tensors, label)
        modules = sorted({module for _, module in pairs})
        if abi_modules is not None:
            outside = sorted(set(modules) - set(abi_modules))
            if outside:
                raise SlmopsUsageError(
                    "--adapter", f"{label} adapts {outside}, outside the bundle's adapter ABI {abi_modules}; "
                    "add them with --lora_modules, or merge this adapter with --merge",
                )
    run_dir = adapter_dir.parent if (adapter_dir.parent / RUN_JSON).is_file() else None
    record = read_run_record(run_dir) if run_dir is not None else None  # another schema: refused here, before any work
    return PeftAdapter(name=name, adapter_dir=adapter_dir, config=config, modules=modules, run_dir=run_dir, meta=meta,
                       record=record)


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def lora_scale(config: dict[str, Any], module_path: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module_path, config.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_arrays(pairs: dict[tuple[int, str], dict[str, Any]], config: dict[str, Any], template: LoraTemplate,
                   dtype: str, label: str) -> dict[str, Any]:
    """``{graph input name: numpy array}`` of one PEFT adapter's ``pairs`` (:func:`lora_pairs`), laid
    out for ``template`` (ABI 2); ``config`` is its adapter_config.json, ``label`` names it in errors.

    Every module's pair lands in its base projection's pair: for a packed projection (qkv_proj,
    gate_up_proj) A is the members' ``A.T`` concatenated along the rank and B block-diagonal
    (member m's ``(B * scale).T`` in its own rank rows and output columns, zeros elsewhere), so
    ``x @ A @ B`` equals the sum of the members' LoRA outputs placed in their columns.
    """
    import numpy as np
    import torch

    by_key: dict[tuple[int, str, str], Any] = {}
    for item in template.inputs:
        parsed = parse_lora_input(item.name)
        if parsed:
            by_key[(parsed.layer, parsed.projection, parsed.side)] = item
    # {(layer, projection): [(member, A [in, r], B [r, member out] scaled)]}
    grouped: dict[tuple[int, str], list[tuple[Any, Any, Any]]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        found = template.projection_of(module)
        a_in = by_key.get((layer, found[0], "A")) if found else None
        b_in = by_key.get((layer, found[0], "B")) if found else None
        if found is None or a_in is None or b_in is None:
            raise SlmopsUsageError(
                "--adapter", f"{label} adapts layers.{layer}.{module}, which the bundle's adapter ABI "
                f"({template.modules}, {template.num_layers} layers) lacks; add it with --lora_modules or use --merge",
            )
        projection, member = found
        a = ab["A"].to(torch.float32)  # [r, in]
        b = ab["B"].to(torch.float32)  # [out, r]
        rank = a.shape[0]
        want_in = a_in.shape[0]
        if b.shape[1] != rank or a.shape[1] != want_in or b.shape[0] != member.size:
            raise SlmopsUsageError(
                "--adapter", f"{label}: layers.{layer}.{module} has A {list(a.shape)} / B {list(b.shape)}, but the base "
                f"model expects [r, {want_in}] / [{member.size}, r]; it was trained on another base model",
            )
        scale = lora_scale(config, f"layers.{layer}.{module}", rank)
        grouped.setdefault((layer, projection), []).append((member, a.T.numpy(), (b * scale).T.numpy()))
    arrays: dict[str, Any] = {}
    np_dtype = np.dtype(dtype)
    for (layer, projection), items in grouped.items():
        a_in, b_in = by_key[(layer, projection, "A")], by_key[(layer, projection, "B")]
        total_rank = sum(a.shape[1] for _, a, _ in items)
        a_packed = np.concatenate([a for _, a, _ in items], axis=1)
        b_packed = np.zeros((total_rank, int(b_in.shape[1])), np.float32)
        row = 0
        for member, _, b in items:
            b_packed[row:row + b.shape[0], member.offset:member.offset + member.size] = b
            row += b.shape[0]
        arrays[a_in.name] = np.ascontiguousarray(a_packed, dtype=np_dtype)
        arrays[b_in.name] = np.ascontiguousarray(b_packed, dtype=np_dtype)
    return arrays


def convert_adapter(peft_dir: str | Path, template: LoraTemplate, dtype: str, out_path: str | Path,
                    name: str = "") -> AdapterInfo:
    """Convert one PEFT LoRA adapter folder into ``out_path`` (an ``.onnx_adapter`` file)."""
    if dtype not in ADAPTER_DTYPES:
        raise SlmopsUsageError("--precision", f"adapter dtype '{dtype}' is not one of {list(ADAPTER_DTYPES)}")
    adapter_dir = resolve_adapter_dir(peft_dir, name)
    if not template.inputs:
        raise SlmopsUsageError("--adapter", "this bundle has no LoRA inputs (merged); it cannot take runtime adapters")
    label = f"'{name}' ({adapter_dir})" if name else f"'{adapter_dir}'"
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    pairs = lora_pairs(read_lora_tensors(adapter_dir, name=name), label)
    arrays = adapter_arrays(pairs, config, template, dtype, label)
    out_path = Path(out_path)
    write_adapter_tensors(arrays, out_path)
    modules = [m for m in template.modules if m in {module for _, module in pairs}]
    ranks = [int(ab["A"].shape[0]) for ab in pairs.values()]
    run_dir = adapter_dir.parent if (adapter_dir.parent / RUN_JSON).is_file() else None
    return AdapterInfo(
        file=out_path.name,
        sha256=sha256_file(out_path),
        rank=int(max(ranks)),
        alpha=float(config.get("lora_alpha", config.get("r", 0))),
        target_modules=modules,
        dtype=dtype,
        source_run=portable_path(run_dir or adapter_dir),
    )
