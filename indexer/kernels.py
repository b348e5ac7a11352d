"""Similarity kernels over gradient vectors, shared by every path that scores.

A kernel is split into a training-side and a query-side scaling so that every kernel becomes a
plain inner product, which is what FAISS and a GEMM compute:

| kernel        | score                      | train vector   | query vector |
|---------------|----------------------------|----------------|--------------|
| grad_dot      | g_q·g_t                    | g_t            | g_q          |
| grad_cos      | g_q·g_t / (‖g_q‖‖g_t‖)     | g_t/‖g_t‖      | g_q/‖g_q‖    |
| grad_asym_dot | g_q·g_t / ‖g_t‖²           | g_t/‖g_t‖²     | g_q          |

alibi adds 1e-7 to the denominators, so that a zero gradient (a perfectly fit example) scores 0
instead of NaN. For grad_asym_dot the index does exactly the same (the term is on the training side
alone). For grad_cos alibi's 1e-7 sits on the *product* ‖g_q‖‖g_t‖, which cannot be split between
the two sides, and which visibly shrinks the cosine of small gradients (a well-fit example's norm
can be 1e-4); the index therefore stores the exact cosine (unit vectors, a zero vector staying
zero). ``explainers.GradientSimilarity`` reproduces alibi's formula by default (``eps=1e-7``) and
the exact cosine with ``eps=0``.
"""

from __future__ import annotations

import numpy as np

KERNELS: tuple[str, ...] = ("grad_dot", "grad_cos", "grad_asym_dot")
EPS = 1e-7


def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if known, else raise a ValueError naming the choices."""
    if kernel not in KERNELS:
        raise ValueError(f"Unknown sim_fn/kernel {kernel!r}: use one of {', '.join(KERNELS)}.")
    return kernel


def train_scale(sq_norms: np.ndarray, kernel: str) -> np.ndarray:
    """Per-row factor that turns training gradients with squared norms ``sq_norms`` into stored vectors."""
    check_kernel(kernel)
    sq = np.asarray(sq_norms, dtype=np.float64)
    if kernel == "grad_dot":
        return np.ones_like(sq)
    if kernel == "grad_cos":
        return _inv_norm(sq)
    return 1.0 / (sq + EPS)


def _inv_norm(sq: np.ndarray) -> np.ndarray:
    """1/‖g‖, and 0 for a zero gradient (which then scores 0 against everything)."""
    out = np.zeros_like(sq)
    np.divide(1.0, np.sqrt(sq), out=out, where=sq > 0)
    return out


def query_scale(sq_norms: np.ndarray, kernel: str) -> np.ndarray:
    """Per-row factor that turns query gradients with squared norms ``sq_norms`` into query vectors."""
    check_kernel(kernel)
    sq = np.asarray(sq_norms, dtype=np.float64)
    if kernel == "grad_cos":
        return _inv_norm(sq)
    return np.ones_like(sq)


def scale_train(G: np.ndarray, kernel: str) -> np.ndarray:
    """Stored training vectors for ``kernel`` from raw gradient rows ``G`` (n, d)."""
    sq = np.einsum("ij,ij->i", G, G, dtype=np.float64)
    return (G * train_scale(sq, kernel)[:, None]).astype(G.dtype, copy=False)


def scale_query(G: np.ndarray, kernel: str) -> np.ndarray:
    """Query vectors for ``kernel`` from raw gradient rows ``G`` (m, d)."""
    sq = np.einsum("ij,ij->i", G, G, dtype=np.float64)
    return (G * query_scale(sq, kernel)[:, None]).astype(G.dtype, copy=False)


def scores(Gq: np.ndarray, Gt: np.ndarray, kernel: str, eps: float = EPS) -> np.ndarray:
    """Brute-force scores (m, n) between query gradients and training gradients, as alibi defines them.

    Denominators follow alibi exactly (norm product + ``eps`` for cos, ‖g_t‖² + ``eps`` for asym), so
    this is the reference the fast paths are tested against; ``eps=0`` gives the exact cosine
    (zero-safe). ``eps`` is the caller's: the module's ``EPS`` (alibi's 1e-7) is only its default.
    """
    check_kernel(kernel)
    if eps == 0 and kernel == "grad_cos":
        return (Gq * _inv_norm(np.einsum("ij,ij->i", Gq, Gq))[:, None]) @ (
            Gt * _inv_norm(np.einsum("ij,ij->i", Gt, Gt))[:, None]).T
    dots = Gq @ Gt.T
    if kernel == "grad_dot":
        return dots
    nq = np.linalg.norm(Gq, axis=1)
    nt = np.linalg.norm(Gt, axis=1)
    if kernel == "grad_cos":
        return dots / (nq[:, None] * nt[None, :] + eps)
    return dots / (nt[None, :] ** 2 + eps)
