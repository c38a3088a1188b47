"""The rules the build stage writes by and the serve stage reads by, written once.

Beside bundle.json's model (:mod:`slmops.bundle`) and as light (no numpy, onnx or onnxruntime at
import): the adapter name rule, the LoRA graph-input names, the dtype names, the genai_config.json
reader, the ``.onnx_adapter`` checks against a bundle's adapter ABI, and the package-versions
record. Build (`slmops build`, `slmops bundle verify`), serve and the benches call these; a rule
changed here changes for every stage at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmops.bundle import LoraTemplate

# ---- adapter names ------------------------------------------------------------------------------
# An adapter's name is a file name (adapters/<name>.onnx_adapter), a metrics label and a request
# field: ASCII only, at most 64 characters.
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADAPTER_NAME_RULE = "use 1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"


def adapter_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid adapter name (None when it is)."""
    if ADAPTER_NAME_RE.match(name or ""):
        return None
    return f"'{name}' is not a valid adapter name; {ADAPTER_NAME_RULE}"


# ---- LoRA graph inputs --------------------------------------------------------------------------
# model.layers.3.attn.qkv_proj.lora_A.MatMul.weight: layer, block (attn|mlp), projection, A|B
LORA_INPUT_RE = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.MatMul\.weight$")
ROW_MASK_PREFIX = "lora_row_mask."


@dataclass(frozen=True)
class LoraInputName:
    """The parts of a LoRA graph input's name."""

    layer: int
    block: str  # attn | mlp
    projection: str  # qkv_proj, o_proj, gate_up_proj, down_proj (or a PEFT module in ABI 1)
    side: str  # A | B

    @property
    def prefix(self) -> str:
        """``model.layers.3.attn.qkv_proj``: the name both sides of a pair share."""
        return f"model.layers.{self.layer}.{self.block}.{self.projection}"

    def side_name(self, side: str) -> str:
        """The input name of this pair's ``side`` (``"A"`` or ``"B"``)."""
        return lora_input_name(self.layer, self.block, self.projection, side)


def lora_input_name(layer: int, block: str, projection: str, side: str) -> str:
    return f"model.layers.{layer}.{block}.{projection}.lora_{side}.MatMul.weight"


def parse_lora_input(name: str) -> LoraInputName | None:
    """``model.layers.3.attn.qkv_proj.lora_A.MatMul.weight`` -> LoraInputName(3, attn, qkv_proj, A)."""
    match = LORA_INPUT_RE.match(name)
    if not match:
        return None
    return LoraInputName(int(match.group(1)), match.group(2), match.group(3), match.group(4))


def row_mask_name(projection: str) -> str:
    """``qkv_proj`` -> ``lora_row_mask.qkv_proj`` (one mask input per projection kind, all layers)."""
    return f"{ROW_MASK_PREFIX}{projection}"


# ---- dtypes -------------------------------------------------------------------------------------
# bundle.json dtype name (numpy's) <-> onnxruntime's type string (NodeArg.type, OrtValue.data_type())
ONNX_TYPE_OF = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}
DTYPE_OF_ONNX_TYPE = {v: k for k, v in ONNX_TYPE_OF.items()}
# onnx TensorProto element types (equal to onnx_ir's DataType values) of the float dtypes
DTYPE_OF_ONNX_ELEM = {1: "float32", 10: "float16", 16: "bfloat16"}
# the dtypes an .onnx_adapter (and so the graph's LoRA inputs) may have
ADAPTER_DTYPES = ("float32", "float16")


def dtype_of_onnx_type(onnx_type: str, default: str = "float32") -> str:
    """``tensor(float16)`` -> ``float16``."""
    return DTYPE_OF_ONNX_TYPE.get(onnx_type, default)


def numpy_dtype(name: str) -> Any:
    """``float16`` -> ``numpy.float16`` (numpy is imported here, not by ``import slmops.contract``)."""
    import numpy as np

    if name not in ADAPTER_DTYPES:
        raise ValueError(f"dtype '{name}' is not one of {list(ADAPTER_DTYPES)}")
    return np.dtype(name).type


# ---- genai_config.json --------------------------------------------------------------------------
GENAI_CONFIG = "genai_config.json"


def read_genai_config(model_dir: str | Path) -> dict[str, Any]:
    """The raw genai_config.json of a bundle's model folder."""
    path = Path(model_dir) / GENAI_CONFIG
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"{path} is missing; rebuild the bundle with `slmops build`") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); rebuild the bundle with `slmops build`") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path} has no 'model' object; rebuild the bundle with `slmops build`")
    return data


@dataclass(frozen=True)
class GenaiConfig:
    """What the stages read from genai_config.json: the graph's file, sizes, special ids and I/O names."""

    model_file: str
    num_layers: int
    kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    eos_ids: tuple[int, ...]
    input_ids: str
    attention_mask: str
    past_key: str  # %d = layer
    past_value: str
    logits: str
    present_key: str
    present_value: str
    session_options: dict[str, Any] = field(default_factory=dict)
    # layers whose KV cache onnxruntime-genai keeps window-sized (decoder.sliding_window.layers); slmops
    # exports sliding windows over a full-length cache, so its own bundles list none
    windowed_layers: tuple[int, ...] = ()

    @classmethod
    def read(cls, model_dir: str | Path) -> GenaiConfig:
        config = read_genai_config(model_dir)
        model = config["model"]
        try:
            decoder = model["decoder"]
            inputs, outputs = decoder.get("inputs", {}), decoder.get("outputs", {})
            eos = model.get("eos_token_id", [])
            return cls(
                model_file=decoder.get("filename", "model.onnx"),
                num_layers=int(decoder["num_hidden_layers"]),
                kv_heads=int(decoder["num_key_value_heads"]),
                head_size=int(decoder["head_size"]),
                vocab_size=int(model["vocab_size"]),
                context_length=int(model.get("context_length") or config.get("search", {}).get("max_length", 2048)),
                eos_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
                input_ids=inputs.get("input_ids", "input_ids"),
                attention_mask=inputs.get("attention_mask", "attention_mask"),
                past_key=inputs.get("past_key_names", "past_key_values.%d.key"),
                past_value=inputs.get("past_value_names", "past_key_values.%d.value"),
                logits=outputs.get("logits", "logits"),
                present_key=outputs.get("present_key_names", "present.%d.key"),
                present_value=outputs.get("present_value_names", "present.%d.value"),
                session_options=dict(decoder.get("session_options", {})),
                windowed_layers=tuple(int(i) for i in (decoder.get("sliding_window") or {}).get("layers", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{Path(model_dir) / GENAI_CONFIG}: model.decoder lacks or mistypes {exc}; "
                             "rebuild the bundle with `slmops build`") from exc


# ---- package versions ---------------------------------------------------------------------------
def package_versions(packages: Iterable[str], missing: str | None = "not installed") -> dict[str, str]:
    """``{package: installed version}``; a package that is not installed maps to ``missing``
    (or is left out when ``missing`` is None)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if missing is not None:
                out[name] = missing
    return out



# ---- .onnx_adapter files ------------------------------------------------------------------------
ADAPTER_SUFFIX = ".onnx_adapter"


def read_adapter_tensors(path: str | Path) -> dict[str, Any]:
    """``{input name: numpy array}`` of an ``.onnx_adapter`` file.

    Raises:
        AdapterFormatError: a file that is not one (see :mod:`slmops.adapter_format`, which reads
            it a tensor at a time instead of onnxruntime's one GIL-holding call)."""
    from slmops.adapter_format import read_adapter_bytes, read_file

    return read_adapter_bytes(read_file(path))


@dataclass
class AdapterCheck:
    """An ``.onnx_adapter`` checked against a bundle's adapter ABI.

    ``problems`` is empty when it fits; ``readable`` is False when the file is not an .onnx_adapter
    at all (its one problem says why). ``tensors`` are the arrays that were checked (load these,
    not the file again), ``modules``/``rank`` what the adapter adapts, read back from its weights.
    """

    problems: list[str]
    readable: bool = True
    tensors: dict[str, Any] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    rank: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, limit: int = 3) -> str:
        """The first ``limit`` problems in one line."""
        more = len(self.problems) - limit
        return "; ".join(self.problems[:limit]) + (f" (and {more} more)" if more > 0 else "")


MERGED_BUNDLE_PROBLEM = ("this bundle has no LoRA inputs (an adapter was merged into its weights), so it takes no "
                         "runtime adapters; build a bundle without --merge")


def adapter_problems(tensors: dict[str, Any], template: LoraTemplate) -> AdapterCheck:
    """Check ``{input name: array}`` (an .onnx_adapter's contents) against ``template``: every tensor
    is a LoRA input of the ABI, of its dtype and shape, and comes with its A/B pair of equal rank."""
    if not template.inputs:
        return AdapterCheck([MERGED_BUNDLE_PROBLEM], tensors=tensors)
    if not tensors:
        return AdapterCheck(["holds no LoRA tensors"], tensors=tensors)
    expected = {item.name: item.shape for item in template.inputs}
    problems: list[str] = []
    ranks: dict[str, dict[str, int]] = {}
    for name, array in sorted(tensors.items()):
        shape, dtype = list(array.shape), str(array.dtype)
        if name not in expected:
            problems.append(f"adapter ABI mismatch: tensor '{name}' is not a LoRA input of this bundle (bundle.json "
                            f"lora_template: {template.modules}, {template.num_layers} layers); the adapter was built "
                            "for another bundle or base model; rebuild it with `slmops build`")
            continue
        if dtype != template.dtype:
            problems.append(f"adapter ABI mismatch: tensor '{name}' has dtype {dtype}, this bundle's adapters must be "
                            f"{template.dtype}; convert it for this target with `slmops build`")
        want = expected[name]
        if len(shape) != len(want) or any(isinstance(w, int) and w != s for w, s in zip(want, shape, strict=False)):
            problems.append(f"adapter ABI mismatch: tensor '{name}' has shape {shape}, this bundle expects {want}; "
                            "it was built for another base model")
            continue
        parsed = parse_lora_input(name)
        rank_dims = [s for w, s in zip(want, shape, strict=False) if not isinstance(w, int)]
        if parsed is not None and rank_dims:
            ranks.setdefault(parsed.prefix, {})[parsed.side] = int(rank_dims[0])
    for prefix, pair in sorted(ranks.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"'{prefix}' has lora_{next(iter(pair))} without its pair; the adapter is incomplete")
        elif pair["A"] != pair["B"]:
            problems.append(f"'{prefix}' has rank {pair['A']} in lora_A but {pair['B']} in lora_B")
    if problems:
        return AdapterCheck(problems, tensors=tensors)
    modules, rank = adapted_modules(template, ranks, tensors)
    return AdapterCheck([], tensors=tensors, modules=modules, rank=rank)


def check_adapter_file(path: str | Path, template: LoraTemplate) -> AdapterCheck:
    """Read an ``.onnx_adapter`` file and check it against ``template`` (see :func:`adapter_problems`)."""
    from slmops.adapter_format import read_file

    return check_adapter_bytes(read_file(path), template)


def check_adapter_bytes(data: Any, template: LoraTemplate) -> AdapterCheck:
    """An ``.onnx_adapter`` file's bytes checked against ``template``: the check's ``tensors`` are
    read from exactly these bytes (load them, not a file read again)."""
    from slmops.adapter_format import AdapterFormatError, read_adapter_bytes

    try:
        tensors = read_adapter_bytes(data)
    except AdapterFormatError as exc:
        return AdapterCheck([f"not a valid {ADAPTER_SUFFIX} file ({str(exc)[:160]})"], readable=False)
    return adapter_problems(tensors, template)


def adapted_modules(template: LoraTemplate, ranks: dict[str, dict[str, int]],
                    tensors: dict[str, Any]) -> tuple[list[str], int]:
    """(PEFT modules, largest per-module rank) of an adapter, read back from its packed B blocks.

    A packed B (ABI 2) holds member m's rank rows only in m's output columns, so the rows that are
    non-zero in m's columns are m's rank. A projection whose B is all zero (an untrained adapter)
    counts as its projection name with the packed rank.
    """
    modules: set[str] = set()
    rank = 0
    for prefix, pair in ranks.items():
        projection = prefix.rsplit(".", 1)[-1]
        b = tensors.get(f"{prefix}.lora_B.MatMul.weight")  # lora_input_name's layout
        nonzero = b != 0 if b is not None else None
        found = False
        for member in template.projections.get(projection, []):
            if nonzero is None:
                break
            rows = int(nonzero[:, member.offset:member.offset + member.size].any(axis=1).sum())
            if rows:
                modules.add(member.module)
                rank = max(rank, rows)
                found = True
        if not found:
            modules.add(projection)
            rank = max(rank, pair["A"])
    order = {m: i for i, m in enumerate(template.modules)}
    return sorted(modules, key=lambda m: (order.get(m, len(order)), m)), rank


def write_adapter_tensors(tensors: dict[str, Any], path: str | Path) -> Path:
    """``{input name: numpy array}`` as an ``.onnx_adapter`` file at ``path`` (folders made)."""
    import onnxruntime as ort

    path = Path(path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(path))
    return path
