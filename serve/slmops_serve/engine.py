"""The generation engine: one og.Model shared by a pool of workers, one og.Generator per request.

A request is admitted only while fewer than ``workers + max_queue`` are admitted (else
RESOURCE_EXHAUSTED); its adapter is acquired at admission (so a hot swap after that does not
change the weights it runs on) and released when its generator is gone. Workers check the
request's cancel flag before every token step, so a cancelled stream or an expired deadline
stops generation within one step and frees the worker. onnxruntime-genai releases the GIL while
it computes, so plain threads run generations in parallel.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.bundle import BundleError, BundleManifest, read_manifest, verify_files
from slmops_serve.config import ServeConfig
from slmops_serve.errors import (
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    ServeError,
)
from slmops_serve.metrics import BASE_LABEL, ServeMetrics
from slmops_serve.registry import AdapterRegistry, LoadedAdapter

log = logging.getLogger("slmops.serve")

FINISH_EOS = "eos"
FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_CANCELLED = "cancelled"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENAI_CONFIG = "genai_config.json"


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


class Generation:
    """A submitted request: iterate it for chunks (it blocks), ``cancel()`` it from any thread."""

    def __init__(self, request: GenerationRequest, prompt_ids: Any, max_new_tokens: int,
                 adapter: LoadedAdapter | None) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.adapter = adapter
        self.arrived = time.perf_counter()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self._events: queue.Queue[Any] = queue.Queue()

    @property
    def adapter_name(self) -> str:
        return self.adapter.name if self.adapter else ""

    @property
    def adapter_sha256(self) -> str:
        return self.adapter.sha256 if self.adapter else ""

    def cancel(self) -> None:
        self.cancelled.set()

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


def read_genai_config(model_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((model_dir / GENAI_CONFIG).read_text())
    return data


def session_threads(model_dir: Path, override: int | None) -> int | None:
    """The intra-op thread count the session will use (None = onnxruntime-genai's default: one)."""
    if override is not None:
        return override
    options = read_genai_config(model_dir).get("model", {}).get("decoder", {}).get("session_options", {})
    value = options.get("intra_op_num_threads")
    return int(value) if value is not None else None


def load_model(model_dir: Path, threads: int | None) -> Any:
    """og.Model of ``model_dir``; ``threads`` overrides genai_config.json's intra_op_num_threads in memory."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}))
    return og.Model(config)


class Engine:
    """Loads a bundle and runs generations.

    Args:
        config (ServeConfig): the server options (bundle dir, workers, queue, limits, threads ...).
        metrics (ServeMetrics | None): where to report; a private one when None.
    """

    def __init__(self, config: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ServeMetrics()
        self.bundle_dir = config.bundle_path
        self.manifest: BundleManifest | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.registry: AdapterRegistry | None = None
        self.threads: int | None = None
        self.context_length = 0
        self.vocab_size = 0
        self.eos_ids: set[int] = set()
        self.chat_template: str | None = None
        self.load_seconds = 0.0
        self._lock = threading.Condition()
        self._tokenizer_lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._accepting = False
        self._draining = False  # set once by drain/close: a load that finishes later must not reopen
        self._live: set[Generation] = set()
        # Called by the worker before every token step (tests use it to hold a request in flight).
        self.token_hook: Callable[[Generation, int], None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="slmops-gen")

    # ---- lifecycle ----------------------------------------------------------------------------
    def load(self) -> None:
        """Read and check the bundle, load the model and the bundle's adapters, warm up; then accept requests."""
        import onnxruntime_genai as og

        started = time.perf_counter()
        manifest = read_manifest(self.bundle_dir)
        if self.config.verify_bundle:
            problems = verify_files(self.bundle_dir, manifest)
            if problems:
                raise BundleError(f"{self.bundle_dir}: files do not match bundle.json: {'; '.join(problems[:5])}; "
                                  "rebuild or re-copy the bundle (or pass --no-verify-bundle)")
        self.manifest = manifest
        model_dir = self.bundle_dir / manifest.model_dir
        genai = read_genai_config(model_dir)
        self.context_length = int(genai["model"].get("context_length") or genai.get("search", {}).get("max_length", 2048))
        self.vocab_size = int(genai["model"].get("vocab_size", 0))
        self.threads = session_threads(model_dir, self.config.threads)
        self.model = load_model(model_dir, self.config.threads)
        self.tokenizer = og.Tokenizer(self.model)
        self.eos_ids = {int(t) for t in self.tokenizer.eos_token_ids}
        template_file = model_dir / CHAT_TEMPLATE_FILE
        self.chat_template = template_file.read_text() if template_file.is_file() else None
        adapter_dir = self.config.adapter_path
        self.registry = AdapterRegistry(og.Adapters(self.model), manifest.lora_template, adapter_dir,
                                        self.config.max_upload_bytes, on_change=self._adapters_changed)
        for name, info in sorted(manifest.adapters.items()):
            self.registry.load(name, path=self.bundle_dir / info.file, sha256=info.sha256, source="bundle", trusted_path=True)
        cores = os.cpu_count() or 1
        if self.threads and self.config.workers * self.threads > cores:
            log.warning("workers x threads exceeds the CPU cores: concurrent generations will slow each other down",
                        extra={"fields": {"event": "oversubscribed", "workers": self.config.workers,
                                          "threads": self.threads, "cores": cores}})
        self.warmup()
        self.load_seconds = time.perf_counter() - started
        with self._lock:
            if self._draining:
                return
            self._accepting = True
        self.metrics.ready.set(1)
        log.info("model ready", extra={"fields": {
            "event": "ready", "bundle": str(self.bundle_dir), "target": manifest.target.name,
            "precision": manifest.target.precision, "threads": self.threads if self.threads else "1 (onnxruntime-genai default)",
            "workers": self.config.workers, "max_queue": self.config.max_queue,
            "adapters": self.registry.names(), "load_s": round(self.load_seconds, 2)}})

    def warmup(self) -> None:
        """One short greedy generation, so the first real request does not pay session start-up costs."""
        if self.config.warmup_tokens <= 0:
            return
        gen = self._admit(GenerationRequest(prompt="Hello", max_new_tokens=self.config.warmup_tokens,
                                            request_id="warmup"), force=True)
        gen.result()

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._accepting

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False
            self._draining = True
        self.metrics.ready.set(0)

    def drain(self, timeout: float) -> bool:
        """Stop admitting, wait up to ``timeout`` s for admitted requests; cancel what is left. True if drained."""
        self.stop_accepting()
        with self._lock:
            drained = self._lock.wait_for(lambda: self._admitted == 0, timeout=timeout)
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
                gen.cancel()
        self._executor.shutdown(wait=True, cancel_futures=False)
        if self.registry is not None:
            self.registry.close()

    @property
    def admitted(self) -> int:
        with self._lock:
            return self._admitted

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    # ---- requests -----------------------------------------------------------------------------
    def render_prompt(self, request: GenerationRequest) -> str:
        if request.messages is None:
            return request.prompt or ""
        try:
            rendered: str = self.tokenizer.apply_chat_template(json.dumps(request.messages), template_str=self.chat_template,
                                                               add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - og raises RuntimeError when there is no template or it fails
            raise ServeError(FAILED_PRECONDITION, "messages", f"the bundle's chat template cannot render them ({exc}); "
                             "send a plain prompt instead") from exc
        return rendered

    def submit(self, request: GenerationRequest) -> Generation:
        """Admit ``request`` or raise ServeError (UNAVAILABLE not ready, RESOURCE_EXHAUSTED full,
        NOT_FOUND unknown adapter, INVALID_ARGUMENT prompt too long)."""
        return self._admit(request, force=False)

    def generate(self, request: GenerationRequest) -> Result:
        return self.submit(request).result()

    def _admit(self, request: GenerationRequest, force: bool) -> Generation:
        if not force and not self.ready:
            raise ServeError(UNAVAILABLE, "", "the server is not ready (loading the model or shutting down); retry later")
        if not request.request_id:
            request.request_id = uuid.uuid4().hex[:16]
        max_new = request.max_new_tokens or self.config.default_max_new_tokens
        with self._tokenizer_lock:
            text = self.render_prompt(request)
            ids = self.tokenizer.encode(text)
        if len(ids) == 0:
            raise ServeError(INVALID_ARGUMENT, "prompt", "encodes to zero tokens; send some text")
        if len(ids) >= self.context_length:
            field_name = "messages" if request.messages is not None else "prompt"
            raise ServeError(INVALID_ARGUMENT, field_name, f"is {len(ids)} tokens; the model's context length is "
                             f"{self.context_length}, leaving no room to generate")
        with self._lock:
            if not self._accepting and not force:
                raise ServeError(UNAVAILABLE, "", "the server is not ready (loading the model or shutting down); retry later")
            if self._admitted >= self.config.capacity and not force:
                raise ServeError(RESOURCE_EXHAUSTED, "", f"the request queue is full ({self.config.workers} generating, "
                                 f"{self.config.max_queue} waiting); retry later")
            self._admitted += 1
            self._update_queue_gauge()
        adapter = None
        try:
            if request.adapter:
                assert self.registry is not None
                adapter = self.registry.acquire(request.adapter)
            gen = Generation(request, ids, max_new, adapter)
            with self._lock:
                self._live.add(gen)
            self._executor.submit(self._run, gen)
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

    def _update_queue_gauge(self) -> None:
        self.metrics.queue_depth.set(self._admitted - self._running)

    def _search_options(self, gen: Generation) -> dict[str, Any]:
        request = gen.request
        options: dict[str, Any] = {"max_length": min(self.context_length, len(gen.prompt_ids) + gen.max_new_tokens)}
        if request.min_new_tokens > 0:
            options["min_length"] = min(options["max_length"], len(gen.prompt_ids) + request.min_new_tokens)
        if request.temperature > 0:
            options.update(do_sample=True, temperature=float(request.temperature), top_p=float(request.top_p),
                           top_k=int(request.top_k) if request.top_k > 0 else max(self.vocab_size, 1))
            if request.seed is not None:
                # og takes a signed 32-bit seed; fold larger ones so every uint64 seed is reproducible.
                options["random_seed"] = int(request.seed) % (2**31 - 1)
        else:
            options["do_sample"] = False
        return options

    def _run(self, gen: Generation) -> None:
        """Worker: generate ``gen`` token by token, pushing chunks; always frees its slot and adapter."""
        import onnxruntime_genai as og

        with self._lock:
            self._running += 1
            self._update_queue_gauge()
        self.metrics.active.inc()
        started = time.perf_counter()
        generator = None
        try:
            if gen.cancelled.is_set():
                gen._put(self._final(gen, "", FINISH_CANCELLED, 0, started, None, None))
                return
            params = og.GeneratorParams(self.model)
            params.set_search_options(**self._search_options(gen))
            generator = og.Generator(self.model, params)
            if gen.adapter is not None:
                assert self.registry is not None
                with self.registry.og_lock:
                    generator.set_active_adapter(self.registry.og_adapters, gen.adapter.internal)
            generator.append_tokens(gen.prompt_ids)
            self._decode_loop(gen, generator, started)
        except ServeError as exc:
            gen._put(exc)
        except Exception as exc:  # noqa: BLE001 - report any og failure to the caller as INTERNAL
            log.exception("generation failed", extra={"fields": {"event": "generation_error", "request_id": gen.request_id}})
            gen._put(ServeError(INTERNAL, "", f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            # The generator holds the adapter inside og: drop it before the registry may unload that adapter.
            if generator is not None:
                if self.registry is not None:
                    with self.registry.og_lock:
                        del generator
                else:
                    del generator
            if gen.adapter is not None and self.registry is not None:
                self.registry.release(gen.adapter)
            self.metrics.active.dec()
            with self._lock:
                self._running -= 1
                self._admitted -= 1
                self._live.discard(gen)
                self._update_queue_gauge()
                self._lock.notify_all()
            gen.finished.set()
            gen._put(_DONE)

    def _decode_loop(self, gen: Generation, generator: Any, started: float) -> None:
        stream = self.tokenizer.create_stream()
        stops = [s for s in gen.request.stop if s]
        holdback = max((len(s) for s in stops), default=1) - 1  # text that may still become a stop string
        text, emitted, produced = "", 0, 0
        first_token_at: float | None = None
        reason = FINISH_LENGTH
        while produced < gen.max_new_tokens:
            if self.token_hook is not None:
                self.token_hook(gen, produced)
            if gen.cancelled.is_set():
                reason = FINISH_CANCELLED
                break
            if generator.is_done():
                break  # the context length was reached
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            produced += 1
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token in self.eos_ids and produced > gen.request.min_new_tokens:
                reason = FINISH_EOS
                break
            before = len(text)
            text += stream.decode(token)
            if stops:
                hits = [i for s in stops if (i := text.find(s, max(0, before - len(s) + 1))) >= 0]
                if hits:
                    text = text[:min(hits)]
                    reason = FINISH_STOP
                    break
            safe = len(text) - holdback
            if safe > emitted:
                gen._put(Chunk(text=text[emitted:safe], adapter=gen.adapter_name, adapter_sha256=gen.adapter_sha256))
                emitted = safe
        gen._put(self._final(gen, text[emitted:], reason, produced, started, first_token_at, time.perf_counter()))

    def _final(self, gen: Generation, text: str, reason: str, produced: int, started: float,
               first_token_at: float | None, ended: float | None) -> Chunk:
        now = time.perf_counter()
        queue_ms = (started - gen.arrived) * 1000
        ttft_ms = ((first_token_at or now) - gen.arrived) * 1000
        total_ms = ((ended or now) - gen.arrived) * 1000
        decode_s = (ended - first_token_at) if (ended and first_token_at) else 0.0
        decode_tps = (produced - 1) / decode_s if decode_s > 0 and produced > 1 else 0.0
        if gen.request_id != "warmup" and reason != FINISH_CANCELLED:
            label = gen.adapter_name or BASE_LABEL
            self.metrics.generated_tokens.labels(label).inc(produced)
            if first_token_at is not None:
                self.metrics.ttft.observe(ttft_ms / 1000)
            self.metrics.request_seconds.observe(total_ms / 1000)
            if decode_tps > 0:
                self.metrics.tokens_per_second.observe(decode_tps)
        return Chunk(text=text, adapter=gen.adapter_name, adapter_sha256=gen.adapter_sha256, finish_reason=reason,
                     prompt_tokens=len(gen.prompt_ids), completion_tokens=produced, queue_ms=queue_ms, ttft_ms=ttft_ms,
                     total_ms=total_ms, decode_tps=decode_tps)

    # ---- adapters -----------------------------------------------------------------------------
    def _adapters_changed(self) -> None:
        if self.registry is None:
            return
        entries = self.registry.entries()
        self.metrics.adapters_loaded.set(len(entries))
        self.metrics.adapter_info.clear()
        for entry, _ in entries:
            self.metrics.adapter_info.labels(entry.name, entry.sha256).set(1)
