"""alibi code runs unchanged: predictor kind inferred, ``predict_fn``, ``to_json``/``from_json`` in alibi's
shape, ``gen_category_map``, ``spacy_model``, ``verbose`` progress.

The reference is alibi 0.9.6's own output, made in a separate environment by
tests/reference/alibi_anchors_reference.py (tests/reference/alibi_anchors.json): its data, its
``gen_category_map`` and its ``Explanation.to_json()`` for a tabular, a text and an image problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from explainers.anchors import AnchorImage, AnchorTabular, AnchorText
from explainers.explanation import Explanation
from explainers.utils import gen_category_map, spacy_model

REF = json.loads((Path(__file__).parent / "reference" / "alibi_anchors.json").read_text())
FAST = dict(coverage_samples=2000)


def alibi_exp(kind: str) -> dict:
    return json.loads(REF[kind]["explanation"])


def frame() -> tuple[pd.DataFrame, np.ndarray]:
    t = REF["tabular"]
    return pd.DataFrame(t["rows"], columns=t["columns"]).infer_objects(), np.asarray(t["y"])


def encoded(df: pd.DataFrame, category_map: dict) -> np.ndarray:
    cols = [[category_map[j].index(v) for v in df.iloc[:, j]] if j in category_map else df.iloc[:, j].to_numpy(float)
            for j in range(df.shape[1])]
    return np.column_stack(cols).astype(float)


def tree_model(X: np.ndarray, y: np.ndarray):
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(random_state=0).fit(X, y)


def text_predict(texts):
    return np.array([int("not" in t.split() and "good" in t.split()) for t in texts])


def image_predict(X):
    return (np.asarray(X)[:, :4, :4, 0].std(axis=(1, 2)) > 0.4).astype(int)


def grid(image):
    r, c = np.indices(image.shape[:2])
    return (r // 2) * 4 + c // 2


def keys_like_alibi(ours: dict, theirs: dict) -> None:
    """Our JSON has every key alibi's has, at every level alibi users read (meta, data, raw, examples)."""
    assert set(ours) == {"meta", "data"} == set(theirs)
    assert set(theirs["meta"]) == set(ours["meta"])
    assert set(theirs["data"]) <= set(ours["data"])
    assert set(theirs["data"]["raw"]) <= set(ours["data"]["raw"])
    for a, b in zip(ours["data"]["raw"]["examples"], theirs["data"]["raw"]["examples"]):
        assert set(a) == set(b)
    for k in ("precision", "coverage"):
        assert isinstance(ours["data"][k], float)


# ---- gen_category_map ------------------------------------------------------------------------------
def test_gen_category_map_matches_alibi() -> None:
    df, _ = frame()
    got = gen_category_map(df)
    assert {str(k): [str(v) for v in vals] for k, vals in got.items()} == REF["category_map"]
    # pandas' string dtype (pandas >= 3 default for text) is categorical too; explicit columns by name or index
    assert gen_category_map(df.astype({"color": "string", "shape": "string"})) == got
    assert gen_category_map(df, ["shape"]) == {5: got[5]}
    assert gen_category_map(df.to_numpy(), [3]) == {3: got[3]}
    with pytest.raises(ValueError, match="categorical_columns"):
        gen_category_map(df.to_numpy())
    with pytest.raises(TypeError, match="2-dimensional"):
        gen_category_map(df["color"])


# ---- JSON -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tabular", "text", "image"])
def test_from_json_reads_alibi_output_and_round_trips(kind: str) -> None:
    text = REF[kind]["explanation"]
    exp = Explanation.from_json(text)
    theirs = json.loads(text)
    assert exp.anchor == theirs["data"]["anchor"] and exp.precision == theirs["data"]["precision"]
    assert exp.coverage == theirs["data"]["coverage"] and exp.raw == theirs["data"]["raw"]
    assert exp.name == theirs["meta"]["name"] and exp.params == theirs["meta"]["params"]  # meta keys as attributes
    assert json.loads(exp.to_json()) == theirs


def test_from_json_refuses_what_is_not_an_explanation() -> None:
    with pytest.raises(ValueError, match="not a JSON"):
        Explanation.from_json("{nope")
    with pytest.raises(ValueError, match="'meta' and 'data'"):
        Explanation.from_json('{"data": {}}')


# ---- the notebook snippets, unchanged ---------------------------------------------------------------
def test_tabular_snippet_with_predict_proba_and_to_json() -> None:
    df, y = frame()
    category_map = gen_category_map(df)
    X = encoded(df, category_map)
    clf = tree_model(X, y)
    feature_names = list(df.columns)
    # alibi's snippet: no predictor_type, clf.predict_proba given as is
    explainer = AnchorTabular(clf.predict_proba, feature_names, categorical_names=category_map, seed=0)
    explainer.fit(X, disc_perc=[25, 50, 75])
    i = REF["tabular"]["index"]
    class_names = ["no", "yes"]
    pred = class_names[explainer.predict_fn(X[i])[0]]
    assert pred == "yes" and explainer.predict_fn(X[:50]).tolist() == clf.predict(X[:50]).tolist()
    explanation = explainer.explain(X[i], threshold=0.95)
    assert explanation.meta["params"]["predictor_type"] == "proba"
    assert explanation.meta["params"]["predictor_type_inferred"] is True
    theirs = alibi_exp("tabular")
    assert sorted(explanation.anchor) == sorted(theirs["data"]["anchor"])  # the tree's rule, as alibi found
    assert explanation.precision >= 0.95
    ours = json.loads(explanation.to_json())
    keys_like_alibi(ours, theirs)
    back = Explanation.from_json(explanation.to_json())
    assert back.anchor == explanation.anchor and back.raw["feature"] == explanation.raw["feature"]
    np.testing.assert_allclose(back.raw["instance"], explanation.raw["instance"])


def test_text_and_image_json_shape_like_alibi() -> None:
    import spacy

    tex = AnchorText(predictor=text_predict, sampling_strategy="unknown", nlp=spacy.blank("en"), seed=0)
    assert tex.predict_fn(REF["text"]["text"]).tolist() == [1]
    assert tex.predict_fn(["not good", "good"]).tolist() == [1, 0]
    exp = tex.explain(REF["text"]["text"], **FAST)
    theirs = alibi_exp("text")
    assert sorted(exp.anchor) == sorted(theirs["data"]["anchor"])
    assert exp.meta["params"]["predictor_type"] == "class" and exp.meta["params"]["predictor_type_inferred"]
    keys_like_alibi(json.loads(exp.to_json()), theirs)

    image = np.asarray(REF["image"]["image"], np.float32)[..., None]
    ex = AnchorImage(image_predict, (8, 8, 1), segmentation_fn=grid, seed=0)
    exp = ex.explain(image, p_sample=0.5, **FAST)
    theirs = alibi_exp("image")
    ours = json.loads(exp.to_json())
    keys_like_alibi(ours, theirs)
    assert ours["data"]["segments"] == theirs["data"]["segments"]
    assert np.shape(ours["data"]["anchor"]) == np.shape(theirs["data"]["anchor"]) == (8, 8, 1)
    # the texture rule needs 3 of the 4 top-left superpixels (0, 1, 4, 5), as alibi's anchor has
    assert len(exp.raw["feature"]) == len(theirs["data"]["raw"]["feature"]) == 3
    assert set(exp.raw["feature"]) <= {0, 1, 4, 5} and set(theirs["data"]["raw"]["feature"]) <= {0, 1, 4, 5}
    assert ex.predict_fn(image).tolist() == [1]


# ---- predictor kind ----------------------------------------------------------------------------------
def test_declared_kind_wins_and_nothing_is_probed() -> None:
    calls = []

    def fn(X):
        calls.append(len(X))
        return text_predict(X)

    ex = AnchorText(fn, sampling_strategy="unknown", nlp=__import__("spacy").blank("en"), predictor_type="class")
    assert calls == [] and ex.meta["params"]["predictor_type_inferred"] is False
    AnchorText(fn, sampling_strategy="unknown", nlp=__import__("spacy").blank("en"))
    assert calls == [1]  # one probe, as alibi


def test_inference_failures_say_what_to_pass() -> None:
    def broken(X):
        raise RuntimeError("model not loaded")

    with pytest.raises(ValueError, match="predictor_type='class'.*'proba'"):
        AnchorImage(broken, (8, 8, 1), segmentation_fn=grid)
    with pytest.raises(ValueError, match="returned shape"):
        AnchorImage(lambda X: np.zeros((len(X), 2, 2)), (8, 8, 1), segmentation_fn=grid)
    # (n, 1) is labels, as alibi's rule (argmax of the shape is the batch axis)
    ex = AnchorImage(lambda X: image_predict(X)[:, None], (8, 8, 1), segmentation_fn=grid)
    assert ex.predictor_type == "class"


# ---- verbose ---------------------------------------------------------------------------------------
def test_verbose_prints_alibis_progress(capsys: pytest.CaptureFixture) -> None:
    image = np.asarray(REF["image"]["image"], np.float32)[..., None]
    ex = AnchorImage(image_predict, (8, 8, 1), segmentation_fn=grid, seed=0)
    ex.explain(image, **FAST)
    assert capsys.readouterr().out == ""
    ex.explain(image, verbose=True, **FAST)
    out = capsys.readouterr().out
    assert "Best of size  1 :" in out and "Best of size  3 :" in out
    assert "mean = " in out and " lb = " in out and " coverage: " in out and "Found eligible result " in out
    assert "Best: " in out and "Worst: " in out and "B = " in out  # KL-LUCB rounds
    ex.explain(image, verbose=True, verbose_every=1000, **FAST)
    assert "Worst: " not in capsys.readouterr().out


# ---- spacy_model -------------------------------------------------------------------------------------
def test_spacy_model_checks_and_never_downloads(tmp_path: Path) -> None:
    import spacy

    with pytest.raises(OSError, match="not installed.*nothing is downloaded"):
        spacy_model("xx_no_such_pipeline_sm")
    spacy.blank("en").to_disk(tmp_path / "blank_en")
    assert spacy_model(str(tmp_path / "blank_en")) is None
    assert spacy.load(tmp_path / "blank_en").lang == "en"
