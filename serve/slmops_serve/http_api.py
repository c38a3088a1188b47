"""OpenAI-compatible HTTP API over the same Engine as gRPC (``slmops serve --http-port 8000``).

Routes (``model`` names the adapter, as in vLLM and LoRAX; the base model's name or ``""`` = no adapter):

- ``GET /v1/models``, ``GET /v1/models/{model}``: the base model and every loaded adapter;
- ``POST /v1/chat/completions``, ``POST /v1/completions``: ``stream: true`` answers server-sent
  events, one per text delta, ending in ``data: [DONE]``;
- ``GET /health`` (= ``/readyz``): 200 while gRPC health says SERVING, else 503; ``GET /livez``: 200
  while the scheduler runs, 503 once it died (the process must be restarted);
- admin, with ``Authorization: Bearer <admin token>`` when the server has one (401 otherwise), and
  from loopback peers only when it has none (403 for any other peer):
  ``GET /v1/adapters``, ``POST /v1/adapters`` ``{name, path, sha256?}`` (a file in the adapter
  dir; replaces an existing name atomically), ``DELETE /v1/adapters/{name}`` (drains first).

With ``--api-key`` the ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` routes need
``Authorization: Bearer <key>`` (what the openai client sends as its ``api_key``; 401 otherwise);
health stays open (:mod:`slmops_serve.auth`).

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}`` with the status
of the engine's ServeError code (400 bad field, 404 unknown model, 429 queue full, 503 not ready,
draining or the scheduler died, 500 an internal error), 401 without the admin token or API key, 403
for admin calls from another host without an admin token, and 413 for a body over
``--http-max-body-bytes``.

Stack: FastAPI on Starlette, served by uvicorn (h11) in a thread of the gRPC server's process. It is
what vLLM's and SGLang's OpenAI servers run, so clients meet the same SSE framing; both are
maintained, typed, and need no C extension. The engine interface is blocking, so each request's
``submit`` and chunk iteration run in a worker thread that hands chunks to the event loop
(``loop.call_soon_threadsafe``), one thread per admitted request, as gRPC uses one per RPC.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops_serve import auth
from slmops_serve.config import ServeConfig
from slmops_serve.engine import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Chunk,
    Engine,
    Generation,
    GenerationRequest,
)
from slmops_serve.errors import (
    CANCELLED,
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    ServeError,
)

log = logging.getLogger("slmops.serve")

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_REQUEST_ID = 128
REQUEST_ID_HEADER = "x-request-id"
ADAPTER_SHA_HEADER = "x-slmops-adapter-sha256"
OWNER = "slmops"
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
# engine finish reason -> OpenAI's (a stop string and end-of-sequence are both "stop" there)
FINISH_REASONS = {FINISH_EOS: "stop", FINISH_STOP: "stop", FINISH_LENGTH: "length"}
# ServeError code -> (HTTP status, OpenAI error type)
STATUS = {
    INVALID_ARGUMENT: (400, "invalid_request_error"),
    FAILED_PRECONDITION: (400, "invalid_request_error"),
    UNAUTHENTICATED: (401, "authentication_error"),
    PERMISSION_DENIED: (403, "permission_error"),
    NOT_FOUND: (404, "not_found_error"),
    PAYLOAD_TOO_LARGE: (413, "invalid_request_error"),
    RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    UNAVAILABLE: (503, "service_unavailable"),
    INTERNAL: (500, "server_error"),
    CANCELLED: (499, "invalid_request_error"),  # the client left; nobody reads it (nginx's code)
}
# engine field name -> the OpenAI request field it comes from
HTTP_FIELDS = {"min_new_tokens": "min_tokens"}


def http_error(error: ServeError) -> ServeError:
    """``error`` naming the field as the HTTP request spells it."""
    field = HTTP_FIELDS.get(error.field)
    return ServeError(error.code, field, error.message) if field else error


def internal_error(exc: BaseException) -> ServeError:
    """500 for an exception that is no ServeError: its type and first line (the traceback is logged)."""
    log.error("unexpected error", exc_info=exc, extra={"fields": {"event": "http_error"}})
    first = (str(exc).splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return ServeError(INTERNAL, "", f"internal error ({text[:200]}); the server logged the details")


# ---- request bodies -----------------------------------------------------------------------------
class _Body(BaseModel):
    # Unknown fields are ignored (clients send `user`, `metadata`, `store` ...); the fields that would
    # change the answer and are not supported are named below and refused with a 400.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension (-1 or 0 = no limit)
    min_tokens: int | None = None  # vLLM extension: end-of-sequence suppressed before this many tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's guided decoding fields
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class LoadAdapterBody(_Body):
    name: str
    path: str
    sha256: str = ""


# pydantic names the union member that failed inside an error's location (``content.str``): not a field
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\]|function-.*)$")


def _field_path(loc: Any) -> str:
    """A validation error's location as the request names it: ``messages[0].content``."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_TAG.match(str(part)):
            path += ("." if path else "") + str(part)
    return path


def _bad(field: str, message: str) -> ServeError:
    return ServeError(INVALID_ARGUMENT, field, message)


def _sampling(body: _Sampling, config: ServeConfig, max_tokens: int | None, max_field: str) -> dict[str, Any]:
    """The engine fields shared by both routes; ServeError(INVALID_ARGUMENT) names the first bad field."""
    if body.n is not None and body.n != 1:
        raise _bad("n", f"{body.n} choices are not supported; send n=1 (or leave it out) and repeat the request")
    if body.best_of is not None and body.best_of != 1:
        raise _bad("best_of", "is not supported; leave it out")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise _bad(name, "is not supported; leave it out or send 0")
    if body.logit_bias:
        raise _bad("logit_bias", "is not supported; leave it out")
    limit = config.max_new_tokens_limit
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise _bad(max_field, f"{max_tokens} is outside 1..{limit} (the server's --max-new-tokens-limit); "
                   f"leave it out for the server default {config.default_max_new_tokens}")
    effective_max = max_tokens or config.default_max_new_tokens
    min_tokens = body.min_tokens or 0
    if min_tokens < 0 or min_tokens > effective_max:
        raise _bad("min_tokens", f"{min_tokens} is outside 0..{effective_max} ({max_field})")
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    if not math.isfinite(temperature) or temperature < 0:
        raise _bad("temperature", f"{temperature} must be >= 0 (0 = greedy)")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise _bad("top_p", f"{top_p} is outside (0, 1]")
    top_k = body.top_k or 0
    if top_k < -1:
        raise _bad("top_k", f"{top_k} is negative; use -1 or 0 for no limit")
    if body.seed is not None and not 0 <= body.seed < 2**64:
        raise _bad("seed", f"{body.seed} is outside 0..2^64-1")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad("stop", f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS}")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise _bad("stop", f"a stop string is longer than {MAX_STOP_LENGTH} characters")
    return dict(max_new_tokens=max_tokens or 0, min_new_tokens=min_tokens, temperature=temperature, top_p=top_p,
                top_k=max(top_k, 0), seed=body.seed, stop=[s for s in stops if s], **_guidance(body))


def _guidance(body: _Sampling) -> dict[str, str]:
    """response_format / vLLM's guided_* fields -> the engine's guidance_kind, guidance, guidance_field."""
    found: list[dict[str, str]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(dict(guidance_kind="json_object", guidance="", guidance_field="response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        if schema is None:
            raise _bad("response_format.json_schema.schema", "is missing; send {\"type\": \"json_schema\", "
                       "\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        found.append(dict(guidance_kind="json_schema", guidance=json.dumps(schema), guidance_field="response_format"))
    if body.guided_json is not None:
        schema_text = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        found.append(dict(guidance_kind="json_schema", guidance=schema_text, guidance_field="guided_json"))
    if body.guided_regex is not None:
        found.append(dict(guidance_kind="regex", guidance=body.guided_regex, guidance_field="guided_regex"))
    if body.guided_grammar is not None:
        found.append(dict(guidance_kind="lark_grammar", guidance=body.guided_grammar, guidance_field="guided_grammar"))
    if body.guided_choice is not None:
        raise _bad("guided_choice", "is not supported; send guided_regex with the choices as alternatives, e.g. "
                   "\"(yes|no)\"")
    if len(found) > 1:
        raise _bad(found[1]["guidance_field"], f"only one of response_format (json_object/json_schema), guided_json, "
                   f"guided_regex, guided_grammar may be set; {found[0]['guidance_field']} is set too")
    return found[0] if found else {}


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise _bad(f"messages[{index}].content[{j}].type", f"'{part.type}' parts are not supported; send text")
        parts.append(part.text)
    return "".join(parts)


def chat_request(body: ChatCompletionRequest, config: ServeConfig, adapter: str, request_id: str) -> GenerationRequest:
    if body.tools or body.functions:
        raise _bad("tools" if body.tools else "functions", "tool calls are not supported; leave tools out")
    if body.tool_choice not in (None, "none") or body.function_call not in (None, "none"):
        raise _bad("tool_choice" if body.tool_choice not in (None, "none") else "function_call",
                   "tool calls are not supported; leave it out")
    if body.logprobs:
        raise _bad("logprobs", "log probabilities are not supported; leave it out or send false")
    if body.top_logprobs:
        raise _bad("top_logprobs", "log probabilities are not supported; leave it out")
    if not body.messages:
        raise _bad("messages", "is empty; send at least one message")
    messages = []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"'{message.role}' is not supported; use system, user or assistant")
        messages.append({"role": role, "content": _message_text(message, i)})
    if not any(m["content"].strip() for m in messages):
        raise _bad("messages", "every message content is empty")
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise _bad("max_completion_tokens", f"{body.max_completion_tokens} differs from max_tokens {body.max_tokens}; "
                   "send one of them")
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenerationRequest(messages=messages, adapter=adapter, request_id=request_id,
                             **_sampling(body, config, max_tokens, max_field))


def completion_request(body: CompletionRequest, config: ServeConfig, adapter: str, request_id: str) -> GenerationRequest:
    if body.logprobs is not None:
        raise _bad("logprobs", "log probabilities are not supported; leave it out")
    if body.echo:
        raise _bad("echo", "is not supported; leave it out or send false")
    if body.suffix:
        raise _bad("suffix", "is not supported; leave it out")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _bad("prompt", "send one prompt string (lists of prompts and token ids are not supported)")
        prompt = prompt[0]
    if not prompt.strip():
        raise _bad("prompt", "is empty; send some text")
    return GenerationRequest(prompt=prompt, adapter=adapter, request_id=request_id,
                             **_sampling(body, config, body.max_tokens, "max_tokens"))


# ---- responses ----------------------------------------------------------------------------------
def error_body(code: str, field: str, message: str) -> dict[str, Any]:
    _, kind = STATUS.get(code, STATUS[INTERNAL])
    text = f"{field}: {message}" if field else message
    error_code = "model_not_found" if code == NOT_FOUND and field == "model" else code.lower()
    return {"error": {"message": text, "type": kind, "param": field or None, "code": error_code}}


def error_response(error: ServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    status, _ = STATUS.get(error.code, STATUS[INTERNAL])
    return JSONResponse(error_body(error.code, error.field, error.message), status_code=status, headers=headers)


def _usage(chunk: Chunk) -> dict[str, int]:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# ---- bridging the blocking engine to the event loop ---------------------------------------------
_END = object()


class _Pump:
    """Admits ``request`` and iterates its Generation in a worker thread (both block), handing the
    Generation, then each chunk (or the ServeError) to the event loop. ``cancel()`` stops the
    generation within one step, also when it comes before the admission.

    The thread wakes the loop only when it is not already woken: while the loop is busy, chunks
    pile up and are read (and joined) in one go, instead of one wake-up per token."""

    def __init__(self, engine: Engine, request: GenerationRequest, executor: ThreadPoolExecutor) -> None:
        self.loop = asyncio.get_running_loop()
        self.gen: Generation | None = None
        # set by cancel(); the engine checks it during admission (tokenizing, grammar compilation)
        self.cancelled = threading.Event()
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._ready = asyncio.Event()
        executor.submit(self._run, engine, request)

    def _put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the event loop is closed (server stopping): nobody reads any more
                self.cancel()

    def _run(self, engine: Engine, request: GenerationRequest) -> None:
        try:
            gen = engine.submit(request, cancel=self.cancelled)
            with self._lock:
                self.gen = gen
            if self.cancelled.is_set():
                gen.cancel()
            self._put(gen)
            for chunk in gen:
                self._put(chunk)
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - ServeError or a bug: the handler answers it
            self._put(exc)

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            gen = self.gen
        if gen is not None:
            gen.cancel()

    async def next(self) -> Any:
        """The next item: the Generation (first), a Chunk or ``_END``; a ServeError is raised. Text chunks already waiting
        come joined in one (a slow client gets fewer, larger events, as over gRPC)."""
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    while isinstance(item, Chunk) and item.finish_reason is None and self._items \
                            and isinstance(self._items[0], Chunk):
                        following = self._items.popleft()
                        following.text = item.text + following.text
                        item = following
                    break
                self._wake_pending = False
                self._ready.clear()
            await self._ready.wait()
        if isinstance(item, BaseException):
            raise item
        return item


async def _watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Cancel the generation if the client goes away before the response is sent."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class _Call:
    """Bookkeeping of one HTTP request: gRPC-style status code for the metrics, one JSON log line."""

    def __init__(self, route: str, app: HttpApi, request_id: str = "") -> None:
        self.method = f"http {route}"
        self.app = app
        self.request_id = request_id
        self.started = time.perf_counter()
        self.code = "OK"
        self.ended = False  # the final chunk or an error was handled (else the client left early)
        self.fields: dict[str, Any] = {}

    def fail(self, error: ServeError) -> JSONResponse:
        self.ended = True
        self.code = error.code
        self.fields["error"] = str(error)
        return error_response(error, headers={REQUEST_ID_HEADER: self.request_id} if self.request_id else None)

    def finish(self, last: Chunk) -> None:
        self.ended = True
        self.fields.update(finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                           completion_tokens=last.completion_tokens, ttft_ms=round(last.ttft_ms, 2),
                           total_ms=round(last.total_ms, 2), queue_ms=round(last.queue_ms, 2))
        if last.finish_reason == FINISH_CANCELLED:
            self.code = "CANCELLED"

    def done(self) -> None:
        self.app.metrics.requests.labels(self.method, self.code).inc()
        fields = {"event": "http", "method": self.method, "code": self.code,
                  "ms": round((time.perf_counter() - self.started) * 1000, 2), **self.fields}
        if self.request_id:
            fields["request_id"] = self.request_id
        level = logging.INFO if self.code in ("OK", "CANCELLED") else logging.WARNING
        log.log(level, self.method, extra={"fields": fields})


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app parses it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.limit
        body, more = bytearray(), True
        while more and not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.limit
        if too_large:
            response = JSONResponse(error_body(PAYLOAD_TOO_LARGE, "", f"the request body is over {self.limit} bytes "
                                               "(the server's --http-max-body-bytes); send a shorter prompt"),
                                    status_code=413)
            await response(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however the stream ends (done, client gone, error)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class HttpApi:
    """The FastAPI app over ``engine``; ``ready()`` says whether gRPC health is SERVING."""

    def __init__(self, engine: Engine, ready: Callable[[], bool]) -> None:
        self.engine = engine
        self.config = engine.config
        self.metrics = engine.metrics
        self.ready = ready
        # One thread per request admits it and reads its chunks (both block): at most `capacity` are
        # admitted at once, the spares answer the rest (429 when full) without waiting. Admin calls
        # (adapter loads) have their own threads.
        self.executor = ThreadPoolExecutor(max_workers=self.config.capacity + 8, thread_name_prefix="slmops-http")
        self.admin_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="slmops-http-admin")
        self.app = self._build()

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        return self.engine.manifest.base_model.name if self.engine.manifest is not None else ""

    def resolve_model(self, model: str) -> str:
        """The adapter a request's ``model`` selects ("" = the base); ServeError NOT_FOUND otherwise."""
        registry = self.engine.registry
        if registry is not None and model and registry.servable(model):
            return model
        if model in ("", self.base_name):
            return ""
        if registry is None:
            raise ServeError(UNAVAILABLE, "", "the server is not ready (loading the model or shutting down); retry later")
        available = [self.base_name, *registry.names()]
        raise ServeError(NOT_FOUND, "model", f"'{model}' is not served (models: {', '.join(available)}); "
                         "GET /v1/models lists them")

    def _request_id(self, request: Request) -> str:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        return given if 0 < len(given) <= MAX_REQUEST_ID else uuid.uuid4().hex[:16]

    def _check(self, request: Request, kind: str) -> None:
        """ServeError 401/403 when ``request`` may not call a route of ``kind`` (auth.ADMIN, auth.INFERENCE)."""
        peer = request.client.host if request.client is not None else ""
        auth.check(kind, request.headers.get("authorization"), auth.is_loopback_host(peer), self.config.admin_token,
                   self.config.api_key, peer)

    def _check_admin(self, request: Request) -> None:
        self._check(request, auth.ADMIN)

    def _model_card(self, name: str, parent: str | None, sha256: str, created: float) -> dict[str, Any]:
        card: dict[str, Any] = {"id": name, "object": "model", "created": int(created), "owned_by": OWNER,
                                "root": self.base_name, "parent": parent, "sha256": sha256}
        if self.context_length:
            card["max_model_len"] = self.context_length
        return card

    @property
    def context_length(self) -> int:
        return int(self.engine.context_length)

    def models(self) -> list[dict[str, Any]]:
        manifest = self.engine.manifest
        if manifest is None or self.engine.registry is None:
            raise ServeError(UNAVAILABLE, "", "the server is not ready (loading the model); retry later")
        try:
            built = datetime.fromisoformat(manifest.created_at).timestamp()
        except ValueError:
            built = 0.0
        cards = [self._model_card(self.base_name, None, manifest.base_model.sha256, built)]
        for entry, _ in self.engine.registry.entries():
            cards.append(self._model_card(entry.name, self.base_name, entry.sha256, entry.loaded_at))
        return cards

    # ---- generation ---------------------------------------------------------------------------
    async def _generate(self, request: Request, route: str, body: ChatCompletionRequest | CompletionRequest) -> Response:
        call = _Call(route, self, self._request_id(request))
        chat = isinstance(body, ChatCompletionRequest)
        pump: _Pump | None = None
        streaming = False
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                self._check(request, auth.INFERENCE)
                adapter = self.resolve_model(body.model)
                if isinstance(body, ChatCompletionRequest):
                    engine_request = chat_request(body, self.config, adapter, call.request_id)
                else:
                    engine_request = completion_request(body, self.config, adapter, call.request_id)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                if body.stream_options is not None and not body.stream:
                    raise _bad("stream_options", "is only allowed with stream: true")
                pump = _Pump(self.engine, engine_request, self.executor)
                watcher = asyncio.create_task(_watch_disconnect(request, pump.cancel))
                gen: Generation = await pump.next()
                call.fields.update(adapter=gen.adapter_name, adapter_sha256=gen.adapter_sha256[:12])
                first = await pump.next()  # an error raised before the first token still gets its status
            except ServeError as error:
                if error.code == NOT_FOUND and error.field == "adapter":  # unloaded between the check and submit
                    error = ServeError(NOT_FOUND, "model", error.message)
                return call.fail(http_error(error))
            except Exception as exc:  # noqa: BLE001 - a 500 in OpenAI's shape, counted as INTERNAL
                return call.fail(internal_error(exc))
            finally:
                if watcher is not None:
                    watcher.cancel()
            model = body.model or self.base_name
            headers = {REQUEST_ID_HEADER: gen.request_id, ADAPTER_SHA_HEADER: gen.adapter_sha256}
            created = int(time.time())
            rid = ("chatcmpl-" if chat else "cmpl-") + gen.request_id
            if body.stream:
                streaming = True
                events = self._events(call, pump, first, rid, created, model, chat, include_usage)
                return _SSEResponse(events, on_close=self._closer(call, pump), headers=headers)
            return await self._whole(call, pump, first, rid, created, model, chat, headers, request)
        finally:
            if not streaming:
                if pump is not None:
                    pump.cancel()
                call.done()

    def _closer(self, call: _Call, pump: _Pump) -> Callable[[], None]:
        def close() -> None:
            pump.cancel()  # no-op when finished; stops the engine when the client left early
            if not call.ended:
                call.code = "CANCELLED"
            call.done()

        return close

    async def _whole(self, call: _Call, pump: _Pump, first: Any, rid: str, created: int, model: str, chat: bool,
                     headers: dict[str, str], request: Request) -> Response:
        parts: list[str] = []
        item = first
        watcher = asyncio.create_task(_watch_disconnect(request, pump.cancel))
        try:
            while item is not _END:
                parts.append(item.text)
                last: Chunk = item
                item = await pump.next()
        except ServeError as error:
            return call.fail(http_error(error))
        except Exception as exc:  # noqa: BLE001 - a 500 in OpenAI's shape, counted as INTERNAL
            return call.fail(internal_error(exc))
        finally:
            watcher.cancel()
        call.finish(last)
        if last.finish_reason == FINISH_CANCELLED:
            return call.fail(ServeError(UNAVAILABLE, "", "the request was cancelled (client gone or the server is "
                                        "shutting down); retry"))
        text = "".join(parts)
        finish = FINISH_REASONS.get(last.finish_reason or "", "stop")
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": model, "system_fingerprint": None, "choices": [choice], "usage": _usage(last)}
        return JSONResponse(payload, headers=headers)

    async def _events(self, call: _Call, pump: _Pump, first: Any, rid: str, created: int, model: str, chat: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text is not None else {})
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                       "system_fingerprint": None, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return _sse(payload)

        # a text event is this template with the text's JSON in the middle (one dumps of the text)
        head, tail = event("", None).split(b'"content":""' if chat else b'"text":""', 1)
        key = b'"content":' if chat else b'"text":'

        def text_event(text: str) -> bytes:
            return head + key + json.dumps(text, ensure_ascii=False).encode() + tail

        if chat:
            yield event(None, None, role=True)
        item = first
        try:
            while True:
                if item is _END:
                    break
                chunk: Chunk = item
                if chunk.finish_reason is None:
                    if chunk.text:
                        yield text_event(chunk.text)
                else:
                    call.finish(chunk)
                    if chunk.finish_reason == FINISH_CANCELLED:
                        yield _sse(error_body(UNAVAILABLE, "", "the request was cancelled (the server is shutting "
                                                           "down); retry"))
                        yield _sse("[DONE]")
                        return
                    if chunk.text:
                        yield text_event(chunk.text)
                    yield event(None if chat else "", FINISH_REASONS.get(chunk.finish_reason, "stop"))
                    if include_usage:
                        yield _sse({"id": rid, "object": obj, "created": created, "model": model,
                                    "system_fingerprint": None, "choices": [], "usage": _usage(chunk)})
                item = await pump.next()
        except Exception as exc:  # noqa: BLE001 - a ServeError, or a bug reported as an internal error
            error = http_error(exc) if isinstance(exc, ServeError) else internal_error(exc)
            call.ended = True
            call.code = error.code
            call.fields["error"] = str(error)
            yield _sse(error_body(error.code, error.field, error.message))
        yield _sse("[DONE]")

    # ---- the app ------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="slmops OpenAI-compatible API", docs_url=None, redoc_url=None)
        api = self

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            errors = exc.errors()
            err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
            field = _field_path(err.get("loc", ()))
            message = str(err.get("msg", "invalid"))
            if err.get("type") == "json_invalid":
                field, message = "body", "is not valid JSON"
            elif err.get("type") == "missing":
                message = "is required"
            error = ServeError(INVALID_ARGUMENT, field or "body", message)
            route = request.url.path
            try:  # a caller without the API key learns nothing about the body it sent
                api._check(request, auth.ADMIN if route.startswith("/v1/adapters") else auth.INFERENCE)
            except ServeError as denied:
                error = denied
            api.metrics.requests.labels(f"http {route}", error.code).inc()
            log.warning(f"http {route}", extra={"fields": {"event": "http", "method": f"http {route}",
                                                           "code": error.code, "error": str(error)}})
            return error_response(error)

        @app.exception_handler(404)
        async def not_found(request: Request, exc: Exception) -> JSONResponse:
            return error_response(ServeError(NOT_FOUND, "", f"no route {request.method} {request.url.path}; see "
                                             "GET /v1/models, POST /v1/chat/completions, POST /v1/completions"))

        @app.exception_handler(405)
        async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(error_body(INVALID_ARGUMENT, "", f"{request.method} is not allowed on {request.url.path}"),
                                status_code=405)

        @app.get("/health")
        @app.get("/readyz")
        async def health() -> JSONResponse:
            serving = api.ready()
            return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

        @app.get("/livez")
        async def live() -> JSONResponse:
            failure = api.engine.failure
            if failure is not None:  # the scheduler died: this process must be restarted
                return JSONResponse({"status": "DEAD", "error": f"the scheduler died ({type(failure).__name__}: "
                                     f"{str(failure)[:200]})"}, status_code=503)
            return JSONResponse({"status": "ALIVE"})

        @app.exception_handler(Exception)
        async def unexpected(request: Request, exc: Exception) -> JSONResponse:
            return error_response(internal_error(exc))

        @app.get("/v1/models")
        async def list_models(request: Request) -> JSONResponse:
            call = _Call("/v1/models", api)
            try:
                api._check(request, auth.INFERENCE)
                return JSONResponse({"object": "list", "data": api.models()})
            except ServeError as error:
                return call.fail(error)
            finally:
                call.done()

        @app.get("/v1/models/{model:path}")
        async def get_model(model: str, request: Request) -> JSONResponse:
            call = _Call("/v1/models/{model}", api)
            try:
                api._check(request, auth.INFERENCE)
                for card in api.models():
                    if card["id"] == model:
                        return JSONResponse(card)
                api.resolve_model(model)  # raises the NOT_FOUND naming what is served
                raise ServeError(NOT_FOUND, "model", f"'{model}' is not served")
            except ServeError as error:
                return call.fail(error)
            finally:
                call.done()

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
            return await api._generate(request, "/v1/chat/completions", body)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            return await api._generate(request, "/v1/completions", body)

        async def admin(request: Request, route: str, body: Callable[[_Call], Awaitable[Any]]) -> JSONResponse:
            call = _Call(route, api)
            try:
                api._check_admin(request)
                registry = api.engine.registry
                if registry is None or not api.engine.ready:
                    raise ServeError(UNAVAILABLE, "", "the server is not ready (loading the model or shutting down); "
                                     "retry later")
                return JSONResponse(await body(call))
            except ServeError as error:
                return call.fail(error)
            except Exception as exc:  # noqa: BLE001 - a 500 in OpenAI's shape, counted as INTERNAL
                return call.fail(internal_error(exc))
            finally:
                call.done()

        def adapter_card(entry: Any, total: int, in_flight: int) -> dict[str, Any]:
            return {"name": entry.name, "sha256": entry.sha256, "source": entry.source, "path": str(entry.file.path),
                    "rank": entry.file.rank, "target_modules": entry.file.modules, "in_flight": in_flight,
                    "requests_total": total, "loaded_at": entry.loaded_at, "size_bytes": entry.file.size}

        @app.get("/v1/adapters")
        async def list_adapters(request: Request) -> JSONResponse:
            async def body(call: _Call) -> Any:
                registry = api.engine.registry
                assert registry is not None
                return {"object": "list", "data": [adapter_card(e, t, registry.in_flight(e)) for e, t in registry.entries()]}

            return await admin(request, "GET /v1/adapters", body)

        @app.post("/v1/adapters")
        async def load_adapter(request: Request) -> JSONResponse:
            async def body(call: _Call) -> Any:
                if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                    raise _bad("content-type", "send the body as application/json")
                try:
                    parsed = LoadAdapterBody.model_validate_json(await request.body())
                except ValueError as exc:
                    raise _bad("body", f"send {{\"name\": ..., \"path\": <file in the adapter dir>, \"sha256\"?: ...}} "
                               f"({str(exc).splitlines()[0]})") from exc
                registry = api.engine.registry
                assert registry is not None
                call.fields.update(adapter=parsed.name, source="path")
                loop = asyncio.get_running_loop()
                try:
                    result = await loop.run_in_executor(api.admin_executor, lambda: registry.load(
                        parsed.name, path=parsed.path, sha256=parsed.sha256, source="path"))
                except ServeError as error:
                    api.metrics.adapter_load_failures.labels(error.code).inc()
                    raise
                if not result.unchanged:
                    api.metrics.adapter_load_seconds.observe(result.load_ms / 1000)
                entry = result.adapter
                total = dict((e.name, t) for e, t in registry.entries()).get(entry.name, 0)
                call.fields.update(sha256=entry.sha256[:12], replaced=result.replaced is not None,
                                   unchanged=result.unchanged, load_ms=round(result.load_ms, 2))
                return {"adapter": adapter_card(entry, total, registry.in_flight(entry)),
                        "replaced": result.replaced is not None,
                        "previous_sha256": result.replaced.sha256 if result.replaced else "",
                        "unchanged": result.unchanged, "load_ms": result.load_ms}

            return await admin(request, "POST /v1/adapters", body)

        @app.delete("/v1/adapters/{name}")
        async def unload_adapter(name: str, request: Request) -> JSONResponse:
            async def body(call: _Call) -> Any:
                registry = api.engine.registry
                assert registry is not None
                call.fields.update(adapter=name)
                loop = asyncio.get_running_loop()
                entry, drained = await loop.run_in_executor(
                    api.admin_executor, lambda: registry.unload(name, timeout=api.config.unload_drain_timeout_s))
                call.fields.update(sha256=entry.sha256[:12], drained=drained)
                return {"name": entry.name, "sha256": entry.sha256, "drained": drained}

            return await admin(request, "DELETE /v1/adapters", body)

        return app


class HttpServer:
    """uvicorn serving :class:`HttpApi` in a thread of this process; ``start()`` binds (RuntimeError
    naming --http-port when the port is taken) and returns the port, ``stop()`` closes it."""

    def __init__(self, engine: Engine, ready: Callable[[], bool]) -> None:
        self.api = HttpApi(engine, ready)
        self.config = engine.config
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        import uvicorn
        from starlette.middleware.cors import CORSMiddleware

        config = self.config
        assert config.http_port is not None
        host = "::" if config.host in ("[::]", "::") else config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, config.http_port))
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"--http-port: cannot listen on {config.host}:{config.http_port} ({exc.strerror or exc}); "
                               "choose another port") from exc
        sock.set_inheritable(True)
        self.port = int(sock.getsockname()[1])
        app: ASGIApp = self.api.app
        if config.http_cors_origins:  # CORS is off unless origins are named
            app = CORSMiddleware(app, allow_origins=config.http_cors_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "content-type", REQUEST_ID_HEADER])
        app = BodyLimit(app, config.http_max_body_bytes)
        ssl: dict[str, Any] = {}
        if config.tls_cert and config.tls_key:
            ssl = dict(ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)
        uv_config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", loop="asyncio", http="h11",
                                   timeout_graceful_shutdown=5, timeout_keep_alive=30, **ssl)
        server = uvicorn.Server(uv_config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="slmops-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError(f"the HTTP server on port {self.port} did not start")
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.api.executor.shutdown(wait=False, cancel_futures=True)
        self.api.admin_executor.shutdown(wait=False, cancel_futures=True)
