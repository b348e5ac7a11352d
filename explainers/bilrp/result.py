"""The result of one explained pair (``BiLRPResult``) and the pooling of relevances to patches or
tokens; ``BiLRPResult.to_explanation()`` wraps it in the ``Explanation(meta, data)`` envelope the
other explainers return."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from explainers.explanation import Explanation


@dataclass
class BiLRPResult:
    """The BiLRP explanation of one pair.

    relevance: (d, d') pair relevances over the flattened input features of x and x_other;
    pooled: (p, p') the same summed over feature groups (image patches with channels summed, text
    tokens with embedding dims summed); similarity: <phi(x), phi(x_other)>; explained: the value the
    relevances decompose (equals ``similarity`` without projection, <P^T phi, P^T phi'> with one);
    r_x, r_other: (k, d) per-seed LRP relevances of each input (row m: R(phi_m; .), or of projected
    dimension m); pool_grid / pool_grid_other: the patch grid (rows, cols) of the pooled axes, or
    (tokens,) / (features,).
    """

    relevance: np.ndarray
    pooled: np.ndarray
    similarity: float
    explained: float
    r_x: np.ndarray
    r_other: np.ndarray
    input_shape: tuple[int, ...]
    input_shape_other: tuple[int, ...]
    pool: Any
    pool_grid: tuple[int, ...]
    pool_grid_other: tuple[int, ...]
    rules: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Sum of all pair relevances (≈ ``explained`` for conservative rules)."""
        return float(self.relevance.sum())

    def top_pairs(self, k: int = 20, sign: str = "positive") -> list[tuple[int, int, float]]:
        """The k strongest pooled pairs (i, i', R) by value ('positive'), by -value ('negative') or |R| ('abs')."""
        P = self.pooled
        key = {"positive": -P, "negative": P, "abs": -np.abs(P)}.get(sign)
        if key is None:
            raise ValueError(f"sign must be 'positive', 'negative' or 'abs', got {sign!r}")
        k = min(k, P.size)
        flat = np.argsort(key, axis=None, kind="stable")[:k]
        rows, cols = np.unravel_index(flat, P.shape)
        return [(int(i), int(j), float(P[i, j])) for i, j in zip(rows, cols)]

    def to_dict(self, top_k: int = 20) -> dict[str, Any]:
        """JSON-able summary for the server: pooled matrix, its grids, the similarity and top pairs."""
        return {
            "similarity": self.similarity,
            "explained": self.explained,
            "total": self.total,
            "pooled": self.pooled.astype(float).tolist(),
            "pooled_shape": list(self.pooled.shape),
            "pool_grid": list(self.pool_grid),
            "pool_grid_other": list(self.pool_grid_other),
            "top_pairs": [{"i": i, "j": j, "relevance": r} for i, j, r in self.top_pairs(top_k, "abs")],
            "rules": list(self.rules),
        }

    def to_explanation(self, meta: dict[str, Any] | None = None) -> Explanation:
        """The alibi-style ``Explanation(meta, data)`` envelope the other explainers return.

        ``data`` holds every field of the result (``exp.relevance``, ``exp.pooled``, ``exp.similarity``,
        ...) plus ``top_pairs`` (the 20 strongest pooled pairs by |R|); ``meta`` names the explainer
        and, when given, carries the explainer's parameters.
        """
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["total"] = self.total
        data["top_pairs"] = self.top_pairs(20, "abs")
        base = {"name": "BiLRP", "type": ["whitebox"], "explanations": ["local"], "params": {}}
        if meta:
            base.update(meta)
        return Explanation(meta=base, data=data)


# --------------------------------------------------------------------------------------------
# pooling


def _pool_rows(R: torch.Tensor, in_shape: tuple[int, ...], pool: Any) -> tuple[torch.Tensor, tuple[int, ...], Any]:
    """Sum per-seed relevances (M, *in_shape) over feature groups -> (M, p) and the group grid."""
    M = R.shape[0]
    if pool == "auto":
        pool = (4, 4) if len(in_shape) == 3 else ("tokens" if len(in_shape) == 2 else None)
    if pool is None or pool == "features":
        return R.reshape(M, int(np.prod(in_shape))), (int(np.prod(in_shape)),), None
    if pool == "tokens":
        if len(in_shape) != 2:
            raise ValueError(f"pool='tokens' needs inputs of shape (tokens, dims), got {in_shape}")
        return R.sum(dim=2), (in_shape[0],), pool
    if isinstance(pool, int):
        pool = (pool, pool)
    if isinstance(pool, (tuple, list)) and len(pool) == 2:
        if len(in_shape) != 3:
            raise ValueError(f"patch pooling needs images of shape (C, H, W), got {in_shape}")
        ph, pw = int(pool[0]), int(pool[1])
        if ph < 1 or pw < 1:
            raise ValueError(f"patch size must be positive, got {pool}")
        Rc = R.sum(dim=1)  # channels
        H, W = in_shape[1], in_shape[2]
        gh, gw = -(-H // ph), -(-W // pw)
        Rc = F.pad(Rc, (0, gw * pw - W, 0, gh * ph - H))
        Rp = Rc.reshape(M, gh, ph, gw, pw).sum(dim=(2, 4))
        return Rp.reshape(M, gh * gw), (gh, gw), (ph, pw)
    raise ValueError(f"pool must be 'auto', None, 'features', 'tokens', an int or a (h, w) patch size; got {pool!r}")


