"""Generated gRPC code of the public ``slmops.v1`` contract (protos/slmops/v1/*.proto).

Do not edit the ``*_pb2*`` files: regenerate them with ``make protos``
(``python -m slmops_serve.protogen``); a test fails when they are stale.
"""
