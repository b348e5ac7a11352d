"""BiLRP: conservation, the closed form of a linear embedding, diagonal concentration of identical
pairs, agreement with a brute-force per-dimension loop, folding, projection, the server hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bilrp_reference import bilrp_reference
from explainers.bilrp import BiLRP, explain_pair, pca_projection, penultimate_embedding, plot_pair

torch.set_num_threads(1)


def _bias_free_cnn(seed: int = 0) -> nn.Sequential:
    """A bias-free ReLU CNN using every layer kind whose LRP-0 is conservative."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 6, 2, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3),
        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(5 * 3 * 3, 8, bias=False), nn.ReLU(),
    ).eval()


def _full_cnn(seed: int = 0) -> nn.Sequential:
    """Every supported layer kind, biases and a BatchNorm with non-trivial running statistics."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 4, 2), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.3), nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.ReLU()), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(27, 7), nn.BatchNorm1d(7), nn.ReLU(),
    )
    with torch.no_grad():
        for bn in (m[2], m[10]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return m.eval()


def _images(seed: int = 1, n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((1, 12, 12)) for _ in range(n)]


def test_conservation_lrp0_bias_free_relu_net():
    """Sum of pair relevances equals y = <phi(x), phi(x')> (and each first-order pass sums to phi_m)."""
    xa, xb = _images()
    for rule, kw in (("zero", {}), ("epsilon", {"epsilon": 1e-9})):
        e = BiLRP(_bias_free_cnn(), rule=rule, dtype=torch.float64, **kw)
        res = e.explain(xa, xb)
        assert res.similarity > 0
        assert abs(res.total - res.similarity) <= 1e-3 * abs(res.similarity), (rule, res.total, res.similarity)
        phi = e.embed(xa)
        active = np.nonzero((phi != 0) & (e.embed(xb) != 0))[0]
        np.testing.assert_allclose(res.r_x.sum(axis=1), phi[active], rtol=1e-6)
        # pooling only regroups: the pooled matrix sums to the same total
        assert res.pooled.sum() == pytest.approx(res.total, rel=1e-9)


def test_conservation_fails_where_it_should_not_hold():
    """With biases, the epsilon rule absorbs relevance: the test above is not vacuous."""
    xa, xb = _images()
    res = BiLRP(_full_cnn(), rule="epsilon", epsilon=0.5, dtype=torch.float64).explain(xa, xb)
    assert abs(res.total - res.similarity) > 1e-3 * abs(res.similarity)


def test_linear_embedding_closed_form():
    """phi(x) = W x: R_{ii'} = x_i x'_{i'} (W^T W)_{ii'} exactly."""
    torch.manual_seed(3)
    lin = nn.Linear(10, 4, bias=False)
    W = lin.weight.detach().double().numpy()
    rng = np.random.default_rng(0)
    x, xo = rng.normal(size=10), rng.normal(size=10)
    res = BiLRP(nn.Sequential(lin), rule="zero", dtype=torch.float64).explain(x, xo)
    expect = x[:, None] * xo[None, :] * (W.T @ W)
    np.testing.assert_allclose(res.relevance, expect, rtol=1e-9, atol=1e-12)
    assert res.total == pytest.approx(float((W @ x) @ (W @ xo)), rel=1e-9)


def test_linear_token_embedding_closed_form_and_token_pooling():
    """Text-like input (tokens, dims) through a Flatten+Linear: closed form, pooled = sum over dims."""
    torch.manual_seed(4)
    T, D, E = 5, 3, 6
    model = nn.Sequential(nn.Flatten(), nn.Linear(T * D, E, bias=False))
    W = model[1].weight.detach().double().numpy()
    rng = np.random.default_rng(1)
    x, xo = rng.normal(size=(T, D)), rng.normal(size=(T, D))
    res = BiLRP(model, rule="zero", dtype=torch.float64, pool="tokens").explain(x, xo)
    full = x.reshape(-1)[:, None] * xo.reshape(-1)[None, :] * (W.T @ W)
    np.testing.assert_allclose(res.relevance, full, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.pooled, full.reshape(T, D, T, D).sum(axis=(1, 3)), rtol=1e-9, atol=1e-12)
    assert res.pool_grid == (T,)


@pytest.mark.parametrize("opts", [
    {"rule": "zero"},
    {"rule": "epsilon", "epsilon": 0.1},
    {"rule": "gamma", "gamma": 0.5},
    {"rule": ["gamma", "gamma", "epsilon"], "input_rule": "zb", "bounds": (0.0, 1.0)},
])
def test_batched_equals_bruteforce_loop(opts):
    """The batched explicit pass equals one modified-gradient backward per embedding dimension."""
    xa, xb = _images(5)
    e = BiLRP(_full_cnn(), dtype=torch.float64, batch_size=3, **opts)  # batch_size 3: several seed chunks
    res = e.explain(xa, xb)
    ref = bilrp_reference(_full_cnn(), xa, xb, dtype=torch.float64, **opts)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(res.relevance, ref, rtol=1e-8, atol=1e-12 * np.abs(ref).max())


def test_batchnorm_folding_preserves_forward():
    m = _full_cnn()
    x = _images(7)[0]
    e = BiLRP(m, dtype=torch.float64)
    want = m.double()(torch.as_tensor(x)[None]).detach().numpy().reshape(-1)
    np.testing.assert_allclose(e.embed(x), want, rtol=1e-10, atol=1e-12)


def test_identical_inputs_concentrate_on_diagonal():
    """Measure: on the pooled matrix (2x2 patches, positive part, patches carrying relevance), the mean
    diagonal cell over the mean off-diagonal cell. For an identical pair the diagonal dominates (> 5x),
    and clearly more than for a pair of different digits (same locations, different strokes)."""
    from indexer.demo import load_digits_28, train_digits_cnn

    X, y = load_digits_28(300)
    torch.manual_seed(0)
    emb = penultimate_embedding(train_digits_cnn(X, y, epochs=1, seed=0))
    e = BiLRP(emb, rule=["gamma", "gamma", "epsilon"], input_rule="zb", bounds=(0.0, 1.0), pool=(2, 2))

    def diag_ratio(a, b):
        P = np.clip(e.explain(a, b).pooled, 0, None)
        act = (P.sum(axis=1) > 0) & (P.sum(axis=0) > 0)
        P = P[np.ix_(act, act)]
        p = P.shape[0]
        return (np.trace(P) / p) / ((P.sum() - np.trace(P)) / (p * (p - 1)))

    for i in (0, 1, 2):
        same = diag_ratio(X[i], X[i])
        j = int(np.nonzero(y != y[i])[0][0])
        other = diag_ratio(X[i], X[j])
        assert same > 5, (i, same)
        assert same > 1.5 * other, (i, same, other)


def test_projection_full_rank_is_exact_and_low_rank_is_conserved():
    m = _bias_free_cnn()
    xa, xb = _images(2)
    base = BiLRP(m, rule="zero", dtype=torch.float64).explain(xa, xb)
    Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))
    full = BiLRP(m, rule="zero", dtype=torch.float64, projection=Q).explain(xa, xb)
    np.testing.assert_allclose(full.relevance, base.relevance, rtol=1e-8, atol=1e-14)
    e = BiLRP(m, rule="zero", dtype=torch.float64, projection=Q[:, :3])
    low = e.explain(xa, xb)
    phi_a, phi_b = e.embed(xa), e.embed(xb)
    assert low.explained == pytest.approx(float((Q[:, :3].T @ phi_a) @ (Q[:, :3].T @ phi_b)), rel=1e-9)
    assert low.total == pytest.approx(low.explained, rel=1e-3)
    assert low.r_x.shape[0] == 3
    ref = bilrp_reference(m, xa, xb, rule="zero", dtype=torch.float64, projection=Q[:, :3])
    np.testing.assert_allclose(low.relevance, ref, rtol=1e-8, atol=1e-14)
    P = pca_projection(np.random.default_rng(1).normal(size=(20, 8)), 4)
    assert P.shape == (8, 4) and np.allclose(P.T @ P, np.eye(4), atol=1e-5)


def test_penultimate_embedding_factorises_last_layer_gradient_similarity():
    """<g, g'> over the last Linear layer = <delta, delta'> (<phi, phi'> + 1): the documented choice."""
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    emb = penultimate_embedding(clf)
    x = torch.randn(2, 1, 12)
    ys = torch.tensor([0, 2])
    grads, deltas = [], []
    for k in range(2):
        clf.zero_grad()
        logits = clf(x[k:k + 1])
        loss = nn.functional.cross_entropy(logits, ys[k:k + 1])
        loss.backward()
        last = clf[3]
        grads.append(torch.cat([last.weight.grad.reshape(-1), last.bias.grad]).clone())
        deltas.append(torch.softmax(logits, 1)[0].detach() - nn.functional.one_hot(ys[k], 3))
    phi = emb(x).detach()
    want = float(deltas[0] @ deltas[1]) * (float(phi[0] @ phi[1]) + 1.0)
    assert float(grads[0] @ grads[1]) == pytest.approx(want, rel=1e-5)


def test_explain_pair_validates_input():
    m = _full_cnn()
    xa, xb = _images()
    res = explain_pair(m, xa, xb, rule="epsilon", pool=(3, 3))
    assert res.pooled.shape == (16, 16) and res.pool_grid == (4, 4)
    d = res.to_dict(top_k=5)
    assert len(d["top_pairs"]) == 5 and d["pooled_shape"] == [16, 16]
    with pytest.raises(ValueError, match="same shape"):
        explain_pair(m, xa, xb[:, :10])
    bad = xa.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        explain_pair(m, bad, xb)
    with pytest.raises(ValueError, match="do not fit the embedding model"):
        explain_pair(m, np.zeros((1, 9, 9)), np.zeros((1, 9, 9)))
    with pytest.raises(ValueError, match="unknown BiLRP options"):
        explain_pair(m, xa, xb, rules="zero")
    with pytest.raises(ValueError, match="bounds"):
        explain_pair(m, xa, xb, input_rule="zb")
    with pytest.raises(ValueError, match="unknown LRP rule"):
        explain_pair(m, xa, xb, rule="alpha")
    with pytest.raises(TypeError, match="does not support layer"):
        BiLRP(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        BiLRP(lambda x: x)


def test_plot_pair_draws_top_pairs(tmp_path):
    m = _bias_free_cnn()
    xa, xb = _images()
    res = BiLRP(m, rule="zero", pool=(3, 3)).explain(xa, xb)
    path = tmp_path / "pair.png"
    fig = plot_pair(res, xa, xb, path=str(path), k=7)
    assert path.stat().st_size > 1000
    assert len(fig.axes[0].lines) == sum(1 for _, _, r in res.top_pairs(7, "abs") if r != 0) > 0


def test_zb_on_saturated_pixels_is_stable():
    """Digits with exact 0 and 1 pixels give z^B patches with z = 0: no blow-up, float32
    agrees with float64, and the batched pass with the loop (a regression: rounding noise in z used
    to be amplified into relevances of 1e-2 on background pixels)."""
    from indexer.demo import digits_cnn_torch, load_digits_28

    X, _ = load_digits_28(6)
    imgs = [X[0], X[5]]
    assert (X == 0).any() and (X == 1).any()
    opts = dict(rule="gamma", input_rule="zb", bounds=(0.0, 1.0))
    torch.manual_seed(0)
    m = penultimate_embedding(digits_cnn_torch())
    e64 = BiLRP(m, dtype=torch.float64, **opts)
    r64 = e64.explain(*imgs).relevance
    r32 = BiLRP(m, **opts).explain(*imgs).relevance
    scale = np.abs(r64).max()
    assert scale > 0
    assert np.abs(r32 - r64).max() < 1e-4 * scale
    np.testing.assert_allclose(r64, bilrp_reference(m, *imgs, dtype=torch.float64, **opts), rtol=1e-8,
                               atol=1e-12 * scale)
    with pytest.raises(ValueError, match="outside the z"):
        e64.explain(imgs[0] * 2 - 0.5, imgs[1])


def test_explanation_envelope_carries_result_and_params():
    """``BiLRP.explanation`` gives alibi's ``Explanation(meta, data)``: data keys double as attributes."""
    from explainers import Explanation

    xa, xb = _images()
    e = BiLRP(_bias_free_cnn(), rule="zero", pool=(3, 3), dtype=torch.float64)
    exp = e.explanation(xa, xb)
    res = e.explain(xa, xb)
    assert isinstance(exp, Explanation)
    assert exp.meta["name"] == "BiLRP" and exp.meta["params"]["rules"] == ["zero"] * 3
    np.testing.assert_array_equal(exp.pooled, res.pooled)
    assert exp.similarity == res.similarity and exp.data["total"] == pytest.approx(res.total)
    assert exp.top_pairs == res.top_pairs(20, "abs")
