"""Bearer-token authentication as a gRPC server interceptor.

Clients send ``authorization: Bearer <token>`` metadata. Health checks are exempt (load balancers
and orchestrators probe without credentials). A missing or wrong token is UNAUTHENTICATED; with an
``admin_token`` configured, admin RPCs (ReloadIndex) called with the ordinary token are
PERMISSION_DENIED. Tokens are compared in constant time; the ``Bearer`` scheme is matched
case-insensitively. ``on_deny`` hears the method only as a name from the service's own method
table (:func:`method_label`): a client-chosen path never becomes a metric label.
"""

from __future__ import annotations

import hmac

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_METHODS = ("/gradindex.v1.GradIndex/ReloadIndex",)


def method_label(method: str, known: frozenset[str]) -> str:
    """The metric label of a called path: its short name when the service has it, else ``unknown``."""
    return method.rsplit("/", 1)[-1] if method in known else "unknown"


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def handler(request, context):
        context.abort(code, message)

    # Every RPC this service exposes is unary-unary; a streaming call is denied just the same
    # because the abort happens before any message is read.
    return grpc.unary_unary_rpc_method_handler(handler)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Let a call through only with the right ``authorization: Bearer`` metadata."""

    def __init__(self, token: str, admin_token: str | None = None, on_deny=None) -> None:
        if not token:
            raise ValueError("token must be a non-empty string")
        self._token = token.encode()
        self._admin = admin_token.encode() if admin_token else None
        self._on_deny = on_deny

    def _matches(self, presented: bytes, expected: bytes) -> bool:
        return hmac.compare_digest(presented, expected)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value
                break
        code = None
        if header is None:
            code, msg = grpc.StatusCode.UNAUTHENTICATED, (
                "missing credentials: send metadata 'authorization: Bearer <token>'")
        elif header[:7].lower() != "bearer ":  # the auth scheme is case-insensitive (RFC 7235)
            code, msg = grpc.StatusCode.UNAUTHENTICATED, (
                "malformed authorization metadata: use 'authorization: Bearer <token>'")
        else:
            presented = header[7:].strip().encode()
            is_admin = self._admin is not None and self._matches(presented, self._admin)
            is_user = self._matches(presented, self._token)
            if not (is_admin or is_user):
                code, msg = grpc.StatusCode.UNAUTHENTICATED, "invalid token: check the bearer token you send"
            elif method in ADMIN_METHODS and self._admin is not None and not is_admin:
                code, msg = grpc.StatusCode.PERMISSION_DENIED, (
                    f"{method.rsplit('/', 1)[-1]} needs the admin token; this token may only query")
        if code is None:
            return continuation(handler_call_details)
        if self._on_deny is not None:
            self._on_deny(method, code)
        return _deny(code, msg)
