"""``slmops serve`` (the server), ``slmops generate`` and ``slmops adapters`` (clients of a running server)."""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from slmops.errors import SlmopsUsageError

F = TypeVar("F", bound=Callable[..., Any])

# CLI option -> ServeConfig field, where the names differ.
SERVE_OPTION_FIELDS = {
    "watch_interval": "watch_interval_s", "grace_period": "grace_period_s",
    "unload_drain_timeout": "unload_drain_timeout_s", "max_new_tokens_limit": "max_new_tokens_limit",
    "http_cors_origin": "http_cors_origins", "adapter_memory": "adapter_memory_mb",
}


def _load_yaml(path: str) -> dict[str, Any]:
    """A serve YAML: ``slmops.configfile.load_yaml`` with dashed keys (``metrics-port``) as option names."""
    from slmops.configfile import load_yaml

    return {str(k).replace("-", "_"): v for k, v in load_yaml(path, "serve options").items()}


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("bundle_dir", required=False, type=click.Path(file_okay=False))
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="YAML of these options (the CLI wins)")
@click.option("--host", default=None, help="address to bind  [default: 0.0.0.0]")
@click.option("--port", type=int, default=None, help="gRPC port, 0 = any free  [default: 50051]")
@click.option("--metrics-port", type=int, default=None, help="Prometheus /metrics port  [default: 9090]")
@click.option("--no-metrics", is_flag=True, help="do not serve /metrics")
@click.option("--http-port", type=int, default=None, help="also serve the OpenAI-compatible HTTP API on this port "
              "(/v1/chat/completions, /v1/completions, /v1/models), 0 = any free  [default: off]")
@click.option("--http-max-body-bytes", type=int, default=None, help="largest HTTP request body (413 beyond)  [default: 4 MiB]")
@click.option("--http-cors-origin", multiple=True, help="origin allowed to call the HTTP API from a browser "
              "(repeatable)  [default: none, CORS off]")
@click.option("--max-batch", type=int, default=None, help="requests decoded together in one step (continuous batching)  [default: 8]")
@click.option("--max-queue", type=int, default=None, help="requests waiting for a batch row; more get RESOURCE_EXHAUSTED  [default: 16]")
@click.option("--prefill-chunk", type=int, default=None, help="prompt tokens per prefill call (running streams wait at most one)  [default: 256]")
@click.option("--speculation", type=click.Choice(["off", "ngram"]), default=None, help="speculative decoding: "
              "ngram drafts tokens by prompt lookup (and the tokens a structured-output grammar forces) and verifies "
              "them in one step, output unchanged; off = one token per step  [default: off]")
@click.option("--max-draft", type=int, default=None, metavar="N", help="draft tokens per row and step  [default: 8]")
@click.option("--max-context", type=int, default=None, help="cache positions per request  [default: the model's, at most 4096]")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: the bundle's genai_config.json)")
@click.option("--max-new-tokens-limit", type=int, default=None, help="largest max_new_tokens a request may ask  [default: 1024]")
@click.option("--default-max-new-tokens", type=int, default=None, help="for requests that leave it 0  [default: 256]")
@click.option("--adapter-dir", default=None, help="folder LoadAdapter(path) may read  [default: BUNDLE_DIR/adapters]")
@click.option("--watch/--no-watch", default=None, help="load .onnx_adapter files dropped into --adapter-dir")
@click.option("--watch-interval", type=float, default=None, help="seconds between --watch polls  [default: 1.0]")
@click.option("--adapter-memory", type=float, default=None, metavar="MB", help="MB of adapter weights held at once: "
              "a load evicts idle adapters (least recently used, never pinned or in use); an evicted one loads "
              "again on its next request  [default: unbounded]")
@click.option("--pin", multiple=True, metavar="NAME", help="adapter never evicted (repeatable); loaded at start from "
              "the bundle or --adapter-dir")
@click.option("--lazy-load/--no-lazy-load", default=None, help="a request naming an adapter that is not loaded loads "
              "ADAPTER_DIR/NAME.onnx_adapter first (LoRAX-style)  [default: on with --adapter-memory]")
@click.option("--max-upload-bytes", type=int, default=None, help="largest uploaded adapter  [default: 4x the "
              "bundle's largest adapter file, at least 16 MiB]")
@click.option("--unload-drain-timeout", type=float, default=None, help="seconds UnloadAdapter waits for in-flight requests  [default: 30]")
@click.option("--grace-period", type=float, default=None, help="seconds in-flight requests get on SIGTERM  [default: 30]")
@click.option("--step-timeout", type=float, default=None, help="seconds one scheduler step may run; past it the "
              "server fails every request, turns NOT_SERVING and exits 1 (0 = never)  [default: 120]")
@click.option("--admin-token", default=None, envvar="SLMOPS_ADMIN_TOKEN", show_envvar=True,
              help="bearer token adapter admin calls require (gRPC Adapters, HTTP /v1/adapters)  [default: none: "
              "admin calls from this machine only (loopback), PERMISSION_DENIED / 403 from any other]")
@click.option("--api-key", default=None, envvar="SLMOPS_API_KEY", show_envvar=True,
              help="bearer key inference calls require (gRPC Generation; HTTP /v1/*, as the openai client's "
              "api_key)  [default: none, open]")
@click.option("--tls-cert", default=None, help="PEM certificate: serve TLS (with --tls-key)")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert")
@click.option("--verify-bundle/--no-verify-bundle", default=None, help="re-hash bundle files at start  [default: verify]")
@click.option("--log-level", default=None, callback=lambda _c, _p, v: _log_level_name(v), metavar="LEVEL",
              help="DEBUG, INFO, WARNING, ERROR, or olive's 0-4 (0 DEBUG ... 3 ERROR, 4 CRITICAL)  [default: INFO]")
@click.option("--force", is_flag=True, help="serve a bundle built for another CPU architecture (bundle.json target.arch)")
@click.pass_context
def serve_command(ctx: click.Context, bundle_dir: str | None, config_file: str | None, no_metrics: bool, force: bool,
                  **options: Any) -> None:
    """Serve BUNDLE_DIR (from `slmops build`) over gRPC: slmops.v1.Generation and Adapters, health,
    reflection, Prometheus metrics; with --http-port also the OpenAI-compatible HTTP API on the same
    engine. Adapters load, replace and unload while serving."""
    from slmops_serve.config import serve_config

    values = _load_yaml(config_file) if config_file else {}
    for key, value in options.items():
        if value is not None and value != ():
            values[SERVE_OPTION_FIELDS.get(key, key)] = list(value) if isinstance(value, tuple) else value
    if bundle_dir is not None:
        values["bundle_dir"] = bundle_dir
    if not values.get("bundle_dir"):
        raise SlmopsUsageError("BUNDLE_DIR", "missing; pass the bundle folder (e.g. dist/bundles/cpu)")
    if no_metrics:
        values["metrics_port"] = None
    force = force or bool(values.pop("force", False))  # a YAML may say `force: true` too
    config = serve_config(values)

    from slmops.bundle import BundleError, read_manifest
    from slmops.platforms import check_bundle_arch

    try:
        manifest = read_manifest(config.bundle_path)
    except (BundleError, ValueError) as exc:
        raise SlmopsUsageError("BUNDLE_DIR", str(exc)) from exc
    warning = check_bundle_arch(manifest, force=force)
    if warning:
        click.echo(warning, err=True)
    _check_metrics_port(config.host, config.metrics_port)
    _check_port("--http-port", config.host, config.http_port, "choose another port")
    from slmops_serve.server import serve

    try:
        code = serve(config)
    except RuntimeError as exc:
        if str(exc).startswith("--http-port: "):  # taken between the check and the bind
            raise SlmopsUsageError("--http-port", str(exc).removeprefix("--http-port: ")) from exc
        if "bind" in str(exc).lower() or "port" in str(exc).lower():
            raise SlmopsUsageError("--port", f"cannot listen on {config.host}:{config.port} ({exc}); choose another port") from exc
        raise
    except OSError as exc:  # prometheus' HTTP server: the metrics port taken between the check and the bind
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise SlmopsUsageError("--metrics-port", f"cannot listen on {config.host}:{config.metrics_port} ({exc.strerror}); "
                                   "choose another port or pass --no-metrics") from exc
        raise
    ctx.exit(code)


def _log_level_name(value: str | None) -> str | None:
    """``--log-level``: a level name, or olive's ``--log_level`` number (0 DEBUG ... 4 CRITICAL)."""
    if value is None:
        return None
    names = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    if value.strip().isdigit() and int(value) < len(names):
        return names[int(value)]
    if value.strip().upper() in names:
        return value.strip().upper()
    raise SlmopsUsageError("--log_level", f"'{value}' is not one of {names} or olive's 0-4")


def _check_metrics_port(host: str, port: int | None) -> None:
    """Refuse a taken metrics port before the bundle is loaded (one line, not prometheus' traceback)."""
    _check_port("--metrics-port", host, port, "choose another port or pass --no-metrics")


def _check_port(option: str, host: str, port: int | None, fix: str) -> None:
    """Refuse a taken port of ``option`` before the bundle is loaded (one line naming the option)."""
    import socket

    if not port:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise SlmopsUsageError(option, f"cannot listen on {host}:{port} ({exc.strerror or exc}); {fix}") from exc


# ---- clients ------------------------------------------------------------------------------------
def client_options(func: F) -> F:
    """--server, --token, --tls, --ca-cert, --timeout, shared by every client command."""
    decorators = [
        click.option("--server", envvar="SLMOPS_SERVER", default="localhost:50051", show_default=True,
                     help="host:port of `slmops serve` (or $SLMOPS_SERVER)"),
        click.option("--tls", is_flag=True, help="connect with TLS (system CAs unless --ca-cert)"),
        click.option("--ca-cert", default=None, help="PEM CA certificate that signed the server's (implies --tls)"),
        click.option("--timeout", type=float, default=120.0, show_default=True, help="deadline of the call, seconds"),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def token_option(func: F) -> F:
    return click.option("--token", envvar="SLMOPS_ADMIN_TOKEN", default=None,
                        help="admin bearer token (or $SLMOPS_ADMIN_TOKEN)")(func)


def _client(server: str, tls: bool, ca_cert: str | None, timeout: float, token: str | None = None,
            api_key: str | None = None) -> Any:
    from slmops_serve.client import SlmopsClient

    if ca_cert is not None and not Path(ca_cert).is_file():
        raise SlmopsUsageError("--ca-cert", f"'{ca_cert}' does not exist; pass the PEM file of the CA that signed the server's certificate")

    return SlmopsClient(server, token=token, tls=tls, ca_cert=ca_cert, timeout=timeout, api_key=api_key)


def _rpc_error(exc: Any, server: str) -> click.ClickException:
    import grpc

    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE and "not ready" not in (exc.details() or ""):
        return click.ClickException(f"cannot reach the server at {server} ({exc.details()}); is `slmops serve` running?")
    return click.ClickException(f"{code.name if code else 'ERROR'}: {exc.details() if hasattr(exc, 'details') else exc}")


FINISH_NAMES = {0: "", 1: "eos", 2: "length", 3: "stop"}


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read '{path}': {exc}", param_hint=option) from exc


@click.command("generate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt")
@click.option("--adapter", default="", help="adapter name ('' = base model)")
@click.option("--stream", is_flag=True, help="print tokens as they arrive (GenerateStream)")
@click.option("--chat", is_flag=True, help="send PROMPT as a user chat message (the bundle's chat template)")
@click.option("--system", default=None, help="system message (implies --chat)")
@click.option("--max-new-tokens", type=int, default=0, help="0 = the server default")
@click.option("--min-new-tokens", type=int, default=0, help="suppress end-of-sequence before this many tokens")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=0)
@click.option("--seed", type=int, default=None, help="same seed, same text")
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print the whole response as JSON")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False), default=None,
              help="constrain the output to this JSON Schema file (structured output)")
@click.option("--json-object", is_flag=True, help="constrain the output to any JSON object")
@click.option("--regex", default=None, help="constrain the whole output to match this regular expression")
@click.option("--grammar", type=click.Path(dir_okay=False), default=None, help="constrain the output to this Lark grammar file")
@client_options
@click.option("--api-key", envvar="SLMOPS_API_KEY", default=None,
              help="the server's --api-key, if it has one (or $SLMOPS_API_KEY)")
def generate_command(prompt: str, adapter: str, stream: bool, chat: bool, system: str | None, max_new_tokens: int,
                     min_new_tokens: int, temperature: float, top_p: float | None, top_k: int, seed: int | None, stop: tuple[str, ...],
                     as_json: bool, json_schema: str | None, json_object: bool, regex: str | None, grammar: str | None,
                     server: str, tls: bool, ca_cert: str | None, timeout: float, api_key: str | None) -> None:
    """Generate text for PROMPT ('-' reads stdin) on a running server."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    if prompt == "-":
        prompt = sys.stdin.read()
    chosen = [name for name, value in (("--json-schema", json_schema), ("--json-object", json_object), ("--regex", regex),
                                       ("--grammar", grammar)) if value]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)}: give one structured-output constraint")
    guidance: tuple[str, str] | None = None
    if json_schema:
        guidance = ("json_schema", _read_text(json_schema, "--json-schema"))
    elif json_object:
        guidance = ("json_object", "")
    elif regex:
        guidance = ("regex", regex)
    elif grammar:
        guidance = ("lark_grammar", _read_text(grammar, "--grammar"))
    kwargs: dict[str, Any] = dict(adapter=adapter, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  temperature=temperature, top_p=top_p,
                                  top_k=top_k, seed=seed, stop=list(stop), guidance=guidance)
    if chat or system:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        kwargs["messages"] = messages
        text_prompt = None
    else:
        text_prompt = prompt
    with _client(server, tls, ca_cert, timeout, api_key=api_key) as client:
        try:
            if stream:
                last = None
                for chunk in client.generate_stream(text_prompt, **kwargs):
                    if as_json:
                        click.echo(json.dumps(MessageToDict(chunk, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)))
                    else:
                        click.echo(chunk.text, nl=False)
                        sys.stdout.flush()
                    last = chunk
                if not as_json:
                    click.echo()
                if last is not None:
                    click.echo(f"[{FINISH_NAMES.get(last.finish_reason, '')}, {last.usage.completion_tokens} tokens, "
                               f"ttft {last.timings.time_to_first_token_ms:.0f} ms]", err=True)
            else:
                response = client.generate(text_prompt, **kwargs)
                if as_json:
                    click.echo(json.dumps(MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True), indent=2))
                else:
                    click.echo(response.text)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, server) from exc


@click.group("adapters", context_settings={"help_option_names": ["-h", "--help"]})
def adapters_group() -> None:
    """List, load (or replace) and unload adapters on a running server."""


@adapters_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@client_options
@token_option
def adapters_list(as_json: bool, server: str, tls: bool, ca_cert: str | None, timeout: float, token: str | None) -> None:
    """Loaded adapters: name, sha256, source, rank, in-flight and total requests."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    with _client(server, tls, ca_cert, timeout, token) as client:
        try:
            adapters = client.list_adapters()
        except grpc.RpcError as exc:
            raise _rpc_error(exc, server) from exc
    if as_json:
        click.echo(json.dumps([MessageToDict(a, preserving_proto_field_name=True, always_print_fields_with_no_presence=True) for a in adapters], indent=2))
        return
    if not adapters:
        click.echo("no adapters loaded")
        return
    rows = [("NAME", "SHA256", "SOURCE", "RANK", "IN_FLIGHT", "REQUESTS")] + [
        (a.name, a.sha256[:12], a.source, str(a.rank), str(a.in_flight), str(a.requests_total)) for a in adapters]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@adapters_group.command("load")
@click.argument("name")
@click.argument("path")
@click.option("--remote", is_flag=True, help="PATH is a file in the SERVER's adapter directory (default: upload a local file)")
@click.option("--sha256", default="", help="expected sha256; the server refuses a mismatch")
@client_options
@token_option
def adapters_load(name: str, path: str, remote: bool, sha256: str, server: str, tls: bool, ca_cert: str | None,
                  timeout: float, token: str | None) -> None:
    """Load NAME from PATH (a local .onnx_adapter, uploaded); an existing NAME is replaced atomically."""
    import grpc

    if not remote and not Path(path).is_file():
        raise SlmopsUsageError("PATH", f"'{path}' is not a local file; pass --remote for a file in the server's adapter directory")
    with _client(server, tls, ca_cert, timeout, token) as client:
        try:
            if remote:
                response = client.load_adapter(name, path=path, sha256=sha256)
            else:
                response = client.upload_adapter(name, path, sha256=sha256)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, server) from exc
    adapter = response.adapter
    if response.unchanged:
        click.echo(f"{name}: already loaded with sha256 {adapter.sha256[:12]}; nothing to do")
    elif response.replaced:
        click.echo(f"{name}: replaced {response.previous_sha256[:12]} -> {adapter.sha256[:12]} "
                   f"(rank {adapter.rank}, {response.load_ms:.1f} ms)")
    else:
        click.echo(f"{name}: loaded {adapter.sha256[:12]} (rank {adapter.rank}, {response.load_ms:.1f} ms)")


@adapters_group.command("unload")
@click.argument("name")
@client_options
@token_option
def adapters_unload(name: str, server: str, tls: bool, ca_cert: str | None, timeout: float, token: str | None) -> None:
    """Unload NAME: new requests get NOT_FOUND at once; returns after in-flight ones finish."""
    import grpc

    with _client(server, tls, ca_cert, timeout, token) as client:
        try:
            response = client.unload_adapter(name)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, server) from exc
    state = "drained" if response.drained else "still in use by in-flight requests; freed when they finish"
    click.echo(f"{name}: unloaded {response.sha256[:12]} ({state})")
