"""Influence beyond similarity (DESIGN §9, Kong & Chaudhuri 2021): self-influence and TracIn.

* Self-influence of a training example is Σ_c lr_c‖g_c‖² over the TracIn checkpoints c with
  learning rates lr_c (‖g‖² with one model): high means atypical, ambiguous or mislabeled. The
  build computes it *exactly* from the gradient blocks (not from the projection) and stores it per
  example in the catalog, so ranking is one indexed SQL query.
* TracIn over several checkpoints is one inner-product index over the concatenation of
  √lr_c·g_c (``kernel = "grad_dot"`` with ``[[model.checkpoints]]`` in the config): the inner
  product of two such vectors is Σ_c lr_c g_c(q)·g_c(t), the TracIn score.
* Unsupervised models (``task = "unsupervised"``, no labels): the loss is the model's per-example
  loss, e.g. a VAE's negative ELBO averaged over several encoder samples (``indexer.vae``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import InvalidArgument


def self_influence_top(workdir: str | Path, name: str, k: int, payload: bool = False,
                       lowest: bool = False) -> list[dict[str, Any]]:
    """The k most self-influential training examples of an index (largest first), from the catalog;
    ``lowest=True``: the k least self-influential (the most typical), smallest first."""
    from indexer.query import open_index

    idx = open_index(workdir, name, load_model=False)
    try:
        return idx.self_influence_top(k, payload=payload, lowest=lowest)
    finally:
        idx.close()


def self_influence(embedder: Any, X: Any, Y: Any = None) -> np.ndarray:
    """Σ_c lr_c‖g_c‖² (exact, from the gradient blocks) for examples X with targets Y."""
    _, si, _ = embedder.raw(X, Y)
    return si


def tracin_scores(idx: Any, X: Any, Y: Any = None, k: int = 10, mode: str = "most"):
    """Top-k TracIn proponents (mode 'most') / opponents ('least') of query examples in a TracIn index.

    The index must use ``kernel = "grad_dot"`` (TracIn is a plain sum of checkpoint dot products).
    """
    if idx.kernel != "grad_dot":
        raise InvalidArgument(f"TracIn scores need an index with kernel 'grad_dot', {idx.name!r} uses {idx.kernel!r}.")
    return idx.find_similar(X, Y, k=k, mode=mode)


def self_proponent_rate(idx: Any, sample: int | None = None, seed: int = 0) -> float:
    """Fraction of training examples that are their own strongest proponent (paper's sanity check: > 99%).

    Uses the stored vectors as queries: for every kernel the stored vector is a positive multiple of
    the query vector, so the ranking is the one a query with the example itself would give.
    """
    V, ids = idx.vectors()
    rows = np.arange(len(V))
    if sample is not None and sample < len(V):
        rows = np.sort(np.random.default_rng(seed).choice(len(V), size=sample, replace=False))
    _, top = idx.store.search(np.ascontiguousarray(V[rows]), 1)
    return float(np.mean(top[:, 0] == ids[rows]))


__all__ = ["self_influence_top", "self_influence", "tracin_scores", "self_proponent_rate"]
