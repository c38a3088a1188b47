"""Python client of a running ``slmops serve``: generate, stream, manage adapters, check health.

    from slmops_serve.client import SlmopsClient
    with SlmopsClient("localhost:50051") as client:
        print(client.generate("I can't believe it worked!", adapter="tone").text)
        for chunk in client.generate_stream("Hello", max_new_tokens=32):
            print(chunk.text, end="")
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slmops.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

UPLOAD_CHUNK_BYTES = 4 << 20  # one UploadAdapter message: small enough that no copy of it stalls the server

DEFAULT_SERVER = "localhost:50051"
SERVER_ENV = "SLMOPS_SERVER"
TOKEN_ENV = "SLMOPS_ADMIN_TOKEN"
API_KEY_ENV = "SLMOPS_API_KEY"


def build_request(prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None, adapter: str = "",
                  max_new_tokens: int = 0, temperature: float = 0.0, top_p: float | None = None, top_k: int = 0,
                  seed: int | None = None, stop: Sequence[str] = (), request_id: str = "",
                  min_new_tokens: int = 0, guidance: tuple[str, str] | None = None) -> generation_pb2.GenerateRequest:
    """A GenerateRequest; ``guidance`` = (kind, text), e.g. ("json_schema", schema_json) or ("regex", "[0-9]+")."""
    request = generation_pb2.GenerateRequest(
        prompt=prompt or "", adapter=adapter or "", max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        temperature=temperature, top_k=top_k,
        stop=list(stop), request_id=request_id,
        messages=[generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in (messages or [])])
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    if guidance is not None:
        request.guidance.kind, request.guidance.text = guidance
    return request


class SlmopsClient:
    """A channel to one server.

    Args:
        server (str): ``host:port``; default ``$SLMOPS_SERVER`` or localhost:50051.
        token (str | None): admin bearer token for the Adapters service; default ``$SLMOPS_ADMIN_TOKEN``
            (a server without one answers admin calls from its own machine only).
        api_key (str | None): bearer key for Generation on a server started with ``--api-key``;
            default ``$SLMOPS_API_KEY``.
        tls (bool): use TLS (system roots unless ``ca_cert``).
        ca_cert (str | None): PEM file of the CA (or self-signed cert) that signed the server's certificate.
        server_name (str | None): TLS name to check instead of the host (e.g. for a cert issued to "localhost").
        timeout (float | None): default deadline of each call, in seconds.
    """

    def __init__(self, server: str | None = None, token: str | None = None, tls: bool = False,
                 ca_cert: str | None = None, server_name: str | None = None, timeout: float | None = 120.0,
                 api_key: str | None = None) -> None:
        self.server = server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout
        options: list[tuple[str, Any]] = [("grpc.max_send_message_length", 1 << 30)]
        if tls or ca_cert:
            roots = Path(ca_cert).read_bytes() if ca_cert else None
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(self.server, grpc.ssl_channel_credentials(root_certificates=roots), options)
        else:
            self.channel = grpc.insecure_channel(self.server, options)
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> SlmopsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (not until the model is warm: see ``health``)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def _admin_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _api_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> generation_pb2.GenerateResponse:
        """Unary Generate; ``kwargs`` are ``build_request``'s (adapter, max_new_tokens, temperature, ...)."""
        request = build_request(prompt, **kwargs)
        response: generation_pb2.GenerateResponse = self.generation.Generate(request, timeout=timeout or self.timeout,
                                                                             metadata=self._api_metadata())
        return response

    def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                        **kwargs: Any) -> Iterator[generation_pb2.GenerateStreamResponse]:
        """GenerateStream; the returned iterator also has ``cancel()`` (grpc's call object)."""
        request = build_request(prompt, **kwargs)
        stream: Iterator[generation_pb2.GenerateStreamResponse] = self.generation.GenerateStream(
            request, timeout=timeout or self.timeout, metadata=self._api_metadata())
        return stream

    # ---- adapters -----------------------------------------------------------------------------
    def list_adapters(self) -> list[adapters_pb2.AdapterInfo]:
        response = self.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=self.timeout,
                                              metadata=self._admin_metadata())
        return list(response.adapters)

    def load_adapter(self, name: str, path: str | None = None, data: bytes | None = None,
                     sha256: str = "") -> adapters_pb2.LoadAdapterResponse:
        """Load ``name`` from ``path`` (a file in the SERVER's adapter directory) or uploaded ``data``."""
        request = adapters_pb2.LoadAdapterRequest(name=name, sha256=sha256)
        if data is not None:
            request.data = data
        elif path is not None:
            request.path = path
        response: adapters_pb2.LoadAdapterResponse = self.adapters.LoadAdapter(
            request, timeout=self.timeout, metadata=self._admin_metadata())
        return response

    def upload_adapter(self, name: str, local_file: str | Path, sha256: str = "",
                       chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> adapters_pb2.LoadAdapterResponse:
        """Upload a local ``.onnx_adapter`` file in pieces (UploadAdapter) and load it as ``name``;
        a server older than UploadAdapter gets one LoadAdapter(data) message instead."""
        path = Path(local_file)
        size = path.stat().st_size

        def pieces() -> Iterator[adapters_pb2.UploadAdapterChunk]:
            with open(path, "rb") as f:
                yield adapters_pb2.UploadAdapterChunk(name=name, size=size, sha256=sha256, data=f.read(chunk_bytes))
                while data := f.read(chunk_bytes):
                    yield adapters_pb2.UploadAdapterChunk(data=data)

        try:
            response: adapters_pb2.LoadAdapterResponse = self.adapters.UploadAdapter(
                pieces(), timeout=self.timeout, metadata=self._admin_metadata())
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                raise
            return self.load_adapter(name, data=path.read_bytes(), sha256=sha256)
        return response

    def unload_adapter(self, name: str) -> adapters_pb2.UnloadAdapterResponse:
        response: adapters_pb2.UnloadAdapterResponse = self.adapters.UnloadAdapter(
            adapters_pb2.UnloadAdapterRequest(name=name), timeout=self.timeout, metadata=self._admin_metadata())
        return response

    # ---- health -------------------------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """``SERVING``, ``NOT_SERVING`` (loading or draining) or ``SERVICE_UNKNOWN``."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
