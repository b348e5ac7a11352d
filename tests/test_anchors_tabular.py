"""AnchorTabular against a model whose rule is known: predict 1 iff x2 > t and x5 = 'a'."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from explainers.anchors import AnchorTabular, Explanation
from explainers.anchors.base import dlow_bernoulli, dup_bernoulli, kl_bernoulli

NAMES = [f"x{i}" for i in range(6)]
CATS = {3: ["p", "q", "r"], 5: ["a", "b", "c"]}
FAST = dict(coverage_samples=2000)


def make_data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.normal(size=n), rng.uniform(size=n), rng.normal(size=n), rng.integers(0, 3, n),
                         rng.normal(size=n), rng.integers(0, 3, n)]).astype(np.float64)
    t = float(np.median(X[:, 2]))  # the rule's threshold is a quantile border
    return X, t


X, T = make_data()


def rule(Z: np.ndarray) -> np.ndarray:
    Z = np.asarray(Z)
    return ((Z[:, 2] > T) & (Z[:, 5] == 0)).astype(np.int64)


def rule_proba(Z: np.ndarray) -> np.ndarray:
    y = rule(Z)
    return np.column_stack([1.0 - y, y])


@pytest.fixture(scope="module")
def explainer() -> AnchorTabular:
    return AnchorTabular(rule, NAMES, categorical_names=CATS, seed=3).fit(X)


def positives() -> np.ndarray:
    return X[rule(X) == 1]


def test_known_rule_yields_exactly_its_predicates(explainer: AnchorTabular) -> None:
    for x in positives()[:3]:
        exp = explainer.explain(x, **FAST)
        assert isinstance(exp, Explanation)
        assert sorted(exp.anchor) == sorted(["x5 = a", "x2 > %.2f" % T]), exp.anchor
        assert sorted(exp.raw["feature"]) == [2, 5]
        assert exp.precision == 1.0 and exp.raw["success"]
        # coverage: fraction of training rows where x2 > median and x5 == 0 (about 1/2 * 1/3)
        truth = np.mean((X[:, 2] > T) & (X[:, 5] == 0))
        assert abs(exp.coverage - truth) < 0.03
        assert exp.raw["prediction"].tolist() == [1]
        # per-step trace and examples of the partial anchors
        assert len(exp.raw["precision"]) == len(exp.raw["coverage"]) == len(exp.raw["examples"]) == 2
        assert exp.raw["examples"][-1]["covered_true"].shape[1] == 6
        assert len(exp.raw["examples"][-1]["covered_false"]) == 0


def test_precision_remeasured_on_fresh_samples(explainer: AnchorTabular) -> None:
    """Precision of the anchor on training rows drawn from the anchor (an independent measurement)."""
    rng = np.random.default_rng(123)
    for x in np.concatenate([positives()[:2], X[rule(X) == 0][:4]]):
        exp = explainer.explain(x, threshold=0.9, **FAST)
        covered = X[explainer.anchor_mask(exp, X)]
        assert len(covered) > 0
        sample = covered[rng.integers(0, len(covered), 2000)]
        label = rule(x[None])[0]
        precision = np.mean(rule(sample) == label)
        assert precision >= 0.9 - 0.05, (exp.anchor, precision)
        # coverage evaluated with the anchor's operators on the training data
        assert abs(exp.coverage - explainer.anchor_mask(exp, X).mean()) < 0.03


def test_same_seed_same_anchor_and_no_global_seeding(explainer: AnchorTabular) -> None:
    x = X[rule(X) == 0][5]
    state = np.random.get_state()[1].copy()
    a = explainer.explain(x, seed=7, **FAST)
    b = explainer.explain(x, seed=7, **FAST)
    assert a.anchor == b.anchor and a.precision == b.precision and a.coverage == b.coverage
    assert a.raw["num_preds"] == b.raw["num_preds"]
    assert np.array_equal(np.random.get_state()[1], state), "explain must not touch numpy's global RNG"


def test_threads_give_sequential_results(explainer: AnchorTabular) -> None:
    xs = np.concatenate([positives()[:3], X[rule(X) == 0][:3]])
    seq = [explainer.explain(x, seed=i, **FAST) for i, x in enumerate(xs)]
    out: list = [None] * len(xs)

    def work(i: int) -> None:
        out[i] = explainer.explain(xs[i], seed=i, **FAST)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, p in zip(seq, out):
        assert s.anchor == p.anchor and s.precision == p.precision and s.coverage == p.coverage
        assert s.raw["num_preds"] == p.raw["num_preds"]


def test_predictor_type_declared_wins() -> None:
    ex = AnchorTabular(rule_proba, NAMES, categorical_names=CATS, predictor_type="proba", seed=0).fit(X)
    exp = ex.explain(positives()[0], **FAST)
    assert sorted(exp.raw["feature"]) == [2, 5]
    assert exp.meta["params"]["predictor_type"] == "proba" and not exp.meta["params"]["predictor_type_inferred"]
    wrong = AnchorTabular(rule_proba, NAMES, categorical_names=CATS, predictor_type="class").fit(X)
    with pytest.raises(ValueError, match="predictor_type='proba'"):
        wrong.explain(positives()[0])
    with pytest.raises(ValueError, match="predictor_type"):
        AnchorTabular(rule, NAMES, predictor_type="labels")


@pytest.mark.parametrize("drop", [None, "first"])
def test_one_hot_input(drop: str | None) -> None:
    """ohe=True, with full one-hot blocks and with drop='first' blocks (alibi #602)."""
    from sklearn.preprocessing import OneHotEncoder

    enc = OneHotEncoder(drop=drop, sparse_output=False, categories=[[0.0, 1.0, 2.0]] * 2).fit(X[:, [3, 5]])

    def to_ohe(Z: np.ndarray) -> np.ndarray:
        o = enc.transform(Z[:, [3, 5]])
        w = o.shape[1] // 2
        return np.column_stack([Z[:, :3], o[:, :w], Z[:, 4:5], o[:, w:]])

    def predict_ohe(Zo: np.ndarray) -> np.ndarray:
        w = (Zo.shape[1] - 4) // 2
        x5_is_a = Zo[:, 4 + w:].sum(axis=1) == 0 if drop == "first" else Zo[:, 4 + w] == 1
        return ((Zo[:, 2] > T) & x5_is_a).astype(int)

    Xo = to_ohe(X)
    assert np.array_equal(predict_ohe(Xo), rule(X))
    ex = AnchorTabular(predict_ohe, NAMES, categorical_names=CATS, ohe=True, ohe_drop=drop, seed=1).fit(Xo)
    exp = ex.explain(Xo[rule(X) == 1][0], **FAST)
    assert sorted(exp.anchor) == sorted(["x5 = a", "x2 > %.2f" % T])
    assert exp.raw["instance"].shape == (Xo.shape[1],)
    assert exp.raw["examples"][-1]["covered_true"].shape[1] == Xo.shape[1]
    assert np.array_equal(predict_ohe(exp.raw["examples"][-1]["covered_true"]),
                          np.ones(len(exp.raw["examples"][-1]["covered_true"])))


def test_bad_input() -> None:
    ex = AnchorTabular(rule, NAMES, categorical_names=CATS)
    with pytest.raises(ValueError, match="not fitted"):
        ex.explain(X[0])
    ex.fit(X)
    with pytest.raises(ValueError, match="expected 6 features"):
        ex.explain(X[0, :5])
    with pytest.raises(ValueError, match="threshold"):
        ex.explain(X[0], threshold=1.5)
    with pytest.raises(ValueError, match="codes"):
        AnchorTabular(rule, NAMES, categorical_names=CATS).fit(X + 0.5)


def test_kl_bounds_match_definition() -> None:
    """The bisection bounds are the KL-ball limits: KL(p, bound) == level at the bound (hand-checkable)."""
    p = np.array([0.2, 0.5, 0.9])
    level = np.array([0.05, 0.1, 0.01])
    ub, lb = dup_bernoulli(p, level), dlow_bernoulli(p, level)
    assert np.all(ub > p) and np.all(lb < p)
    np.testing.assert_allclose(kl_bernoulli(p, ub), level, atol=2e-3)
    np.testing.assert_allclose(kl_bernoulli(p, lb), level, atol=2e-3)
    # the one-pass helper KL-LUCB uses (upper bounds for some arms, lower for others) gives the same numbers
    from explainers.anchors.bounds import kl_bounds

    upper = np.array([True, False, True])
    np.testing.assert_array_equal(kl_bounds(p, level, upper), np.where(upper, ub, lb))


def test_lucb_arms_paper_rule_and_batched_rounds(explainer: AnchorTabular) -> None:
    """lucb_arms=2 (the paper's two critical arms per round) and the default (all blocking arms)
    find the same rule; the default needs fewer predictor calls."""
    x = positives()[1]
    calls = {}
    for arms in (2, None):
        before = explainer.predictor.calls
        exp = explainer.explain(x, lucb_arms=arms, seed=0, **FAST)
        calls[arms] = explainer.predictor.calls - before
        assert sorted(exp.raw["feature"]) == [2, 5] and exp.precision == 1.0
    assert calls[None] < calls[2]
    with pytest.raises(ValueError, match="lucb_arms"):
        explainer.explain(x, lucb_arms=1)


def test_fallback_conditions_on_the_longest_satisfiable_prefix() -> None:
    """Fewer training rows than samples satisfy the whole anchor (alibi's ``replace_features``):
    each of those rows is used once with all anchored features, the rest take the first feature
    from rows satisfying its predicate and the second independently from rows satisfying its own.
    Hand-built data: x0 and x1 anti-correlated so only 5 rows have both above the median."""
    from explainers.anchors.tabular import TabularSampler

    rng = np.random.default_rng(0)
    n_rows = 200
    x0 = np.arange(n_rows, dtype=float)
    x1 = x0[::-1].copy()
    both = np.array([10, 20, 30, 40, 50])  # rows with low x0 (<= median): give them both high
    x0[both], x1[both] = 150 + both / 100, 160 + both / 100
    X = np.column_stack([x0, x1, rng.normal(size=n_rows)])
    ex = AnchorTabular(lambda Z: np.zeros(len(Z), dtype=int), ["x0", "x1", "x2"], seed=0).fit(X, disc_perc=(50,))
    inst = np.array([190.0, 190.0, 0.0])
    s = TabularSampler(ex, inst, 0, ex._predict_ord)
    q0, q1 = ex._qts[0][0], ex._qts[1][0]
    a0 = [i for i, p in enumerate(s.preds) if p[0] == 0 and p[1] == 2]
    a1 = [i for i, p in enumerate(s.preds) if p[0] == 1 and p[1] == 2]
    anchor = (a0[0], a1[0])
    full = np.nonzero((X[:, 0] > q0) & (X[:, 1] > q1))[0]
    assert sorted(full) == sorted(both)
    samples, binary = s.perturb(anchor, 100, np.random.default_rng(1))
    assert binary[:, list(anchor)].all()
    assert (samples[:, 0] > q0).all() and (samples[:, 1] > q1).all()
    # the first 5 samples are the full-anchor rows, both features jointly
    assert sorted(map(tuple, samples[:5, :2])) == sorted(map(tuple, X[both][:, :2]))
    # the rest: x0 from rows with x0 > q0, x1 from rows with x1 > q1, drawn independently (hardly ever a training pair)
    assert set(samples[5:, 0]) <= set(X[X[:, 0] > q0, 0]) and set(samples[5:, 1]) <= set(X[X[:, 1] > q1, 1])
    pairs = set(map(tuple, X[:, :2]))
    assert sum(tuple(p) in pairs for p in samples[5:, :2]) < 20
    # the unanchored feature comes from random training rows
    assert set(samples[:, 2]) <= set(X[:, 2])


def test_fallback_three_features_uses_the_two_feature_prefix() -> None:
    """Anchor on x0, x1, x3: 2 rows satisfy all three, 5 satisfy x0 and x1. Samples 0-1: the 2 rows;
    samples 2-6: the 5 (x0, x1) rows jointly, x3 from its own rows; the rest x0 from its rows and
    x1, x3 independently (alibi's cascade; independent per-feature sampling would make (x0, x1)
    a training pair only by chance)."""
    from explainers.anchors.tabular import TabularSampler

    rng = np.random.default_rng(0)
    n_rows = 200
    x0 = np.arange(n_rows, dtype=float)
    x1 = x0[::-1].copy()
    both = np.array([10, 20, 30, 40, 50])
    x0[both], x1[both] = 150 + both / 100, 160 + both / 100
    x3 = rng.permutation(n_rows).astype(float)
    x3[[30, 40, 50]], x3[[10, 20]] = -1.0, 1000.0
    X = np.column_stack([x0, x1, rng.normal(size=n_rows), x3])
    ex = AnchorTabular(lambda Z: np.zeros(len(Z), dtype=int), ["x0", "x1", "x2", "x3"], seed=0).fit(X, disc_perc=(50,))
    s = TabularSampler(ex, np.array([190.0, 190.0, 0.0, 1000.0]), 0, ex._predict_ord)
    anchor = tuple(i for i, p in enumerate(s.preds) if p[0] in (0, 1, 3) and p[1] == 2)
    assert len(anchor) == 3
    samples, binary = s.perturb(anchor, 100, np.random.default_rng(1))
    assert binary[:, list(anchor)].all()
    assert sorted(map(tuple, samples[:2, [0, 1, 3]])) == sorted(map(tuple, X[[10, 20]][:, [0, 1, 3]]))
    assert sorted(map(tuple, samples[2:7, :2])) == sorted(map(tuple, X[both][:, :2]))
