"""kernels.scores: the brute-force reference honours the caller's eps (hand-computed cases)."""

import numpy as np
import pytest

from indexer.kernels import EPS, scores

GQ = np.array([[3.0, 4.0]])            # ‖g_q‖ = 5
GT = np.array([[6.0, 8.0], [0.0, 2.0]])  # ‖g_t‖ = 10 and 2; dots 50 and 8


@pytest.mark.parametrize("eps", [0.5, 1.0, 1e-3])
def test_cos_uses_the_given_eps(eps):
    want = np.array([[50.0 / (5 * 10 + eps), 8.0 / (5 * 2 + eps)]])
    np.testing.assert_allclose(scores(GQ, GT, "grad_cos", eps=eps), want, rtol=1e-12)


@pytest.mark.parametrize("eps", [0.5, 1.0, 1e-3])
def test_asym_dot_uses_the_given_eps(eps):
    want = np.array([[50.0 / (100 + eps), 8.0 / (4 + eps)]])
    np.testing.assert_allclose(scores(GQ, GT, "grad_asym_dot", eps=eps), want, rtol=1e-12)


def test_default_eps_is_alibis_and_zero_is_the_exact_cosine():
    np.testing.assert_allclose(scores(GQ, GT, "grad_cos"), [[50.0 / (50 + EPS), 8.0 / (10 + EPS)]], rtol=1e-12)
    np.testing.assert_allclose(scores(GQ, GT, "grad_cos", eps=0), [[1.0, 0.8]], rtol=1e-12)
    np.testing.assert_allclose(scores(GQ, GT, "grad_dot", eps=5.0), [[50.0, 8.0]], rtol=1e-12)
