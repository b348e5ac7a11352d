"""Errors of the indexer and the query path, one class per gRPC status the server maps them to.

The server turns them into status codes (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION,
RESOURCE_EXHAUSTED); in-process callers can catch them as the matching builtin too
(``InvalidArgument`` is a ``ValueError``, ``NotFound`` a ``LookupError``), so the usual
"bad input raises ValueError" rule holds.
"""

from __future__ import annotations


class GradIndexError(Exception):
    """Base class of every error gradindex raises on purpose."""


class NotFound(GradIndexError, LookupError):
    """An unknown index, model, build or example id (gRPC NOT_FOUND)."""


class InvalidArgument(GradIndexError, ValueError):
    """Bad input: shape, dtype, NaN, bad k, bad config field (gRPC INVALID_ARGUMENT)."""


class ConfigError(InvalidArgument):
    """A build config or dataset is invalid; ``field`` names the offending config key."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class FailedPrecondition(GradIndexError):
    """The system is not in a state that allows the call: index not built, name taken (FAILED_PRECONDITION)."""


class ModelMismatch(FailedPrecondition):
    """The model's weights (fingerprint) differ from those the index was built with."""


class ResourceExhausted(GradIndexError):
    """The request is too large for the configured limits (RESOURCE_EXHAUSTED)."""


__all__ = ["GradIndexError", "NotFound", "InvalidArgument", "ConfigError", "FailedPrecondition",
           "ModelMismatch", "ResourceExhausted"]
