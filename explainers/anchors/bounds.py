"""KL confidence bounds of the anchors search (Kaufmann & Kalyanakrishnan 2013), with alibi's constants.

Bernoulli KL divergence, the upper and lower confidence bounds by bisection, and KL-LUCB's
exploration rate.
"""

from __future__ import annotations

import numpy as np


def kl_bernoulli(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL divergence between Bernoulli(p) and Bernoulli(q), elementwise (clipped as alibi does)."""
    m = np.clip(p, 1e-7, 1 - 1e-16)
    n = np.clip(q, 1e-7, 1 - 1e-16)
    return m * np.log(m / n) + (1.0 - m) * np.log((1.0 - m) / (1.0 - n))


def dup_bernoulli(p: np.ndarray, level: np.ndarray, n_iter: int = 17) -> np.ndarray:
    """Upper confidence bound: largest q >= p with KL(p, q) <= level (bisection)."""
    p = np.asarray(p, dtype=float)
    lm = p.copy()
    um = np.minimum(p + np.sqrt(level / 2.0), 1.0)
    for _ in range(1, n_iter):
        qm = (um + lm) / 2.0
        gt = kl_bernoulli(p, qm) > level
        um = np.where(gt, qm, um)
        lm = np.where(gt, lm, qm)
    return um


def dlow_bernoulli(p: np.ndarray, level: np.ndarray, n_iter: int = 17) -> np.ndarray:
    """Lower confidence bound: smallest q <= p with KL(p, q) <= level (bisection)."""
    p = np.asarray(p, dtype=float)
    um = p.copy()
    lm = np.clip(p - np.sqrt(level / 2.0), 0.0, 1.0)
    for _ in range(1, n_iter):
        qm = (um + lm) / 2.0
        gt = kl_bernoulli(p, qm) > level
        lm = np.where(gt, qm, lm)
        um = np.where(gt, um, qm)
    return lm


def compute_beta(n_arms: int, t: int, delta: float) -> float:
    """Exploration rate of KL-LUCB (Kaufmann & Kalyanakrishnan 2013, constants as in their experiments)."""
    alpha, k = 1.1, 405.5
    temp = np.log(k * n_arms * (t ** alpha) / delta)
    return float(temp + np.log(temp))


__all__ = ["kl_bernoulli", "dup_bernoulli", "dlow_bernoulli", "compute_beta"]
