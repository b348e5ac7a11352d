"""AnchorText against a model keyed on "not good": the anchor must be exactly those words.

The spaCy pipeline (blank English + word vectors) and the masked language model (a tiny randomly
initialised BERT with a WordPiece vocabulary) are built here, saved to a temporary directory and
loaded from disk as a user would; nothing is downloaded.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from explainers.anchors import AnchorText, LanguageModel

TEXT = "this movie is not good at all"
WORDS = ("this movie is not good at all bad great film plot actor terrible fine nice poor awful the a "
         "really so very book story").split()
FAST = dict(coverage_samples=1000)


def keyed(texts: list[str]) -> np.ndarray:
    """1 iff both 'not' and 'good' are in the text."""
    return np.array([int("not" in t.split() and "good" in t.split()) for t in texts])


@pytest.fixture(scope="module")
def nlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import spacy

    nlp = spacy.blank("en")
    rng = np.random.default_rng(0)
    base = {w: rng.normal(size=16).astype(np.float32) for w in WORDS}
    # make 'good' and 'great'/'fine'/'nice' neighbours so that similarity sampling has structure
    for w in ("great", "fine", "nice"):
        base[w] = base["good"] + 0.1 * rng.normal(size=16).astype(np.float32)
    for w, v in base.items():
        nlp.vocab.set_vector(w, v)
    path = tmp_path_factory.mktemp("spacy") / "tiny_en_vectors"
    nlp.to_disk(path)
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!"] + WORDS + ["##s", "##ing", "##ly"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertForMaskedLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fresh_precision(text: str, anchor: list[str], n: int = 2000, seed: int = 99) -> float:
    """Independent re-measurement: UNK each non-anchor word with prob 0.5, fraction keeping the label."""
    rng = np.random.default_rng(seed)
    words = text.split()
    label = keyed([text])[0]
    keep = np.array([w in anchor for w in words])
    samples = []
    for _ in range(n):
        change = (rng.random(len(words)) < 0.5) & ~keep
        samples.append(" ".join("UNK" if c else w for w, c in zip(words, change)))
    return float(np.mean(keyed(samples) == label))


@pytest.mark.parametrize("strategy", ["unknown", "similarity"])
def test_not_good_anchor(strategy: str, nlp_dir: Path) -> None:
    ex = AnchorText(keyed, strategy, nlp=str(nlp_dir), seed=0, sample_proba=0.5)
    exp = ex.explain(TEXT, **FAST)
    assert sorted(exp.anchor) == ["good", "not"]
    assert exp.precision >= 0.95 and exp.raw["success"]
    assert sorted(exp.raw["positions"]) == [TEXT.index("not"), TEXT.index("good")]
    assert exp.raw["prediction"].tolist() == [1]
    # coverage: both words kept w.p. 1/2 each
    assert abs(exp.coverage - 0.25) < 0.05
    assert fresh_precision(TEXT, exp.anchor) >= 0.95 - 0.05
    for ex_true in exp.raw["examples"][-1]["covered_true"]:
        assert "not" in ex_true.split() and "good" in ex_true.split()


def test_similarity_samples_neighbours(nlp_dir: Path) -> None:
    ex = AnchorText(keyed, "similarity", nlp=str(nlp_dir), seed=0, top_n=3, use_proba=True, temperature=0.5)
    exp = ex.explain(TEXT, **FAST)
    # partial anchors' failing examples show 'good' replaced by one of its 3 nearest neighbours
    replaced = set()
    for step in exp.raw["examples"]:
        for s in step["covered_false"]:
            replaced.update(set(s.split()) - set(TEXT.split()))
    assert replaced, "similarity sampling must replace words"
    assert replaced <= set(WORDS)


def test_negative_instance_and_unknown_precision(nlp_dir: Path) -> None:
    ex = AnchorText(keyed, "unknown", nlp=str(nlp_dir), seed=1)
    text = "this movie is good"
    exp = ex.explain(text, **FAST)
    assert exp.raw["prediction"].tolist() == [0]
    assert exp.precision >= 0.95  # without 'not' the label is always 0: empty anchor
    assert exp.anchor == [] and exp.coverage == 1.0


@pytest.mark.parametrize("filling", ["parallel", "autoregressive"])
def test_language_model(filling: str, lm_dir: Path) -> None:
    ex = AnchorText(keyed, "language_model", language_model=str(lm_dir), seed=0, filling=filling,
                    use_proba=True, temperature=1.0, top_n=10, stopwords=["at"], frac_mask_templates=0.2)
    exp = ex.explain(TEXT, coverage_samples=300, batch_size=50, min_samples_start=50)
    assert sorted(exp.anchor) == ["good", "not"]
    assert exp.precision >= 0.95
    tokens = TEXT.split()
    assert sorted(exp.raw["positions"]) == [tokens.index("not"), tokens.index("good")]
    # the stopword is never perturbed; words are refilled from the LM vocabulary (no [MASK] left)
    for step in exp.raw["examples"]:
        for s in list(step["covered_true"]) + list(step["covered_false"]):
            assert "[MASK]" not in s and " at " in f" {s} "


def test_language_model_object_and_same_seed(lm_dir: Path) -> None:
    lm = LanguageModel(str(lm_dir))
    ex = AnchorText(keyed, "language_model", language_model=lm, seed=5)
    a = ex.explain(TEXT, coverage_samples=300)
    b = ex.explain(TEXT, coverage_samples=300)
    assert a.anchor == b.anchor and a.precision == b.precision and a.raw["num_preds"] == b.raw["num_preds"]
    assert [list(e["covered_true"]) for e in a.raw["examples"]] == [list(e["covered_true"]) for e in b.raw["examples"]]


def test_threads_and_seeds(nlp_dir: Path) -> None:
    ex = AnchorText(keyed, "unknown", nlp=str(nlp_dir))
    texts = [TEXT, "not good", "a book that is not good really", "good film"]
    seq = [ex.explain(t, seed=i, **FAST) for i, t in enumerate(texts)]
    par: list = [None] * len(texts)

    def work(i: int) -> None:
        par[i] = ex.explain(texts[i], seed=i, **FAST)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for s, p in zip(seq, par):
        assert s.anchor == p.anchor and s.precision == p.precision and s.raw["num_preds"] == p.raw["num_preds"]


def test_bad_arguments(nlp_dir: Path) -> None:
    with pytest.raises(ValueError, match="sampling_strategy"):
        AnchorText(keyed, "synonyms", nlp=str(nlp_dir))
    with pytest.raises(ValueError, match="language_model"):
        AnchorText(keyed, "language_model")
    with pytest.raises(ValueError, match="local directory"):
        AnchorText(keyed, "language_model", language_model="/nonexistent/model")
    with pytest.raises(ValueError, match="spaCy"):
        AnchorText(keyed, "unknown", nlp="/nonexistent/pipeline")
    ex = AnchorText(keyed, "unknown", nlp=str(nlp_dir))
    with pytest.raises(ValueError, match="empty"):
        ex.explain("   ")


def test_lucb_arms_auto_is_the_paper_rule_for_text(nlp_dir: Path) -> None:
    """'auto' (the default) samples the two critical arms per KL-LUCB round for text (a text
    pipeline's cost grows with the rows): identical to lucb_arms=2 (same anchor, same number of
    sentences labelled), and no more sentences than sampling every blocking arm."""
    rows = {"n": 0}

    def counted(texts: list[str]) -> np.ndarray:
        rows["n"] += len(texts)
        return keyed(texts)

    ex = AnchorText(counted, "unknown", nlp=str(nlp_dir), seed=0, sample_proba=0.5)
    used = {}
    for arms in ("auto", 2, None):
        before = rows["n"]
        exp = ex.explain(TEXT, lucb_arms=arms, seed=3, **FAST)
        used[arms] = rows["n"] - before
        assert sorted(exp.anchor) == ["good", "not"]
    assert used["auto"] == used[2] <= used[None]
    with pytest.raises(ValueError, match="lucb_arms"):
        ex.explain(TEXT, lucb_arms=1)


def test_named_language_models_load_locally_and_never_download(lm_dir: Path, tmp_path: Path) -> None:
    """alibi's named classes: from a directory, from a Hugging Face cache, or a clear error when absent."""
    import shutil

    from explainers.utils import BertBaseUncased, DistilbertBaseUncased, RobertaBase

    by_dir = BertBaseUncased(path=str(lm_dir))
    assert by_dir.mask == "[MASK]" and by_dir.is_subword_prefix("##s") and not by_dir.is_subword_prefix("good")
    alibi_style = BertBaseUncased(preloading=False).from_disk(lm_dir)
    # a Hugging Face hub cache holding the tiny model under distilbert-base-uncased's repo id
    repo = tmp_path / "hub" / "models--distilbert-base-uncased"
    commit = "0" * 40
    shutil.copytree(lm_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    by_cache = DistilbertBaseUncased(cache_dir=tmp_path / "hub")
    reference = AnchorText(keyed, "language_model", language_model=str(lm_dir), seed=2).explain(
        TEXT, coverage_samples=300)
    for lm in (by_dir, alibi_style, by_cache):
        exp = AnchorText(keyed, "language_model", language_model=lm, seed=2).explain(TEXT, coverage_samples=300)
        assert exp.anchor == reference.anchor and exp.precision == reference.precision
        assert exp.raw["num_preds"] == reference.raw["num_preds"]
    with pytest.raises(FileNotFoundError, match="nothing is downloaded.*save_pretrained"):
        RobertaBase(cache_dir=tmp_path / "empty_cache")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        RobertaBase(path=tmp_path / "missing")
