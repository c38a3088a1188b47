"""The gRPC server: Generation, Adapters, grpc.health.v1.Health, reflection, Prometheus metrics,
and with ``http_port`` the OpenAI-compatible HTTP API (:mod:`slmops_serve.http_api`) on the same engine.

Start-up order: bind the ports with health NOT_SERVING, load + warm the model, then SERVING.
On SIGTERM/SIGINT: health NOT_SERVING, new generations UNAVAILABLE, in-flight ones get up to
``grace_period_s`` to finish (then they are cancelled and end UNAVAILABLE), the process exits 0.

If the scheduler thread dies (a fault in a step's own error handling, or every step failing), the
server fails loudly: health NOT_SERVING for every service at once, ``/livez`` and ``/readyz`` 503,
every waiting and running request ends UNAVAILABLE (HTTP 503), new ones are refused the same way,
and ``serve()`` exits 1 so a restart policy (Docker ``--restart``, Swarm, Kubernetes) starts a fresh
process; the image's HEALTHCHECK fails meanwhile.

Who may call what (admin token, loopback-only admin without one, ``--api-key``): :mod:`slmops_serve.auth`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from slmops.bundle import BundleError, read_manifest
from slmops.runtime.memory import configure_allocator
from slmops.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from slmops_serve.config import ServeConfig
from slmops_serve.engine import Engine
from slmops_serve.logs import setup_logging
from slmops_serve.metrics import ServeMetrics
from slmops_serve.servicer import (
    ADAPTERS_SERVICE,
    GENERATION_SERVICE,
    AdaptersServicer,
    AuthInterceptor,
    GenerationServicer,
)
from slmops_serve.watch import AdapterWatcher

log = logging.getLogger("slmops.serve")

HEALTH_SERVICES = ("", GENERATION_SERVICE, ADAPTERS_SERVICE)
# grpc threads beyond the admitted requests: health probes, admin calls, quick RESOURCE_EXHAUSTED answers.
SPARE_RPC_THREADS = 8
MESSAGE_OVERHEAD = 1 << 20


class SlmopsServer:
    """One server. ``start()`` binds; ``load()`` loads the model and turns health SERVING; ``stop()`` drains."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ServeMetrics()
        self.engine = Engine(config, self.metrics)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.serving = False  # what gRPC health says for every service; HTTP /health agrees
        self._http: Any = None
        self._grpc: grpc.Server | None = None
        self._metrics_http: Any = None
        self._watcher: AdapterWatcher | None = None
        self._stopped = threading.Event()
        self.failed = threading.Event()  # the scheduler died: serve() exits 1
        self.engine.on_fatal = self._scheduler_died

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "[::]", "::", "") else self.config.host
        return f"{host}:{self.port}"

    def start(self) -> None:
        """Bind the gRPC and metrics ports and answer health checks (NOT_SERVING until ``load``)."""
        config = self.config
        read_manifest(config.bundle_path)  # fail fast on a folder that is no bundle
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        interceptors = [AuthInterceptor(config.admin_token, config.api_key, self.metrics)]
        options = [
            ("grpc.max_receive_message_length", config.upload_limit() + MESSAGE_OVERHEAD),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ]
        server = grpc.server(ThreadPoolExecutor(max_workers=config.capacity + SPARE_RPC_THREADS,
                                                thread_name_prefix="slmops-rpc"),
                             interceptors=interceptors, options=options)
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.engine), server)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(self.engine), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
            adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        bind = f"{config.host}:{config.port}"
        if config.tls_cert and config.tls_key:
            credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
            self.port = server.add_secure_port(bind, credentials)
        else:
            self.port = server.add_insecure_port(bind)
        server.start()
        self._grpc = server
        if config.http_port is not None:
            from slmops_serve.http_api import HttpServer

            self._http = HttpServer(self.engine, ready=lambda: self.serving and self.engine.failure is None)
            try:
                self.http_port = self._http.start()
            except BaseException:
                server.stop(grace=0)  # the HTTP port is taken: do not leave gRPC listening
                raise
        if config.metrics_port is not None:
            from prometheus_client import start_http_server

            httpd, _ = start_http_server(config.metrics_port, addr=config.host, registry=self.metrics.registry)
            self._metrics_http = httpd
            self.metrics_port = int(httpd.server_port)
        log.info("listening", extra={"fields": {
            "event": "listening", "grpc": bind.rsplit(":", 1)[0] + f":{self.port}", "tls": bool(config.tls_cert),
            "metrics_port": self.metrics_port, "http_port": self.http_port, "admin_token": bool(config.admin_token),
            "api_key": bool(config.api_key), "max_upload_bytes": config.upload_limit()}})
        if not config.admin_token:
            log.warning("no --admin-token: adapter admin calls are answered for loopback peers only (PERMISSION_DENIED "
                        "for others); set --admin-token or $SLMOPS_ADMIN_TOKEN to manage adapters over the network",
                        extra={"fields": {"event": "no_admin_token"}})

    def _scheduler_died(self, exc: BaseException) -> None:
        """The engine's scheduler thread is gone (it has already failed every request): health
        NOT_SERVING for every service, /readyz and /livez 503, and ``serve()`` exits 1."""
        self.serving = False
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.ready.set(0)
        log.critical("the scheduler died; health NOT_SERVING, every request failed", extra={"fields": {
            "event": "scheduler_died", "error": f"{type(exc).__name__}: {exc}"}})
        self.failed.set()

    def load(self) -> None:
        """Load + warm the model and the bundle's adapters, then turn health SERVING."""
        self.engine.load()
        if self._stopped.is_set():
            return
        if self.config.watch:
            assert self.engine.registry is not None
            self._watcher = AdapterWatcher(self.engine.registry, self.config.adapter_path, self.config.watch_interval_s)
            self._watcher.start()
        if self.engine.failure is not None:
            return  # the scheduler died during warm-up: stay NOT_SERVING
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.serving = not self._stopped.is_set()
        if self.engine.failure is not None:  # died between the check and the set
            self._scheduler_died(self.engine.failure)

    def stop(self, grace: float | None = None) -> bool:
        """Health NOT_SERVING, drain in-flight generations (up to ``grace`` s), stop. True if all finished."""
        if self._stopped.is_set():
            return True
        self._stopped.set()
        grace = self.config.grace_period_s if grace is None else grace
        started = time.monotonic()
        self.serving = False
        self.health.enter_graceful_shutdown()
        in_flight = self.engine.admitted
        log.info("draining", extra={"fields": {"event": "draining", "in_flight": in_flight, "grace_s": grace}})
        drained = self.engine.drain(grace)
        if self._watcher is not None:
            self._watcher.stop()
        if self._grpc is not None:
            # Handlers are done or cancelled by now; give the last responses a moment to be sent.
            self._grpc.stop(grace=2.0).wait(5.0)
        if self._http is not None:
            self._http.stop()  # in-flight HTTP streams were drained with the engine above
        self.engine.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped", extra={"fields": {"event": "stopped", "drained": drained, "in_flight_at_signal": in_flight,
                                              "drain_s": round(time.monotonic() - started, 2)}})
        return drained


def serve(config: ServeConfig) -> int:
    """Run a server until SIGTERM/SIGINT; the exit code (0 after a drain, 1 when the model fails to load
    or the scheduler dies)."""
    setup_logging(config.log_level)
    configure_allocator()  # before any thread: freed adapter buffers go back to the OS, not to a heap
    server = SlmopsServer(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal", extra={"fields": {"event": "signal", "signal": signal.Signals(signum).name}})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    failure: list[BaseException] = []

    def load() -> None:
        try:
            server.load()
        except BaseException as exc:  # noqa: BLE001 - reported below, the process exits 1
            failure.append(exc)
            stop.set()

    # Load in a thread: the main thread stays free to take SIGTERM while a large model loads.
    loader = threading.Thread(target=load, name="slmops-load", daemon=True)
    loader.start()
    while not stop.wait(0.5):
        if server.failed.is_set():
            break
    if server.failed.is_set():
        log.error("exiting after the scheduler died", extra={"fields": {"event": "exit", "code": 1}})
        server.stop(grace=0)
        return 1
    if failure:
        exc = failure[0]
        message = str(exc) if isinstance(exc, BundleError) else f"{type(exc).__name__}: {exc}"
        log.error("model load failed", extra={"fields": {"event": "load_failed", "error": message}})
        server.stop(grace=0)
        return 1
    server.stop()
    return 0
