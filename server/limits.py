"""Per-request limits checked before any work: reply-size and memory estimates, explainer knob
caps, name/filter checks, and the deadline-checking, chunked model call the explainers get.

Every limit comes from :class:`server.config.ServerConfig` (the one owner of server limits); this
module only applies them. Estimates are deliberately simple upper bounds written down here, so
that a request that would build a reply or a sample set larger than the budget is refused in
microseconds with RESOURCE_EXHAUSTED saying what to send instead, rather than after seconds of
work and gigabytes of memory.
"""

from __future__ import annotations

from typing import Any, Callable

import grpc
import numpy as np

from server.config import ServerConfig
from server.rpc import RpcError, alive

SC = grpc.StatusCode

#: Upper estimate of one neighbour in a reply without its data: score, id, external id, split,
#: source, label, norms and a little metadata, with protobuf framing.
NEIGHBOR_BYTES = 160
#: How many float32 copies of one model input an explainer holds per sample at worst (the
#: sample, the model's layout, the framework's tensor, the first activations).
COPIES = 4


def clip(value: Any, n: int = 64) -> str:
    """``repr`` of a client-sent value, cut to ``n`` characters: statuses and logs never echo more."""
    r = repr(value)
    return r if len(r) <= n else f"{r[:n]}…(+{len(r) - n} chars)"


def check_name(value: str, what: str, cfg: ServerConfig) -> str:
    """A client-sent name: at most ``max_name_chars`` characters, printable."""
    if len(value) > cfg.max_name_chars:
        raise RpcError(SC.INVALID_ARGUMENT, f"{what} is {len(value)} characters long; names have at most "
                       f"{cfg.max_name_chars} (got {clip(value)})")
    if not value.isprintable():
        raise RpcError(SC.INVALID_ARGUMENT, f"{what} {clip(value)} has control characters; send a plain name")
    return value


def sample_bytes(input_shape: Any) -> int:
    """Bytes of one float32 model input of ``input_shape`` (1 element when unknown)."""
    return int(np.prod([int(v) for v in input_shape or [1]], dtype=np.int64)) * 4


def check_reply(cfg: ServerConfig, n_queries: int, k: int, n_directions: int, include_data: bool,
                input_shape: Any, what: str = "the reply") -> None:
    """Refuse a query whose reply estimate exceeds the message limit or the request budget."""
    per = NEIGHBOR_BYTES + (sample_bytes(input_shape) if include_data else 0)
    est = n_queries * k * n_directions * per
    limit = min(cfg.max_message_bytes, cfg.request_memory_bytes)
    if est > limit:
        fit = max(0, limit // (k * n_directions * per))
        hint = (f"send at most {fit} queries per call at k={k}" if fit >= 1 else
                f"ask for k <= {max(1, limit // (n_directions * per))} per query")
        raise RpcError(SC.RESOURCE_EXHAUSTED,
                       f"{what} would be about {est / 2**20:.1f} MiB ({n_queries} queries x k={k} x "
                       f"{n_directions} direction(s){' with data' if include_data else ''}), more than the "
                       f"server's limit of {limit / 2**20:.1f} MiB; {hint}"
                       f"{', or leave include_data off' if include_data else ''}")


def _int_knob(params: dict, key: str, default: int) -> int:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
        raise RpcError(SC.INVALID_ARGUMENT, f"{key} must be a positive integer, got {clip(v)}")
    return int(v)


def check_anchor_knobs(cfg: ServerConfig, params: dict, input_shape: Any, text: str | None) -> None:
    """Cap the anchors search knobs so that the samples of one batch and the coverage set fit the budget.

    One sample costs ``COPIES`` float32 copies of a model input (text: of the text's characters,
    an upper bound of a bag of words or token ids per sample).
    """
    from explainers.anchors.base import SEARCH_DEFAULTS

    per = COPIES * (4 * max(len(text), 1) if text is not None else sample_bytes(input_shape))
    budget = cfg.request_memory_bytes
    for key in ("batch_size", "coverage_samples"):
        n = _int_knob(params, key, int(SEARCH_DEFAULTS[key]))
        cap = max(1, budget // per)
        if n > cap:
            raise RpcError(SC.RESOURCE_EXHAUSTED,
                           f"{key}={n} would take about {n * per / 2**20:.0f} MiB for this input, more than the "
                           f"server's request_memory_mb={cfg.request_memory_mb:g}; send {key} <= {cap}")
    if "batch_size_lm" in params:
        n = _int_knob(params, "batch_size_lm", 1)
        if n > cfg.explain_chunk:
            raise RpcError(SC.RESOURCE_EXHAUSTED, f"batch_size_lm={n} is more than the server's explain_chunk="
                           f"{cfg.explain_chunk}; send batch_size_lm <= {cfg.explain_chunk}")


def check_bilrp_knobs(cfg: ServerConfig, opts: dict, x: np.ndarray) -> None:
    """BiLRP backpropagates ``batch_size`` embedding dimensions at once through a copy of the input each."""
    if "batch_size" in opts:
        n = _int_knob(opts, "batch_size", 1)
        per = COPIES * 4 * max(int(x.size), 1)
        cap = max(1, cfg.request_memory_bytes // per)
        if n > cap:
            raise RpcError(SC.RESOURCE_EXHAUSTED, f"batch_size={n} would take about {n * per / 2**20:.0f} MiB, more "
                           f"than the server's request_memory_mb={cfg.request_memory_mb:g}; send batch_size <= {cap}")


def chunked(predict: Callable[[np.ndarray], Any], rows: int, context: grpc.ServicerContext | None,
            stage: str) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` run ``rows`` at a time, checking the deadline/cancellation before every chunk.

    Peak model memory is then bounded by ``rows`` whatever batch the explainer hands over, and the
    index's lock (taken per call by ``predict``) is released between chunks, so queries of the same
    index interleave with a long explanation instead of waiting for all of it.
    """
    def run(X: Any) -> np.ndarray:
        X = np.asarray(X)
        outs = []
        for i in range(0, max(len(X), 1), rows):
            if context is not None:
                alive(context, stage)
            outs.append(np.asarray(predict(X[i:i + rows])))
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    return run


__all__ = ["clip", "check_name", "check_reply", "check_anchor_knobs", "check_bilrp_knobs", "chunked", "sample_bytes"]
