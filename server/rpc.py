"""RPC plumbing shared by every handler: status codes by exception class, metrics, one log line.

:func:`rpc` wraps a handler. Errors raised on purpose carry their status: :class:`RpcError` its
own code, the indexer's error classes (:mod:`indexer.errors`) the code they are named after, and a
builtin ``ValueError`` (the "bad input" convention of numpy-style code, e.g. a malformed tensor)
INVALID_ARGUMENT; a ``MemoryError`` is RESOURCE_EXHAUSTED. Anything else is a bug: the client gets
INTERNAL with a one-line message and no traceback, and the server log gets the traceback. A
builtin ``TypeError`` is deliberately *not* INVALID_ARGUMENT: inputs are validated before they
reach code that could raise one, so a TypeError means the server is wrong, not the client.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import grpc

from indexer.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from server.observability import LOGGER_NAME
from server.registry import NotServed

log = logging.getLogger(LOGGER_NAME)
SC = grpc.StatusCode


class RpcError(Exception):
    """Ends the RPC with ``code`` and a message saying what to fix (raised by handlers and the batcher)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


#: Exception classes -> status codes, matched along the exception's MRO (subclasses map too; the
#: first class of the MRO found here wins, so ConfigError is INVALID_ARGUMENT, ModelMismatch
#: FAILED_PRECONDITION).
STATUS_BY_CLASS: dict[type[BaseException], grpc.StatusCode] = {
    NotFound: SC.NOT_FOUND,
    NotServed: SC.NOT_FOUND,
    InvalidArgument: SC.INVALID_ARGUMENT,
    FailedPrecondition: SC.FAILED_PRECONDITION,
    ResourceExhausted: SC.RESOURCE_EXHAUSTED,
    ValueError: SC.INVALID_ARGUMENT,
    MemoryError: SC.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: RpcError's own, else by class along the MRO, else INTERNAL."""
    if isinstance(exc, RpcError):
        return exc.code
    for klass in type(exc).__mro__:
        code = STATUS_BY_CLASS.get(klass)
        if code is not None:
            return code
    return SC.INTERNAL


#: Longest status message sent or logged: a message that echoes client input never grows with it.
MAX_MESSAGE_CHARS = 1000


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else \
        f"{message[:MAX_MESSAGE_CHARS]}…(message cut, {len(message)} chars)"


def rpc(method: Callable) -> Callable:
    """Wrap a servicer method: status mapping, metrics, one structured log line per call.

    The servicer must have a ``metrics`` attribute (:class:`server.observability.Metrics`).
    """
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        code, message, response = SC.OK, "", None
        self.metrics.inflight.inc()
        try:
            response = method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status code
            code = status_for(exc)
            message = _cut(str(exc)) if code != SC.INTERNAL else (
                f"internal error ({type(exc).__name__}); the server log has the details")
            if code == SC.INTERNAL:
                log.exception("rpc failed", extra={"fields": {"method": name}})
        finally:
            self.metrics.inflight.dec()
            dt = time.perf_counter() - t0
            self.metrics.requests.labels(name, code.name).inc()
            self.metrics.latency.labels(name).observe(dt)
            fields = {"event": "rpc", "method": name, "code": code.name, "ms": round(dt * 1e3, 3),
                      "peer": context.peer()}
            idx = getattr(request, "index", None)
            if idx:
                fields["index"] = idx if len(idx) <= 128 else f"{idx[:128]}…(+{len(idx) - 128} chars)"
            if message:
                fields["error"] = message
            log.info("rpc", extra={"fields": fields})
        if code != SC.OK:
            context.abort(code, message)
        return response

    return wrapper


def alive(context: grpc.ServicerContext, stage: str) -> None:
    """Abandon the request (DEADLINE_EXCEEDED) when the client has gone or its deadline has passed."""
    remaining = context.time_remaining()
    if not context.is_active() or (remaining is not None and remaining <= 0):
        raise RpcError(SC.DEADLINE_EXCEEDED,
                       f"the deadline passed before the {stage} stage; give the call a longer deadline "
                       "or send fewer queries per call")


__all__ = ["RpcError", "STATUS_BY_CLASS", "status_for", "rpc", "alive"]
