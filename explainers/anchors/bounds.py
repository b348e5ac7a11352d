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


def kl_bounds(p: np.ndarray, level: np.ndarray, upper: np.ndarray | bool, n_iter: int = 17) -> np.ndarray:
    """The q on one side of p where KL(p, q) reaches ``level``, by bisection over all arms at once.

    Elementwise, ``upper`` True: largest q >= p with KL(p, q) <= level, in the bracket
    [p, min(p + sqrt(level / 2), 1)]; False: smallest q <= p, in [max(p - sqrt(level / 2), 0), p]
    (Pinsker's inequality puts the answer inside). Both sides halve the same way (the midpoint
    replaces the far end when KL exceeds the level there, else the near end), so one loop serves a
    mix of upper and lower bounds (KL-LUCB's challengers and beam in one pass). Returns the far end
    after ``n_iter - 1`` halvings, as alibi's two loops do (bit-identical to them).
    """
    p = np.asarray(p, dtype=float)
    width = np.sqrt(np.asarray(level, dtype=float) / 2.0)
    near = p.copy()  # the end of the bracket at p (KL <= level there)
    far = np.where(upper, np.minimum(p + width, 1.0), np.clip(p - width, 0.0, 1.0))
    for _ in range(1, n_iter):
        mid = (near + far) / 2.0
        out = kl_bernoulli(p, mid) > level
        far = np.where(out, mid, far)
        near = np.where(out, near, mid)
    return far


def dup_bernoulli(p: np.ndarray, level: np.ndarray, n_iter: int = 17) -> np.ndarray:
    """Upper confidence bound: largest q >= p with KL(p, q) <= level (bisection)."""
    return kl_bounds(p, level, True, n_iter)


def dlow_bernoulli(p: np.ndarray, level: np.ndarray, n_iter: int = 17) -> np.ndarray:
    """Lower confidence bound: smallest q <= p with KL(p, q) <= level (bisection)."""
    return kl_bounds(p, level, False, n_iter)


def compute_beta(n_arms: int, t: int, delta: float) -> float:
    """Exploration rate of KL-LUCB (Kaufmann & Kalyanakrishnan 2013, constants as in their experiments)."""
    alpha, k = 1.1, 405.5
    temp = np.log(k * n_arms * (t ** alpha) / delta)
    return float(temp + np.log(temp))


__all__ = ["kl_bernoulli", "kl_bounds", "dup_bernoulli", "dlow_bernoulli", "compute_beta"]
