"""explain_anchors: the served entry point returns plain dicts and rejects bad requests with ValueError."""

from __future__ import annotations

import numpy as np
import pytest

from explainers.anchors import explain_anchors

rng = np.random.default_rng(0)
X = np.column_stack([rng.normal(size=1500), rng.integers(0, 2, 1500)]).astype(float)
MED = float(np.median(X[:, 0]))


def tab_predict(Z: np.ndarray) -> np.ndarray:
    return ((np.asarray(Z)[:, 0] > MED) & (np.asarray(Z)[:, 1] == 1)).astype(int)


def text_predict(texts: list[str]) -> np.ndarray:
    return np.array([int("not" in t.split() and "good" in t.split()) for t in texts])


def img_predict(X: np.ndarray) -> np.ndarray:
    return (X[:, :7, :7, 0].std(axis=(1, 2)) > 0.3).astype(int)


IMG = np.zeros((14, 14, 1), dtype=np.float32)
IMG[:7, :7, 0] = np.indices((7, 7)).sum(0) % 2
GRID = (np.indices((14, 14))[0] // 7) * 2 + np.indices((14, 14))[1] // 7


def test_tabular_request() -> None:
    x = X[tab_predict(X) == 1][0]
    out = explain_anchors(tab_predict, "tabular", {
        "instance": x.tolist(), "train_data": X, "feature_names": ["a", "b"],
        "categorical_names": {"1": ["no", "yes"]}, "disc_perc": [50], "seed": 1, "coverage_samples": 1000})
    assert sorted(out["anchor"]) == sorted(["b = yes", "a > %.2f" % np.median(X[:, 0])])
    assert out["precision"] == 1.0 and 0.15 < out["coverage"] < 0.35
    assert out["raw"]["success"] and out["raw"]["prediction"] == [1]
    assert len(out["raw"]["precision"]) == 2 and isinstance(out["raw"]["num_preds"], int)
    again = explain_anchors(tab_predict, "tabular", {
        "instance": x.tolist(), "train_data": X, "feature_names": ["a", "b"],
        "categorical_names": {"1": ["no", "yes"]}, "disc_perc": [50], "seed": 1, "coverage_samples": 1000})
    assert again["anchor"] == out["anchor"] and again["coverage"] == out["coverage"]


def test_text_request() -> None:
    out = explain_anchors(text_predict, "text", {"text": "this is not good", "sampling_strategy": "unknown",
                                                 "seed": 0, "coverage_samples": 500})
    assert sorted(out["anchor"]) == ["good", "not"] and out["precision"] >= 0.95
    assert sorted(out["positions"]) == [8, 12]


def test_image_request_masked_image() -> None:
    out = explain_anchors(img_predict, "image", {"image": IMG, "segments": GRID, "seed": 0,
                                                 "coverage_samples": 500})
    assert out["anchor"] == [0] and out["precision"] == 1.0
    mi = out["masked_image"]
    assert mi.shape == IMG.shape and np.all(mi[7:, :] == 0) and np.all(mi[:, 7:] == 0) and mi.max() == 255
    assert np.array_equal(out["segments"], GRID)


@pytest.mark.parametrize("kind,request_,match", [
    ("tabular", {"threshold": 0.0}, "threshold"),
    ("tabular", {"threshold": 1.01}, "threshold"),
    ("tabular", {"instance": [0.1, 1.0, 3.0]}, "3 features"),
    ("tabular", {"feature_names": ["a"]}, "feature_names"),
    ("tabular", {"instance": [float("nan"), 1.0]}, "NaN"),
    ("tabular", {"batch_size": 0}, "batch_size"),
    ("tabular", {"predictor_type": "scores"}, "predictor_type"),
    ("tabular", {"colour": 1}, "unknown request keys"),
    ("text", {"text": "not good", "sampling_strategy": "synonyms"}, "sampling_strategy"),
    ("text", {"text": ""}, "text"),
    ("text", {"text": "not good", "top_n": 3}, "do not apply"),
    ("text", {"text": "not good", "sampling_strategy": "language_model", "language_model": "/nope"}, "local directory"),
    ("image", {"image": IMG, "segmentation_fn": "watershed"}, "segmentation_fn"),
    ("image", {"image": IMG, "p_sample": 2}, "p_sample"),
    ("image", {"image": IMG, "segmentation_fn": "slic", "segmentation_kwargs": {"bogus": 1}}, "segmentation_kwargs"),
    ("video", {}, "kind"),
])
def test_bad_requests_raise_value_error(kind: str, request_: dict, match: str) -> None:
    base = {"tabular": {"instance": X[0].tolist(), "train_data": X, "feature_names": ["a", "b"],
                        "categorical_names": {1: ["no", "yes"]}},
            "text": {}, "image": {}, "video": {}}[kind]
    fn = {"tabular": tab_predict, "text": text_predict, "image": img_predict, "video": tab_predict}[kind]
    with pytest.raises(ValueError, match=match):
        explain_anchors(fn, kind, {**base, **request_})
