"""What every vector store answers, and the build-time helpers they share (sampling, exact truth, recall).

A store holds the training vectors of one index version and answers top-k inner-product queries
with the convention of :meth:`indexer.store.VectorStore.search`: scores (m, k) float32 and ids
(m, k) int64, best first; missing hits have score -inf and id -1. Builds feed stores from the
build's shards through a *shard source*: a callable returning a fresh iterator of
``(vectors (n_i, d) float32, ids (n_i,) int64)`` in a fixed order, so a store can stream the data
as many times as it needs (norm pass, training sample, writing, recall) without holding it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from indexer.errors import InvalidArgument
from indexer.store import ExactSearcher, recall_at_k

ShardSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


@runtime_checkable
class SearchBackend(Protocol):
    """The query-side interface of a store (what :class:`indexer.query.GradIndex` calls)."""

    dim: int

    @property
    def ntotal(self) -> int: ...

    def search(self, Q: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
               **params: Any) -> tuple[np.ndarray, np.ndarray]: ...

    def vectors(self) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


def check_query(Q: Any, k: Any, dim: int) -> tuple[np.ndarray, int]:
    """Validate a query batch and k the way :class:`indexer.store.VectorStore` does (clear errors)."""
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    if Q.ndim != 2 or Q.shape[1] != dim:
        raise InvalidArgument(f"query vectors must be (m, {dim}), got {Q.shape}.")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise InvalidArgument(f"k must be a positive integer, got {k!r}.")
    return Q, int(k)


def max_norm(shards: ShardSource) -> float:
    """Largest row norm over all shards (M of the MIPS-to-L2 augmentation), with a relative margin."""
    m = 0.0
    for V, _ in shards():
        if len(V):
            m = max(m, float(np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64).max())))
    return m * (1 + 1e-6)


def sample_rows(shards: ShardSource, n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A uniform seeded sample of ``size`` rows (vectors, positions), read shard by shard (bounded memory)."""
    size = min(int(size), n)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)) if size < n else np.arange(n)
    out, pos = [], 0
    for V, _ in shards():
        sel = pick[(pick >= pos) & (pick < pos + len(V))] - pos
        if len(sel):
            out.append(np.ascontiguousarray(V[sel], dtype=np.float32))
        pos += len(V)
    d = out[0].shape[1] if out else 0
    return (np.concatenate(out) if out else np.zeros((0, d), np.float32)), pick


def exact_topk(shards: ShardSource, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner products of Q over all shards, merged shard by shard (the recall truth)."""
    best_s = np.full((len(Q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(Q), 0), np.int64)
    for V, ids in shards():
        s_, i_ = ExactSearcher(np.ascontiguousarray(V, dtype=np.float32), ids).search(Q, k)
        best_s, best_i = np.hstack([best_s, s_]), np.hstack([best_i, i_])
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return best_s, best_i


def measure_recall(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], shards: ShardSource, n: int,
                   sample: int, k: int = 10, truth: tuple[np.ndarray, np.ndarray] | None = None) -> float | None:
    """recall@k of ``search`` against brute force, with a seeded sample of stored rows as queries."""
    if sample <= 0 or n == 0:
        return None
    Q, _ = sample_rows(shards, n, sample, seed=0)
    k = min(k, n)
    _, I_true = truth if truth is not None else exact_topk(shards, Q, k)
    _, I = search(Q, k)
    return recall_at_k(I, I_true, k)


def iter_batches(shards: ShardSource, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Re-chunk a shard source into batches of at most ``rows`` rows (same order)."""
    for V, ids in shards():
        for s in range(0, len(V), rows):
            yield V[s:s + rows], ids[s:s + rows]


__all__ = ["SearchBackend", "ShardSource", "check_query", "max_norm", "sample_rows", "exact_topk", "measure_recall",
           "iter_batches"]
