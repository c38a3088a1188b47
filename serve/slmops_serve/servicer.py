"""gRPC servicers of ``slmops.v1.Generation`` and ``slmops.v1.Adapters`` over the Engine.

Requests are checked field by field here (INVALID_ARGUMENT naming the field); the engine and
the registry raise ServeError with the status code of everything else. A bad request never
affects the server: it is answered and forgotten.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from slmops.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from slmops_serve import auth
from slmops_serve.config import ServeConfig
from slmops_serve.engine import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GUIDANCE_KINDS,
    Chunk,
    Engine,
    GenerationRequest,
)
from slmops_serve.errors import (
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    ServeError,
)
from slmops_serve.metrics import ServeMetrics
from slmops_serve.registry import AdapterRegistry, LoadedAdapter, LoadResult

log = logging.getLogger("slmops.serve")

GENERATION_SERVICE = "slmops.v1.Generation"
ADAPTERS_SERVICE = "slmops.v1.Adapters"
FINISH_REASONS = {
    FINISH_EOS: generation_pb2.FINISH_REASON_EOS,
    FINISH_LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FINISH_STOP: generation_pb2.FINISH_REASON_STOP,
}
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_REQUEST_ID = 128
REQUEST_ID_HEADER = "x-request-id"
LOAD_METHODS = ("LoadAdapter", "UploadAdapter")


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def to_engine_request(request: generation_pb2.GenerateRequest, config: ServeConfig, request_id: str) -> GenerationRequest:
    """Check every field of ``request``; ServeError(INVALID_ARGUMENT) names the first bad one."""

    def bad(field: str, message: str) -> ServeError:
        return ServeError(INVALID_ARGUMENT, field, message)

    if request.prompt and len(request.messages):
        raise bad("prompt", "set either prompt or messages, not both")
    messages = None
    if len(request.messages):
        messages = []
        for i, message in enumerate(request.messages):
            if not message.role.strip():
                raise bad(f"messages[{i}].role", "is empty; use system, user or assistant")
            messages.append({"role": message.role, "content": message.content})
        if not any(m["content"].strip() for m in messages):
            raise bad("messages", "every message content is empty")
    elif not request.prompt.strip():
        raise bad("prompt", "is empty; send a prompt or chat messages")
    if request.max_new_tokens < 0:
        raise bad("max_new_tokens", f"{request.max_new_tokens} is negative; use 1..{config.max_new_tokens_limit} "
                  f"(0 = the server default {config.default_max_new_tokens})")
    if request.max_new_tokens > config.max_new_tokens_limit:
        raise bad("max_new_tokens", f"{request.max_new_tokens} is above the server limit {config.max_new_tokens_limit}")
    if request.min_new_tokens < 0:
        raise bad("min_new_tokens", f"{request.min_new_tokens} is negative; use 0 to stop at end-of-sequence")
    if request.min_new_tokens > (request.max_new_tokens or config.default_max_new_tokens):
        raise bad("min_new_tokens", f"{request.min_new_tokens} is above max_new_tokens "
                  f"{request.max_new_tokens or config.default_max_new_tokens}; raise max_new_tokens or lower min_new_tokens")
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise bad("temperature", f"{request.temperature} must be >= 0 (0 = greedy)")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise bad("top_p", f"{top_p} is outside (0, 1]")
    if request.top_k < 0:
        raise bad("top_k", f"{request.top_k} is negative; use 0 for no limit")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"{len(request.stop)} stop strings; at most {MAX_STOP_STRINGS}")
    if any(len(s) > MAX_STOP_LENGTH for s in request.stop):
        raise bad("stop", f"a stop string is longer than {MAX_STOP_LENGTH} characters")
    if len(request.request_id) > MAX_REQUEST_ID:
        raise bad("request_id", f"is longer than {MAX_REQUEST_ID} characters")
    guidance_kind, guidance_text = "", ""
    if request.HasField("guidance"):
        guidance_kind, guidance_text = request.guidance.kind.strip(), request.guidance.text
        if guidance_kind not in GUIDANCE_KINDS:
            raise bad("guidance.kind", f"'{guidance_kind}' is not one of {', '.join(GUIDANCE_KINDS)}")
        if guidance_kind != "json_object" and not guidance_text.strip():
            raise bad("guidance.text", f"is empty; give the {guidance_kind.replace('_', ' ')}")
    return GenerationRequest(
        guidance_kind=guidance_kind, guidance=guidance_text, guidance_field="guidance.text",
        prompt=request.prompt if messages is None else None, messages=messages, adapter=request.adapter,
        max_new_tokens=request.max_new_tokens, min_new_tokens=request.min_new_tokens, temperature=request.temperature, top_p=top_p, top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None, stop=list(request.stop), request_id=request_id,
    )


def _usage(chunk: Chunk) -> generation_pb2.Usage:
    return generation_pb2.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                                total_tokens=chunk.prompt_tokens + chunk.completion_tokens)


def _timings(chunk: Chunk) -> generation_pb2.Timings:
    return generation_pb2.Timings(queue_ms=chunk.queue_ms, time_to_first_token_ms=chunk.ttft_ms, total_ms=chunk.total_ms,
                                  decode_tokens_per_second=chunk.decode_tps)


def unexpected_error(exc: BaseException) -> ServeError:
    """The status an unexpected exception means for the client (never a silent OK/UNKNOWN)."""
    if isinstance(exc, FileNotFoundError):
        return ServeError(NOT_FOUND, "", f"a file disappeared while the server read it: {exc.filename or exc}")
    if isinstance(exc, PermissionError):
        return ServeError(PERMISSION_DENIED, "", f"the server may not read {exc.filename or 'a file'}: {exc.strerror or exc}")
    if isinstance(exc, MemoryError):
        return ServeError(RESOURCE_EXHAUSTED, "", "the server ran out of memory; retry later or with less")
    if isinstance(exc, OSError):
        return ServeError(UNAVAILABLE, "", f"the server hit an I/O error: {exc.strerror or exc}; retry later")
    return ServeError(INTERNAL, "", f"{type(exc).__name__}: {exc}")


def internal_error(exc: BaseException) -> ServeError:
    """INTERNAL for an exception that is no ServeError: its type and first line, at most 200 characters."""
    first = (str(exc).splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return ServeError(INTERNAL, "", f"internal error ({text[:200]}); the server logged the details")


class _Departure:
    """The cancel callback of one RPC, registered before any admission work (tokenizing, grammar
    compilation): a client that leaves meanwhile sets ``event``, which the engine checks before that
    work and uses as the generation's own cancel flag afterwards."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.gen: Any = None

    def cancel(self) -> None:
        self.event.set()
        if self.gen is not None:
            self.gen.cancel()

    def attach(self, gen: Any) -> None:
        self.gen = gen
        if self.event.is_set():
            gen.cancel()


class _Call:
    """Bookkeeping of one RPC: status code for metrics, one JSON log line at the end."""

    def __init__(self, method: str, metrics: ServeMetrics, context: grpc.ServicerContext, request_id: str = "") -> None:
        self.method = method
        self.metrics = metrics
        self.context = context
        self.request_id = request_id
        self.started = time.perf_counter()
        self.code = "OK"
        self.fields: dict[str, Any] = {}

    def fail_unexpected(self, exc: BaseException) -> None:
        """An exception that is not a ServeError: answer (and count, and log) the status it means."""
        if self.code != "OK":
            raise exc  # grpc's own abort exception, raised by fail()
        log.error("unexpected error", exc_info=exc, extra={"fields": {"event": "rpc_error", "method": self.method}})
        self.fail(unexpected_error(exc))

    def fail_internal(self, exc: BaseException) -> None:
        """A generation that raised something other than a ServeError: INTERNAL with a short message
        (the traceback goes to the log), counted as INTERNAL, never UNKNOWN or OK."""
        if self.code != "OK":
            raise exc  # grpc's own abort exception, raised by fail()
        log.error("unexpected error", exc_info=exc, extra={"fields": {"event": "rpc_error", "method": self.method}})
        self.fail(internal_error(exc))

    def fail(self, error: ServeError) -> None:
        self.code = error.code
        self.fields["error"] = str(error)
        self.context.abort(getattr(grpc.StatusCode, error.code), str(error))

    def cancelled(self) -> None:
        remaining = self.context.time_remaining()
        self.code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"

    def done(self) -> None:
        self.metrics.requests.labels(self.method, self.code).inc()
        fields = {"event": "rpc", "method": self.method, "code": self.code,
                  "ms": round((time.perf_counter() - self.started) * 1000, 2), **self.fields}
        if self.request_id:
            fields["request_id"] = self.request_id
        level = logging.INFO if self.code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED") else logging.WARNING
        log.log(level, self.method, extra={"fields": fields})


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.metrics = engine.metrics

    def _start(self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext, call: _Call) -> Any:
        call.request_id = request.request_id or _metadata(context).get(REQUEST_ID_HEADER, "")
        # Fires on client cancel and on an expired deadline, also while the request is being admitted
        # (tokenized, its grammar compiled): the engine then skips that work or stops before the next token.
        departure = _Departure()
        if not context.add_callback(departure.cancel):
            departure.cancel()  # the RPC has already ended
        try:
            engine_request = to_engine_request(request, self.config, call.request_id)
            gen = self.engine.submit(engine_request, cancel=departure.event)
        except ServeError as error:
            call.fail(error)  # raises
        departure.attach(gen)
        call.request_id = gen.request_id
        call.fields.update(adapter=gen.adapter_name, adapter_sha256=gen.adapter_sha256[:12])
        return gen

    def _cancelled(self, call: _Call, context: grpc.ServicerContext) -> None:
        """A generation ended cancelled: a client that is still there was cancelled by the server (a
        drain that ran out of time, a shutdown), which it must see as UNAVAILABLE, not as an OK."""
        if context.is_active():
            call.fail(ServeError(UNAVAILABLE, "", "the request was cancelled: the server is shutting down (its drain "
                                 "grace period ran out); retry on another server or later"))

    def _finish_fields(self, call: _Call, last: Chunk) -> None:
        call.fields.update(finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                           completion_tokens=last.completion_tokens, ttft_ms=round(last.ttft_ms, 2),
                           total_ms=round(last.total_ms, 2), queue_ms=round(last.queue_ms, 2))
        if last.finish_reason == FINISH_CANCELLED:
            call.cancelled()

    def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext) -> generation_pb2.GenerateResponse:
        call = _Call("Generate", self.metrics, context)
        try:
            return self._generate(request, context, call)
        except Exception as exc:  # noqa: BLE001 - INTERNAL, counted; grpc's own abort is re-raised
            call.fail_internal(exc)
            raise  # unreachable: fail_internal raises
        finally:
            call.done()

    def _generate(self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext,
                  call: _Call) -> generation_pb2.GenerateResponse:
        gen = self._start(request, context, call)
        try:
            result = gen.result()
        except ServeError as error:
            call.fail(error)
        last = Chunk(text="", adapter=result.adapter, adapter_sha256=result.adapter_sha256,
                     finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                     completion_tokens=result.completion_tokens, queue_ms=result.queue_ms, ttft_ms=result.ttft_ms,
                     total_ms=result.total_ms, decode_tps=result.decode_tps)
        self._finish_fields(call, last)
        if result.finish_reason == FINISH_CANCELLED:
            self._cancelled(call, context)
        return generation_pb2.GenerateResponse(
            text=result.text, finish_reason=FINISH_REASONS.get(result.finish_reason, generation_pb2.FINISH_REASON_UNSPECIFIED), usage=_usage(last),
            adapter=result.adapter, adapter_sha256=result.adapter_sha256, timings=_timings(last),
            request_id=result.request_id)

    def GenerateStream(self, request: generation_pb2.GenerateRequest,
                       context: grpc.ServicerContext) -> Iterator[generation_pb2.GenerateStreamResponse]:
        call = _Call("GenerateStream", self.metrics, context)
        try:
            try:
                gen = self._start(request, context, call)
            except Exception as exc:  # noqa: BLE001 - INTERNAL, counted; grpc's own abort is re-raised
                call.fail_internal(exc)
            try:
                for chunk in gen:
                    message = generation_pb2.GenerateStreamResponse(
                        text=chunk.text, adapter=chunk.adapter, adapter_sha256=chunk.adapter_sha256,
                        request_id=gen.request_id)
                    if chunk.finish_reason is not None:
                        self._finish_fields(call, chunk)
                        if chunk.finish_reason == FINISH_CANCELLED:
                            self._cancelled(call, context)
                            return
                        message.finish_reason = FINISH_REASONS.get(chunk.finish_reason, generation_pb2.FINISH_REASON_UNSPECIFIED)
                        message.usage.CopyFrom(_usage(chunk))
                        message.timings.CopyFrom(_timings(chunk))
                    yield message
            except ServeError as error:
                call.fail(error)
            except GeneratorExit:
                call.cancelled()  # grpc closed the stream (client gone)
                raise
            except Exception as exc:  # noqa: BLE001
                call.fail_internal(exc)
            finally:
                gen.cancel()  # no-op when finished; stops the worker when the stream ended early
        finally:
            call.done()


def adapter_info(entry: LoadedAdapter, requests_total: int, in_flight: int) -> adapters_pb2.AdapterInfo:
    return adapters_pb2.AdapterInfo(
        name=entry.name, sha256=entry.sha256, source=entry.source, path=str(entry.file.path), rank=entry.file.rank,
        target_modules=entry.file.modules, in_flight=in_flight, requests_total=requests_total, loaded_at=entry.loaded_at,
        size_bytes=entry.file.size)


def receive_upload(chunks: Iterator[adapters_pb2.UploadAdapterChunk], max_bytes: int, call: _Call) -> tuple[str, str, Any]:
    """(name, sha256, the file's bytes as a uint8 array) of an UploadAdapter stream. Each piece is
    copied into one buffer allocated from the declared size, so no copy of the whole file is made
    while holding the GIL (a single LoadAdapter(data) message is copied whole three times)."""
    import numpy as np

    first = next(chunks, None)
    if first is None:
        raise ServeError(INVALID_ARGUMENT, "name", "the upload stream is empty; its first message names the adapter")
    name, sha256, size = first.name, first.sha256, first.size
    call.fields.update(adapter=name, source="upload", size=size)
    if size <= 0:
        raise ServeError(INVALID_ARGUMENT, "size", f"{size}; the first message gives the file's size in bytes")
    if size > max_bytes:
        raise ServeError(INVALID_ARGUMENT, "size", f"{size} bytes is larger than the server's limit "
                         f"--max-upload-bytes {max_bytes}")
    buffer = np.empty(size, np.uint8)
    done = 0
    for chunk in itertools.chain([first], chunks):
        if chunk.name and chunk is not first:
            raise ServeError(INVALID_ARGUMENT, "name", "only the first message of an upload names the adapter")
        piece = chunk.data
        if done + len(piece) > size:
            raise ServeError(INVALID_ARGUMENT, "data", f"more than the declared size {size} bytes arrived")
        buffer[done:done + len(piece)] = np.frombuffer(piece, np.uint8)
        done += len(piece)
    if done != size:
        raise ServeError(INVALID_ARGUMENT, "data", f"the stream ended after {done} of the declared {size} bytes")
    return name, sha256, buffer


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.metrics = engine.metrics

    def _registry(self) -> AdapterRegistry:
        if self.engine.registry is None or not self.engine.ready:
            raise ServeError(UNAVAILABLE, "", "the server is not ready (loading the model or shutting down); retry later")
        return self.engine.registry

    def _run(self, method: str, context: grpc.ServicerContext, body: Callable[[_Call], Any]) -> Any:
        call = _Call(method, self.metrics, context)
        try:
            try:
                return body(call)
            except ServeError as error:
                if method in LOAD_METHODS:
                    self.metrics.adapter_load_failures.labels(error.code).inc()
                call.fail(error)
            except Exception as exc:  # noqa: BLE001 - mapped to a status, counted and logged
                if method in LOAD_METHODS and call.code == "OK":
                    self.metrics.adapter_load_failures.labels(unexpected_error(exc).code).inc()
                call.fail_unexpected(exc)
        finally:
            call.done()

    def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest, context: grpc.ServicerContext) -> adapters_pb2.ListAdaptersResponse:
        def body(call: _Call) -> adapters_pb2.ListAdaptersResponse:
            registry = self._registry()
            return adapters_pb2.ListAdaptersResponse(adapters=[
                adapter_info(entry, total, registry.in_flight(entry)) for entry, total in registry.entries()])

        return self._run("ListAdapters", context, body)

    def LoadAdapter(self, request: adapters_pb2.LoadAdapterRequest, context: grpc.ServicerContext) -> adapters_pb2.LoadAdapterResponse:
        def body(call: _Call) -> adapters_pb2.LoadAdapterResponse:
            registry = self._registry()
            source = request.WhichOneof("source")
            call.fields.update(adapter=request.name, source=source or "")
            if source is None:
                raise ServeError(INVALID_ARGUMENT, "path", "set path (a file in the server's adapter directory) or data (bytes)")
            if source == "path":
                result = registry.load(request.name, path=request.path, sha256=request.sha256, source="path")
            else:
                result = registry.load(request.name, data=request.data, sha256=request.sha256, source="upload")
            return self._loaded(call, registry, result)

        return self._run("LoadAdapter", context, body)

    def UploadAdapter(self, request_iterator: Iterator[adapters_pb2.UploadAdapterChunk],
                      context: grpc.ServicerContext) -> adapters_pb2.LoadAdapterResponse:
        def body(call: _Call) -> adapters_pb2.LoadAdapterResponse:
            registry = self._registry()
            name, sha256, data = receive_upload(request_iterator, self.config.upload_limit(), call)
            result = registry.load(name, data=data, sha256=sha256, source="upload")
            return self._loaded(call, registry, result)

        return self._run("UploadAdapter", context, body)

    def _loaded(self, call: _Call, registry: AdapterRegistry, result: LoadResult) -> adapters_pb2.LoadAdapterResponse:
        if not result.unchanged:
            self.metrics.adapter_load_seconds.observe(result.load_ms / 1000)
        call.fields.update(sha256=result.adapter.sha256[:12], replaced=result.replaced is not None,
                           unchanged=result.unchanged, load_ms=round(result.load_ms, 2))
        entry = result.adapter
        total = dict((e.name, t) for e, t in registry.entries()).get(entry.name, 0)
        return adapters_pb2.LoadAdapterResponse(
            adapter=adapter_info(entry, total, registry.in_flight(entry)), replaced=result.replaced is not None,
            previous_sha256=result.replaced.sha256 if result.replaced else "", load_ms=result.load_ms,
            unchanged=result.unchanged)

    def UnloadAdapter(self, request: adapters_pb2.UnloadAdapterRequest,
                      context: grpc.ServicerContext) -> adapters_pb2.UnloadAdapterResponse:
        def body(call: _Call) -> adapters_pb2.UnloadAdapterResponse:
            registry = self._registry()
            call.fields.update(adapter=request.name)
            timeout = self.config.unload_drain_timeout_s
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = max(0.0, min(timeout, remaining - 0.05))
            entry, drained = registry.unload(request.name, timeout=timeout)
            call.fields.update(sha256=entry.sha256[:12], drained=drained)
            return adapters_pb2.UnloadAdapterResponse(name=entry.name, sha256=entry.sha256, drained=drained)

        return self._run("UnloadAdapter", context, body)


class AuthInterceptor(grpc.ServerInterceptor):
    """Who may call what (:mod:`slmops_serve.auth`): every ``slmops.v1.Adapters`` call needs the admin
    token (UNAUTHENTICATED), or without one comes from a loopback peer (PERMISSION_DENIED otherwise);
    with an API key every ``slmops.v1.Generation`` call needs it. Health and reflection pass untouched.
    The peer is known only inside the call, so the check runs first thing in the wrapped handler."""

    def __init__(self, admin_token: str | None, api_key: str | None, metrics: ServeMetrics) -> None:
        self._admin_token = admin_token
        self._api_key = api_key
        self._metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        method: str = handler_call_details.method or ""
        if method.startswith(f"/{ADAPTERS_SERVICE}/"):
            kind = auth.ADMIN
        elif method.startswith(f"/{GENERATION_SERVICE}/") and self._api_key:
            kind = auth.INFERENCE
        else:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        authorization = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        short = method.rsplit("/", 1)[-1]

        def guard(context: grpc.ServicerContext) -> None:
            peer = context.peer() or ""
            try:
                auth.check(kind, authorization, auth.is_loopback_peer(peer), self._admin_token, self._api_key, peer)
            except ServeError as error:
                self._metrics.requests.labels(short, error.code).inc()
                log.warning(short, extra={"fields": {"event": "rpc", "method": short, "code": error.code, "peer": peer,
                                                     "error": str(error)}})
                context.abort(getattr(grpc.StatusCode, error.code), str(error))

        return _guarded(handler, guard)


def _guarded(handler: Any, guard: Callable[[grpc.ServicerContext], None]) -> Any:
    """``handler`` (any of the four RPC shapes) with ``guard(context)`` run before its behaviour."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    for attribute, factory in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                               ("unary_stream", grpc.unary_stream_rpc_method_handler),
                               ("stream_unary", grpc.stream_unary_rpc_method_handler),
                               ("stream_stream", grpc.stream_stream_rpc_method_handler)):
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            def guarded(request: Any, context: grpc.ServicerContext, behaviour: Any = behaviour) -> Any:
                guard(context)
                return behaviour(request, context)

            return factory(guarded, **kwargs)
    return handler
