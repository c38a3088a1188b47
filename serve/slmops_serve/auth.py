"""Who may call what, shared by gRPC (:mod:`slmops_serve.servicer`) and HTTP (:mod:`slmops_serve.http_api`).

- Admin calls (gRPC ``slmops.v1.Adapters``, HTTP ``/v1/adapters``): with ``--admin-token`` they need
  ``authorization: Bearer <token>`` (UNAUTHENTICATED / 401 without it or with a wrong one, from any
  peer); without a token they are answered for loopback peers only (127.0.0.0/8, ::1, a Unix
  socket) and refused for every other peer with PERMISSION_DENIED / 403 naming the flag. A server on
  a network therefore cannot be reconfigured by whoever reaches its port.
- Inference calls (gRPC ``slmops.v1.Generation``, HTTP ``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/models``): open, unless ``--api-key`` is set: then they need ``authorization: Bearer <key>``
  (what the official openai client sends for its ``api_key``); the admin token is accepted too.
- Health, reflection and metrics stay open (probes and scrapers carry no secrets).

Tokens are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import unquote

from slmops_serve.config import ADMIN_TOKEN_ENV, API_KEY_ENV
from slmops_serve.errors import PERMISSION_DENIED, UNAUTHENTICATED, ServeError

ADMIN = "admin"
INFERENCE = "inference"


def is_loopback_host(host: str) -> bool:
    """True for a loopback IP address (127.0.0.0/8, ::1, ::ffff:127.x.y.z); False for anything else."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_loopback_peer(peer: str) -> bool:
    """True for a gRPC peer string of this machine: ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``."""
    kind, _, rest = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    rest = unquote(rest)  # grpc percent-encodes IPv6 peers: ipv6:%5B::1%5D:41040 (`localhost` resolves to ::1)
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return is_loopback_host(host)


def bearer_matches(authorization: str | bytes | None, secret: str) -> bool:
    """True if ``authorization`` is ``Bearer <secret>`` (scheme case-insensitive; constant-time compare)."""
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    scheme, _, credential = (authorization or "").strip().partition(" ")
    given = credential.strip().encode() if scheme.lower() == "bearer" else b""
    return hmac.compare_digest(given, secret.encode())


def check(kind: str, authorization: str | bytes | None, peer_is_loopback: bool, admin_token: str | None,
          api_key: str | None, peer: str = "") -> None:
    """Raise ServeError(UNAUTHENTICATED | PERMISSION_DENIED, "authorization") when a call of ``kind``
    (ADMIN or INFERENCE) with this ``authorization`` header from this peer is not allowed."""
    if kind == ADMIN:
        if admin_token:
            if not bearer_matches(authorization, admin_token):
                raise ServeError(UNAUTHENTICATED, "authorization", "admin calls need 'authorization: Bearer <admin "
                                 f"token>' (the server's --admin-token / ${ADMIN_TOKEN_ENV}; the client's --token)")
            return
        if not peer_is_loopback:
            raise ServeError(PERMISSION_DENIED, "authorization", f"admin calls from {peer or 'a remote peer'} are refused: "
                             "the server has no admin token, so only loopback peers (127.0.0.1, ::1) may list, load, "
                             f"upload or unload adapters; start it with --admin-token (or ${ADMIN_TOKEN_ENV}) and call with "
                             "that token ('authorization: Bearer <token>'; the client's --token)")
        return
    if api_key and not bearer_matches(authorization, api_key) and not (admin_token and bearer_matches(authorization, admin_token)):
        raise ServeError(UNAUTHENTICATED, "authorization", "this server needs an API key: send 'Authorization: Bearer "
                         f"<key>' (the server's --api-key / ${API_KEY_ENV}; the openai client's api_key)")
