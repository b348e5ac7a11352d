"""Make the alibi 0.9.6 anchors reference that tests/test_anchors_alibi_api.py compares against.

Run in a throwaway environment that has alibi (never in the project's):
    python3 -m venv /tmp/alibi-venv && /tmp/alibi-venv/bin/pip install alibi==0.9.6
    /tmp/alibi-venv/bin/python tests/reference/alibi_anchors_reference.py
It writes tests/reference/alibi_anchors.json: the data of each problem, alibi's
``gen_category_map`` of the DataFrame, and alibi's ``Explanation.to_json()`` for a tabular, a text
and an image explanation, each made by alibi code exactly as its docs write it (predictor kind left
to alibi's inference).
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import spacy
from alibi.explainers import AnchorImage, AnchorTabular, AnchorText
from alibi.utils import gen_category_map
from sklearn.tree import DecisionTreeClassifier

OUT = Path(__file__).with_name("alibi_anchors.json")


def tabular_problem() -> tuple[pd.DataFrame, np.ndarray]:
    """600 rows, two object columns; the label is 1 iff x2 > median and shape == 'a'."""
    rng = np.random.default_rng(0)
    n = 600
    df = pd.DataFrame({
        "x0": rng.normal(size=n).round(3), "x1": rng.uniform(size=n).round(3),
        "x2": rng.normal(size=n).round(3), "color": rng.choice(["red", "green", "blue"], n),
        "x4": rng.normal(size=n).round(3), "shape": rng.choice(["a", "b", "c"], n)})
    y = ((df["x2"] > df["x2"].median()) & (df["shape"] == "a")).astype(int).to_numpy()
    return df, y


def text_predict(texts):
    return np.array([int("not" in t.split() and "good" in t.split()) for t in texts])


def image_predict(X):
    """Class 1 iff the top-left 4x4 block keeps its texture: pixel std > 0.4 (channel-last (n, 8, 8, 1)).

    On the test image (a 0/1 checkerboard there) that holds while at most one of its four 2x2
    superpixels is flattened to its mean."""
    return (np.asarray(X)[:, :4, :4, 0].std(axis=(1, 2)) > 0.4).astype(int)


def grid(image):
    """Sixteen 2x2 superpixels."""
    r, c = np.indices(image.shape[:2])
    return (r // 2) * 4 + c // 2


def main() -> None:
    out = {}
    df, y = tabular_problem()
    category_map = gen_category_map(df)
    out["category_map"] = {str(k): [str(v) for v in vals] for k, vals in category_map.items()}
    X = df.copy()
    for col, vals in category_map.items():
        X.iloc[:, col] = [vals.index(v) for v in df.iloc[:, col]]
    X = X.to_numpy(dtype=float)
    clf = DecisionTreeClassifier(random_state=0).fit(X, y)
    explainer = AnchorTabular(clf.predict_proba, list(df.columns), categorical_names=category_map, seed=0)
    explainer.fit(X, disc_perc=[25, 50, 75])
    i = int(np.nonzero(y == 1)[0][0])
    exp = explainer.explain(X[i], threshold=0.95)
    out["tabular"] = {"columns": list(df.columns), "rows": df.astype(object).values.tolist(), "y": y.tolist(),
                      "index": i, "explanation": exp.to_json()}

    nlp = spacy.blank("en")
    text = "this movie is not good at all"
    exp = AnchorText(predictor=text_predict, sampling_strategy="unknown", nlp=nlp, seed=0).explain(text)
    out["text"] = {"text": text, "explanation": exp.to_json()}

    image = (np.indices((8, 8)).sum(axis=0) % 2).astype(np.float32)[..., None]  # checkerboard
    image[4:, :] *= 0.3
    exp = AnchorImage(image_predict, (8, 8, 1), segmentation_fn=grid, seed=0).explain(image, p_sample=0.5)
    out["image"] = {"image": image[..., 0].tolist(), "explanation": exp.to_json()}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
