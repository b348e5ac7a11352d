"""The text classifier example end to end (quick settings): its AnchorText explanation is a
non-empty anchor made of the query's own words, with the precision AnchorText promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_text_classifier_example_anchor_is_not_empty(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "text_classifier" / "run.py"
    spec = importlib.util.spec_from_file_location("text_classifier_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--workdir", str(tmp_path / "wd"), "--k", "2"])
    assert out["targets"] == [1, 0]  # the positive and the negative review
    words = set("the plot was dull and the acting was awful".split())
    assert out["anchor"] and set(out["anchor"]) <= words
    assert out["precision"] >= 0.95
