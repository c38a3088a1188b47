"""ServeError: a request problem with the gRPC status it maps to and the field it names."""

from __future__ import annotations

# gRPC status code names (grpc.StatusCode.<NAME>); kept as strings so the engine needs no grpc import.
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
PERMISSION_DENIED = "PERMISSION_DENIED"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"
UNAUTHENTICATED = "UNAUTHENTICATED"
CANCELLED = "CANCELLED"  # the client left before its request was admitted


class ServeError(Exception):
    """A request the server refuses; ``str()`` reads ``field: what is wrong and how to fix it``.

    Args:
        code (str): gRPC status code name, e.g. ``INVALID_ARGUMENT``.
        field (str): the request field at fault (``max_new_tokens``, ``adapter``, ``path``), or "".
        message (str): what is wrong and how to fix it.
    """

    def __init__(self, code: str, field: str, message: str) -> None:
        self.code = code
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)
