"""Closed-form influences of the k-NN, KDE and GMM density estimators against per-example refits:
a brute-force leave-one-out loop for each (k-NN from sorted distances and the d-ball volume; KDE with
scikit-learn's KernelDensity; GMM by an explicit weighted M-step with SciPy's Gaussian, and by
scikit-learn's GaussianMixture refitted without the example), plus the properties the closed forms
imply on the six-cluster set."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from indexer.density_influence import GMMDensity, KDEDensity, KNNDensity, six_clusters


@pytest.fixture(scope="module")
def data():
    X, lab = six_clusters(k=5, seed=0)
    rng = np.random.default_rng(1)
    Z = np.concatenate([X[rng.choice(len(X), 3, replace=False)] + 0.1, [[0.5, -0.3], [10.0, 10.0]]])
    return X, lab, Z


def _knn_loss(X: np.ndarray, z: np.ndarray, k: int) -> float:
    """−log of k / (N V_d R_k^d), from scratch (V_d = π^(d/2) / Γ(d/2 + 1))."""
    n, d = X.shape
    r = np.sort(np.linalg.norm(X - z, axis=1))[k - 1]
    vd = math.pi ** (d / 2) / math.gamma(d / 2 + 1)
    return -math.log(k / (n * vd * r ** d))


def test_knn_influence_equals_leave_one_out_loop(data):
    X, lab, Z = data
    m = KNNDensity(k=5).fit(X)
    IF = m.influence(Z)
    cols = np.r_[0:40, len(X) - 12:len(X)]  # some of every kind, incl. the 5-point cluster
    for q, z in enumerate(Z):
        base = _knn_loss(X, z, 5)
        assert m.loss(z[None])[0] == pytest.approx(base, rel=1e-12)
        ref = [_knn_loss(np.delete(X, i, 0), z, 5) - base for i in cols]
        np.testing.assert_allclose(IF[q, cols], ref, rtol=1e-10, atol=1e-12)
    # self-influence: x_i evaluated by the model without it
    si = m.self_influence()
    for i in cols:
        assert si[i] == pytest.approx(_knn_loss(np.delete(X, i, 0), X[i], 5) - _knn_loss(X, X[i], 5), rel=1e-10)
    # proponents are exactly the k nearest neighbours of z; everyone else weighs log((N-1)/N)
    nn = np.argsort(np.linalg.norm(X - Z[3], axis=1))[:5]
    assert set(np.argsort(-IF[3])[:5]) == set(nn)
    assert np.allclose(np.delete(IF[3], nn), math.log((len(X) - 1) / len(X)))
    # the paper's observation: the highest self-influences are the cluster of exactly k points
    assert set(lab[np.argsort(-si)[:5]]) == {5}


def test_kde_influence_equals_sklearn_refits(data):
    from sklearn.neighbors import KernelDensity

    X, _, Z = data
    h = 0.4
    m = KDEDensity(h).fit(X)
    full = KernelDensity(bandwidth=h, kernel="gaussian").fit(X)
    np.testing.assert_allclose(m.log_density(Z), full.score_samples(Z), rtol=1e-10)
    IF = m.influence(Z)
    cols = np.r_[0:25, 300:310, len(X) - 5:len(X)]
    for i in cols:
        loo = KernelDensity(bandwidth=h, kernel="gaussian").fit(np.delete(X, i, 0))
        np.testing.assert_allclose(IF[:, i], full.score_samples(Z) - loo.score_samples(Z), rtol=1e-8, atol=1e-12)
    si = m.self_influence()
    for i in cols[:8]:
        loo = KernelDensity(bandwidth=h, kernel="gaussian").fit(np.delete(X, i, 0))
        assert si[i] == pytest.approx(full.score_samples(X[i:i + 1])[0] - loo.score_samples(X[i:i + 1])[0], rel=1e-8)
    # a soft k-NN: the influence over z falls with the distance to z (strictly while the kernel
    # weight is representable; far points all weigh log((N-1)/N))
    by_dist = IF[3][np.argsort(np.linalg.norm(X - Z[3], axis=1))]
    assert np.all(np.diff(by_dist[:40]) < 0) and np.all(np.diff(by_dist) <= 1e-15)
    assert by_dist[-1] == pytest.approx(math.log((len(X) - 1) / len(X)))


def _gmm_loss_loop(X: np.ndarray, R: np.ndarray, z: np.ndarray, reg: float) -> float:
    """−log p(z) of the mixture whose parameters are the weighted M-step of responsibilities R."""
    logs = []
    for k in range(R.shape[1]):
        w = R[:, k]
        mu = np.average(X, axis=0, weights=w)
        cov = np.cov(X.T, aweights=w, bias=True) + reg * np.eye(X.shape[1])
        logs.append(math.log(w.sum() / len(X)) + multivariate_normal(mu, cov).logpdf(z))
    return -float(logsumexp(logs))


def test_gmm_influence_equals_m_step_loop_and_sklearn_refit(data):
    from sklearn.mixture import GaussianMixture

    X, lab, Z = data
    m = GMMDensity(6, seed=0).fit(X)
    R = m.resp
    # the fitted model is the M-step of its responsibilities (EM converged)
    np.testing.assert_allclose(m.log_density(Z), m.gmm.score_samples(Z), rtol=1e-6)
    IF = m.influence(Z)
    cols = np.r_[0:12, 200:206, len(X) - 5:len(X)]
    for q in (0, 3):
        base = _gmm_loss_loop(X, R, Z[q], m.reg_covar)
        ref = [_gmm_loss_loop(np.delete(X, i, 0), np.delete(R, i, 0), Z[q], m.reg_covar) - base for i in cols]
        np.testing.assert_allclose(IF[q, cols], ref, rtol=1e-7, atol=1e-10)
    # the peer library: EM refitted on X without x_i (warm-started at the fit) gives the same
    # influence on these well-separated clusters
    g = m.gmm
    for i in cols[::3]:
        Xi = np.delete(X, i, 0)
        loo = GaussianMixture(6, covariance_type="full", reg_covar=m.reg_covar, tol=1e-10, max_iter=500,
                              weights_init=g.weights_, means_init=g.means_,
                              precisions_init=g.precisions_).fit(Xi)
        np.testing.assert_allclose(IF[:4, i], g.score_samples(Z[:4]) - loo.score_samples(Z[:4]),
                                   rtol=2e-3, atol=1e-6)


def test_bad_input_is_refused(data):
    X, _, _ = data
    with pytest.raises(ValueError, match="k must be"):
        KNNDensity(0)
    with pytest.raises(ValueError, match="at least k"):
        KNNDensity(5).fit(X[:6])
    with pytest.raises(ValueError, match="bandwidth"):
        KDEDensity(0.0)
    with pytest.raises(ValueError, match="features"):
        KDEDensity(0.5).fit(X).influence(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        KNNDensity(2).fit(np.full((5, 2), np.nan))
    with pytest.raises(RuntimeError, match="not fitted"):
        GMMDensity(2).influence(X[:2])
