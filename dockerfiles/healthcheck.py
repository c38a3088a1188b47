"""HEALTHCHECK of the slmops serve image: ``grpc.health.v1.Health/Check`` (service "") on the server
running in this container. Exit 0 when it answers SERVING, 1 otherwise (Docker's contract): loading,
draining, the scheduler died (every service turns NOT_SERVING at once), not listening yet, or no
answer within the timeout. Health needs no token (``--admin-token`` / ``--api-key`` leave it open).

The address comes from ``$SLMOPS_HEALTH_ADDR`` (host:port) if set, else from the serve process's own
arguments (``--host``, ``--port``, or ``port``/``host`` in its ``-c`` YAML), else 127.0.0.1:50051.
A server started with ``--tls-cert`` is probed over TLS with that certificate as the trusted root and
``$SLMOPS_HEALTH_TLS_NAME`` (default ``localhost``) as the name to check.

    python healthcheck.py [--timeout SECONDS] [--service NAME] [-v]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _serve_args() -> list[str]:
    """argv of the ``slmops serve`` process in this container (PID 1, or a child of tini)."""
    me = os.getpid()
    for proc in sorted(Path("/proc").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 1 << 30):
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if "serve" in argv:
            return argv[argv.index("serve") + 1:]
    return []


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def target() -> tuple[str, str | None]:
    """(host:port, TLS certificate file or None)."""
    args = _serve_args()
    cert = _option(args, "--tls-cert")
    if os.environ.get("SLMOPS_HEALTH_ADDR"):
        return os.environ["SLMOPS_HEALTH_ADDR"], cert
    host, port = _option(args, "--host"), _option(args, "--port")
    config = _option(args, "-c", "--config")
    if config and (host is None or port is None or cert is None):
        try:
            import yaml

            values = yaml.safe_load(Path(config).read_text()) or {}
            host = host or values.get("host")
            port = port or values.get("port")
            cert = cert or values.get("tls_cert") or values.get("tls-cert")
        except Exception:  # the probe must not crash on a config it cannot read
            pass
    if not host or host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port or 50051}", cert


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--service", default="")
    parser.add_argument("-v", "--verbose", action="store_true")
    opts = parser.parse_args()

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address, cert = target()
    if cert:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
        name = os.environ.get("SLMOPS_HEALTH_TLS_NAME", "localhost")
        channel = grpc.secure_channel(address, creds, [("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=opts.service), timeout=opts.timeout)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        status = f"{exc.code().name}: {exc.details()}"
    finally:
        channel.close()
    if opts.verbose or status != "SERVING":
        print(f"{address} {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
