"""Export the base model to ONNX with runtime-swappable LoRA inputs (the adapter ABI).

Recipe (see shared/design/facts.md, "Runtime-swappable adapters"):

1. Write a TEMPLATE PEFT adapter (rank 1, non-zero B) that covers every module of the ABI and
   run the onnxruntime-genai model builder with ``adapter_path=`` it. The builder bakes the LoRA
   weights in as initializers ``model.layers.{i}.{attn|mlp}.{proj}.lora_{A|B}.MatMul.weight``
   (scaling folded into B) and emits a MatMul-A -> MatMul-B -> Add path beside every base MatMul.
   For int4/int8 the LoRA MatMuls are listed in ``nodes_to_exclude`` so they stay float.
2. Rewrite the graph: every LoRA initializer becomes a graph INPUT with a symbolic rank
   (``[in, "lora_r"]`` / ``["lora_r", out]``) that keeps a rank-0 default initializer
   (``[in, 0]`` / ``[0, out]``), so a request without an adapter computes the pure base model and
   onnxruntime-genai feeds an active ``.onnx_adapter``'s tensors by name.
3. Set ``session_options`` of genai_config.json from the target profile (thread counts).
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

from slmops.bundle import LoraInput, LoraTemplate
from slmops.errors import SlmopsUsageError
from slmops.targets import Target
from slmops_build.quantize import builder_extra_options, merged_options, quantize_graph, quantizer_for

# The adapter ABI of decoder-only Llama-style models: leaf module name -> builder group name.
ABI_MODULES: dict[str, str] = {
    "q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
DEFAULT_LORA_MODULES: tuple[str, ...] = tuple(ABI_MODULES)
RANK_DIM = "lora_r"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
TEMPLATE_RANK = 1

# model.layers.3.attn.q_proj.lora_A.MatMul.weight
LORA_INPUT_RE = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.MatMul\.weight$")


class ExportError(RuntimeError):
    """The model builder or the graph rewrite failed (not a user input problem)."""


def lora_input_name(layer: int, module: str, which: str) -> str:
    return f"model.layers.{layer}.{ABI_MODULES[module]}.{module}.lora_{which}.MatMul.weight"


def lora_node_name(layer: int, module: str, which: str) -> str:
    """Name of the builder's LoRA MatMul node (what ``nodes_to_exclude`` matches)."""
    return f"/model/layers.{layer}/{ABI_MODULES[module]}/{module}/lora_{which}/MatMul"


def parse_lora_input(name: str) -> tuple[int, str, str] | None:
    """``model.layers.3.attn.q_proj.lora_A.MatMul.weight`` -> (3, "q_proj", "A")."""
    match = LORA_INPUT_RE.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(3), match.group(4)


def check_lora_modules(modules: Iterable[str] | None) -> list[str]:
    """Normalize ``--lora_modules`` (``all-linear`` = every ABI module) into ABI order."""
    wanted = list(modules or DEFAULT_LORA_MODULES)
    if wanted in (["all-linear"], ["all"]):
        wanted = list(DEFAULT_LORA_MODULES)
    unknown = sorted(set(wanted) - set(ABI_MODULES))
    if unknown:
        raise SlmopsUsageError("--lora_modules", f"{unknown} are not LoRA-able modules; choose from {list(ABI_MODULES)}")
    if not wanted:
        raise SlmopsUsageError("--lora_modules", "is empty; name at least one module or use 'all-linear'")
    return [m for m in DEFAULT_LORA_MODULES if m in wanted]


# ---- 1. template adapter --------------------------------------------------------------------
def linear_shapes(model_dir: str | Path, modules: list[str]) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of the model's decoder linears named in ``modules``.

    The model is instantiated on the meta device: no weights are read, so this is fast for any
    size and any architecture transformers knows.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in modules and isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def make_template_adapter(model_dir: str | Path, modules: list[str], out_dir: Path, seed: int = 0) -> Path:
    """Write a rank-1 PEFT LoRA adapter over ``modules`` with non-zero, seeded A and B."""
    import torch
    from safetensors.torch import save_file

    shapes = linear_shapes(model_dir, modules)
    found = {name.rsplit(".", 1)[-1] for name in shapes}
    missing = [m for m in modules if m not in found]
    if missing:
        raise SlmopsUsageError("--lora_modules", f"{missing} are not linear layers of {model_dir}; drop them from --lora_modules")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in sorted(shapes.items()):
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(TEMPLATE_RANK, in_f, generator=gen) * 0.02
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, TEMPLATE_RANK, generator=gen) * 0.02
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": TEMPLATE_RANK, "lora_alpha": TEMPLATE_RANK, "lora_dropout": 0.0, "target_modules": modules,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": False, "use_rslora": False, "use_dora": False,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# ---- running the model builder --------------------------------------------------------------
def run_builder(model_dir: str | Path, out_dir: Path, target: Target, adapter_path: Path | None = None,
                lora_nodes: list[str] | None = None, extra_options: dict[str, str] | None = None,
                log_path: Path | None = None, in_process: bool | None = None, precision: str | None = None) -> float:
    """Run the onnxruntime-genai model builder; return its seconds.

    By default in a subprocess (``python -m onnxruntime_genai.models.builder``): that keeps the
    builder's memory (the whole torch model) out of this process and its console noise in
    ``log_path``. ``in_process=True`` (or ``SLMOPS_BUILDER_IN_PROCESS=1``) calls its Python API
    instead, which saves the ~10 s import on small models (tests). Failures raise ExportError.
    ``precision`` overrides the builder's ``-p`` (fp32 when slmops' quantizer runs afterwards).
    """
    options = builder_extra_options(target, lora_nodes or [], extra_options or {})
    if adapter_path is not None:
        options["adapter_path"] = str(adapter_path)
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
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", *args]
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

    quant_logger = logging.getLogger("onnxruntime.quantization")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            options = builder.parse_extra_options(None, str(model_dir), str(out_dir), precision, provider, str(cache), kv)
            builder.create_model(None, str(model_dir), str(out_dir), precision, provider, str(cache), **options)
        except Exception:  # noqa: BLE001 - reported with the log tail like a subprocess failure
            traceback.print_exc(file=log)
            return 1
        finally:
            quant_logger.setLevel(level)
    return 0


# ---- 2. LoRA initializers -> inputs with rank-0 defaults ------------------------------------
def expose_lora_inputs(src_dir: Path, dst_dir: Path) -> LoraTemplate:
    """Rewrite ``src_dir/model.onnx`` into ``dst_dir`` with every LoRA weight as a graph input.

    Each ``...lora_A.MatMul.weight`` [in, r] initializer becomes an input ``[in, "lora_r"]`` with a
    default initializer of shape ``[in, 0]`` (B: ``["lora_r", out]`` / ``[0, out]``). Other files
    of ``src_dir`` are copied. Weights go to one external ``model.onnx.data`` file.
    """
    import numpy as np
    import onnx_ir as ir

    model = ir.load(str(src_dir / MODEL_FILE))
    inputs: list[LoraInput] = []
    layers: set[int] = set()
    modules: set[str] = set()
    dtypes: set[str] = set()
    for name, value in list(model.graph.initializers.items()):
        parsed = parse_lora_input(name)
        if parsed is None:
            continue
        layer, module, which = parsed
        shape = [d if isinstance(d, int) else -1 for d in value.shape] if value.shape is not None else []
        if len(shape) != 2 or min(shape) < 0 or value.dtype is None:
            raise ExportError(f"LoRA initializer {name} has an unexpected shape {value.shape}")
        np_dtype = value.dtype.numpy()
        if which == "A":
            symbolic: list[int | str] = [shape[0], RANK_DIM]
            default = np.zeros((shape[0], 0), dtype=np_dtype)
        else:
            symbolic = [RANK_DIM, shape[1]]
            default = np.zeros((0, shape[1]), dtype=np_dtype)
        value.const_value = ir.tensor(default, name=name)
        value.shape = ir.Shape(symbolic)
        model.graph.inputs.append(value)
        inputs.append(LoraInput(name=name, shape=symbolic))
        layers.add(layer)
        modules.add(module)
        dtypes.add(np.dtype(np_dtype).name)
    if not inputs:
        raise ExportError(f"{src_dir / MODEL_FILE} has no LoRA initializers; was it built with adapter_path=?")
    if len(dtypes) != 1:
        raise ExportError(f"LoRA initializers have mixed dtypes {sorted(dtypes)}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(dst_dir / MODEL_FILE), external_data=DATA_FILE)
    copy_side_files(src_dir, dst_dir)
    return LoraTemplate(
        modules=[m for m in DEFAULT_LORA_MODULES if m in modules] + sorted(modules - set(DEFAULT_LORA_MODULES)),
        num_layers=len(layers),
        dtype=dtypes.pop(),
        inputs=sorted(inputs, key=lambda i: _input_order(i.name)),
    )


def _input_order(name: str) -> tuple[int, int, str]:
    parsed = parse_lora_input(name)
    if parsed is None:
        return (1 << 30, 0, name)
    layer, module, which = parsed
    pos = DEFAULT_LORA_MODULES.index(module) if module in DEFAULT_LORA_MODULES else len(DEFAULT_LORA_MODULES)
    return (layer, pos, which)


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy genai_config, tokenizer and template files (everything but the graph and its data)."""
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.name not in (MODEL_FILE, DATA_FILE):
            shutil.copy2(path, dst_dir / path.name)


def read_template(model_dir: Path) -> LoraTemplate:
    """The ABI of an already exported model folder (graph read without its weights)."""
    import onnx

    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    type_names = {1: "float32", 10: "float16", 16: "bfloat16"}
    inputs, layers, modules, dtypes = [], set(), set(), set()
    for graph_input in model.graph.input:
        parsed = parse_lora_input(graph_input.name)
        if parsed is None:
            continue
        dims: list[int | str] = [d.dim_param or int(d.dim_value) for d in graph_input.type.tensor_type.shape.dim]
        inputs.append(LoraInput(name=graph_input.name, shape=dims))
        layers.add(parsed[0])
        modules.add(parsed[1])
        dtypes.add(type_names.get(graph_input.type.tensor_type.elem_type, str(graph_input.type.tensor_type.elem_type)))
    num_layers = len(layers) or int(genai_config(model_dir)["model"]["decoder"].get("num_hidden_layers", 0))
    return LoraTemplate(
        modules=[m for m in DEFAULT_LORA_MODULES if m in modules], num_layers=num_layers,
        dtype=dtypes.pop() if len(dtypes) == 1 else "", inputs=sorted(inputs, key=lambda i: _input_order(i.name)),
    )


# ---- 3. genai_config.json -------------------------------------------------------------------
def genai_config(model_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((model_dir / GENAI_CONFIG).read_text())
    return data


def set_session_options(model_dir: Path, session_options: dict[str, Any]) -> None:
    """Merge the target's session options (e.g. ``intra_op_num_threads``) into genai_config.json.

    onnxruntime-genai otherwise runs a CPU session on ONE intra-op thread.
    """
    config = genai_config(model_dir)
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update(session_options)
    (model_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")


def io_dtype_name(model_dir: Path) -> str:
    """dtype of the graph's float inputs/outputs (the logits)."""
    import onnx

    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    names = {1: "float32", 10: "float16", 16: "bfloat16"}
    for out in model.graph.output:
        if out.name == "logits":
            return names.get(out.type.tensor_type.elem_type, "float32")
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
    try:
        raw = work / "raw"
        if with_lora:
            modules = check_lora_modules(lora_modules)
            template_dir = make_template_adapter(model_dir, modules, work / "template_adapter")
            num_layers = _num_layers(model_dir)
            nodes = [lora_node_name(i, m, w) for i in range(num_layers) for m in modules for w in "AB"]
            run_builder(model_dir, raw, target, adapter_path=template_dir, lora_nodes=nodes, extra_options=extra_options,
                        log_path=work / "builder.log", in_process=in_process, precision=build_precision)
            template = expose_lora_inputs(raw, out_dir)
        else:
            run_builder(model_dir, raw, target, extra_options=extra_options, log_path=work / "builder.log",
                        in_process=in_process, precision=build_precision)
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
