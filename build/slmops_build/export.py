"""Export the base model to ONNX with runtime-swappable LoRA inputs (adapter ABI 2).

1. The onnxruntime-genai model builder exports the PLAIN graph (no adapter), so its fast layout
   stays: q/k/v packed into one ``qkv_proj`` MatMul and (``fuse_mlp_gate_up``) gate/up into one
   ``gate_up_proj``. For slmops' quantizer it exports fp32 and quantization runs afterwards.
2. :func:`add_lora_inputs` puts one LoRA pair beside every base projection the ABI covers:
   ``y = base(x) + ((x @ A) * M) @ B`` with A ``[in, r]`` and B ``[r, out]`` (r symbolic, per pair) as graph
   INPUTS named ``model.layers.{i}.{attn|mlp}.{projection}.lora_{A|B}.MatMul.weight``, each with a
   rank-0 default (``[in, 0]`` / ``[0, 1]``, broadcast), so a request without an adapter computes
   the pure base model. A packed projection takes one pair for all its members: A is the members' A
   concatenated along the rank, B block-diagonal (adapters are converted to that layout). One
   pair per packed projection instead of one per module: 4 LoRA branches a layer instead of 7,
   and the base MatMuls stay fused (measured in bench/bench_lora.py).
   ABI 3 adds one row mask per projection kind, ``lora_row_mask.{projection}`` ``[rows, 1, r]``
   (default ``[1, 1, 1]`` ones, so onnxruntime-genai, which never feeds it, still applies an
   adapter to every row): the server concatenates the A/B of every adapter in a batch along the
   rank and masks, per row, the rank columns that are not that row's adapter. Rows with different
   adapters then share one step, and each distinct adapter's weights are read once per step.
3. ``session_options`` of genai_config.json come from the target profile (thread counts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slmops.bundle import LoraInput, LoraTemplate, PackedMember
from slmops.contract import (
    DTYPE_OF_ONNX_ELEM,
    GENAI_CONFIG,
    ROW_MASK_PREFIX,
    lora_input_name,
    parse_lora_input,
    read_genai_config,
    row_mask_name,
)
from slmops.errors import SlmopsUsageError
from slmops.families import FAMILIES, Family, family_of, module_sizes
from slmops.targets import Target
from slmops_build.quantize import builder_extra_options, merged_options, quantize_graph, quantizer_for

# Graph projections in ABI order (the family table, slmops.families, says which PEFT modules each packs).
PROJECTION_ORDER = ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "gate_proj", "up_proj", "down_proj")
RANK_DIM = "lora_r"
OUT_DIM = "lora_out"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

# /model/layers.3/attn/qkv_proj/MatMul (float) or .../MatMul_Q4 (the builder's quantizer)
BASE_NODE_RE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul(?:_Q\d+)?$")


DEFAULT_FAMILY = FAMILIES["llama"]
# Sliding windows: the attention op masks the window over a full-length cache (the layout the runner
# binds) instead of the builder's default window-sized ring for local layers.
FIXED_BUILDER_OPTIONS = {"windowed_kv_cache": "false"}


class ExportError(RuntimeError):
    """The model builder or the graph rewrite failed (not a user input problem)."""


def check_lora_modules(modules: Iterable[str] | None, family: Family = DEFAULT_FAMILY) -> list[str]:
    """Normalize ``--lora_modules`` (``all-linear`` = every linear projection of the family) into ABI order."""
    wanted = list(modules or family.modules)
    if wanted in (["all-linear"], ["all"]):
        wanted = list(family.modules)
    unknown = sorted(set(wanted) - set(family.modules))
    if unknown:
        raise SlmopsUsageError("--lora_modules", f"{unknown} are not LoRA-able modules of {family.model_type}; choose from "
                               f"{list(family.modules)}")
    if not wanted:
        raise SlmopsUsageError("--lora_modules", "is empty; name at least one module or use 'all-linear'")
    return family.order(wanted)


def covered_modules(modules: list[str], family: Family = DEFAULT_FAMILY) -> list[str]:
    """The modules a graph with LoRA on ``modules`` can adapt: a packed projection takes all its members."""
    covered = set(modules)
    for members in family.packing.values():
        if covered & set(members):
            covered |= set(members)
    return family.order(covered)


def member_sizes(model_dir: str | Path, family: Family | None = None) -> dict[str, int]:
    """Output width of every PEFT module of the model's family, from its config.json."""
    return module_sizes(model_dir, family or family_of(model_dir))


# ---- running the model builder --------------------------------------------------------------
def run_builder(model_dir: str | Path, out_dir: Path, target: Target, extra_options: dict[str, str] | None = None,
                log_path: Path | None = None, in_process: bool | None = None, precision: str | None = None) -> float:
    """Run the onnxruntime-genai model builder; return its seconds.

    By default in a subprocess (``python -m onnxruntime_genai.models.builder``): that keeps the
    builder's memory (the whole torch model) out of this process and its console noise in
    ``log_path``. ``in_process=True`` (or ``SLMOPS_BUILDER_IN_PROCESS=1``) calls its Python API
    instead, which saves the ~10 s import on small models (tests). Failures raise ExportError.
    ``precision`` overrides the builder's ``-p`` (fp32 when slmops' quantizer runs afterwards).
    """
    options = builder_extra_options(target, extra_options or {})
    if in_process is None:
        in_process = os.environ.get("SLMOPS_BUILDER_IN_PROCESS", "0") not in ("0", "", "false")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="slmops-builder-cache-"))
    precision = precision or target.precision
    args = ["-i", str(model_dir), "-o", str(out_dir), "-p", precision, "-e", target.execution_provider, "-c", str(cache)]
    kv = [f"{k}={v}" for k, v in options.items()]
    log_path = log_path or out_dir.parent / f"{out_dir.name}.builder.log"
    started = time.time()
    try:
        if in_process:
            returncode = _builder_in_process(model_dir, out_dir, precision, target.execution_provider, cache, kv, log_path)
        else:
            cmd = [sys.executable, "-m", "slmops_build.builder_compat", *args]
            if kv:
                cmd += ["--extra_options", *kv]
            env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
            with open(log_path, "w") as log:
                returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if returncode != 0 or not (out_dir / MODEL_FILE).is_file():
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.is_file() else ""
        raise ExportError(f"the onnxruntime-genai model builder failed (exit {returncode}); log {log_path}:\n{tail}")
    return time.time() - started


def _builder_in_process(model_dir: str | Path, out_dir: Path, precision: str, provider: str, cache: Path,
                        kv: list[str], log_path: Path) -> int:
    import contextlib
    import logging
    import traceback

    from onnxruntime_genai.models import builder

    from slmops_build.builder_compat import patched

    quant_logger = logging.getLogger("onnxruntime.quantization")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            with patched():
                options = builder.parse_extra_options(None, str(model_dir), str(out_dir), precision, provider, str(cache), kv)
                builder.create_model(None, str(model_dir), str(out_dir), precision, provider, str(cache), **options)
        except Exception:  # noqa: BLE001 - reported with the log tail like a subprocess failure
            traceback.print_exc(file=log)
            return 1
        finally:
            quant_logger.setLevel(level)
    return 0


# ---- 2. LoRA pairs beside the base projections -----------------------------------------------
def add_lora_inputs(src_dir: Path, dst_dir: Path, modules: list[str], sizes: dict[str, int],
                    family: Family = DEFAULT_FAMILY) -> LoraTemplate:
    """Write ``src_dir``'s graph into ``dst_dir`` with a LoRA pair beside each base projection
    that packs one of ``modules`` (see the module docstring); other files are copied."""
    import numpy as np
    import onnx_ir as ir

    model = ir.load(str(src_dir / MODEL_FILE))
    graph: Any = model.graph
    logits = next((o for o in graph.outputs if o.name == "logits"), None)
    dtype = logits.dtype if logits is not None and logits.dtype in DTYPE_OF_ONNX_ELEM else ir.DataType.FLOAT
    np_dtype = dtype.numpy()
    inputs: list[LoraInput] = []
    projections: dict[str, list[PackedMember]] = {}
    layers: set[int] = set()
    row_masks: dict[str, Any] = {}
    for node in list(graph):
        match = BASE_NODE_RE.match(node.name or "")
        if match is None or node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        layer, group, projection = int(match.group(1)), match.group(2), match.group(3)
        members = family.members(projection)
        if not set(members) & set(modules):
            continue
        x = node.inputs[0]
        if node.op_type == "MatMul":
            shape = node.inputs[1].shape
            k, n = int(shape[0]), int(shape[1])
        else:
            k, n = int(node.attributes["K"].value), int(node.attributes["N"].value)
        layout, offset = [], 0
        for member in members:
            layout.append(PackedMember(module=member, offset=offset, size=sizes[member]))
            offset += sizes[member]
        if offset != n:
            raise ExportError(f"{node.name}: output width {n} is not the sum of {list(members)} widths {offset}")
        projections.setdefault(projection, layout)
        a_name, b_name = (lora_input_name(layer, group, projection, w) for w in "AB")
        # Every pair gets its OWN symbolic dims: onnxruntime's memory planner treats equal dim
        # names as equal sizes and reuses buffers on that basis, so a shared "lora_r" fails as
        # soon as one adapter leaves some projections at rank 0 (measured: "Shape mismatch
        # attempting to re-use buffer {1,8,0} != {1,8,4}" for an o_proj/down_proj-only adapter).
        rank_dim, out_dim = f"{RANK_DIM}.{layer}.{projection}", f"{OUT_DIM}.{layer}.{projection}"
        a_value = ir.Value(name=a_name, type=ir.TensorType(dtype), shape=ir.Shape([k, rank_dim]),
                           const_value=ir.tensor(np.zeros((k, 0), np_dtype), name=a_name))
        # B's default is [0, 1], not [0, out]: the rank-0 branch then yields a [.., 1] zero that
        # the Add broadcasts, instead of materializing [.., out] zeros for every projection and
        # token (measured: no-adapter decode 0.956x -> 0.997x the plain graph). The graph keeps
        # B's columns symbolic; bundle.json's ABI fixes them to ``out`` for adapters.
        b_value = ir.Value(name=b_name, type=ir.TensorType(dtype), shape=ir.Shape([rank_dim, out_dim]),
                           const_value=ir.tensor(np.zeros((0, 1), np_dtype), name=b_name))
        for value in (a_value, b_value):
            graph.inputs.append(value)
            graph.register_initializer(value)
        inputs += [LoraInput(name=a_name, shape=[k, rank_dim]), LoraInput(name=b_name, shape=[rank_dim, n])]
        mask = row_masks.get(projection)
        if mask is None:
            # Its own dim names (not batch_size / a pair's rank): equal names mean equal sizes to
            # onnxruntime's planner, and the mask is [1, 1, 1] when onnxruntime-genai runs the graph.
            mask_name = row_mask_name(projection)
            mask = ir.Value(name=mask_name, type=ir.TensorType(dtype),
                            shape=ir.Shape([f"lora_mask_rows.{projection}", 1, f"lora_mask_r.{projection}"]),
                            const_value=ir.tensor(np.ones((1, 1, 1), np_dtype), name=mask_name))
            graph.inputs.append(mask)
            graph.register_initializer(mask)
            row_masks[projection] = mask
        prefix = f"/model/layers.{layer}/{group}/{projection}"
        out = node.outputs[0]
        uses = list(out.uses())
        via_a = ir.Node("", "MatMul", [x, a_value], name=f"{prefix}/lora_A/MatMul", num_outputs=1)
        masked = ir.Node("", "Mul", [via_a.outputs[0], mask], name=f"{prefix}/lora_mask/Mul", num_outputs=1)
        via_b = ir.Node("", "MatMul", [masked.outputs[0], b_value], name=f"{prefix}/lora_B/MatMul", num_outputs=1)
        add = ir.Node("", "Add", [out, via_b.outputs[0]], name=f"{prefix}/lora/Add", num_outputs=1)
        for new in (via_a, masked, via_b, add):
            new.outputs[0].name = f"{new.name}/output_0"
            new.outputs[0].dtype = dtype
        add.outputs[0].shape = out.shape
        graph.insert_after(node, [via_a, masked, via_b, add])
        for use in uses:
            use.node.replace_input_with(use.idx, add.outputs[0])
        if out.is_graph_output():
            raise ExportError(f"{node.name} feeds a graph output directly; cannot add a LoRA branch")
        layers.add(layer)
    if not inputs:
        raise ExportError(f"{src_dir / MODEL_FILE} has no base projections for {modules} (looked for {BASE_NODE_RE.pattern})")
    covered = {m.module for layout in projections.values() for m in layout}
    dst_dir.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(dst_dir / MODEL_FILE), external_data=DATA_FILE)
    copy_side_files(src_dir, dst_dir)
    return LoraTemplate(
        modules=family.order(covered),
        num_layers=len(layers),
        dtype=DTYPE_OF_ONNX_ELEM.get(dtype, "float32"),
        inputs=sorted(inputs, key=lambda i: _input_order(i.name)),
        projections={p: projections[p] for p in sorted(projections, key=_projection_order)},
        row_masks={p: row_mask_name(p) for p in sorted(row_masks, key=_projection_order)},
    )


def _projection_order(projection: str) -> int:
    return PROJECTION_ORDER.index(projection) if projection in PROJECTION_ORDER else len(PROJECTION_ORDER)


def _input_order(name: str) -> tuple[int, int, str]:
    parsed = parse_lora_input(name)
    if parsed is None:
        return (1 << 30, 0, name)
    return (parsed.layer, _projection_order(parsed.projection), parsed.side)


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy genai_config, tokenizer and template files (everything but the graph and its data)."""
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.name not in (MODEL_FILE, DATA_FILE):
            shutil.copy2(path, dst_dir / path.name)


def read_template(model_dir: Path) -> LoraTemplate:
    """The ABI of an already exported model folder (graph read without its weights)."""
    import onnx

    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    inputs, layers, modules, dtypes = [], set(), set(), set()
    row_masks: dict[str, str] = {}
    for graph_input in model.graph.input:
        if graph_input.name.startswith(ROW_MASK_PREFIX):
            row_masks[graph_input.name[len(ROW_MASK_PREFIX):]] = graph_input.name
            continue
        parsed = parse_lora_input(graph_input.name)
        if parsed is None:
            continue
        dims: list[int | str] = [d.dim_param or int(d.dim_value) for d in graph_input.type.tensor_type.shape.dim]
        inputs.append(LoraInput(name=graph_input.name, shape=dims))
        layers.add(parsed.layer)
        modules.add(parsed.projection)
        dtypes.add(DTYPE_OF_ONNX_ELEM.get(graph_input.type.tensor_type.elem_type, str(graph_input.type.tensor_type.elem_type)))
    num_layers = len(layers) or int(read_genai_config(model_dir)["model"]["decoder"].get("num_hidden_layers", 0))
    return LoraTemplate(
        modules=sorted(modules, key=_projection_order), num_layers=num_layers,
        dtype=dtypes.pop() if len(dtypes) == 1 else "", inputs=sorted(inputs, key=lambda i: _input_order(i.name)),
        row_masks={p: row_masks[p] for p in sorted(row_masks, key=_projection_order)},
    )


def shape_fits(graph_shape: list[int | str], abi_shape: list[int | str]) -> bool:
    """A graph input's declared shape admits the ABI's shape (a symbolic graph dim admits any size)."""
    return len(graph_shape) == len(abi_shape) and all(
        isinstance(g, str) or g == a for g, a in zip(graph_shape, abi_shape, strict=True))


# ---- 3. genai_config.json -------------------------------------------------------------------
def set_session_options(model_dir: Path, session_options: dict[str, Any]) -> None:
    """Merge the target's session options (e.g. ``intra_op_num_threads``) into genai_config.json.

    onnxruntime-genai otherwise runs a CPU session on ONE intra-op thread.
    """
    config = read_genai_config(model_dir)
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update(session_options)
    (model_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")


def io_dtype_name(model_dir: Path) -> str:
    """dtype of the graph's float inputs/outputs (the logits)."""
    import onnx

    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    for out in model.graph.output:
        if out.name == "logits":
            return DTYPE_OF_ONNX_ELEM.get(out.type.tensor_type.elem_type, "float32")
    return "float32"


# ---- the whole export -----------------------------------------------------------------------
def export_base_model(model_dir: str | Path, out_dir: Path, target: Target, lora_modules: list[str] | None,
                      extra_options: dict[str, str] | None = None, work_dir: Path | None = None,
                      with_lora: bool = True, in_process: bool | None = None,
                      report: dict[str, Any] | None = None) -> LoraTemplate:
    """Export ``model_dir`` for ``target`` into ``out_dir`` and return its adapter ABI.

    ``with_lora=False`` exports a plain graph (no LoRA inputs; used for merged bundles and as the
    benchmark baseline); its template lists no inputs. ``report`` receives the quantization
    figures and timings.
    """
    out_dir = Path(out_dir)
    extra_options = extra_options or {}
    quantizer = quantizer_for(target, extra_options)
    # slmops' quantizer works on the fp32 export; the builder's quantizes while exporting.
    build_precision = "fp32" if quantizer == "slmops" else target.precision
    report = report if report is not None else {}
    started = time.time()
    own_work = work_dir is None
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="slmops-export-"))
    # Keep gate/up fused (one MatMul) unless the user says otherwise; q/k/v are packed by default.
    builder_options = {"fuse_mlp_gate_up": "true", **FIXED_BUILDER_OPTIONS, **extra_options}
    try:
        raw = work / "raw"
        run_builder(model_dir, raw, target, extra_options=builder_options, log_path=work / "builder.log",
                    in_process=in_process, precision=build_precision)
        if with_lora:
            family = family_of(model_dir)
            modules = check_lora_modules(lora_modules, family)
            template = add_lora_inputs(raw, out_dir, modules, member_sizes(model_dir, family), family)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            for path in raw.iterdir():
                if path.is_file():
                    shutil.move(str(path), out_dir / path.name)
            template = LoraTemplate(modules=[], num_layers=_num_layers(model_dir), dtype=io_dtype_name(out_dir), inputs=[])
        report["builder_s"] = round(time.time() - started, 2)
        report["quantizer"] = quantizer or "none"
        if quantizer == "slmops":
            t0 = time.time()
            bits = 4 if target.precision == "int4" else 8
            report["quantization"] = quantize_graph(out_dir, bits, merged_options(target, extra_options))
            report["quantize_s"] = round(time.time() - t0, 2)
        if target.session_options:
            set_session_options(out_dir, target.session_options)
        return template
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _num_layers(model_dir: str | Path) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config") or {}
    return int(config.get("num_hidden_layers") or text.get("num_hidden_layers") or 0)
