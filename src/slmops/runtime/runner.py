"""The model runner: one onnxruntime session over a bundle's graph, one step at a time.

It owns the KV cache and nothing else about requests. Two calls:

- :meth:`ModelRunner.prefill` runs ``ids`` (a prompt, or one chunk of it) for ONE row and returns
  that row's last logits;
- :meth:`ModelRunner.decode` runs one token for each of the first ``n`` rows at once, rows of any
  lengths and adapters, and returns their logits.

The KV cache is one preallocated ``[rows, kv_heads, capacity, head_size]`` array per layer and
key/value. Past and present are bound to the SAME buffer (onnxruntime's GroupQueryAttention then
writes each row's new key/value at that row's length, ``sum(attention_mask) - 1``, and reads only
that row's prefix), so a step copies no cache. Active rows are kept in ``[0, n)``: a finished row
is replaced by the last one (:meth:`KVCache.move_row`), so a step binds one contiguous view.
The capacity grows by doubling up to ``max_length`` when a row needs it; a growth copies only the
positions rows have used (idle rows' pages stay untouched). Once the rows that needed it are gone
(the longest live row uses a quarter of the capacity or less), :meth:`KVCache.shrink` moves the live
rows into smaller buffers and frees the large ones, so the memory of a burst goes back.

LoRA (adapter ABI 3): a step's adapters are concatenated along the rank per projection and each
row's ``lora_row_mask`` keeps only its own adapter's rank columns (see :class:`LoraBank`), so rows
with different adapters share one step and each distinct adapter's weights are read once. Every cache of feeds is bounded in bytes
(:class:`slmops.runtime.memory.ByteLRU`), and a new mix's concatenation can be built on another
thread (:meth:`LoraBank.ready_feeds` returns None until :meth:`LoraBank.build` has made it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slmops.bundle import LoraTemplate
from slmops.contract import ONNX_TYPE_OF, GenaiConfig, dtype_of_onnx_type, numpy_dtype, parse_lora_input
from slmops.runtime.memory import DEFAULT_FEEDS_CACHE_BYTES, ByteLRU, arrays_nbytes

_INITIAL_CAPACITY = 256
DEFAULT_MAX_LENGTH = 4096


# bundle.json target.execution_provider -> onnxruntime provider
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider",
             "webgpu": "WebGpuExecutionProvider"}


def session_providers(execution_provider: str, available: list[str]) -> list[str]:
    """onnxruntime providers for a bundle's target; ValueError when this onnxruntime lacks it.

    The KV cache and LoRA feeds live in host memory: on a GPU provider onnxruntime copies them per
    step (correct, not fast; a device-resident cache is future work)."""
    wanted = PROVIDERS.get(execution_provider, execution_provider)
    if wanted == "CPUExecutionProvider":
        return [wanted]
    if wanted not in available:
        raise ValueError(f"the bundle targets {execution_provider} ({wanted}), which this onnxruntime lacks "
                         f"(it has {', '.join(available)}); install the onnxruntime build for that device or serve "
                         "a cpu bundle")
    return [wanted, "CPUExecutionProvider"]


class KVCache:
    """Per-layer key/value buffers ``[rows, kv_heads, capacity, head_size]``; rows ``[0, n)`` are live."""

    def __init__(self, info: GenaiConfig, rows: int, dtype: Any, max_length: int) -> None:
        self.info = info
        self.rows = rows
        self.dtype = dtype
        self.max_length = max_length
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.used = np.zeros(rows, np.int64)  # positions written per row (what a growth must keep)
        self.version = 0  # bumped when the buffers are reallocated (bindings must be redone)
        self.ensure(min(_INITIAL_CAPACITY, max_length))

    def ensure(self, length: int) -> None:
        """Make room for ``length`` positions per row (grows by doubling, keeps the contents)."""
        if length <= self.capacity:
            return
        if length > self.max_length:
            raise ValueError(f"{length} positions exceed the KV cache limit {self.max_length}")
        capacity = min(self.max_length, max(length, 2 * self.capacity))
        self._reallocate(capacity, [(row, int(n)) for row, n in enumerate(self.used) if n > 0])

    def _reallocate(self, capacity: int, live: list[tuple[int, int]]) -> None:
        """New buffers of ``capacity`` positions holding the first ``n`` positions of each ``(row, n)``
        in ``live``; each layer's old buffers are let go as soon as they are copied."""
        shape = (self.rows, self.info.kv_heads, capacity, self.info.head_size)
        keys, values = [], []
        for layer in range(self.info.num_layers):
            # np.zeros maps pages lazily: only copied and later written positions become resident
            k, v = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)
            for row, n in live:
                k[row, :, :n] = self.keys[layer][row, :, :n]
                v[row, :, :n] = self.values[layer][row, :, :n]
            keys.append(k)
            values.append(v)
            if self.keys:
                self.keys[layer] = self.values[layer] = k
        self.keys, self.values, self.capacity = keys, values, capacity
        self.version += 1

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions onto row ``dst``."""
        for layer in range(self.info.num_layers):
            self.keys[layer][dst, :, :length] = self.keys[layer][src, :, :length]
            self.values[layer][dst, :, :length] = self.values[layer][src, :, :length]
        self.used[dst] = length
        self.used[src] = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers as allocated (only pages written are resident)."""
        return sum(int(a.nbytes) for a in (*self.keys, *self.values))

    def shrink(self, live_rows: int, longest: int) -> bool:
        """Return memory after a burst: when rows ``[0, live_rows)`` use at most ``longest`` positions
        and that is a quarter of the capacity or less, reallocate smaller buffers (twice ``longest``
        rounded up to a power of two, at least the initial capacity) holding those rows' positions,
        and free the old ones. Rows from ``live_rows`` on are idle: their positions are dropped.
        Returns True if it shrank (bindings of the old buffers must be redone: ``version`` moved)."""
        floor = min(_INITIAL_CAPACITY, self.max_length)
        if self.capacity <= floor or 4 * longest > self.capacity:
            return False
        capacity = floor
        while capacity < 2 * longest:
            capacity *= 2
        capacity = min(capacity, self.max_length)
        if capacity >= self.capacity:
            return False
        self.used[live_rows:] = 0
        live = [(row, min(int(n), capacity)) for row, n in enumerate(self.used[:live_rows]) if n > 0]
        self._reallocate(capacity, live)
        for row, n in live:
            self.used[row] = n
        return True


# Runs between two shrinks of onnxruntime's CPU memory arena (see ModelRunner.__init__).
ARENA_SHRINK_EVERY = 256


class LoraBank:
    """Builds a step's LoRA feeds from the adapters of its rows (adapter ABI 3).

    ``adapters`` maps an adapter key to its tensors (``{input name: array}``, the .onnx_adapter
    contents). For a step whose rows use adapters ``[a, b, None, a]`` the feed of every projection
    is ``A = [A_a | A_b]``, ``B = [B_a ; B_b]`` (concatenated along the rank) and the row mask of
    each projection kind keeps row 0 and 3 on a's columns, row 1 on b's, row 2 on none. An adapter
    that lacks a projection, or has a smaller rank in some layers, is padded with zeros so every
    layer of a projection kind has the same rank layout (the mask is shared by the layers).
    """

    def __init__(self, template: LoraTemplate, dtype: Any, cache_bytes: int = DEFAULT_FEEDS_CACHE_BYTES) -> None:
        self.template = template
        self.dtype = dtype
        self._shapes = {i.name: i.shape for i in template.inputs}
        # projection kind -> [(A name, B name)] over layers
        self._pairs: dict[str, list[tuple[str, str]]] = {}
        for item in template.inputs:
            parsed = parse_lora_input(item.name)
            if parsed is not None and parsed.side == "A":
                self._pairs.setdefault(parsed.projection, []).append((item.name, parsed.side_name("B")))
        # adapter keys -> (feeds, segments, weight), bounded in the bytes the concatenations allocated
        # (a single adapter's own arrays cost nothing); filled by the scheduler or a builder thread
        self._cache: ByteLRU[tuple[dict[str, np.ndarray], dict[str, list[tuple[int, int]]], int]] = ByteLRU(cache_bytes)
        self._weights: dict[Any, int] = {}  # adapter key -> sum of its ranks
        self._ones = np.ones((1, 1, 1), dtype)
        # recently forgotten adapter keys: a concatenation built meanwhile (on another thread) is not kept
        self._gone: OrderedDict[Any, None] = OrderedDict()

    @property
    def cache(self) -> ByteLRU[Any]:
        """The concatenations held (``nbytes``, ``limit``, ``evictions``)."""
        return self._cache

    def ranks(self, tensors: dict[str, np.ndarray]) -> dict[str, int]:
        """Rank an adapter takes in each projection kind (its largest over layers; 0 = absent)."""
        out: dict[str, int] = {}
        for projection, pairs in self._pairs.items():
            out[projection] = max((tensors[a].shape[1] for a, _ in pairs if a in tensors), default=0)
        return out

    def feeds(self, row_adapters: Sequence[tuple[Any, dict[str, np.ndarray]] | None]) -> dict[str, np.ndarray]:
        """Graph feeds for rows ``[0, n)``: ``row_adapters[i]`` is ``(key, tensors)`` or None (base model)."""
        feeds = self.ready_feeds(row_adapters, build=True)
        assert feeds is not None
        return feeds

    def ready_feeds(self, row_adapters: Sequence[tuple[Any, dict[str, np.ndarray]] | None],
                    build: bool = False) -> dict[str, np.ndarray] | None:
        """:meth:`feeds`, or None when they need a concatenation that is not cached (``build``
        False): the caller has :meth:`build` make it elsewhere, e.g. off the scheduler thread."""
        tensors_of: dict[Any, dict[str, np.ndarray]] = {}
        for item in row_adapters:
            if item is not None:
                tensors_of.setdefault(item[0], item[1])
        if not tensors_of:
            return {}
        found = self._concatenated(tensors_of, build or not self.needs_copy(tensors_of))
        if found is None:
            return None
        keys, concat, segments = found
        feeds = dict(concat)
        first = next(iter(tensors_of))
        shared = len(keys) == 1 and all(item is not None and item[0] == first for item in row_adapters)
        index = {key: i for i, key in enumerate(keys)}
        for projection, mask_name in self.template.row_masks.items():
            spans = segments.get(projection)
            if not spans or spans[-1][1] == 0:
                continue  # no adapter of this step adapts this projection kind: the graph default serves
            if shared:
                feeds[mask_name] = self._ones  # broadcasts: every row takes every column
                continue
            mask = np.zeros((len(row_adapters), 1, spans[-1][1]), self.dtype)
            for row, item in enumerate(row_adapters):
                if item is not None:
                    start, end = spans[index[item[0]]]
                    mask[row, 0, start:end] = 1
            feeds[mask_name] = mask
        return feeds

    def _weight(self, key: Any, tensors: dict[str, np.ndarray]) -> int:
        weight = self._weights.get(key)
        if weight is None:
            weight = self._weights[key] = sum(self.ranks(tensors).values())
        return weight

    def needs_copy(self, tensors_of: dict[Any, dict[str, np.ndarray]]) -> bool:
        """Whether these adapters' feeds need a new array (a concatenation, or one adapter padded to
        a rank layout shared by its layers) rather than the adapter's own arrays."""
        if len(tensors_of) != 1:
            return bool(tensors_of)
        tensors = next(iter(tensors_of.values()))
        for projection, total in self.ranks(tensors).items():
            if total and any(a not in tensors or tensors[a].shape[1] != total for a, _ in self._pairs[projection]):
                return True
        return False

    def ready(self, tensors_of: dict[Any, dict[str, np.ndarray]]) -> bool:
        """Whether feeds of these adapters are at hand without a copy (cached, or one adapter's own)."""
        return not self.needs_copy(tensors_of) or self._concatenated(tensors_of, build=False) is not None

    def build(self, tensors_of: dict[Any, dict[str, np.ndarray]]) -> bool:
        """Make (and cache) the concatenation of these adapters, unless a cached one serves them.
        False when one of them was forgotten meanwhile (nothing is kept)."""
        self._concatenated(tensors_of, build=True)
        return not any(key in self._gone for key in tensors_of)

    def _concatenated(self, tensors_of: dict[Any, dict[str, np.ndarray]], build: bool = True
                      ) -> tuple[tuple[Any, ...], dict[str, np.ndarray], dict[str, list[tuple[int, int]]]] | None:
        """The concatenation of a step's adapters, or a cached one that holds them all and not much
        more (a row that left keeps its columns until a new adapter joins: no copy per departure).
        None when none is cached and ``build`` is False."""
        wanted = set(tensors_of)
        need = sum(self._weight(k, t) for k, t in tensors_of.items())
        best: tuple[Any, ...] | None = None
        best_weight = 0
        for cached_keys, (_, _, weight) in self._cache.items():
            assert isinstance(cached_keys, tuple)
            fits = wanted <= set(cached_keys) and (len(cached_keys) == len(wanted) or weight <= 1.5 * need + 8)
            if fits and (best is None or weight < best_weight):
                best, best_weight = cached_keys, weight
        if best is not None:
            hit = self._cache.get(best)
            if hit is not None:  # else another thread dropped it meanwhile: build it again
                return best, hit[0], hit[1]
        if not build:
            return None
        keys = tuple(sorted(tensors_of, key=str))
        feeds: dict[str, np.ndarray] = {}
        segments: dict[str, list[tuple[int, int]]] = {}
        ranks = [self.ranks(tensors_of[k]) for k in keys]
        allocated = 0
        for projection, pairs in self._pairs.items():
            widths = [r[projection] for r in ranks]
            total = sum(widths)
            bounds, start = [], 0
            for w in widths:
                bounds.append((start, start + w))
                start += w
            segments[projection] = bounds
            if total == 0:
                continue
            for a_name, b_name in pairs:
                in_dim, out_dim = int(self._shapes[a_name][0]), int(self._shapes[b_name][1])
                if len(keys) == 1 and a_name in tensors_of[keys[0]] and tensors_of[keys[0]][a_name].shape[1] == total:
                    feeds[a_name] = tensors_of[keys[0]][a_name]
                    feeds[b_name] = tensors_of[keys[0]][b_name]
                    continue
                a_cat = np.zeros((in_dim, total), self.dtype)
                b_cat = np.zeros((total, out_dim), self.dtype)
                for key, (lo, _) in zip(keys, bounds, strict=True):
                    tensors = tensors_of[key]
                    if a_name in tensors:
                        r = tensors[a_name].shape[1]
                        a_cat[:, lo:lo + r] = tensors[a_name]
                        b_cat[lo:lo + r, :] = tensors[b_name]
                feeds[a_name], feeds[b_name] = a_cat, b_cat
                allocated += a_cat.nbytes + b_cat.nbytes
        if not any(key in self._gone for key in keys):  # else an adapter was unloaded during the copy
            self._cache.put(keys, (feeds, segments, need), allocated)
        return keys, feeds, segments

    def forget(self, key: Any) -> None:
        """Drop cached concatenations that hold adapter ``key`` (it was unloaded)."""
        self._gone[key] = None
        while len(self._gone) > 4096:
            self._gone.popitem(last=False)
        self._cache.drop_if(lambda keys: isinstance(keys, tuple) and key in keys)
        self._weights.pop(key, None)


class ModelRunner:
    """One onnxruntime session over ``model_dir`` with a KV cache of ``rows`` rows.

    Args:
        model_dir (Path): the bundle's model folder (model.onnx, genai_config.json).
        template (LoraTemplate): the bundle's adapter ABI (LoRA and row-mask input names).
        rows (int): the most rows one decode step may hold (the server's --max-batch).
        threads (int | None): intra-op threads; None = genai_config.json's, else onnxruntime's default.
        max_length (int | None): KV positions per row; default the model's context length, at most
            ``DEFAULT_MAX_LENGTH`` (the cache grows on demand, but a row may grow to this).
        feeds_cache_bytes (int): bytes of LoRA feeds each of its caches (the bank's concatenations,
            the OrtValues of steps) may hold beyond the one entry in use.
    """

    def __init__(self, model_dir: Path, template: LoraTemplate, rows: int, threads: int | None = None,
                 max_length: int | None = None, execution_provider: str = "cpu",
                 feeds_cache_bytes: int = DEFAULT_FEEDS_CACHE_BYTES) -> None:
        import onnxruntime as ort

        self.info = GenaiConfig.read(model_dir)
        if self.info.windowed_layers:
            raise ValueError(f"layers {list(self.info.windowed_layers)} of {model_dir} keep a window-sized KV cache "
                             "(genai_config.json decoder.sliding_window), which this runner's full-length cache cannot "
                             "bind; rebuild the bundle with `slmops build` (it exports sliding windows over a full cache)")
        # LongRoPE graphs (Phi-3.5, Phi-4-mini) pick short or long rotary caches per call by the total
        # length (the model builder's rope_caches_subgraph If node): a prompt prefilled in small slices
        # would use short caches where one call over the whole prompt uses long ones (PyTorch's answer).
        self.length_switched_rope = _names_node(model_dir / self.info.model_file, b"rope_caches_subgraph")
        options = ort.SessionOptions()
        configured = self.info.session_options.get("intra_op_num_threads")
        self.threads = threads if threads is not None else (int(configured) if configured is not None else None)
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_dir / self.info.model_file), options,
                                            providers=session_providers(execution_provider, ort.get_available_providers()))
        # inputs with a default (the LoRA pairs and masks) are "overridable initializers" to onnxruntime
        io_types = {i.name: i.type for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        self.dtype = numpy_dtype(dtype_of_onnx_type(io_types.get(self.info.past_key % 0, ONNX_TYPE_OF["float32"])))
        self.graph_inputs = set(io_types)
        missing = {m for m in template.row_masks.values()} - self.graph_inputs
        if missing:
            raise ValueError(f"the graph lacks the LoRA row-mask inputs {sorted(missing)}; rebuild the bundle")
        self.rows = rows
        self.max_length = min(max_length or DEFAULT_MAX_LENGTH, self.info.context_length)
        self.cache = KVCache(self.info, rows, self.dtype, self.max_length)
        self.feeds_cache_bytes = feeds_cache_bytes
        self.bank = LoraBank(template, numpy_dtype(template.dtype), feeds_cache_bytes) if template.inputs else None
        from onnxruntime.capi import _pybind_state

        self._ort, self._capi = ort, _pybind_state
        self._run_options = _pybind_state.RunOptions()
        # every ARENA_SHRINK_EVERY runs, one hands onnxruntime's CPU arena regions no step uses back
        # (it grows to the largest shape seen: +47 MB over random batch/prompt shapes on the soak's
        # model, +12 MB after a shrink; shrinking at every run cost 60% more per step)
        self._shrink_options = _pybind_state.RunOptions()
        self._shrink_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.runs = 0
        # (rows, adapters) -> OrtValues of the cache views and LoRA feeds; bounded in the bytes of
        # the LoRA arrays they keep alive (the cache views are the KV cache's own memory)
        self._static: ByteLRU[tuple[Any, ...]] = ByteLRU(feeds_cache_bytes)
        self._static_version = -1
        self._cpu = _pybind_state.OrtDevice(_pybind_state.OrtDevice.cpu(), _pybind_state.OrtDevice.default_memory(), 0)

    # ---- steps --------------------------------------------------------------------------------
    def prefill(self, row: int, ids: np.ndarray, past: int, lora: dict[str, np.ndarray], lora_key: Any = None) -> np.ndarray:
        """Run ``ids`` (1-D: a prompt or one chunk of it) for row ``row`` whose first ``past``
        positions are cached; returns its last logits ``[vocab]`` (float32)."""
        total = past + len(ids)
        self.cache.ensure(total)
        logits = np.empty((1, len(ids), self.info.vocab_size), self.dtype)
        feeds = {self.info.input_ids: np.ascontiguousarray(ids, np.int64).reshape(1, -1),
                 self.info.attention_mask: np.ones((1, total), np.int64)}
        self._run(feeds, lora, lora_key, logits, row, row + 1)
        self.cache.used[row] = total
        return np.asarray(logits[0, -1], np.float32)

    def prefill_rows(self, start: int, ids: np.ndarray, lengths: np.ndarray, lora: dict[str, np.ndarray],
                     lora_key: Any = None) -> np.ndarray:
        """Whole prompts of rows ``[start, start + k)`` in one call: ``ids`` ``[k, width]`` right-padded,
        ``lengths[i]`` row i's prompt length. Returns each row's last-prompt-position logits ``[k, vocab]``.

        The mask's row sums give each row its length; the padding's keys land past the row's
        length, where its first decoded tokens overwrite them.
        """
        k, width = ids.shape
        self.cache.ensure(width)
        logits = np.empty((k, width, self.info.vocab_size), self.dtype)
        mask = (np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]).astype(np.int64)
        feeds = {self.info.input_ids: np.ascontiguousarray(ids, np.int64), self.info.attention_mask: mask}
        self._run(feeds, lora, lora_key, logits, start, start + k)
        self.cache.used[start:start + k] = width  # the padding was written too
        return np.asarray(logits[np.arange(k), lengths - 1], np.float32)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, lora: dict[str, np.ndarray], lora_key: Any = None,
               start: int = 0) -> np.ndarray:
        """One token for each of rows ``[start, start + n)``: ``tokens[i]`` is row start+i's next input,
        ``lengths[i]`` its cached positions. Returns logits ``[n, vocab]`` (float32). ``lora_key``
        names the contents of ``lora`` (equal keys = equal feeds), so their OrtValues are made once."""
        n = len(tokens)
        totals = lengths.astype(np.int64) + 1
        width = int(totals.max())
        self.cache.ensure(width)
        # only the row sums matter to the graph (seqlens_k = sum - 1); the width is the longest row
        mask = (np.arange(width, dtype=np.int64)[None, :] < totals[:, None]).astype(np.int64)
        logits = np.empty((n, 1, self.info.vocab_size), self.dtype)
        feeds = {self.info.input_ids: np.ascontiguousarray(tokens, np.int64).reshape(n, 1),
                 self.info.attention_mask: mask}
        self._run(feeds, lora, lora_key, logits, start, start + n)
        self.cache.used[start:start + n] = np.maximum(self.cache.used[start:start + n], totals)
        return np.asarray(logits[:, 0], np.float32)

    def verify(self, tokens: np.ndarray, lengths: np.ndarray, lora: dict[str, np.ndarray], lora_key: Any = None,
               start: int = 0) -> np.ndarray:
        """Several tokens for each of rows ``[start, start + n)`` in one call (speculative decoding):
        ``tokens[i]`` ``[width]`` is row start+i's next input followed by its draft tokens (a row
        with a shorter draft is padded: its padding only follows its real tokens, so causal
        attention keeps it out of their logits), ``lengths[i]`` the row's cached positions.
        Returns logits ``[n, width, vocab]`` (float32): ``[i, j]`` predicts the token after
        ``tokens[i, :j + 1]``. Every input position is written to the cache; the caller keeps only
        the accepted ones (a row's length is what the next step's mask says: rejected positions are
        overwritten later, which rolls them back at no cost)."""
        n, width = tokens.shape
        totals = lengths.astype(np.int64) + width
        self.cache.ensure(int(totals.max()))
        # GroupQueryAttention: past = sum(mask) - width per row, so the new keys land at each row's length
        mask = (np.arange(int(totals.max()), dtype=np.int64)[None, :] < totals[:, None]).astype(np.int64)
        logits = np.empty((n, width, self.info.vocab_size), self.dtype)
        feeds = {self.info.input_ids: np.ascontiguousarray(tokens, np.int64), self.info.attention_mask: mask}
        self._run(feeds, lora, lora_key, logits, start, start + n)
        self.cache.used[start:start + n] = np.maximum(self.cache.used[start:start + n], totals)
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    @property
    def static_cache(self) -> ByteLRU[Any]:
        """The OrtValues of recent steps' LoRA feeds and cache views (``nbytes`` of LoRA arrays held)."""
        return self._static

    def shrink_cache(self, live_rows: int, longest: int) -> bool:
        """Return KV memory after a burst: :meth:`KVCache.shrink` to fit rows ``[0, live_rows)`` of at
        most ``longest`` positions, dropping the OrtValues bound to the old buffers. True if it shrank."""
        if not self.cache.shrink(live_rows, longest):
            return False
        self._static.clear()
        self._static_version = self.cache.version
        return True

    def forget(self, keys: set[Any]) -> None:
        """Drop cached feeds that hold any of the adapter ``keys`` (they were unloaded or replaced).

        A ``lora_key`` is one adapter's key or a tuple of them (a step's adapters)."""
        def holds(lora_key: Any) -> bool:
            return bool(keys & set(lora_key)) if isinstance(lora_key, tuple) else lora_key in keys

        self._static.drop_if(lambda key: isinstance(key, tuple) and holds(key[2]))
        if self.bank is not None:
            for key in keys:
                self.bank.forget(key)

    def _run(self, feeds: dict[str, np.ndarray], lora: dict[str, np.ndarray], lora_key: Any, logits: np.ndarray,
             start: int, end: int) -> None:
        """Run the graph with past and present key/values bound to the SAME cache rows ``[start, end)``
        and the logits written into ``logits``. onnxruntime's IOBinding cannot bind inputs that have
        a default (the LoRA inputs), so this goes through ``run_with_ortvaluevector`` with
        preallocated fetches, as onnxruntime-genai's C++ Run call does. The OrtValues of the cache
        views and of the LoRA feeds are made once per (rows, cache, adapters) and reused."""
        C, ort = self._capi, self._ort
        if self._static_version != self.cache.version:
            self._static.clear()  # they hold views of the old cache buffers
            self._static_version = self.cache.version
        key = (start, end, lora_key)
        static = self._static.get(key)
        if static is None or lora_key is None:
            static = self._static_values(lora, start, end)
            if lora_key is not None:
                self._static.put(key, static, arrays_nbytes(lora.values()))
        names, values, fetch_names, fetches, _keep = static
        feed_names = list(feeds) + names
        vector = C.OrtValueVector()
        vector.reserve(len(feed_names))
        dynamic = [ort.OrtValue.ortvalue_from_numpy(value) for value in feeds.values()]
        for value in dynamic:
            vector.push_back(value._ortvalue)
        for value in values:
            vector.push_back(value)
        out = C.OrtValueVector()
        out.reserve(len(fetch_names) + 1)
        logits_value = ort.OrtValue.ortvalue_from_numpy(logits)
        out.push_back(logits_value._ortvalue)
        for value in fetches:
            out.push_back(value)
        self.runs += 1
        options = self._shrink_options if self.runs % ARENA_SHRINK_EVERY == 0 else self._run_options
        self.session._sess.run_with_ortvaluevector(options, feed_names, vector, [self.info.logits, *fetch_names],
                                                   out, [self._cpu] * (len(fetch_names) + 1))

    def _static_values(self, lora: dict[str, np.ndarray], start: int, end: int) -> tuple[Any, ...]:
        ort = self._ort
        names: list[str] = []
        values: list[Any] = []
        fetch_names: list[str] = []
        fetches: list[Any] = []
        keep: list[Any] = []  # the OrtValues borrow these arrays' memory
        for name, array in lora.items():
            value = ort.OrtValue.ortvalue_from_numpy(array)
            keep.append(value)
            names.append(name)
            values.append(value._ortvalue)
        for layer in range(self.info.num_layers):
            for buffers, past, present in ((self.cache.keys, self.info.past_key, self.info.present_key),
                                           (self.cache.values, self.info.past_value, self.info.present_value)):
                value = ort.OrtValue.ortvalue_from_numpy(buffers[layer][start:end])
                keep.append(value)
                names.append(past % layer)
                values.append(value._ortvalue)
                fetch_names.append(present % layer)
                fetches.append(value._ortvalue)
        return names, values, fetch_names, fetches, keep


def _names_node(model_file: Path, name: bytes, limit: int = 256 << 20) -> bool:
    """Whether the graph file holds a node name containing ``name`` (weights live in the external
    .data file, so model.onnx itself is small; a graph with inline weights over ``limit`` is read
    only up to it)."""
    try:
        with open(model_file, "rb") as f:
            return name in f.read(limit)
    except OSError:
        return False
