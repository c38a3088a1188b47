"""Weight quantization for int4/int8 bundles: two quantizers, chosen by ``quantizer=``.

``quantizer=slmops`` (default for float32-io targets, i.e. cpu): the builder exports fp32 and
:func:`quantize_graph` rewrites the graph. Every base MatMul becomes a ``MatMulNBits`` with
asymmetric min/max blocks (32 along K) and integer zero points. What a rounded integer zero
point misses, the per-block offset ``D = min + z * scale``, is put back (``offsets=``):

* ``folded`` (default): the MatMulNBits gets the block sums of x as extra K rows
  (``Concat(x, x @ S)``) whose weights are D, 4-bit symmetric. One MatMulNBits, two small
  nodes; D's own rounding is <= scale/28, far below the weight grid.
* ``exact``: a float32 ``blocksum(x) @ D`` MatMul + Add beside the MatMulNBits (slower: D is
  read in float32 every token, a quarter of the int4 weight bytes).
* ``none``: dropped, i.e. the builder-like rounded zero point.

``accuracy_level`` (default 4: int8 activations, onnxruntime's fast path) applies to the int4
MatMuls; the int8 lm_head has its own ``head_accuracy_level`` (default 4: with 1 it runs ~15x
slower, there is no fast fp32-activation kernel for 8-bit blocks).

Weights already on a 4-bit grid (a model converted from a Q4_1 GGUF, like the default SmolLM2)
come out (near-)lossless. The lm_head and the (tied) embedding are int8 blocks (lossless for
Q8_0-derived weights). LoRA MatMuls stay float. Measured figures (perplexity vs fp32, decode speed
against the builder's symmetric int4 graph) are not repeated here: they live in bench/results/
(lora_peers_cpu.json: ``folded``, the default) and the README's "Adapter speed and quality"
section, rendered from that file by bench/readme_figures.py. ``exact`` and ``none`` have no
committed measurement; ``none`` loses the offsets' accuracy by construction.

``quantizer=builder``: the onnxruntime-genai builder's own RTN (symmetric, MatMulNBits), told
the target's ``builder_options`` and the user's ``--extra_option k=v``. Any builder option is
reachable, e.g. ``algo_config=k_quant``.
"""

from __future__ import annotations

from pathlib import Path
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
# onnxruntime-genai 0.18's builder documents the `int4_`-prefixed names as aliases but silently
# ignores them (measured: int4_block_size=16 still gives block_size 32). Pass the current names.
OPTION_ALIASES = {
    "int4_accuracy_level": "accuracy_level", "int4_block_size": "block_size", "int4_algo_config": "algo_config",
    "int4_is_symmetric": "is_symmetric", "int4_op_types_to_quantize": "op_types_to_quantize",
    "int4_nodes_to_exclude": "nodes_to_exclude",
}
# Options slmops sets itself; a user value would break the adapter ABI.
RESERVED_OPTIONS = ("adapter_path", "config_only", "exclude_embeds", "include_hidden_states")
QUANTIZERS = ("slmops", "builder")
# Options only the builder's quantizer understands (they select `quantizer=builder`'s behaviour).
BUILDER_ONLY_OPTIONS = ("algo_config", "is_symmetric", "op_types_to_quantize", "matmul_mixed_precision", "use_qdq")
# Options slmops' quantizer reads; everything else goes to the builder.
SLMOPS_QUANT_OPTIONS = ("quantizer", "block_size", "accuracy_level", "head_accuracy_level", "embedding_bits", "offsets",
                        "fp32_last_layers")


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


def merged_options(target: Target, extra_options: dict[str, str]) -> dict[str, str]:
    """Target profile options, then the user's, with deprecated ``int4_*`` names translated."""
    options = {OPTION_ALIASES.get(k, k): _text(v) for k, v in target.builder_options.items()}
    options.update({OPTION_ALIASES.get(k, k): v for k, v in extra_options.items()})
    return options


def quantizer_for(target: Target, extra_options: dict[str, str]) -> str | None:
    """Which quantizer an export uses: None (float precision), "slmops" or "builder"."""
    if target.precision not in QUANTIZED:
        return None
    options = merged_options(target, extra_options)
    chosen = options.get("quantizer")
    if chosen is not None and chosen not in QUANTIZERS:
        raise SlmopsUsageError("--extra_option", f"quantizer={chosen} is not one of {list(QUANTIZERS)}")
    if chosen is None:
        # slmops' quantizer writes float32 offsets/activations: the cpu (float32-io) targets.
        chosen = "slmops" if target.execution_provider == "cpu" else "builder"
    if chosen == "slmops":
        builder_only = sorted(set(options) & set(BUILDER_ONLY_OPTIONS))
        if builder_only:
            raise SlmopsUsageError("--extra_option", f"{builder_only} apply to the builder's quantizer; add quantizer=builder")
        if target.execution_provider != "cpu":
            raise SlmopsUsageError("--extra_option", f"quantizer=slmops supports the cpu target only; use quantizer=builder for {target.name}")
    return chosen


def builder_extra_options(target: Target, extra_options: dict[str, str]) -> dict[str, str]:
    """The builder's ``--extra_options``: target profile, then the user's options.

    With slmops' quantizer the builder exports fp32 and gets none of the quantization options.
    The LoRA branches are added after the builder (and its quantizer) ran, so none is excluded here.
    """
    options = merged_options(target, extra_options)
    if quantizer_for(target, extra_options) == "slmops":
        return {k: v for k, v in options.items() if k not in SLMOPS_QUANT_OPTIONS}
    options.pop("quantizer", None)
    options.pop("embedding_bits", None)
    options.pop("offsets", None)
    return options


# ---- slmops' quantizer -----------------------------------------------------------------------
LM_HEAD_NODE = "/lm_head/MatMul"
# How the asymmetric blocks' offsets D (what an integer zero point misses) reach the output:
# "folded" into the same MatMulNBits as extra K rows (block sums of x, 4-bit D), "exact" as a
# float32 MatMul + Add beside it, or "none" (dropped: the builder-like rounded zero point).
OFFSET_MODES = ("folded", "exact", "none")
DEFAULT_OFFSETS = "folded"


def _blocks(w: Any, block: int) -> Any:
    """[K, N] weight -> [N, K/block, block] float64 blocks along K (MatMulNBits' layout)."""
    import numpy as np

    k, n = w.shape
    return np.asarray(w, dtype=np.float64).T.reshape(n, k // block, block)


def quantize_asymmetric(w: Any, bits: int, block: int) -> tuple[Any, Any, Any, Any]:
    """(q [N, nb, block] uint8 levels, scales [N, nb], zero points [N, nb] uint8, offsets D [nb, N]).

    Each block: scale = (max - min) / (2^bits - 1), q = round((w - min) / scale), integer zero point
    z = round(-min / scale); MatMulNBits computes scale * (q - z), and D = min + z * scale is what
    that misses, so the block is min + scale * q = scale * (q - z) + D exactly.
    """
    import numpy as np

    levels = (1 << bits) - 1
    wb = _blocks(w, block)
    lo, hi = wb.min(-1), wb.max(-1)
    scale = (hi - lo) / levels
    scale[scale == 0] = 1.0
    q = np.clip(np.rint((wb - lo[..., None]) / scale[..., None]), 0, levels).astype(np.uint8)
    z = np.clip(np.rint(-lo / scale), 0, levels).astype(np.uint8)
    offsets = (lo + z * scale).T.astype(np.float32)
    return q, scale.astype(np.float32), z, offsets


def quantize_symmetric4(w: Any, block: int) -> tuple[Any, Any, Any]:
    """Symmetric 4-bit blocks along K: (q [N, nb, block] in 0..15, scales [N, nb], zero points 8)."""
    import numpy as np

    wb = _blocks(w, block)
    scale = np.abs(wb).max(-1) / 7.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(wb / scale[..., None]), -8, 7) + 8).astype(np.uint8)
    return q, scale.astype(np.float32), np.full(scale.shape, 8, np.uint8)


def pack_nbits(q: Any, z: Any, bits: int) -> tuple[Any, Any]:
    """MatMulNBits layout: q [N, nb, block] -> [N, nb, block*bits/8]; z [N, nb] -> flat (4-bit: two per byte)."""
    import numpy as np

    if bits == 8:
        return q, z.reshape(-1)
    n, nb = z.shape
    q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if nb % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
    return q, (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def quantize_symmetric8(w: Any, block: int) -> tuple[Any, Any, Any]:
    """int8 blocks along K: (q uint8 [N, nb, block] offset by 128, scales [N*nb], zero points 128)."""
    import numpy as np

    wb = _blocks(w, block)
    scale = np.abs(wb).max(-1) / 127.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(wb / scale[..., None]), -127, 127) + 128).astype(np.uint8)
    return q, scale.astype(np.float32).reshape(-1), np.full(scale.size, 128, np.uint8)


def quantize_graph(model_dir: Path, bits: int, options: dict[str, str] | None = None) -> dict[str, Any]:
    """Quantize the float32 graph in ``model_dir`` in place (see the module docstring)."""
    import numpy as np
    import onnx_ir as ir

    options = options or {}
    block = int(options.get("block_size", 32))
    accuracy = int(options.get("accuracy_level", 4))
    # The int8 lm_head keeps int8 activations unless asked: onnxruntime has no fast fp32-activation
    # kernel for 8-bit blocks (measured: accuracy_level=1 on it drops decode from ~90 to 6 tok/s).
    head_accuracy = int(options.get("head_accuracy_level", 4))
    embed_bits = int(options.get("embedding_bits", 8))
    # fp32 activations (accuracy_level 1) for the int4 MatMuls of the last k decoder layers only
    fp32_last = int(options.get("fp32_last_layers", 0))
    offsets_mode = options.get("offsets", DEFAULT_OFFSETS)
    if offsets_mode not in OFFSET_MODES:
        raise SlmopsUsageError("--extra_option", f"offsets={offsets_mode} is not one of {list(OFFSET_MODES)}")
    if block < 16 or block & (block - 1):
        raise SlmopsUsageError("--extra_option", f"block_size={block} must be a power of two >= 16")
    if embed_bits not in (8, 0):
        raise SlmopsUsageError("--extra_option", "embedding_bits must be 8 (int8 lm_head/embeddings) or 0 (keep them float)")
    path = model_dir / "model.onnx"
    model = ir.load(str(path))
    graph: Any = model.graph

    def const(name: str, array: Any) -> Any:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value

    def replace(node: Any, new_nodes: list[Any], final: Any) -> None:
        out = node.outputs[0]
        name, shape = out.name, out.shape
        for new in new_nodes:
            graph.insert_before(node, new)
        out.replace_all_uses_with(final, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        final.name, final.shape, final.dtype = name, shape, ir.DataType.FLOAT

    first_fp32 = _num_layers(graph) - fp32_last if fp32_last > 0 else None

    def level_of(node_name: str, is_head: bool) -> int:
        if is_head:
            return head_accuracy
        layer = _layer_of(node_name)
        return 1 if first_fp32 is not None and layer is not None and layer >= first_fp32 else accuracy

    stats: dict[str, Any] = {"method": "slmops", "bits": bits, "block_size": block, "accuracy_level": accuracy,
             "head_accuracy_level": head_accuracy, "fp32_last_layers": fp32_last,
             "embedding_bits": embed_bits, "offsets": offsets_mode, "matmuls": 0, "kept_float": []}
    block_sums: dict[tuple[int, int, int], Any] = {}
    sum_matrices: dict[tuple[int, int], Any] = {}

    def block_sum(x: Any, k: int, width: int, node_name: str, new_nodes: list[Any]) -> Any:
        """``x @ S``: the sum of every K-block of ``x`` ([.., K] -> [.., width], zero-padded), once per x."""
        key = (id(x), k, width)
        if key not in block_sums:
            if (k, width) not in sum_matrices:
                ones = np.zeros((k, width), np.float32)
                ones[np.arange(k), np.arange(k) // block] = 1.0
                sum_matrices[(k, width)] = const(f"slmops.block_sum.{k}x{width}", ones)
            summed = ir.Node("", "MatMul", [x, sum_matrices[(k, width)]], name=f"{node_name}/block_sum", num_outputs=1)
            summed.outputs[0].name = f"{node_name}/block_sum/output_0"
            new_nodes.append(summed)
            block_sums[key] = summed.outputs[0]
        return block_sums[key]

    for node in list(graph):
        if node.op_type != "MatMul" or "/lora_" in (node.name or "") or len(node.inputs) != 2:
            continue
        x, weight = node.inputs
        if weight is None or weight.const_value is None or x is None:
            continue
        w = weight.const_value.numpy()
        if w.ndim != 2 or w.dtype != np.float32:
            continue
        k, n = w.shape
        is_head = node.name == LM_HEAD_NODE
        if k % block or (is_head and not embed_bits):
            stats["kept_float"].append(node.name)
            continue
        base = weight.name
        new_nodes: list[Any] = []
        matmul_input, k_total = x, k
        if is_head:
            q, scales, zp = quantize_symmetric8(w, block)
            node_bits, offsets = 8, None
            scales = scales.reshape(n, -1)
            zp = zp.reshape(n, -1)
        else:
            q, scales, zp, offsets = quantize_asymmetric(w, bits, block)
            node_bits = bits
        if offsets is not None and offsets_mode == "folded":
            # Fold the offsets into the same MatMulNBits: K grows by the block sums of x, whose
            # weights are D (symmetric 4-bit, error <= scale/28: far below the weights' own grid).
            nb = k // block
            width = -(-nb // block) * block
            sums = block_sum(x, k, width, node.name, new_nodes)
            concat = ir.Node("", "Concat", [x, sums], attributes=[ir.AttrInt64("axis", -1)],
                             name=f"{node.name}/with_block_sums", num_outputs=1)
            concat.outputs[0].name = f"{node.name}/with_block_sums/output_0"
            new_nodes.append(concat)
            d = np.zeros((width, n), np.float32)
            d[:nb] = offsets
            if bits == 4:
                dq, ds, dz = quantize_symmetric4(d, block)
            else:
                dq, ds, dz = quantize_symmetric8(d, block)
                ds, dz = ds.reshape(n, -1), dz.reshape(n, -1)
            q, scales, zp = np.concatenate([q, dq], 1), np.concatenate([scales, ds], 1), np.concatenate([zp, dz], 1)
            matmul_input, k_total, offsets = concat.outputs[0], k + width, None
        elif offsets_mode == "none":
            offsets = None
        q, zp = pack_nbits(q, zp, node_bits)
        matmul = ir.Node(
            "com.microsoft", "MatMulNBits",
            [matmul_input, const(f"{base}_Q{node_bits}", q), const(f"{base}_scales", scales.reshape(-1)),
             const(f"{base}_zp", zp)],
            attributes=[ir.AttrInt64("K", k_total), ir.AttrInt64("N", n), ir.AttrInt64("bits", node_bits),
                        ir.AttrInt64("block_size", block),
                        ir.AttrInt64("accuracy_level", level_of(node.name or "", is_head))],
            name=f"{node.name}_Q{node_bits}", num_outputs=1,
        )
        matmul.outputs[0].name = f"{node.name}_Q{node_bits}/output_0"
        new_nodes.append(matmul)
        final = matmul.outputs[0]
        if offsets is not None:  # "exact": + blocksum(x) @ D in float32
            sums = block_sum(x, k, k // block, node.name, new_nodes)
            offset = ir.Node("", "MatMul", [sums, const(f"{base}_offsets", offsets)],
                             name=f"{node.name}/offsets", num_outputs=1)
            add = ir.Node("", "Add", [matmul.outputs[0], offset.outputs[0]], name=f"{node.name}/offsets/Add", num_outputs=1)
            offset.outputs[0].name = f"{node.name}/offsets/output_0"
            new_nodes += [offset, add]
            final = add.outputs[0]
        replace(node, new_nodes, final)
        if not weight.uses():
            graph.initializers.pop(base, None)
        stats["matmuls"] += 1

    if embed_bits:
        for node in list(graph):
            if node.op_type != "Gather" or node.inputs[0] is None:
                continue
            table, indices = node.inputs[0], node.inputs[1]
            producer = table.producer()
            if producer is not None and producer.op_type == "Transpose" and f"{producer.inputs[0].name}_Q8" in graph.initializers:
                # tied embeddings: gather from the lm_head's int8 blocks ([V, H/block, block] -> [V, H])
                head = producer.inputs[0]
                q_value, s_value = graph.initializers[f"{head.name}_Q8"], graph.initializers[f"{head.name}_scales"]
                vocab, nb, blk = q_value.const_value.shape
                reshape_q = ir.Node("", "Reshape", [q_value, const(f"{head.name}_Q8_shape", np.array([vocab, nb * blk], np.int64))],
                                    name="/model/embed_tokens/Reshape_Q8", num_outputs=1)
                reshape_s = ir.Node("", "Reshape", [s_value, const(f"{head.name}_scales_shape", np.array([vocab, nb], np.int64))],
                                    name="/model/embed_tokens/Reshape_scales", num_outputs=1)
                data, scales_2d, pre = reshape_q.outputs[0], reshape_s.outputs[0], [reshape_q, reshape_s]
                zero = const(f"{head.name}_gather_zp", np.full((vocab, nb), 128, np.uint8))
            elif table.const_value is not None and table.const_value.numpy().ndim == 2:
                emb = table.const_value.numpy()
                vocab, hidden = emb.shape
                if hidden % block:
                    continue
                q, scales, _ = quantize_symmetric8(emb.T, block)  # blocks along the hidden dim
                data = const(f"{table.name}_Q8", q.reshape(vocab, hidden))
                scales_2d = const(f"{table.name}_scales", scales.reshape(vocab, hidden // block))
                zero = const(f"{table.name}_zp", np.full((vocab, hidden // block), 128, np.uint8))
                pre, producer, blk = [], None, block
            else:
                continue
            gather = ir.Node("com.microsoft", "GatherBlockQuantized", [data, indices, scales_2d, zero],
                             attributes=[ir.AttrInt64("bits", 8), ir.AttrInt64("block_size", blk),
                                         ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1)],
                             name=f"{node.name}BlockQuantized", num_outputs=1)
            replace(node, [*pre, gather], gather.outputs[0])
            if producer is not None and not producer.outputs[0].uses():
                graph.remove(producer, safe=True)
            if not table.uses() and table.name in graph.initializers:
                graph.initializers.pop(table.name, None)
            stats["embedding"] = "int8"
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input()]:
        graph.initializers.pop(name)
    tmp = model_dir / "model.q.onnx"
    ir.save(model, str(tmp), external_data="model.q.onnx.data")
    del model
    (model_dir / "model.onnx.data").unlink(missing_ok=True)
    (model_dir / "model.q.onnx.data").rename(model_dir / "model.onnx.data")
    _relocate_external_data(tmp, "model.q.onnx.data", "model.onnx.data")
    tmp.rename(path)
    return stats


def _layer_of(node_name: str) -> int | None:
    """The decoder layer index in a builder node name (``/model/layers.7/attn/...`` -> 7)."""
    import re

    match = re.search(r"/layers\.(\d+)/", node_name)
    return int(match.group(1)) if match else None


def _num_layers(graph: Any) -> int:
    """Decoder layers: the ones with weight MatMuls (the builder names the final norm layers.<N> too)."""
    layers = [_layer_of(node.name or "") for node in graph if node.op_type == "MatMul"]
    return max((i for i in layers if i is not None), default=-1) + 1


def _relocate_external_data(model_path: Path, old: str, new: str) -> None:
    """Point every external-data reference of ``model_path`` from file ``old`` to ``new``."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(proto, str(model_path))
