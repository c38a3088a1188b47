"""ServeConfig: every option of ``slmops serve``, built alike by the CLI, a YAML file and the tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slmops.errors import SlmopsUsageError

ADMIN_TOKEN_ENV = "SLMOPS_ADMIN_TOKEN"
API_KEY_ENV = "SLMOPS_API_KEY"
# Default --max-upload-bytes: this many times the largest adapter file of the bundle, at least UPLOAD_FLOOR.
UPLOAD_FACTOR = 4
UPLOAD_FLOOR = 16 << 20


class ServeConfig(BaseModel):
    """Options of one server. Field names are the CLI option names (``--max_queue`` / ``--max-queue``)."""

    model_config = ConfigDict(extra="forbid")

    bundle_dir: str = Field(description="bundle folder written by `slmops build` (model/, adapters/, bundle.json)")
    host: str = Field("0.0.0.0", description="address the gRPC server binds")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any free port)")
    metrics_port: int | None = Field(9090, ge=0, le=65535, description="Prometheus /metrics port (None = off, 0 = any free port)")
    http_port: int | None = Field(None, ge=0, le=65535, description="OpenAI-compatible HTTP port (None = off, "
                                  "0 = any free port), same process and engine as gRPC")
    http_max_body_bytes: int = Field(4 << 20, ge=1024, description="largest HTTP request body; larger gets 413")
    http_cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS "
                                         "(none = CORS off: browsers on other origins cannot call the API)")
    max_batch: int = Field(8, ge=1, le=256, description="requests decoded together in one step (continuous batching)")
    max_queue: int = Field(16, ge=0, le=10_000, description="requests that may wait for a batch row; beyond it RESOURCE_EXHAUSTED")
    prefill_chunk: int = Field(256, ge=16, le=65_536, description="prompt tokens per prefill call: a longer prompt is "
                               "prefilled in chunks between decode steps, so running streams wait at most one chunk")
    speculation: Literal["off", "ngram"] = Field("off", description="speculative decoding: ngram = draft "
                                                 "tokens by prompt lookup (and the tokens a structured-output "
                                                 "grammar forces), verified in one step with exact output; off = "
                                                 "one token per step (the default until a quiet-machine run shows "
                                                 "where it pays, and int4 near-ties are settled: README)")
    max_draft: int = Field(8, ge=1, le=32, description="draft tokens per row and step (--speculation ngram)")
    max_context: int | None = Field(None, ge=16, description="cache positions per request (prompt + output); "
                                    "default: the model's context length, at most 4096")
    threads: int | None = Field(None, ge=1, le=256, description="onnxruntime intra-op threads; default: the bundle's genai_config.json")
    max_new_tokens_limit: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = Field(256, ge=1, description="max_new_tokens of a request that leaves it 0")
    adapter_dir: str | None = Field(None, description="the only folder LoadAdapter(path) may read; default <bundle>/adapters")
    watch: bool = Field(False, description="load .onnx_adapter files dropped into --adapter-dir (name = file stem)")
    watch_interval_s: float = Field(1.0, gt=0, description="how often --watch polls the adapter dir")
    max_upload_bytes: int | None = Field(None, ge=1, description="largest adapter LoadAdapter(data) / UploadAdapter "
                                         f"accepts; default {UPLOAD_FACTOR}x the largest adapter file of the bundle, "
                                         f"at least {UPLOAD_FLOOR >> 20} MiB")
    unload_drain_timeout_s: float = Field(30.0, ge=0, description="UnloadAdapter waits this long for in-flight requests")
    grace_period_s: float = Field(30.0, ge=0, description="on SIGTERM: time given to in-flight requests before exit")
    step_timeout: float = Field(120.0, ge=0, description="seconds one scheduler step may run: a step past it (a hung "
                                "onnxruntime call) counts as the scheduler's death: every request fails UNAVAILABLE, "
                                "health turns NOT_SERVING and the server exits 1 for its orchestrator to restart it; "
                                "0 = never")
    admin_token: str | None = Field(None, description=f"bearer token the Adapters service and the HTTP admin routes "
                                    f"require (or ${ADMIN_TOKEN_ENV}); without one they answer loopback peers only")
    api_key: str | None = Field(None, description=f"bearer token the inference calls require (gRPC Generation, HTTP "
                                f"/v1/completions, /v1/chat/completions, /v1/models; or ${API_KEY_ENV}); none = open")
    tls_cert: str | None = Field(None, description="PEM server certificate (with --tls-key: serve TLS)")
    tls_key: str | None = Field(None, description="PEM private key of --tls-cert")
    adapter_memory_mb: float | None = Field(None, gt=0, description="MB of adapter weights held at once in any "
                                            "form (None = unbounded): three quarters for loaded adapters, a quarter "
                                            "for the concatenations of mixed batches; loads evict idle, unpinned "
                                            "adapters, least recently used first; evicted ones load again on their "
                                            "next request")
    pin: list[str] = Field(default_factory=list, description="adapters never evicted (loaded at start from the "
                           "bundle or --adapter-dir)")
    lazy_load: bool | None = Field(None, description="a request naming an adapter that is not loaded loads "
                                   "<adapter-dir>/<name>.onnx_adapter (or an evicted one) first; default: on "
                                   "with --adapter-memory")
    verify_bundle: bool = Field(True, description="re-hash every bundle file against bundle.json at start")
    warmup_tokens: int = Field(2, ge=0, description="tokens generated once at start before health turns SERVING")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"--default_max_new_tokens: {self.default_max_new_tokens} is above --max_new_tokens_limit "
                             f"{self.max_new_tokens_limit}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls_cert: TLS needs both --tls-cert and --tls-key")
        for option, value in (("--tls_cert", self.tls_cert), ("--tls_key", self.tls_key)):
            if value and not Path(value).is_file():
                raise ValueError(f"{option}: '{value}' is not a file")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("--admin_token: the token is empty")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api_key: the key is empty")
        from slmops.contract import adapter_name_problem

        for name in self.pin:
            if adapter_name_problem(name) is not None:
                raise ValueError(f"--pin: {adapter_name_problem(name)}")
        return self

    def upload_limit(self) -> int:
        """The largest upload accepted: --max-upload-bytes, else UPLOAD_FACTOR x the largest adapter
        file of the bundle (bundle.json's adapters), at least UPLOAD_FLOOR."""
        if self.max_upload_bytes is not None:
            return self.max_upload_bytes
        from slmops.bundle import read_manifest

        largest = 0
        try:
            manifest = read_manifest(self.bundle_path)
            for info in manifest.adapters.values():
                try:
                    largest = max(largest, (self.bundle_path / info.file).stat().st_size)
                except OSError:
                    continue
        except Exception:  # noqa: BLE001 - no readable bundle.json: the floor (the server refuses such a bundle anyway)
            largest = 0
        self.max_upload_bytes = max(UPLOAD_FLOOR, UPLOAD_FACTOR * largest)
        return self.max_upload_bytes

    @property
    def adapter_memory_bytes(self) -> int | None:
        return None if self.adapter_memory_mb is None else int(self.adapter_memory_mb * (1 << 20))

    @property
    def lazy_adapters(self) -> bool:
        return self.lazy_load if self.lazy_load is not None else self.adapter_memory_mb is not None

    @property
    def adapter_tensor_bytes(self) -> int | None:
        """The adapters' part of --adapter-memory (slmops.runtime.memory.split_adapter_memory)."""
        from slmops.runtime.memory import split_adapter_memory

        budget = self.adapter_memory_bytes
        return None if budget is None else split_adapter_memory(budget)[0]

    @property
    def feeds_cache_bytes(self) -> int:
        """Bytes of mix concatenations (the LoRA feeds caches' limit): the mixes' part of
        --adapter-memory (the runner's and the engine's caches hold views of them, dropped with them);
        else DEFAULT_FEEDS_CACHE_BYTES."""
        from slmops.runtime.memory import DEFAULT_FEEDS_CACHE_BYTES, split_adapter_memory

        budget = self.adapter_memory_bytes
        return DEFAULT_FEEDS_CACHE_BYTES if budget is None else split_adapter_memory(budget)[1]

    @property
    def bundle_path(self) -> Path:
        return Path(self.bundle_dir)

    @property
    def adapter_path(self) -> Path:
        return Path(self.adapter_dir) if self.adapter_dir else self.bundle_path / "adapters"

    @property
    def capacity(self) -> int:
        """Requests admitted at once: running plus waiting."""
        return self.max_batch + self.max_queue


def serve_config(values: dict[str, Any]) -> ServeConfig:
    """Validate ``values`` into a ServeConfig; errors name the option (the CLI exits 2)."""
    values = {k.replace("-", "_"): v for k, v in values.items() if v is not None or k in ("metrics_port", "http_port")}
    if not values.get("admin_token") and os.environ.get(ADMIN_TOKEN_ENV):
        values["admin_token"] = os.environ[ADMIN_TOKEN_ENV]
    if not values.get("api_key") and os.environ.get(API_KEY_ENV):
        values["api_key"] = os.environ[API_KEY_ENV]
    try:
        config = ServeConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        option = "--" + loc[0] if loc else "config"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if msg.startswith("--"):
            option, _, msg = msg.partition(": ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option; see `slmops serve --help`"
        raise SlmopsUsageError(option.replace("_", "-"), msg) from exc
    if not config.bundle_path.is_dir():
        raise SlmopsUsageError("BUNDLE_DIR", f"'{config.bundle_dir}' is not a folder; build one with `slmops build`")
    if config.adapter_dir and not config.adapter_path.is_dir():
        raise SlmopsUsageError("--adapter-dir", f"'{config.adapter_dir}' is not a folder")
    return config
