"""Exact influence functions of three classical density estimators: k-NN, KDE and GMM.

Kong & Chaudhuri (2021) build their intuition for influence in unsupervised learning on models whose
influence has a closed form. With ℓ(z; A(X)) = −log p_X(z) the negative log-density of the model
fitted on X, the influence of training example x_i on a point z is the change of that loss when x_i
is left out of the training set:

    IF(x_i, z) = ℓ(z; A(X \\ {x_i})) − ℓ(z; A(X))

Positive: x_i is a *proponent* of z (removing it lowers the density at z); negative: an *opponent*.
Self-influence is IF(x_i, x_i). Each estimator below computes the whole (m, n) matrix of
leave-one-out influences at once, with no refitting:

* :class:`KNNDensity` — p(z) = k / (N · V_d · R_k(z)^d), R_k(z) the distance from z to its k-th
  nearest training point (z itself counts when z is a training point). Leaving x_i out changes N to
  N − 1 and, only when x_i is one of z's k nearest neighbours, R_k(z) to R_{k+1}(z):
  IF = log((N−1)/N) + d · log(R'_k(z) / R_k(z)). So z's proponents are exactly its k nearest
  neighbours, every other point weighs log((N−1)/N) < 0, and self-influence is highest in clusters
  of exactly k points (their k-th other neighbour lies in another cluster).
* :class:`KDEDensity` — Gaussian kernel, p(z) = (1/N) Σ_j K_h(z − x_j). Leaving x_i out:
  p'(z) = (N p(z) − K_h(z − x_i)) / (N − 1), so IF = log((N−1) p(z) / (N p(z) − K_h(z − x_i))):
  a soft k-NN, decreasing with the distance to z; high self-influence in sparse regions.
* :class:`GMMDensity` — a Gaussian mixture fitted by scikit-learn's EM, whose maximum-likelihood
  parameters are the M-step of its responsibilities r_jk: N_k = Σ_j r_jk, π_k = N_k / N,
  μ_k = Σ_j r_jk x_j / N_k, Σ_k = Σ_j r_jk x_j x_jᵀ / N_k − μ_k μ_kᵀ (+ the fit's ``reg_covar``).
  Leaving x_i out subtracts its terms from these sums (responsibilities of the others held fixed:
  exact for well-separated clusters, where responsibilities are 0 or 1, and the first-order
  update otherwise). Points far from their component's centre move its mean and covariance most,
  so some strong opponents of z can sit in z's own cluster.

The closed forms are checked in tests against per-example refits (brute-force leave-one-out loops
and scikit-learn's own ``KernelDensity`` / ``GaussianMixture``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import gammaln, logsumexp

__all__ = ["KNNDensity", "KDEDensity", "GMMDensity", "six_clusters"]


def _as_2d(X: Any, name: str, dim: int | None = None) -> np.ndarray:
    A = np.asarray(X, dtype=np.float64)
    if A.ndim != 2 or len(A) == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) array, got shape {A.shape}")
    if not np.isfinite(A).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if dim is not None and A.shape[1] != dim:
        raise ValueError(f"{name} has {A.shape[1]} features, the model was fitted on {dim}")
    return A


def _sqdist(Z: np.ndarray, X: np.ndarray) -> np.ndarray:
    d = (Z * Z).sum(1)[:, None] + (X * X).sum(1)[None, :] - 2.0 * Z @ X.T
    return np.maximum(d, 0.0)


class _Density:
    X: np.ndarray

    def _check_fitted(self) -> None:
        if getattr(self, "X", None) is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(X) first")

    def loss(self, Z: Any) -> np.ndarray:
        """ℓ(z) = −log p_X(z) for each row of Z (m,)."""
        return -self.log_density(Z)

    def self_influence(self) -> np.ndarray:
        """IF(x_i, x_i) for every training example (n,)."""
        self._check_fitted()
        return np.diag(self.influence(self.X)).copy()


class KNNDensity(_Density):
    """k-nearest-neighbour density estimator with exact leave-one-out influences."""

    def __init__(self, k: int = 5) -> None:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = int(k)
        self.X = None

    def fit(self, X: Any) -> "KNNDensity":
        X = _as_2d(X, "X")
        if len(X) < self.k + 2:
            raise ValueError(f"the k-NN density with k={self.k} needs at least k + 2 = {self.k + 2} points "
                             f"(leaving one out must leave k + 1), got {len(X)}")
        self.X = X
        return self

    def _sorted(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        D = np.sqrt(_sqdist(Z, self.X))
        order = np.argsort(D, axis=1, kind="stable")[:, :self.k + 1]
        return order, np.take_along_axis(D, order, 1)

    def log_density(self, Z: Any) -> np.ndarray:
        self._check_fitted()
        Z = _as_2d(Z, "Z", self.X.shape[1])
        n, d = self.X.shape
        _, R = self._sorted(Z)
        log_vd = 0.5 * d * np.log(np.pi) - gammaln(0.5 * d + 1.0)
        with np.errstate(divide="ignore"):
            return np.log(self.k) - np.log(n) - log_vd - d * np.log(R[:, self.k - 1])

    def influence(self, Z: Any) -> np.ndarray:
        """IF(x_i, z) (m, n). Infinite where z has k or more training points at distance 0."""
        self._check_fitted()
        Z = _as_2d(Z, "Z", self.X.shape[1])
        n, d = self.X.shape
        order, R = self._sorted(Z)
        out = np.full((len(Z), n), np.log((n - 1) / n))
        with np.errstate(divide="ignore", invalid="ignore"):
            jump = d * (np.log(R[:, self.k]) - np.log(R[:, self.k - 1]))
        rows = np.repeat(np.arange(len(Z)), self.k)
        out[rows, order[:, :self.k].ravel()] += np.repeat(jump, self.k)
        return out


class KDEDensity(_Density):
    """Gaussian kernel density estimator with exact leave-one-out influences."""

    def __init__(self, bandwidth: float = 0.5) -> None:
        if not np.isfinite(bandwidth) or bandwidth <= 0:
            raise ValueError(f"bandwidth must be finite and > 0, got {bandwidth!r}")
        self.bandwidth = float(bandwidth)
        self.X = None

    def fit(self, X: Any) -> "KDEDensity":
        X = _as_2d(X, "X")
        if len(X) < 2:
            raise ValueError("the KDE needs at least 2 points (leaving one out must leave one)")
        self.X = X
        return self

    def _log_kernel(self, Z: np.ndarray) -> np.ndarray:
        d = self.X.shape[1]
        h = self.bandwidth
        return -0.5 * _sqdist(Z, self.X) / h ** 2 - 0.5 * d * np.log(2 * np.pi * h ** 2)

    def log_density(self, Z: Any) -> np.ndarray:
        self._check_fitted()
        Z = _as_2d(Z, "Z", self.X.shape[1])
        return logsumexp(self._log_kernel(Z), axis=1) - np.log(len(self.X))

    def influence(self, Z: Any) -> np.ndarray:
        """IF(x_i, z) = log((N−1) p(z) / (N p(z) − K_h(z − x_i))) (m, n), computed in log space."""
        self._check_fitted()
        Z = _as_2d(Z, "Z", self.X.shape[1])
        n = len(self.X)
        logK = self._log_kernel(Z)
        log_sum = logsumexp(logK, axis=1, keepdims=True)  # log(N p(z))
        # log(N p − K_i) = log_sum + log(1 − K_i / (N p)); K_i / (N p) < 1 unless a single kernel carries all
        frac = np.exp(logK - log_sum)
        with np.errstate(divide="ignore"):
            rest = log_sum + np.log1p(-np.minimum(frac, 1.0))
        return np.log((n - 1) / n) + log_sum - rest


class GMMDensity(_Density):
    """Gaussian mixture (scikit-learn EM, full covariances) with closed-form leave-one-out influences
    at fixed responsibilities (see the module docstring)."""

    def __init__(self, n_components: int = 6, seed: int = 0, reg_covar: float = 1e-6, n_init: int = 3) -> None:
        if not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
        self.n_components, self.seed, self.reg_covar, self.n_init = int(n_components), int(seed), float(reg_covar), int(n_init)
        self.X = None

    def fit(self, X: Any) -> "GMMDensity":
        from sklearn.mixture import GaussianMixture

        X = _as_2d(X, "X")
        if len(X) < 2 * self.n_components:
            raise ValueError(f"{self.n_components} components need at least {2 * self.n_components} points, got {len(X)}")
        self.gmm = GaussianMixture(self.n_components, covariance_type="full", reg_covar=self.reg_covar,
                                   random_state=self.seed, n_init=self.n_init, tol=1e-8, max_iter=1000).fit(X)
        self.X = X
        self.resp = self.gmm.predict_proba(X)  # (n, K)
        self.Nk = self.resp.sum(0)  # (K,)
        self.S1 = self.resp.T @ X  # (K, d)  Σ_j r_jk x_j
        self.S2 = np.einsum("jk,ja,jb->kab", self.resp, X, X)  # (K, d, d)  Σ_j r_jk x_j x_jᵀ
        return self

    def _params(self, Nk: np.ndarray, S1: np.ndarray, S2: np.ndarray, n: float):
        """(log π, μ, Σ) from the responsibility sums; leading batch axes allowed."""
        d = S1.shape[-1]
        mu = S1 / Nk[..., None]
        cov = S2 / Nk[..., None, None] - mu[..., :, None] * mu[..., None, :] + self.reg_covar * np.eye(d)
        return np.log(Nk) - np.log(n), mu, cov

    @staticmethod
    def _log_gauss(Z: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
        """log N(z; μ, Σ) for Z (m, d) against parameters with shape (..., d) / (..., d, d): (m, ...)."""
        d = Z.shape[1]
        sign, logdet = np.linalg.slogdet(cov)
        if np.any(sign <= 0):
            raise ValueError("a leave-one-out covariance is not positive definite (a component with too "
                             "few points); use fewer components or a larger reg_covar")
        inv = np.linalg.inv(cov)
        diff = Z.reshape((len(Z),) + (1,) * (mu.ndim - 1) + (d,)) - mu[None]
        maha = np.einsum("...a,...ab,...b->...", diff, inv[None], diff)
        return -0.5 * (maha + logdet[None] + d * np.log(2 * np.pi))

    def log_density(self, Z: Any) -> np.ndarray:
        self._check_fitted()
        Z = _as_2d(Z, "Z", self.X.shape[1])
        logpi, mu, cov = self._params(self.Nk, self.S1, self.S2, len(self.X))
        return logsumexp(logpi[None] + self._log_gauss(Z, mu, cov), axis=1)

    def influence(self, Z: Any) -> np.ndarray:
        self._check_fitted()
        Z = _as_2d(Z, "Z", self.X.shape[1])
        X, r, n = self.X, self.resp, len(self.X)
        Nk = self.Nk[None] - r  # (n, K): the sums without example i
        S1 = self.S1[None] - r[:, :, None] * X[:, None, :]
        S2 = self.S2[None] - r[:, :, None, None] * (X[:, :, None] * X[:, None, :])[:, None]
        logpi, mu, cov = self._params(Nk, S1, S2, n - 1)
        loo = logsumexp(logpi[None] + self._log_gauss(Z, mu, cov), axis=2)  # (m, n)
        return self.log_density(Z)[:, None] - loo

    def component(self, Z: Any) -> np.ndarray:
        """The most responsible component of each row of Z (m,)."""
        self._check_fitted()
        return self.gmm.predict(_as_2d(Z, "Z", self.X.shape[1]))


def six_clusters(k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D training set of six Gaussian clusters of different sizes and spreads, one of them with
    exactly ``k`` points (the cluster the k-NN estimator's self-influence singles out).
    Returns (X (n, 2), cluster id (n,))."""
    rng = np.random.default_rng(seed)
    centers = 1.6 * np.array([[0.0, 0.0], [6.0, 0.5], [3.0, 5.0], [-4.0, 4.5], [-5.0, -3.0], [4.5, -5.0]])
    sizes = [150, 100, 80, 50, 30, k]
    spreads = [1.0, 0.6, 0.8, 0.5, 0.9, 0.3]
    X = np.concatenate([c + s * rng.standard_normal((m, 2)) for c, m, s in zip(centers, sizes, spreads)])
    labels = np.repeat(np.arange(6), sizes)
    return X, labels
