"""AnchorTabular: anchors for tabular classifiers, a drop-in for alibi 0.9.6's ``AnchorTabular``.

Numerical features are discretised into quantile bins (``disc_perc``); each bin border that lies on
the instance's side gives one predicate (``x <= q`` or ``x > q``), categorical features give
``x = value``. Samples that satisfy an anchor are drawn from the training data conditioned on the
anchor (the anchor's features are copied jointly from training rows where the whole anchor holds,
the others from random training rows), as in the paper and alibi. Coverage is the fraction of
training rows on which every predicate of the anchor holds, evaluated with the predicates' own
operators (``<=``, ``>``, ``=``), not with bin equality.
"""

from __future__ import annotations

import copy
from itertools import accumulate
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .base import (SEARCH_DEFAULTS, Explanation, Predictor, explainer_meta, resolve_predictor,
                   search_with_call_knobs, summary_precision_coverage)


# --------------------------------------------------------------------------------------------------
# One-hot encoding helpers (drop='first' / sklearn drop_idx_ supported)
# --------------------------------------------------------------------------------------------------
def _ohe_layout(n_features: int, cat_sizes: Mapping[int, int], dropped: Mapping[int, int | None]
                ) -> list[tuple[int, int, int]]:
    """For each ordinal feature: (first OHE column, number of OHE columns, kind 0=num / 1=cat)."""
    layout, col = [], 0
    for f in range(n_features):
        if f in cat_sizes:
            width = cat_sizes[f] - (1 if dropped.get(f) is not None else 0)
            layout.append((col, width, 1))
            col += width
        else:
            layout.append((col, 1, 0))
            col += 1
    return layout


class OneHotMap:
    """Maps between ordinal rows (one column per feature) and one-hot rows.

    ``dropped[f]`` is the category of feature ``f`` that has no column (all-zero block), as with
    scikit-learn's ``OneHotEncoder(drop='first')`` (``drop_idx_``); ``None`` means a full block.
    Blocks are laid out in feature order, each categorical feature's block where its column was.
    """

    def __init__(self, n_features: int, cat_sizes: Mapping[int, int], dropped: Mapping[int, int | None]) -> None:
        self.n_features = n_features
        self.cat_sizes = dict(cat_sizes)
        self.dropped = {f: dropped.get(f) for f in cat_sizes}
        self.layout = _ohe_layout(n_features, self.cat_sizes, self.dropped)
        self.n_columns = sum(w for _, w, _ in self.layout)

    def to_ohe(self, X: np.ndarray, dtype: Any) -> np.ndarray:
        X = np.atleast_2d(X)
        out = np.zeros((X.shape[0], self.n_columns), dtype=dtype)
        for f, (c0, w, kind) in enumerate(self.layout):
            if kind == 0:
                out[:, c0] = X[:, f]
                continue
            cats = X[:, f].astype(np.int64)
            d = self.dropped[f]
            cols = cats if d is None else cats - (cats > d)
            keep = np.ones(len(cats), dtype=bool) if d is None else cats != d
            out[np.nonzero(keep)[0], c0 + cols[keep]] = 1
        return out

    def to_ord(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X))
        if X.shape[1] != self.n_columns:
            raise ValueError(f"one-hot input must have {self.n_columns} columns "
                             f"(feature_names, categorical_names and ohe_drop), got {X.shape[1]}")
        out = np.zeros((X.shape[0], self.n_features), dtype=np.float64)
        for f, (c0, w, kind) in enumerate(self.layout):
            block = X[:, c0:c0 + w]
            if kind == 0:
                out[:, f] = block[:, 0]
                continue
            d = self.dropped[f]
            if d is None:
                out[:, f] = block.argmax(axis=1)
            else:
                idx = block.argmax(axis=1)
                cat = idx + (idx >= d)
                cat[block.max(axis=1) <= 0] = d
                out[:, f] = cat
        return out


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------
class TabularSampler:
    """Draws training rows conditioned on an anchor; predicates are indexed 0..n_features-1."""

    def __init__(self, explainer: "AnchorTabular", x: np.ndarray, label: Any, predictor: Callable) -> None:
        self.ex = explainer
        self.x = x
        self.label = label
        self.predictor = predictor
        self.xd = explainer._discretize(x[None, :])[0]
        # predicates: (feature, op, value); op 0: bin == v (categorical), 1: bin <= v, 2: bin > v
        preds: list[tuple[int, int, int]] = []
        for f in range(explainer.n_features):
            if f in explainer.categorical_features:
                preds.append((f, 0, int(self.xd[f])))
            else:
                n_bins = len(explainer.feature_values[f])
                b = int(self.xd[f])
                for v in range(n_bins):
                    if b <= v != n_bins - 1:
                        preds.append((f, 1, v))
                    elif b > v:
                        preds.append((f, 2, v))
        self.preds = preds
        self.n_features = len(preds)
        self.p_feat = np.array([p[0] for p in preds], dtype=np.int64)
        self.p_op = np.array([p[1] for p in preds], dtype=np.int64)
        self.p_val = np.array([p[2] for p in preds], dtype=np.int64)
        self._rows_cache: dict[tuple, np.ndarray] = {}
        # binary predicate matrix of the whole training set: reused for conditioning and coverage
        self.train_bin = self.binarize(explainer._d_train)

    def binarize(self, d: np.ndarray) -> np.ndarray:
        """Bool (n, n_predicates): does each predicate hold on each discretised row."""
        vals = d[:, self.p_feat]
        return np.where(self.p_op == 0, vals == self.p_val,
                        np.where(self.p_op == 1, vals <= self.p_val, vals > self.p_val))

    def _rows(self, anchor: tuple[int, ...]) -> np.ndarray:
        key = tuple(sorted(anchor))
        rows = self._rows_cache.get(key)
        if rows is None:
            rows = np.nonzero(self.train_bin[:, list(key)].all(axis=1))[0]
            self._rows_cache[key] = rows
        return rows

    def perturb(self, anchor: tuple[int, ...], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ex = self.ex
        train, d_train = ex._train, ex._d_train
        idx = rng.integers(0, train.shape[0], size=n)
        samples = train[idx].copy()
        d_samples = d_train[idx].copy()
        if anchor:
            # features in the anchor's (sorted predicate) order, as alibi's ``uniq_feat_ids``
            feats = list(dict.fromkeys(int(self.p_feat[a]) for a in sorted(anchor)))
            rows = self._rows(anchor)
            if len(rows) >= n:
                src = rows[rng.integers(0, len(rows), size=n)]
                samples[:, feats] = train[np.ix_(src, feats)]
                d_samples[:, feats] = d_train[np.ix_(src, feats)]
            else:
                self._fallback(anchor, feats, samples, n, rng)
                d_samples = ex._discretize(samples)
        return samples, self.binarize(d_samples)

    def _fallback(self, anchor: tuple[int, ...], feats: list[int], samples: np.ndarray, n: int,
                  rng: np.random.Generator) -> None:
        """Fewer than ``n`` training rows satisfy the whole anchor: alibi's ``replace_features``.

        With the anchor's features ``f1..fm`` and ``P_j`` the rows satisfying the predicates of
        ``f1..fj``: every row of ``P_m`` once, then every row of ``P_(m-1)`` once (giving ``f1..f(m-1)``
        jointly, ``fm`` from a random row satisfying its own predicates), and so on down to ``P_1``,
        until ``n`` samples are filled (the last block drawn at random from its rows); what is still
        missing takes every feature independently from rows satisfying its predicates. Conditioning on
        the longest satisfiable prefix keeps the features' correlation as far as the training data
        allows, which is the distribution alibi's search sees. A feature whose predicates no training
        row satisfies takes the instance's value.
        """
        train = self.ex._train
        f_rows = {f: self._rows(tuple(a for a in anchor if self.p_feat[a] == f)) for f in feats}
        known = [f for f in feats if len(f_rows[f])]
        for f in feats:
            if not len(f_rows[f]):
                samples[:, f] = self.x[f]
        prefix_rows = list(accumulate((f_rows[f] for f in known), np.intersect1d))
        start = 0
        for j in range(len(known), 0, -1):
            if start >= n:
                break
            r = prefix_rows[j - 1]
            if not len(r):
                continue
            src = r if start + len(r) <= n else r[rng.integers(0, len(r), size=n - start)]
            k = len(src)
            samples[start:start + k, known[:j]] = train[np.ix_(src, known[:j])]
            for f in known[j:]:
                samples[start:start + k, f] = train[f_rows[f][rng.integers(0, len(f_rows[f]), size=k)], f]
            start += k
        if start < n:
            for f in known:
                samples[start:, f] = train[f_rows[f][rng.integers(0, len(f_rows[f]), size=n - start)], f]

    def coverage_data(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.train_bin[rng.integers(0, self.train_bin.shape[0], size=n)]

    def labels(self, raw: np.ndarray) -> np.ndarray:
        return self.predictor(raw) == self.label

    def concat(self, raws: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(raws)

    def examples(self, raw: np.ndarray) -> np.ndarray:
        return self.ex._to_user(raw)


# --------------------------------------------------------------------------------------------------
# Explainer
# --------------------------------------------------------------------------------------------------
class AnchorTabular:
    """Anchors for tabular data (drop-in for ``alibi.explainers.AnchorTabular``).

    Parameters
    ----------
    predictor
        Callable on an array of rows (in the user's encoding: ordinal, or one-hot when ``ohe=True``).
    feature_names
        One name per (ordinal) feature.
    categorical_names
        ``{column: [category names]}`` for categorical columns (ordinal codes 0..k-1).
    dtype
        dtype of the arrays passed to the predictor.
    ohe
        The predictor, ``fit`` and ``explain`` take one-hot encoded categorical features.
    seed
        Default seed of ``explain`` (each call makes its own generator; nothing is seeded globally).
    predictor_type
        ``'class'``: predictor returns labels ``(n,)``; ``'proba'``: returns scores ``(n, n_classes)``.
        ``None`` (default): inferred as alibi does, from one call on a zero row (all categories 0);
        a declared kind wins and nothing is probed. ``meta['params']`` says which kind is used and
        whether it was inferred (``predictor_type_inferred``).
    ohe_drop
        With ``ohe=True``: ``None`` (a column per category), ``'first'`` (category 0 has no column,
        as ``OneHotEncoder(drop='first')``), or ``{column: dropped category or None}`` (sklearn's
        ``drop_idx_``).
    """

    def __init__(self, predictor: Callable[[np.ndarray], np.ndarray], feature_names: Sequence[str],
                 categorical_names: Mapping[int, Sequence[str]] | None = None, dtype: Any = np.float32,
                 ohe: bool = False, seed: int | None = None, predictor_type: str | None = None,
                 ohe_drop: None | str | Mapping[int, int | None] = None) -> None:
        self.feature_names = list(feature_names)
        self.n_features = len(self.feature_names)
        if self.n_features == 0:
            raise ValueError("feature_names must name at least one feature")
        cat = {int(k): list(v) for k, v in (categorical_names or {}).items()}
        for k, v in cat.items():
            if not 0 <= k < self.n_features:
                raise ValueError(f"categorical_names key {k} is not a column index in [0, {self.n_features})")
            if len(v) == 0:
                raise ValueError(f"categorical_names[{k}] is empty")
        self.categorical_names = cat
        self.categorical_features = sorted(cat)
        self.numerical_features = [f for f in range(self.n_features) if f not in cat]
        self.feature_values: dict[int, list[str]] = {k: list(v) for k, v in cat.items()}
        self.dtype = dtype
        self.ohe = bool(ohe)
        self.seed = seed
        self.ohe_map: OneHotMap | None = None
        if self.ohe:
            if not cat:
                raise ValueError("ohe=True needs categorical_names")
            if ohe_drop is None:
                dropped: dict[int, int | None] = {f: None for f in cat}
            elif ohe_drop == "first":
                dropped = {f: 0 for f in cat}
            elif isinstance(ohe_drop, Mapping):
                dropped = {f: (None if ohe_drop.get(f) is None else int(ohe_drop[f])) for f in cat}
            else:
                raise ValueError(f"ohe_drop must be None, 'first' or a dict, got {ohe_drop!r}")
            self.ohe_map = OneHotMap(self.n_features, {f: len(v) for f, v in cat.items()}, dropped)
        elif ohe_drop is not None:
            raise ValueError("ohe_drop is only meaningful with ohe=True")
        self._user_predictor, kind = resolve_predictor(
            predictor, predictor_type, lambda: self._to_user(np.zeros((1, self.n_features))))
        self.predictor_type = kind["predictor_type"]
        self.meta = explainer_meta("AnchorTabular", {"seed": seed, **kind, "ohe": self.ohe})
        self._fitted = False

    # ---- predictor on ordinal rows -----------------------------------------------------------------
    @property
    def predictor(self) -> Predictor:
        return self._user_predictor

    @property
    def predict_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """Class labels of rows (user encoding; one 1-D row is taken as a batch of one), as alibi's."""
        def predict(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X)
            return self._user_predictor(X[None] if X.ndim == 1 else X)
        return predict

    def reset_predictor(self, predictor: Callable, predictor_type: str | None = None) -> None:
        """Replace the predictor (and optionally its declared type)."""
        self.predictor_type = predictor_type or self.predictor_type
        self._user_predictor = Predictor(predictor, self.predictor_type)
        self.meta["params"].update(predictor_type=self.predictor_type, predictor_type_inferred=False)

    def _to_user(self, X_ord: np.ndarray) -> np.ndarray:
        if self.ohe_map is not None:
            return self.ohe_map.to_ohe(X_ord, self.dtype)
        return np.asarray(X_ord, dtype=self.dtype)

    def _predict_ord(self, X_ord: np.ndarray) -> np.ndarray:
        return self._user_predictor(self._to_user(X_ord))

    def _from_user(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X))
        if self.ohe_map is not None:
            return self.ohe_map.to_ord(X)
        if X.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features (len(feature_names)), got {X.shape[1]}")
        return X.astype(np.float64)

    # ---- fit ----------------------------------------------------------------------------------------
    def fit(self, train_data: np.ndarray, disc_perc: Sequence[int | float] = (25, 50, 75),
            **kwargs: Any) -> "AnchorTabular":
        """Discretise numerical features at the ``disc_perc`` percentiles of ``train_data``."""
        train = self._from_user(train_data)
        if train.shape[0] == 0:
            raise ValueError("train_data is empty")
        if not np.all(np.isfinite(train)):
            raise ValueError("train_data contains NaN or infinite values")
        perc = [float(p) for p in disc_perc]
        if not perc or any(not 0 <= p <= 100 for p in perc):
            raise ValueError(f"disc_perc must be percentiles in [0, 100], got {list(disc_perc)}")
        for f in self.categorical_features:
            col = train[:, f]
            if np.any(col != np.round(col)) or col.min() < 0 or col.max() >= len(self.categorical_names[f]):
                raise ValueError(f"categorical column {f} must hold codes 0..{len(self.categorical_names[f]) - 1}")
        self._qts: dict[int, np.ndarray] = {}
        self.feature_values = {k: list(v) for k, v in self.categorical_names.items()}
        for f in self.numerical_features:
            qts = np.unique(np.percentile(train[:, f], perc))
            self._qts[f] = qts
            name = self.feature_names[f]
            names = ["%s <= %.2f" % (name, qts[0])]
            names += ["%.2f < %s <= %.2f" % (qts[i], name, qts[i + 1]) for i in range(len(qts) - 1)]
            names.append("%s > %.2f" % (name, qts[-1]))
            self.feature_values[f] = names
        self._train = train
        self._d_train = self._discretize(train)
        self.disc_perc = tuple(disc_perc)
        self.meta["params"].update(disc_perc=self.disc_perc)
        self._fitted = True
        return self

    def _discretize(self, X: np.ndarray) -> np.ndarray:
        d = np.array(X, dtype=np.float64, copy=True)
        for f, qts in self._qts.items():
            d[:, f] = np.searchsorted(qts, X[:, f])
        return d

    # ---- explain ------------------------------------------------------------------------------------
    def explain(self, X: np.ndarray, threshold: float = 0.95, delta: float = 0.1, tau: float = 0.15,
                batch_size: int = 100, coverage_samples: int = 10000, beam_size: int = 1,
                stop_on_first: bool = False, max_anchor_size: int | None = None, min_samples_start: int = 100,
                n_covered_ex: int = 10, binary_cache_size: int = 10000, cache_margin: int = 1000,
                verbose: bool = False, verbose_every: int = 1, seed: int | None = None,
                lucb_arms: int | str | None = "auto",
                **kwargs: Any) -> Explanation:
        """Find an anchor for the prediction on the single row ``X`` (see alibi's docs for the knobs).

        ``seed`` overrides the constructor's seed for this call; ``verbose``/``verbose_every`` are
        accepted for compatibility.
        """
        if not self._fitted:
            raise ValueError("AnchorTabular is not fitted: call fit(train_data) first")
        x_user = np.asarray(X)
        if x_user.ndim == 2 and x_user.shape[0] == 1:
            x_user = x_user[0]
        if x_user.ndim != 1:
            raise ValueError(f"explain takes one row (1-D array), got shape {np.shape(X)}")
        x = self._from_user(x_user)[0]
        if not np.all(np.isfinite(x)):
            raise ValueError("the instance contains NaN or infinite values")
        label = self._predict_ord(x[None, :])[0]
        sampler = TabularSampler(self, x, label, self._predict_ord)
        result, params = search_with_call_knobs(sampler, self.seed, locals())
        return self._build_explanation(x, result, label, sampler, params)

    def _names(self, sampler: TabularSampler, features: list[int]) -> tuple[list[int], list[str]]:
        """alibi's predicate names: one name per original feature, in the order features were added."""
        feat_order: list[int] = []
        lo: dict[int, float] = {}
        hi: dict[int, float] = {}
        for a in features:
            f, op, v = sampler.preds[a]
            if f not in feat_order:
                feat_order.append(f)
            if op == 1:
                hi[f] = min(hi.get(f, np.inf), v)
            elif op == 2:
                lo[f] = max(lo.get(f, -np.inf), v)
        names = []
        for f in feat_order:
            if f in self.categorical_names:
                v = int(sampler.xd[f])
                names.append("%s = %s" % (self.feature_names[f], self.categorical_names[f][v]))
                continue
            qts = self._qts[f]
            name = self.feature_names[f]
            if f in lo and f in hi:
                names.append("%.2f < %s <= %.2f" % (qts[int(lo[f])], name, qts[int(hi[f])]))
            elif f in hi:
                names.append("%s <= %.2f" % (name, qts[int(hi[f])]))
            else:
                names.append("%s > %.2f" % (name, qts[int(lo[f])]))
        return feat_order, names

    def _build_explanation(self, x: np.ndarray, result: dict, label: Any, sampler: TabularSampler,
                           params: dict) -> Explanation:
        raw = dict(result)
        raw["predicates"] = [sampler.preds[a] for a in result["feature"]]
        raw["feature"], raw["names"] = self._names(sampler, result["feature"])
        raw["prediction"] = np.array([label])
        x_user = self._to_user(x[None, :])
        raw["instance"] = x_user[0]
        raw["instances"] = x_user
        precision, coverage = summary_precision_coverage(result)
        data = dict(anchor=list(raw["names"]), precision=precision, coverage=coverage, raw=raw)
        meta = copy.deepcopy(self.meta)
        meta["params"].update(params)
        return Explanation(meta=meta, data=data)

    def anchor_mask(self, explanation: Explanation, X: np.ndarray) -> np.ndarray:
        """Bool per row of ``X`` (user encoding): does the explanation's anchor hold (its own operators)?"""
        Xo = self._from_user(X)
        d = self._discretize(Xo)
        ok = np.ones(len(Xo), dtype=bool)
        for f, op, v in explanation.raw["predicates"]:
            col = d[:, f]
            ok &= (col == v) if op == 0 else (col <= v) if op == 1 else (col > v)
        return ok


__all__ = ["AnchorTabular", "TabularSampler", "OneHotMap", "SEARCH_DEFAULTS"]
