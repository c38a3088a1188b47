"""The generation engine: continuous batching, with a different adapter per row.

Three parts, each readable alone:

- the scheduler (this module, :class:`Engine`): admission (a bounded queue; RESOURCE_EXHAUSTED
  beyond it), who joins the next step, cancellation and deadlines, metrics. One thread runs the
  loop: prefill what waits (short prompts together, a long one a chunk at a time), then one
  decode step for every running row, and again;
- the batch state (:class:`Row`): a request's cache row, adapter, sampler, stop strings and text;
- the model runner (:mod:`slmops.runtime.runner`): one step of the graph over the KV cache.

A request's adapter is acquired at admission and released when its row leaves, so a hot swap
never changes the weights of a request already admitted. A cancelled request or an expired
deadline leaves the batch before the next step. Clients use one interface (gRPC and HTTP alike):
``submit(request) -> Generation``, iterate its chunks, ``cancel()``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmops.bundle import BundleError, BundleManifest, read_manifest, verify_files
from slmops.contract import GenaiConfig
from slmops.runtime.memory import ByteLRU, arrays_nbytes
from slmops.runtime.runner import ModelRunner
from slmops.runtime.text import Sampler, TemplateError, TextCodec, TokenStream
from slmops_serve.adapter_memory import MixBuilder
from slmops_serve.config import ServeConfig
from slmops_serve.errors import (
    CANCELLED,
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    ServeError,
)
from slmops_serve.metrics import BASE_LABEL, ServeMetrics
from slmops_serve.registry import AdapterRegistry, LoadedAdapter
from slmops_serve.speculation import CallCosts, RowDrafter, SpecSettings

log = logging.getLogger("slmops.serve")

FINISH_EOS = "eos"
FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_CANCELLED = "cancelled"
GUIDANCE_KINDS = ("json_schema", "json_object", "regex", "lark_grammar")
# JSON with Python's separators (", " and ": ") and no other whitespace: with free whitespace a
# small model can spend every token on newlines inside a valid-so-far object, and with none at all
# the extract adapter (trained on ", "/": ") lost 2 of 50 values (bench_guided_quality.py). A
# schema's "x-guidance" options override this.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class GenerationRequest:
    """A validated request, engine-side. Exactly one of ``prompt`` / ``messages`` is set."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    adapter: str = ""
    max_new_tokens: int = 0  # 0 = the server default
    min_new_tokens: int = 0  # end-of-sequence is suppressed before this many tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    request_id: str = ""
    # Structured output: kind "json_schema" (guidance = the schema as JSON text), "json_object"
    # (any JSON object; guidance ignored), "regex" or "lark_grammar"; "" = unconstrained.
    # A bad schema/regex/grammar raises ServeError INVALID_ARGUMENT naming ``guidance_field``.
    guidance_kind: str = ""
    guidance: str = ""
    guidance_field: str = "response_format"


@dataclass
class Chunk:
    """A piece of output. The last chunk of a generation has ``finish_reason`` and usage set."""

    text: str
    adapter: str
    adapter_sha256: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    decode_tps: float = 0.0


@dataclass
class Result:
    """A whole generation (``Generation.result()``)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    adapter_sha256: str
    queue_ms: float
    ttft_ms: float
    total_ms: float
    decode_tps: float
    request_id: str


_DONE = object()
# Steps that fail one after another (each failing its rows) before the scheduler counts as broken
# and dies loudly: a runner that fails every step must not look like a healthy server.
MAX_FAILED_STEPS = 3
_FAILED = "failed"  # a row whose token selection raised: its error is already sent


class Generation:
    """A submitted request: iterate it for chunks (it blocks), ``cancel()`` it from any thread."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], max_new_tokens: int,
                 adapter: LoadedAdapter | None, cancelled: threading.Event | None = None) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.adapter = adapter
        self.arrived = time.perf_counter()
        # the caller's cancel flag (set by its RPC callback, maybe already during admission) or a new one
        self.cancelled = cancelled if cancelled is not None else threading.Event()
        self.finished = threading.Event()
        self._events: queue.Queue[Any] = queue.Queue()
        self._on_cancel: Callable[[], None] | None = None
        self.matcher: Any = None  # structured output (llguidance), compiled at admission

    @property
    def adapter_name(self) -> str:
        return self.adapter.name if self.adapter else ""

    @property
    def adapter_sha256(self) -> str:
        return self.adapter.sha256 if self.adapter else ""

    def cancel(self) -> None:
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def _put(self, item: Any) -> None:
        self._events.put(item)

    def __iter__(self) -> Iterator[Chunk]:
        pending: Any = None  # an event taken from the queue but not handled yet
        while True:
            item = pending if pending is not None else self._events.get()
            pending = None
            # A slow reader gets the text produced meanwhile in one chunk, not one message per token.
            while isinstance(item, Chunk) and item.finish_reason is None:
                try:
                    following = self._events.get_nowait()
                except queue.Empty:
                    break
                if isinstance(following, Chunk):
                    following.text = item.text + following.text
                    item = following
                else:
                    pending = following
                    break
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self) -> Result:
        """Block until done and join the chunks."""
        parts, last = [], None
        for chunk in self:
            parts.append(chunk.text)
            last = chunk
        if last is None or last.finish_reason is None:
            raise ServeError(INTERNAL, "", "generation ended without a final chunk")
        return Result(text="".join(parts), finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                      completion_tokens=last.completion_tokens, adapter=last.adapter, adapter_sha256=last.adapter_sha256,
                      queue_ms=last.queue_ms, ttft_ms=last.ttft_ms, total_ms=last.total_ms, decode_tps=last.decode_tps,
                      request_id=self.request_id)


def session_threads(model_dir: Path, override: int | None) -> int | None:
    """The intra-op thread count the session will use (None = onnxruntime's default)."""
    if override is not None:
        return override
    value = GenaiConfig.read(model_dir).session_options.get("intra_op_num_threads")
    return int(value) if value is not None else None


class AdapterStore:
    """Loaded adapter tensors by internal name (the registry's backend: ``add(name, tensors)``,
    ``unload(name)``). The engine's LoRA bank concatenates them per step. Its lock guards only the
    dict: the registry reads and checks a file before ``add``, so the scheduler, which takes this
    lock to start a row, never waits for a load."""

    def __init__(self, on_unload: Callable[[str], None] | None = None) -> None:
        self._tensors: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._on_unload = on_unload

    def add(self, name: str, tensors: dict[str, np.ndarray]) -> None:
        """Hold ``tensors`` (already read and checked) as adapter version ``name``."""
        with self._lock:
            if name in self._tensors:
                raise RuntimeError(f"adapter '{name}' is already loaded")
            self._tensors[name] = tensors

    def unload(self, name: str) -> None:
        with self._lock:
            if self._tensors.pop(name, None) is None:
                raise RuntimeError(f"adapter '{name}' is not loaded")
        if self._on_unload is not None:
            self._on_unload(name)

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        with self._lock:
            return self._tensors[name]

    def names(self) -> list[str]:
        """Internal names of the versions held (loaded, or retired and not yet freed)."""
        with self._lock:
            return sorted(self._tensors)


def allowed_only(logits: np.ndarray, matcher: Any, eos_ids: set[int], mask: np.ndarray | None = None) -> np.ndarray:
    """``logits`` with every token the grammar does not allow next set to -inf; ``mask``: the
    matcher's bitmask computed already (int32 words, :meth:`Grammars.masks`), else computed here."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8) if mask is None else mask.view(np.uint8)
    allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[-1]].astype(bool)
    if allowed.shape[0] < logits.shape[-1]:  # tokens past the tokenizer's vocabulary: never allowed
        allowed = np.concatenate([allowed, np.zeros(logits.shape[-1] - allowed.shape[0], bool)])
    if not allowed.any():  # the grammar allows nothing more (or failed): end the output
        allowed[sorted(i for i in eos_ids if 0 <= i < len(allowed))] = True
    return np.where(allowed, logits, -np.inf)


class Grammars:
    """Compiles structured-output requests into llguidance matchers over the bundle's tokenizer."""

    def __init__(self, tokenizer_file: Path, vocab_size: int, eos_ids: set[int]) -> None:
        self.tokenizer_file = tokenizer_file
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._tokenizer: Any = None
        self._executor: Any = None
        self._lock = threading.Lock()

    def matcher(self, request: GenerationRequest) -> Any:
        """An LLMatcher for ``request`` (None when unconstrained); INVALID_ARGUMENT for a bad constraint."""
        kind = request.guidance_kind
        if not kind:
            return None
        import llguidance

        field_name = request.guidance_field or "guidance"
        if kind not in GUIDANCE_KINDS:
            raise ServeError(INVALID_ARGUMENT, field_name, f"'{kind}' is not a structured-output kind; use one of "
                             f"{', '.join(GUIDANCE_KINDS)}")
        try:
            if kind == "json_schema":
                schema = json.loads(request.guidance)
                if not isinstance(schema, dict):
                    raise ValueError("a JSON schema must be a JSON object")
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            elif kind == "json_object":
                grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            elif kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(request.guidance)
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(request.guidance)
        except ValueError as exc:
            raise ServeError(INVALID_ARGUMENT, field_name, f"is not a valid {kind.replace('_', ' ')}: {exc}") from exc
        tokenizer = self._llg_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise ServeError(INVALID_ARGUMENT, field_name, f"is not a valid {kind.replace('_', ' ')}: {error[:300]}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ServeError(INVALID_ARGUMENT, field_name, f"is not a valid {kind.replace('_', ' ')}: "
                             f"{matcher.get_error()[:300]}")
        return matcher

    def masks(self, items: list[tuple[Any, list[int]]], vocab: int) -> list[np.ndarray]:
        """The next-token bitmasks of several matchers in ONE llguidance call (its thread pool):
        for each ``(matcher, draft)`` an int32 array ``[1 + len(draft), words]`` whose row i is the
        mask after the matcher consumed ``draft[:i]`` (the matcher's state is left as it was; rows
        past a draft token the grammar refuses are left all-allowed and never used)."""
        import llguidance.numpy as llg_numpy

        with self._lock:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            executor = self._executor
        words = (vocab + 31) // 32
        offsets, total = [], 0
        for _, draft in items:
            offsets.append(total)
            total += 1 + len(draft)
        bitmask = np.full((total, words), -1, np.int32)
        if any(draft for _, draft in items):
            llg_numpy.fill_next_token_bitmask_par_with_draft_tokens(
                executor, [(m, offset, list(draft)) for (m, draft), offset in zip(items, offsets, strict=True)], bitmask)
        else:
            llg_numpy.fill_next_token_bitmask_par(executor, [(m, offset) for (m, _), offset in zip(items, offsets, strict=True)],
                                                  bitmask)
        return [bitmask[offset:offset + 1 + len(draft)] for (_, draft), offset in zip(items, offsets, strict=True)]

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                # built once (about a second): llguidance reads the same tokenizer.json
                try:
                    eos: Any = self.eos_ids  # newer llguidance takes all of them
                    self._tokenizer = llguidance.LLTokenizer(str(self.tokenizer_file), n_vocab=self.vocab_size,
                                                             eos_token=eos)
                except TypeError:  # llguidance < 1.7 takes one end-of-sequence id
                    self._tokenizer = llguidance.LLTokenizer(str(self.tokenizer_file), n_vocab=self.vocab_size,
                                                             eos_token=self.eos_ids[0] if self.eos_ids else None)
            return self._tokenizer


class Row:
    """One request in the batch: its cache row (its index in the engine's row list), where its
    prefill is, its sampler, its text and stop-string state."""

    def __init__(self, gen: Generation, lora: tuple[str, dict[str, np.ndarray]] | None, stream: TokenStream,
                 eos_ids: set[int], matcher: Any = None, spec: SpecSettings | None = None) -> None:
        request = gen.request
        self.gen = gen
        self.matcher = matcher  # llguidance LLMatcher of a structured-output request
        self.lora = lora
        self.ids = np.asarray(gen.prompt_ids, np.int64)
        # prompt + output tokens, what prompt-lookup drafts are looked up in (speculation on only)
        self.drafter = RowDrafter(spec) if spec is not None and spec.enabled else None
        self.history = np.empty(0, np.int64)
        self.history_length = 0
        if self.drafter is not None:
            self.history = np.empty(len(self.ids) + gen.max_new_tokens + 1, np.int64)
            self.history[:len(self.ids)] = self.ids
            self.history_length = len(self.ids)
        self.prefilled = 0  # prompt tokens in the cache
        self.length = 0  # cache positions of this row
        self.next_token = -1  # sampled, emitted, not yet fed to the graph
        self.produced = 0
        self.sampler = Sampler(request.temperature, request.top_p, request.top_k,
                               None if request.seed is None else int(request.seed))
        self.stream = stream
        self.eos_ids = eos_ids
        self.stops = [s for s in request.stop if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1  # text that may still become a stop string
        self.text = ""
        self.emitted = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.finish: str | None = None

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == len(self.ids)

    def take(self, logits: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Sample the next token from ``logits`` and advance the text; sets ``finish`` when done.
        ``mask``: the grammar's bitmask for this token when computed already (for the batch)."""
        suppress_eos = self.produced < self.gen.request.min_new_tokens
        if suppress_eos:
            logits = logits.copy()
            logits[list(self.eos_ids)] = -np.inf
        if self.matcher is not None:
            logits = allowed_only(logits, self.matcher, self.eos_ids, mask)
            if suppress_eos and not np.isfinite(logits).any():
                # the grammar allows only end-of-sequence here, which min_new_tokens forbids: say so
                # instead of sampling from nothing (that emitted token 0)
                raise ServeError(INVALID_ARGUMENT, "min_new_tokens", f"{self.gen.request.min_new_tokens} cannot be met: "
                                 f"the structured-output constraint allows only end-of-sequence after {self.produced} "
                                 "tokens; lower min_new_tokens or loosen the constraint")
        token = self.sampler(logits)
        if self.matcher is not None:
            self.matcher.consume_token(token)
        self.produced += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos_ids:
            self.finish = FINISH_EOS
            return
        before = len(self.text)
        self.text += self.stream.decode(token)
        if self.stops:
            hits = [i for s in self.stops if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish = FINISH_STOP
                return
        self.next_token = token
        if self.drafter is not None and self.history_length < len(self.history):
            self.history[self.history_length] = token
            self.history_length += 1
        safe = len(self.text) - self.holdback
        if safe > self.emitted:
            self.gen._put(Chunk(text=self.text[self.emitted:safe], adapter=self.gen.adapter_name,
                                adapter_sha256=self.gen.adapter_sha256))
            self.emitted = safe
        if self.produced >= self.gen.max_new_tokens:
            self.finish = FINISH_LENGTH


    def draft(self, room: int, corpus: Any = ()) -> tuple[list[int], int]:
        """This step's draft tokens after ``next_token`` (at most ``room``) and how many of them come
        from the grammar (forced: jump-forward); the rest are prompt-lookup guesses (from the row's
        prompt and output, else from ``corpus``: recent outputs of the same adapter)."""
        if self.drafter is None or room <= 0:
            return [], 0
        forced: list[int] = []
        if self.matcher is not None:
            forced = [t for t in self.matcher.compute_ff_tokens()[:room] if t not in self.eos_ids]
        history, length = self.history, self.history_length
        if forced:
            history = np.concatenate([history[:length], np.asarray(forced, np.int64)])
            length = len(history)
        guess = self.drafter.propose(history, length, room - len(forced), corpus)
        return forced + [int(t) for t in guess], len(forced)


class Engine:
    """Loads a bundle and runs generations in continuous batches.

    Args:
        config (ServeConfig): the server options (bundle dir, max batch, queue, limits, threads ...).
        metrics (ServeMetrics | None): where to report; a private one when None.
    """

    def __init__(self, config: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ServeMetrics()
        self.bundle_dir = config.bundle_path
        self.manifest: BundleManifest | None = None
        self.runner: ModelRunner | None = None
        self.tokenizer: TextCodec | None = None
        self.grammars: Grammars | None = None
        self.registry: AdapterRegistry | None = None
        self.store: AdapterStore | None = None
        self.threads: int | None = None
        self.context_length = 0
        self.eos_ids: set[int] = set()
        self.load_seconds = 0.0
        self._lock = threading.Condition()
        self._tokenizer_lock = threading.Lock()
        self._metrics_lock = threading.Lock()
        self._admitted = 0
        self._accepting = False
        self._draining = False  # set once by drain/close: a load that finishes later must not reopen
        self._stopping = False
        self._waiting: collections.deque[Generation] = collections.deque()
        self._rows: list[Row] = []  # cache order: decoding rows first, then rows still in prefill
        self._live: set[Generation] = set()
        # Called in the scheduler before every decode step, once per row about to step (tests hold
        # requests in flight with it; a blocking hook holds the whole batch).
        self.token_hook: Callable[[Generation, int], None] | None = None
        # Fault injection, for tests: called by the scheduler with "step" at the start of each step,
        # "join" when a request was taken from the queue but is not a batch row yet, and "handler" in
        # the step-error handler. What it raises is what a real fault at that point would raise.
        self.fault_hook: Callable[[str], None] | None = None
        # Called once, from the scheduler thread, after it died and failed every request (the server
        # turns health NOT_SERVING).
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._failure: BaseException | None = None  # why the scheduler died; None while it runs
        self._step_started: float | None = None  # monotonic start of the step running now (the watchdog's)
        self._watchdog: threading.Thread | None = None
        self._popped: Generation | None = None  # taken from the queue, not yet a row
        self._thread: threading.Thread | None = None
        # a batch's rows' adapter versions -> their LoRA feeds (masks included), bounded in bytes
        self._feeds_cache: ByteLRU[dict[str, np.ndarray]] = ByteLRU(config.feeds_cache_bytes)
        self._mixes: MixBuilder | None = None  # builds a new mix's concatenation off this thread
        self._forgotten: set[str] = set()  # unloaded adapter versions whose cached feeds must go
        self.spec = SpecSettings(mode=config.speculation, max_draft=config.max_draft)
        self._costs = CallCosts()  # measured graph-call seconds by shape: what a draft costs here, now
        # adapter version ("" = base) -> its recent outputs (drafts for rows whose own text has no
        # match) and its rows' last acceptance rate (a new row's prior); bounded
        self._corpus: collections.OrderedDict[str, tuple[collections.deque[np.ndarray], float]] = collections.OrderedDict()

    # ---- lifecycle ----------------------------------------------------------------------------
    def load(self) -> None:
        """Read and check the bundle, load the model and the bundle's adapters, warm up; then accept requests."""
        started = time.perf_counter()
        manifest = read_manifest(self.bundle_dir)
        if self.config.verify_bundle:
            problems = verify_files(self.bundle_dir, manifest)
            if problems:
                raise BundleError(f"{self.bundle_dir}: files do not match bundle.json: {'; '.join(problems[:5])}; "
                                  "rebuild or re-copy the bundle (or pass --no-verify-bundle)")
        self.manifest = manifest
        model_dir = self.bundle_dir / manifest.model_dir
        try:
            self.runner = ModelRunner(model_dir, manifest.lora_template, rows=self.config.max_batch,
                                      threads=self.config.threads, max_length=self.config.max_context,
                                      execution_provider=manifest.target.execution_provider,
                                      feeds_cache_bytes=self.config.feeds_cache_bytes)
        except ValueError as exc:
            raise BundleError(f"{self.bundle_dir}: {exc}") from exc
        self.threads = self.runner.threads
        self.context_length = self.runner.max_length
        self.tokenizer = TextCodec(model_dir)
        self.eos_ids = set(self.runner.info.eos_ids)
        self.grammars = Grammars(model_dir / "tokenizer.json", self.runner.info.vocab_size, self.eos_ids)
        self.store = AdapterStore(on_unload=self._forget)
        self.registry = AdapterRegistry(self.store, manifest.lora_template, self.config.adapter_path,
                                        self.config.upload_limit(), on_change=self._adapters_changed,
                                        on_unload_failed=self._adapter_unload_failed,
                                        memory_budget=self.config.adapter_tensor_bytes, pinned=self.config.pin,
                                        lazy=self.config.lazy_adapters, on_evict=self._adapter_evicted,
                                        on_lazy_load=self._adapter_lazy_loaded)
        self.metrics.adapter_memory_budget.set(self.config.adapter_memory_bytes or 0)
        self.metrics.spec_max_draft.set(self.spec.max_draft if self.spec.enabled else 0)
        if self.runner.bank is not None:
            self._mixes = MixBuilder(self.runner.bank, on_ready=self._wake)
            self.runner.bank.cache.add_evict_listener(self._mix_evicted)
        for name, info in sorted(manifest.adapters.items()):
            self.registry.load(name, path=self.bundle_dir / info.file, sha256=info.sha256, source="bundle", trusted_path=True)
        self._load_pinned()
        cores = os.cpu_count() or 1
        if self.threads and self.threads > cores:
            log.warning("threads exceed the CPU cores: steps will be slower, not faster",
                        extra={"fields": {"event": "oversubscribed", "threads": self.threads, "cores": cores}})
        self._thread = threading.Thread(target=self._loop, name="slmops-scheduler", daemon=True)
        self._thread.start()
        if self.config.step_timeout > 0:
            self._watchdog = threading.Thread(target=self._watch_steps, name="slmops-watchdog", daemon=True)
            self._watchdog.start()
        self.warmup()
        self.load_seconds = time.perf_counter() - started
        with self._lock:
            if self._draining:
                return
            self._accepting = True
        self.metrics.ready.set(1)
        log.info("model ready", extra={"fields": {
            "event": "ready", "bundle": str(self.bundle_dir), "target": manifest.target.name,
            "precision": manifest.target.precision, "threads": self.threads or "onnxruntime default",
            "max_batch": self.config.max_batch, "max_queue": self.config.max_queue,
            "max_context": self.context_length, "adapters": self.registry.names(),
            "load_s": round(self.load_seconds, 2)}})

    def warmup(self) -> None:
        """Short greedy generations (alone, then a batch of two), so the first requests do not pay
        onnxruntime's first-run costs."""
        if self.config.warmup_tokens <= 0:
            return
        gens = [self._admit(GenerationRequest(prompt="Hello", max_new_tokens=self.config.warmup_tokens,
                                              request_id="warmup"), force=True)]
        gens[0].result()
        if self.config.max_batch > 1:
            gens = [self._admit(GenerationRequest(prompt=p, max_new_tokens=self.config.warmup_tokens, request_id="warmup"),
                                force=True) for p in ("Hello", "Hi there")]
            for gen in gens:
                gen.result()

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._accepting and self._failure is None

    @property
    def failure(self) -> BaseException | None:
        """Why the scheduler thread died (the engine then refuses everything); None while it runs."""
        with self._lock:
            return self._failure

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False
            self._draining = True
        self.metrics.ready.set(0)

    def drain(self, timeout: float) -> bool:
        """Stop admitting, wait up to ``timeout`` s for admitted requests; cancel what is left. True if drained."""
        self.stop_accepting()
        with self._lock:
            # a dead scheduler has failed every request already: nothing to wait for
            drained = self._lock.wait_for(lambda: self._admitted == 0 or self._failure is not None, timeout=timeout)
            drained = drained and self._failure is None
            left = list(self._live)
        if not drained:
            for gen in left:
                gen.cancel()
            with self._lock:
                self._lock.wait_for(lambda: self._admitted == 0, timeout=5.0)
        return drained

    def close(self) -> None:
        self.stop_accepting()
        with self._lock:
            for gen in self._live:
                gen.cancelled.set()
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.registry is not None:
            self.registry.close()
        if self._mixes is not None:
            self._mixes.close()

    @property
    def admitted(self) -> int:
        with self._lock:
            return self._admitted

    @property
    def running(self) -> int:
        """Requests in the batch (decoding or in prefill)."""
        with self._lock:
            return len(self._rows)

    # ---- requests -----------------------------------------------------------------------------
    def render_prompt(self, request: GenerationRequest) -> str:
        if request.messages is None:
            return request.prompt or ""
        assert self.tokenizer is not None
        try:
            return self.tokenizer.render_chat(request.messages)
        except TemplateError as exc:
            raise ServeError(FAILED_PRECONDITION, "messages", f"the bundle's chat template cannot render them ({exc}); "
                             "send a plain prompt instead") from exc

    def submit(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Generation:
        """Admit ``request`` or raise ServeError (UNAVAILABLE not ready, RESOURCE_EXHAUSTED full,
        NOT_FOUND unknown adapter, INVALID_ARGUMENT prompt too long, CANCELLED when ``cancel`` was set
        before the admission work was done). ``cancel`` becomes the generation's cancel flag: a caller
        registers it before submitting, so a client that leaves during tokenizing or grammar
        compilation stops costing work."""
        return self._admit(request, force=False, cancel=cancel)

    def generate(self, request: GenerationRequest) -> Result:
        return self.submit(request).result()

    def _refuse_if_dead(self) -> None:
        failure = self._failure
        if failure is not None:
            raise ServeError(UNAVAILABLE, "", f"the server's scheduler died ({type(failure).__name__}); the server is "
                             "unhealthy and about to be restarted; retry on another server or later")

    def _check_cancel(self, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise ServeError(CANCELLED, "", "the client cancelled the request before it was admitted")

    def _admit(self, request: GenerationRequest, force: bool, cancel: threading.Event | None = None) -> Generation:
        self._refuse_if_dead()
        if not force and not self.ready:
            raise ServeError(UNAVAILABLE, "", "the server is not ready (loading the model or shutting down); retry later")
        self._check_cancel(cancel)
        assert self.tokenizer is not None
        if not request.request_id:
            request.request_id = uuid.uuid4().hex[:16]
        max_new = request.max_new_tokens or self.config.default_max_new_tokens
        with self._tokenizer_lock:
            text = self.render_prompt(request)
            ids = self.tokenizer.encode(text)
        if len(ids) == 0:
            raise ServeError(INVALID_ARGUMENT, "prompt", "encodes to zero tokens; send some text")
        assert self.grammars is not None
        self._check_cancel(cancel)  # the client left while the prompt was tokenized: skip the grammar
        matcher = self.grammars.matcher(request)  # compiled here, in the caller's thread, not the scheduler's
        self._check_cancel(cancel)
        if len(ids) >= self.context_length:
            field_name = "messages" if request.messages is not None else "prompt"
            raise ServeError(INVALID_ARGUMENT, field_name, f"is {len(ids)} tokens; the server's context length is "
                             f"{self.context_length}, leaving no room to generate")
        with self._lock:
            self._refuse_if_dead()
            if not self._accepting and not force:
                raise ServeError(UNAVAILABLE, "", "the server is not ready (loading the model or shutting down); retry later")
            if self._admitted >= self.config.capacity and not force:
                raise ServeError(RESOURCE_EXHAUSTED, "", f"the request queue is full ({self.config.max_batch} in the batch, "
                                 f"{self.config.max_queue} waiting); retry later")
            self._admitted += 1
        adapter = None
        try:
            if request.adapter:
                assert self.registry is not None
                adapter = self.registry.acquire(request.adapter)
            gen = Generation(request, ids, max_new, adapter, cancelled=cancel)
            gen.matcher = matcher
            gen._on_cancel = self._wake
            with self._lock:
                self._refuse_if_dead()  # the scheduler died meanwhile: nobody would serve this request
                self._live.add(gen)
                self._waiting.append(gen)
                self._update_queue_gauge()
                self._lock.notify_all()
        except BaseException:
            if adapter is not None and self.registry is not None:
                self.registry.release(adapter)
            with self._lock:
                self._admitted -= 1
                self._update_queue_gauge()
                self._lock.notify_all()
            raise
        if not force:
            self.metrics.adapter_requests.labels(request.adapter or BASE_LABEL).inc()
        return gen

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _update_queue_gauge(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))

    # ---- the scheduler ------------------------------------------------------------------------
    def _loop(self) -> None:
        """The scheduler thread. A failed step fails its rows (INTERNAL) and the server goes on; if the
        handling itself fails, or MAX_FAILED_STEPS steps in a row fail, or anything else escapes, the
        thread dies through :meth:`_die`: every request fails and ``on_fatal`` turns health NOT_SERVING."""
        try:
            self._steps()
        except BaseException as exc:  # noqa: BLE001 - any death is made loud, never silent
            self._die(exc)

    def _steps(self) -> None:
        failed_in_a_row = 0
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self._waiting or self._rows or self._failure is not None)
                if self._failure is not None:  # the watchdog declared this thread dead while a step hung
                    return
                if self._stopping and not self._rows and not self._waiting:
                    return
            self._step_started = time.monotonic()
            try:
                if self.fault_hook is not None:
                    self.fault_hook("step")
                self._purge_unloaded()
                self._drop_cancelled()
                self._join_waiting()
                if self._rows and not self._rows[-1].prefill_done:
                    self._prefill()
                if self._rows and self._rows[0].prefill_done:
                    self._decode()
                failed_in_a_row = 0
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, the server goes on
                failed_in_a_row += 1
                log.exception("step failed", extra={"fields": {"event": "step_error", "in_a_row": failed_in_a_row}})
                if self.fault_hook is not None:
                    self.fault_hook("handler")
                error = ServeError(INTERNAL, "", f"generation failed: {type(exc).__name__}: {exc}")
                for index in reversed(range(len(self._rows))):
                    self._rows[index].gen._put(error)
                    self._remove(index, None)
                popped, self._popped = self._popped, None
                if popped is not None:
                    popped._put(error)
                    self._release(popped, started=False)
                if failed_in_a_row >= MAX_FAILED_STEPS:
                    raise RuntimeError(f"{failed_in_a_row} steps in a row failed, the last with "
                                       f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._step_started = None

    def _watch_steps(self) -> None:
        """A step that runs past --step-timeout (a hung onnxruntime call, a deadlock) is a death of the
        scheduler, made loud like any other: without this a hung step holds every client while health
        says SERVING. The hung thread, if it ever returns, finds the engine dead and ends."""
        timeout = self.config.step_timeout
        while self._failure is None and not self._stopping:
            started = self._step_started
            if started is not None and time.monotonic() - started > timeout:
                self._die(TimeoutError(f"a scheduler step has run for more than {timeout:g}s (--step-timeout)"))
                return
            time.sleep(min(1.0, timeout / 4))

    def _die(self, exc: BaseException) -> None:
        """The scheduler thread is dying: refuse everything from now on, fail every admitted request
        (waiting, taken from the queue, running) with UNAVAILABLE so no client blocks, then tell the
        server (``on_fatal``). Runs in the dying thread (or the watchdog); the first call wins; never raises."""
        with self._lock:
            if self._failure is not None:  # the watchdog and the hung thread: the first one says it
                return
            self._failure = exc
            self._accepting = False
            self._draining = True
            gens = list(self._live)
            rows = len(self._rows)
            self._live.clear()
            self._waiting.clear()
            self._rows.clear()
            self._popped = None
            self._admitted = 0
            self._lock.notify_all()
        log.critical("the scheduler died", exc_info=exc, extra={"fields": {"event": "scheduler_died"}})
        error = ServeError(UNAVAILABLE, "", f"the server's scheduler died ({type(exc).__name__}: {exc}); the server is "
                           "unhealthy and about to be restarted; retry on another server or later")
        for gen in gens:
            try:
                gen._put(error)
                if gen.adapter is not None and self.registry is not None:
                    self.registry.release(gen.adapter)
            except Exception:  # noqa: BLE001 - the next request must still be failed
                log.exception("failing a request after the scheduler died", extra={"fields": {"event": "die_error"}})
            finally:
                gen.finished.set()
                gen._put(_DONE)
        try:
            self.metrics.ready.set(0)
            self.metrics.queue_depth.set(0)
            self.metrics.active.dec(rows)
        except Exception:  # noqa: BLE001
            pass
        if self.on_fatal is not None:
            try:
                self.on_fatal(exc)
            except Exception:  # noqa: BLE001
                log.exception("on_fatal failed", extra={"fields": {"event": "die_error"}})

    def _join_waiting(self) -> None:
        """Move waiting requests into free rows (first come, first served)."""
        assert self.runner is not None and self.tokenizer is not None and self.store is not None
        while len(self._rows) < self.config.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                gen = self._waiting.popleft()
                self._popped = gen  # in neither list now: a failing step must still answer it
                self._update_queue_gauge()
            if self.fault_hook is not None:
                self.fault_hook("join")
            if gen.cancelled.is_set():
                self._popped = None
                self._finish_unstarted(gen)
                continue
            lora = (gen.adapter.internal, self.store.tensors(gen.adapter.internal)) if gen.adapter is not None else None
            row = Row(gen, lora, self.tokenizer.stream(), self.eos_ids, gen.matcher, self.spec)
            if row.drafter is not None and self._adapter_key(row) in self._corpus:
                row.drafter.rate = self._corpus[self._adapter_key(row)][1]
            self.metrics.queue_seconds.observe(row.started - gen.arrived)
            with self._lock:
                self._rows.append(row)
                self._popped = None
            self.metrics.active.inc()

    def _prefill(self) -> None:
        """Prefill the rows that wait for it: prompts that fit one chunk together in one call
        (right-padded; their first token comes from each row's last prompt position), else one
        chunk of the first long prompt, so running rows wait at most one chunk."""
        assert self.runner is not None
        start = next(i for i, r in enumerate(self._rows) if not r.prefill_done)
        pending = self._rows[start:]
        chunk = self.config.prefill_chunk
        first = pending[0]
        if first.prefilled > 0 or len(first.ids) > chunk:
            ids = first.ids[first.prefilled:first.prefilled + self._prefill_slice(start)]
            feeds, key = self._lora_feeds([first])
            if feeds is None:  # its adapter's feeds are being built: it waits, the decoding rows go on
                self._idle_unless(start > 0)
                return
            started = time.perf_counter()
            logits = self.runner.prefill(start, ids, first.prefilled, feeds, key)
            self._costs.observe_prefill(len(ids), time.perf_counter() - started)
            first.prefilled += len(ids)
            first.length = first.prefilled
            if first.prefill_done:
                self._first_token(start, logits)
            return
        group = [first]
        for row in pending[1:]:
            longest = max(len(r.ids) for r in (*group, row))
            if row.prefilled > 0 or longest * (len(group) + 1) > max(chunk, longest) or not self._feeds_ready([*group, row]):
                break
            group.append(row)
        feeds, key = self._lora_feeds(group)
        if feeds is None:  # the first row's adapter feeds are being built: it waits
            self._idle_unless(start > 0)
            return
        width = max(len(r.ids) for r in group)
        ids = np.zeros((len(group), width), np.int64)
        for i, row in enumerate(group):
            ids[i, :len(row.ids)] = row.ids
        lengths = np.array([len(r.ids) for r in group], np.int64)
        logits = self.runner.prefill_rows(start, ids, lengths, feeds, key)
        for row in group:
            row.prefilled = row.length = len(row.ids)
        for i in reversed(range(len(group))):
            self._first_token(start + i, logits[i])

    def _prefill_slice(self, decoding: int) -> int:
        """Tokens of a long prompt to prefill in this step. Alone: ``--prefill-chunk``. While
        ``decoding`` rows decode: what takes about two of their decode steps (measured), at least
        16, so a long prompt arriving does not pause running streams for more than ~3x their usual
        gap between tokens (a token budget per step, as vLLM's chunked prefill; the prompt's own
        first token comes later, in more, smaller calls)."""
        chunk = self.config.prefill_chunk
        if decoding == 0 or getattr(self.runner, "length_switched_rope", False):
            return chunk  # LongRoPE: slices smaller than the chunk would change the answer (runner.py)
        budget = self._costs.prefill_budget(decoding, 2.0)
        return chunk if budget is None else max(16, min(chunk, budget))

    def _first_token(self, index: int, logits: np.ndarray) -> None:
        row = self._rows[index]
        self._take(row, logits)
        if row.finish is not None:
            self._remove(index, None if row.finish == _FAILED else row.finish)

    def _take(self, row: Row, logits: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Advance ``row`` by its next token; a failure (sampler, grammar) ends that row only."""
        try:
            row.take(logits, mask)
        except ServeError as error:  # the request cannot be served as asked (e.g. grammar vs min_new_tokens)
            row.gen._put(error)
            row.finish = _FAILED
            return
        except Exception as exc:  # noqa: BLE001 - reported to this request as INTERNAL
            log.exception("token selection failed", extra={"fields": {"event": "row_error", "request_id": row.gen.request_id}})
            row.gen._put(ServeError(INTERNAL, "", f"generation failed: {type(exc).__name__}: {exc}"))
            row.finish = _FAILED
            return
        if row.finish is None and row.length >= self.context_length:
            row.finish = FINISH_LENGTH

    def _decode(self) -> None:
        """One token for every row whose prefill is done."""
        assert self.runner is not None
        count = next((i for i, r in enumerate(self._rows) if not r.prefill_done), len(self._rows))
        rows = self._rows[:count]
        if self.token_hook is not None:
            for row in rows:
                self.token_hook(row.gen, row.produced)
            self._drop_cancelled()
            count = next((i for i, r in enumerate(self._rows) if not r.prefill_done), len(self._rows))
            rows = self._rows[:count]
            if not rows:
                return
        lengths = np.array([r.length for r in rows], np.int64)
        # a lone row verifies its draft in its decode call; in a batch every row decodes one token
        # together and then the rows whose draft is likely to pay verify it, one call each
        drafts = [self._worth(rows[0], self._drafts(rows)[0], 1)] if len(rows) == 1 else [([], 0)]
        width = 1 + len(drafts[0][0])
        tokens = np.zeros((len(rows), width), np.int64)
        tokens[:, 0] = [r.next_token for r in rows]
        tokens[0, 1:] = drafts[0][0]
        feeds, key = self._lora_feeds(rows)
        if feeds is not None:
            logits = self._step(tokens, lengths, feeds, key, 0)
        else:  # the mix is being built: the rows whose adapters are at hand step, in contiguous groups
            rows, logits = self._decode_split(rows, tokens, lengths)
        self.metrics.batch_size.observe(len(rows))
        masks = self._masks(rows, drafts if width > 1 else [([], 0)] * len(rows))
        for row, row_logits in zip(rows, logits, strict=True):
            mask = masks.get(id(row))
            row.length += 1
            self._take(row, row_logits[0], None if mask is None else mask[0])
            if width > 1:
                self._accept(row, drafts[0], row_logits[1:], None if mask is None else mask[1:])
        if len(rows) > 1 and self.spec.enabled:
            self._verify_drafts(rows)
        for index in reversed(range(count)):
            row = self._rows[index]
            if row.finish is not None:
                self._remove(index, None if row.finish == _FAILED else row.finish)
        self._release_memory()

    def _masks(self, rows: list[Row], drafts: list[tuple[list[int], int]]) -> dict[int, np.ndarray]:
        """Grammar bitmasks of the structured-output rows among ``rows`` for their next token and
        after each of their draft tokens, all in one llguidance call (by ``id(row)``)."""
        assert self.grammars is not None and self.runner is not None
        guided = [(row, draft) for row, (draft, _) in zip(rows, drafts, strict=True)
                  if row.matcher is not None and row.finish is None]
        if not guided:
            return {}
        try:
            masks = self.grammars.masks([(row.matcher, draft) for row, draft in guided], self.runner.info.vocab_size)
        except Exception:  # noqa: BLE001 - each row computes its own mask instead
            log.exception("batch grammar masks failed", extra={"fields": {"event": "mask_error"}})
            return {}
        return {id(row): mask for (row, _), mask in zip(guided, masks, strict=True)}

    def _accept(self, row: Row, draft: tuple[list[int], int], logits: np.ndarray, masks: np.ndarray | None = None) -> None:
        """After ``row`` took the token of its first position: take the drafts' logits while the
        token taken equals the draft (``logits[j]`` follows draft token j, ``masks[j]`` is its
        grammar mask when computed already)."""
        tokens, forced = draft
        accepted = 0
        for position, token in enumerate(tokens):
            if row.finish is not None or row.next_token != token:
                break
            row.length += 1
            self._take(row, logits[position], None if masks is None else masks[position])
            accepted += 1
        self._count_speculation(row, tokens, forced, accepted)

    def _verify_drafts(self, rows: list[Row]) -> None:
        """In a batch of several rows: rows whose draft is expected to give at least as many tokens
        as a batch step gives the whole batch verify ``[next token, draft]`` in a call of their own
        (onnxruntime's CPU GroupQueryAttention takes several tokens over a cached past only for one
        row per call), with their own adapter."""
        assert self.runner is not None
        candidates = [r for r in rows if r.finish is None and r.drafter is not None]
        if not candidates:
            return
        for row in candidates:
            draft = self._worth(row, self._drafts([row])[0], len(rows))
            if not draft[0]:
                continue
            index = self._rows.index(row)
            feeds, key = self._lora_feeds([row], build=False)
            if feeds is None:
                continue
            tokens = np.asarray([[row.next_token, *draft[0]]], np.int64)
            logits = self._step(tokens, np.asarray([row.length], np.int64), feeds, key, index)[0]
            mask = self._masks([row], [draft]).get(id(row))
            row.length += 1
            self._take(row, logits[0], None if mask is None else mask[0])
            self._accept(row, draft, logits[1:], None if mask is None else mask[1:])

    def _worth(self, row: Row, draft: tuple[list[int], int], batch: int) -> tuple[list[int], int]:
        """The part of ``row``'s draft worth verifying in a call of its own, by the measured cost of
        calls here (:class:`CallCosts`) and the row's acceptance rate; empty when none pays against
        a plain step of ``batch`` rows."""
        tokens, forced = draft
        if not tokens or row.drafter is None:
            return [], 0
        k = self._costs.best_length(forced, len(tokens) - forced, row.drafter.rate, batch)
        if k == 0:
            row.drafter.skipped()
        return tokens[:k], min(forced, k)

    def _drafts(self, rows: list[Row]) -> list[tuple[list[int], int]]:
        """Each row's draft tokens for this step and how many of them the grammar forced: at most
        ``--max-draft``, no more than its output or the context has room for."""
        drafts: list[tuple[list[int], int]] = []
        for row in rows:
            room = min(self.spec.max_draft, row.gen.max_new_tokens - row.produced - 1,
                       self.context_length - row.length - 1)
            corpus = self._corpus.get(self._adapter_key(row))
            try:
                drafts.append(row.draft(room, corpus[0] if corpus else ()) if row.finish is None else ([], 0))
            except Exception:  # noqa: BLE001 - a draft is only a guess: the row steps without one
                log.exception("drafting failed", extra={"fields": {"event": "draft_error", "request_id": row.gen.request_id}})
                drafts.append(([], 0))
        return drafts

    def _count_speculation(self, row: Row, draft: list[int], forced: int, accepted: int) -> None:
        """Metrics and the row's adaptivity after a step that verified ``draft`` (``forced`` of its
        tokens from the grammar) of which ``accepted`` were taken."""
        if row.drafter is not None:
            row.drafter.update(len(draft) - forced, max(0, accepted - forced))
        m = self.metrics
        m.spec_row_steps.inc()
        m.spec_emitted_tokens.inc(accepted + 1)
        if draft:
            m.spec_drafted_tokens.labels("grammar").inc(forced)
            m.spec_drafted_tokens.labels("ngram").inc(len(draft) - forced)
            m.spec_accepted_tokens.labels("grammar").inc(min(forced, accepted))
            m.spec_accepted_tokens.labels("ngram").inc(max(0, accepted - forced))

    def _step(self, tokens: np.ndarray, lengths: np.ndarray, feeds: dict[str, np.ndarray], key: Any,
              start: int) -> np.ndarray:
        """Logits ``[n, width, vocab]`` of rows ``[start, start + n)`` fed ``tokens`` ``[n, width]``:
        one token each (a plain decode step) or their drafts too (one verifying call)."""
        assert self.runner is not None
        started = time.perf_counter()
        if tokens.shape[1] == 1:
            logits = self.runner.decode(tokens[:, 0], lengths, feeds, key, start=start)[:, None]
        else:
            self.metrics.spec_steps.inc()
            logits = self.runner.verify(tokens, lengths, feeds, key, start=start)
        self._costs.observe(tokens.shape[0], tokens.shape[1], time.perf_counter() - started)
        return logits

    @staticmethod
    def _adapter_key(row: Row) -> str:
        return row.lora[0] if row.lora is not None else ""

    def _remember(self, row: Row) -> None:
        """A finished row's output and acceptance rate become its adapter's drafting corpus and prior."""
        if row.drafter is None or row.history_length <= len(row.ids):
            return
        key = self._adapter_key(row)
        outputs = self._corpus[key][0] if key in self._corpus else collections.deque(maxlen=4)
        outputs.appendleft(row.history[len(row.ids):row.history_length].copy())
        self._corpus[key] = (outputs, row.drafter.rate)
        self._corpus.move_to_end(key)
        while len(self._corpus) > 64:
            self._corpus.popitem(last=False)

    def _decode_split(self, rows: list[Row], tokens: np.ndarray, lengths: np.ndarray) -> tuple[list[Row], np.ndarray]:
        """Decode ``rows`` as contiguous groups whose LoRA feeds need no new concatenation; a row whose
        own adapter's feeds are not ready skips this step. Returns the rows that stepped and their logits."""
        assert self.runner is not None
        stepped: list[Row] = []
        parts: list[np.ndarray] = []
        start = 0
        while start < len(rows):
            end = start + 1
            if not self._feeds_ready(rows[start:end]):
                start = end
                continue
            while end < len(rows) and self._feeds_ready(rows[start:end + 1]):
                end += 1
            feeds, key = self._lora_feeds(rows[start:end], build=False)
            if feeds is not None:
                parts.append(self._step(tokens[start:end], lengths[start:end], feeds, key, start))
                stepped.extend(rows[start:end])
            start = end
        if not stepped:
            self._idle_unless(False)
            return [], np.zeros((0, tokens.shape[1], 0), np.float32)
        return stepped, np.concatenate(parts)

    def _feeds_ready(self, rows: list[Row]) -> bool:
        """Whether the LoRA feeds of ``rows`` are at hand without a copy on this thread."""
        assert self.runner is not None
        bank = self.runner.bank
        if bank is None or self._mixes is None:
            return True
        return bank.ready({r.lora[0]: r.lora[1] for r in rows if r.lora is not None})

    def _idle_unless(self, busy: bool) -> None:
        """Nothing could run this step but rows wait for a mix: sleep until it is built (briefly)."""
        if not busy and self._mixes is not None:
            self._mixes.wait(0.05)

    def _lora_feeds(self, rows: list[Row], build: bool = True) -> tuple[dict[str, np.ndarray] | None, Any]:
        """The LoRA feeds of ``rows`` and their key (the row order of adapter versions): computed
        once per batch composition, not per step. None when they need a concatenation that is not
        built yet: it is requested from the mix builder (``build``) and the rows wait."""
        assert self.runner is not None
        key = ("lora", *(r.lora[0] if r.lora is not None else None for r in rows))
        bank = self.runner.bank
        if bank is None or all(r.lora is None for r in rows):
            return {}, key
        cached = self._feeds_cache.get(key)
        if cached is None:
            adapters = [r.lora for r in rows]
            tensors_of = {r.lora[0]: r.lora[1] for r in rows if r.lora is not None}
            inline = self._mixes is None or self._mixes.failed(tensors_of) is not None
            cached = bank.ready_feeds(adapters, build=inline)
            if cached is None:
                if build and self._mixes is not None:
                    self._mixes.request(tensors_of)
                return None, key
            self._feeds_cache.put(key, cached, arrays_nbytes(cached.values()))
        return cached, key

    def _release_memory(self) -> None:
        """After a step: shrink the KV cache once a burst is over (the longest live row uses a quarter
        of its capacity or less), and report the bytes held."""
        runner = self.runner
        if runner is None:
            return
        longest = max((max(r.length, r.prefilled) for r in self._rows), default=0)
        if runner.shrink_cache(len(self._rows), longest) and self._mixes is not None:
            self._mixes.trim()  # malloc_trim on the builder thread, not this one
        self.metrics.kv_cache_bytes.set(runner.cache.nbytes)
        if runner.bank is not None:
            self.metrics.lora_feeds_bytes.labels("bank").set(runner.bank.cache.nbytes)
        self.metrics.lora_feeds_bytes.labels("runner").set(runner.static_cache.nbytes)
        self.metrics.lora_feeds_bytes.labels("engine").set(self._feeds_cache.nbytes)

    def _forget(self, internal: str) -> None:
        """An adapter version was unloaded (no row holds it): its cached feeds are dropped now, from
        this thread (the caches are thread-safe, and no step can be using a version no row holds),
        so an idle server frees the memory too."""
        with self._lock:
            self._forgotten.add(internal)
        if self._mixes is not None:
            self._mixes.forget(internal)
        self._purge_unloaded()

    def _mix_evicted(self, keys: Any, _value: Any) -> None:
        """The bank dropped a concatenation: drop the feeds and OrtValues that view its arrays too, so
        the bytes are really freed (else they stay alive beyond the mixes' share of --adapter-memory)."""
        gone = set(keys) if isinstance(keys, tuple) else {keys}
        self._feeds_cache.drop_if(lambda key: isinstance(key, tuple) and bool(gone & set(key)))
        if self.runner is not None:
            self.runner.static_cache.drop_if(lambda key: isinstance(key, tuple) and isinstance(key[2], tuple)
                                             and bool(gone & set(key[2])))

    def _purge_unloaded(self) -> None:
        with self._lock:
            names, self._forgotten = self._forgotten, set()
        if not names or self.runner is None:
            return
        self._feeds_cache.drop_if(lambda key: isinstance(key, tuple) and bool(names & set(key)))
        self.runner.forget(names)

    def _drop_cancelled(self) -> None:
        for index in reversed(range(len(self._rows))):
            if self._rows[index].gen.cancelled.is_set():
                self._remove(index, FINISH_CANCELLED)
        with self._lock:
            cancelled = [g for g in self._waiting if g.cancelled.is_set()]
            for gen in cancelled:
                self._waiting.remove(gen)
            self._update_queue_gauge()
        for gen in cancelled:
            self._finish_unstarted(gen)

    def _remove(self, index: int, reason: str | None) -> None:
        """Take row ``index`` out of the batch and keep the cache dense: the last decoding row
        moves into its place, and a row in prefill behind it moves down by one."""
        assert self.runner is not None
        row = self._rows[index]
        if reason is not None:
            row.gen._put(self._final(row, reason))
            if reason != FINISH_CANCELLED:
                self._remember(row)
        with self._lock:
            del self._rows[index]
            rows = self._rows
            decoding = next((i for i, r in enumerate(rows) if not r.prefill_done), len(rows))
            # rows [index, ...) moved down by one in the list; restore dense cache order with few copies
            if index < decoding:
                last = decoding - 1
                if last >= index:
                    moved = rows.pop(last)
                    rows.insert(index, moved)
                    self.runner.cache.move_row(last + 1, index, moved.length)
            for position in range(max(index, decoding), len(rows)):
                self.runner.cache.move_row(position + 1, position, rows[position].length)
        self._release(row.gen)
        if not self._rows:  # the last row left (finished, cancelled or failed): the KV cache may shrink
            self._release_memory()

    def _finish_unstarted(self, gen: Generation) -> None:
        now = time.perf_counter()
        gen._put(Chunk(text="", adapter=gen.adapter_name, adapter_sha256=gen.adapter_sha256,
                       finish_reason=FINISH_CANCELLED, prompt_tokens=len(gen.prompt_ids),
                       queue_ms=(now - gen.arrived) * 1000, ttft_ms=(now - gen.arrived) * 1000,
                       total_ms=(now - gen.arrived) * 1000))
        self._release(gen, started=False)

    def _release(self, gen: Generation, started: bool = True) -> None:
        if gen.adapter is not None and self.registry is not None:
            self.registry.release(gen.adapter)
        if started:
            self.metrics.active.dec()
        with self._lock:
            self._admitted -= 1
            self._live.discard(gen)
            self._update_queue_gauge()
            self._lock.notify_all()
        gen.finished.set()
        gen._put(_DONE)

    def _final(self, row: Row, reason: str) -> Chunk:
        gen = row.gen
        now = time.perf_counter()
        first = row.first_token_at
        queue_ms = (row.started - gen.arrived) * 1000
        ttft_ms = ((first or now) - gen.arrived) * 1000
        total_ms = (now - gen.arrived) * 1000
        decode_s = (now - first) if first else 0.0
        decode_tps = (row.produced - 1) / decode_s if decode_s > 0 and row.produced > 1 else 0.0
        if gen.request_id != "warmup" and reason != FINISH_CANCELLED:
            label = gen.adapter_name or BASE_LABEL
            self.metrics.generated_tokens.labels(label).inc(row.produced)
            if first is not None:
                self.metrics.ttft.observe(ttft_ms / 1000)
            self.metrics.request_seconds.observe(total_ms / 1000)
            if decode_tps > 0:
                self.metrics.tokens_per_second.observe(decode_tps)
        return Chunk(text=row.text[row.emitted:], adapter=gen.adapter_name, adapter_sha256=gen.adapter_sha256,
                     finish_reason=reason, prompt_tokens=len(gen.prompt_ids), completion_tokens=row.produced,
                     queue_ms=queue_ms, ttft_ms=ttft_ms, total_ms=total_ms, decode_tps=decode_tps)

    # ---- adapters -----------------------------------------------------------------------------
    def _adapters_changed(self) -> None:
        if self.registry is None:
            return
        # one writer at a time: a watcher load racing an API unload must not interleave clear/set
        with self._metrics_lock:
            entries = self.registry.entries()
            self.metrics.adapters_loaded.set(len(entries))
            self.metrics.adapter_info.clear()
            for entry, _ in entries:
                self.metrics.adapter_info.labels(entry.name, entry.sha256).set(1)
            self.metrics.adapter_unloads_pending.set(len(self.registry.pending_unloads()))
            self.metrics.adapter_memory.set(self.registry.held_bytes)

    def _adapter_unload_failed(self, name: str) -> None:
        self.metrics.adapter_unload_failures.labels(name).inc()

    def _adapter_evicted(self, entry: LoadedAdapter) -> None:
        self.metrics.adapter_evictions.inc()

    def _adapter_lazy_loaded(self, entry: LoadedAdapter) -> None:
        self.metrics.adapter_lazy_loads.inc()

    def _load_pinned(self) -> None:
        """Load every ``--pin`` adapter that the bundle did not bring, from the adapter dir."""
        assert self.registry is not None
        for name in self.config.pin:
            if self.registry.get(name) is not None:
                continue
            path = self.config.adapter_path / f"{name}.onnx_adapter"
            if not path.is_file():
                raise BundleError(f"--pin {name}: no adapter '{name}' in the bundle or in {self.config.adapter_path} "
                                  f"({path.name}); pin a bundle adapter or put the file there")
            self.registry.load(name, path=str(path), source="pin")
