"""GradientSimilarity against alibi 0.9.6's own scores, hand-computed cases and brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from explainers.similarity import GradientSimilarity
from indexer.kernels import scores as brute_scores

REF = Path(__file__).parent / "reference" / "alibi_scores.npz"
KERNELS = ("grad_dot", "grad_cos", "grad_asym_dot")


def _ref_model(ref: np.lib.npyio.NpzFile) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))
    m.load_state_dict({k[2:]: torch.as_tensor(ref[k]) for k in ref.files if k.startswith("w_")})
    return m.eval()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("precompute", [False, True])
def test_scores_equal_alibi_0_9_6(kernel: str, precompute: bool):
    ref = np.load(REF)
    m = _ref_model(ref)
    gs = GradientSimilarity(m, nn.CrossEntropyLoss(), sim_fn=kernel, precompute_grads=precompute, backend="pytorch")
    gs.fit(ref["X_train"], ref["Y_train"])
    e = gs.explain(ref["X_query"], ref["Y_query"])
    want = ref[f"{kernel}_{int(precompute)}_scores"]
    # rtol 1e-4; near-zero scores (float32 gradients on both sides) get an absolute floor of 1e-6 of the scale.
    np.testing.assert_allclose(e.scores, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # Orders agree except where alibi's own scores tie within float noise.
    agree = (e.ordered_indices == ref[f"{kernel}_{int(precompute)}_order"]).mean()
    assert agree > 0.95
    e2 = gs.explain(ref["X_query"])  # targets from the model's prediction, as alibi does
    want2 = ref[f"{kernel}_pred_scores"]
    np.testing.assert_allclose(e2.scores, want2, rtol=1e-4, atol=1e-6 * np.abs(want2).max())


def _linear_explainer(kernel: str, precompute: bool = True) -> GradientSimilarity:
    """A linear model whose 'loss' is its output: the gradient w.r.t. the weights is the input itself."""
    m = nn.Linear(3, 1, bias=False).double()
    return GradientSimilarity(m, lambda pred, target: pred.sum(), sim_fn=kernel, task="regression",
                              precompute_grads=precompute, backend="pytorch", n_examples=3)


def test_kernel_orderings_on_inputs_as_gradients():
    X_train = np.array([[4.0, 0, 0], [0.5, 0, 0], [0, 1.0, 0], [-1.0, 0, 0]])
    q = np.array([[1.0, 0.1, 0]])
    Y = np.zeros((4, 1))
    orders = {}
    for k in KERNELS:
        e = _linear_explainer(k).fit(X_train, Y).explain(q, np.zeros((1, 1)))
        orders[k] = e.ordered_indices[0].tolist()
        np.testing.assert_allclose(np.sort(e.scores[0])[::-1], e.scores[0])
    assert orders["grad_dot"] == [0, 1, 2, 3]       # 4.0 > 0.5 > 0.1 > -1
    assert orders["grad_cos"][:2] in ([0, 1], [1, 0]) and orders["grad_cos"][2:] == [2, 3]
    assert orders["grad_asym_dot"] == [1, 0, 2, 3]  # 0.5/0.25=2 > 4/16=0.25 > 0.1 > -1


def test_hand_computed_asym_dot_and_least_similar():
    X_train = np.array([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]])
    q = np.array([[2.0, 1.0, 0.0]])
    e = _linear_explainer("grad_asym_dot").fit(X_train, np.zeros((2, 1))).explain(q, np.zeros((1, 1)))
    # g_q·g_t / (|g_t|^2 + 1e-7): (2+2)/9 and 3/25
    np.testing.assert_allclose(e.scores[0], [4 / (9 + 1e-7), 3 / (25 + 1e-7)], rtol=1e-12)
    np.testing.assert_array_equal(e.most_similar[0], X_train[[0, 1]])
    np.testing.assert_array_equal(e.least_similar[0], X_train[[1, 0]])


def test_zero_gradient_gives_no_nan():
    X_train = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    for k in KERNELS:
        for pre in (True, False):
            e = _linear_explainer(k, pre).fit(X_train, np.zeros((2, 1))).explain(np.zeros(3), np.zeros(1))
            assert np.all(np.isfinite(e.scores)), k
            e = _linear_explainer(k, pre).fit(X_train, np.zeros((2, 1))).explain(np.ones((1, 3)), np.zeros((1, 1)))
            assert np.all(np.isfinite(e.scores)), k


def test_compact_store_is_exact_and_small_on_the_digits_cnn():
    from indexer.demo import digits_cnn_torch, load_digits_28

    X, y = load_digits_28(70)
    torch.manual_seed(0)
    m = digits_cnn_torch()
    for k in KERNELS:
        gs = GradientSimilarity(m, nn.CrossEntropyLoss(), sim_fn=k, precompute_grads=True, backend="pytorch")
        gs.fit(X[:60], y[:60])
        e = gs.explain(X[60:], y[60:])
        G = gs.engine.grads(X[:60], y[:60], dtype=np.float64)
        Q = gs.engine.grads(X[60:], y[60:], dtype=np.float64)
        want = brute_scores(Q, G, k)
        got = np.empty_like(want)
        np.put_along_axis(got, e.ordered_indices, e.scores, axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
        assert gs.grad_bytes < 0.03 * G.nbytes / 2  # float32 store vs float32 full rows: >30x smaller


def test_explanation_structure_and_meta():
    X_train = np.random.default_rng(0).normal(size=(8, 3))
    gs = _linear_explainer("grad_cos").fit(X_train, np.zeros((8, 1)))
    e = gs.explain(np.ones((2, 3)), np.zeros((2, 1)))
    assert e.scores.shape == (2, 8) and e.ordered_indices.shape == (2, 8)
    assert e.most_similar.shape == (2, 3, 3) and e.least_similar.shape == (2, 3, 3)
    assert e.meta["name"] == "GradientSimilarity"
    assert e.meta["params"] == {"sim_fn_name": "grad_cos", "store_grads": True, "backend_name": "pytorch",
                                "task_name": "regression"}


def test_bad_input_errors_say_what_to_fix():
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="sim_fn"):
        GradientSimilarity(m, nn.CrossEntropyLoss(), sim_fn="grad_l2", backend="pytorch")
    with pytest.raises(ValueError, match="backend"):
        GradientSimilarity(m, nn.CrossEntropyLoss(), backend="jax")
    with pytest.raises(ValueError, match="task"):
        GradientSimilarity(m, nn.CrossEntropyLoss(), task="ranking", backend="pytorch")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GradientSimilarity(object(), nn.CrossEntropyLoss(), backend="pytorch")
    gs = GradientSimilarity(m, nn.CrossEntropyLoss(), backend="pytorch")
    with pytest.raises(ValueError, match="fit"):
        gs.explain(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="lengths differ"):
        gs.fit(np.zeros((4, 3)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="NaN"):
        gs.fit(np.full((2, 3), np.nan), np.zeros(2, dtype=int))
    gs.fit(np.zeros((4, 3)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="shape"):
        gs.explain(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        gs.explain(np.array([[np.inf, 0, 0]]))
    with pytest.raises(ValueError, match="empty"):
        gs.explain(np.zeros((0, 3)))
    reg = GradientSimilarity(nn.Linear(3, 1), nn.MSELoss(), task="regression", backend="pytorch")
    reg.fit(np.zeros((2, 3)), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="target"):
        reg.explain(np.zeros((1, 3)))


def test_tensorflow_backend_matches_pytorch_on_equal_weights():
    tf = pytest.importorskip("tensorflow")
    torch.manual_seed(0)
    tm = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inp = tf.keras.layers.Input((4,), dtype="float64")
    h = tf.keras.layers.Dense(5, activation="tanh", dtype="float64")(inp)
    km = tf.keras.Model(inp, tf.keras.layers.Dense(3, dtype="float64")(h))
    km.layers[1].set_weights([tm[0].weight.detach().numpy().T, tm[0].bias.detach().numpy()])
    km.layers[2].set_weights([tm[2].weight.detach().numpy().T, tm[2].bias.detach().numpy()])
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    for k in KERNELS:
        et = GradientSimilarity(tm, nn.CrossEntropyLoss(), sim_fn=k, backend="pytorch",
                                precompute_grads=True).fit(X, Y).explain(X[:3], Y[:3])
        ek = GradientSimilarity(km, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"),
                                sim_fn=k, backend="tensorflow").fit(X, Y).explain(X[:3], Y[:3])
        np.testing.assert_allclose(ek.scores, et.scores, rtol=1e-6)
