"""Perturbation samplers of AnchorText: one per sampling strategy.

* :class:`UnknownSampler` (``'unknown'``) and :class:`SimilaritySampler` (``'similarity'``) work on
  the spaCy tokens of the text; :class:`Neighbors` finds a word's nearest neighbours in the
  pipeline's vectors for the latter.
* :class:`LanguageModelSampler` (``'language_model'``) masks words and refills them with a
  :class:`~explainers.anchors.language_model.LanguageModel`.

Each implements the search's sampler protocol (``explainers.anchors.base.Sampler``): ``perturb``,
``coverage_data``, ``labels``, ``concat`` and ``examples``. All randomness comes from the
generator the search passes in.
"""

from __future__ import annotations

import string
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .language_model import LanguageModel, sample_top

_POS = frozenset(["NOUN", "VERB", "ADJ", "ADV", "ADP", "DET"])
_FORBIDDEN_TAGS = frozenset(["PRP$"])
_FORBIDDEN_WORDS = frozenset(["be"])


def load_nlp(nlp: Any) -> Any:
    """A spaCy ``Language``: given as is, or loaded by installed package name or directory path."""
    if nlp is None:
        raise ValueError("this sampling strategy needs a spaCy pipeline: pass nlp=<Language or package name>")
    if isinstance(nlp, (str, Path)):
        import spacy

        try:
            return spacy.load(nlp)
        except OSError as e:
            raise ValueError(f"cannot load spaCy pipeline {str(nlp)!r}: {e}") from e
    if not callable(nlp) or not hasattr(nlp, "vocab"):
        raise TypeError(f"nlp must be a spaCy Language or a package name, got {type(nlp).__name__}")
    return nlp


def _has_tagger(nlp: Any) -> bool:
    return any(name in nlp.pipe_names for name in ("tagger", "morphologizer"))


def _join(rows: np.ndarray) -> np.ndarray:
    """Join each row of an object array of tokens with spaces; an object array of str."""
    out = np.empty(rows.shape[0], dtype=object)
    out[:] = [" ".join(r) for r in rows.tolist()]
    return out


# --------------------------------------------------------------------------------------------------
# Samplers for 'unknown' and 'similarity'
# --------------------------------------------------------------------------------------------------
class _TextOutputs:
    """What every text sampler does with its samples (arrays of sentences): label, join, show."""

    label: Any = None
    predictor: Callable | None = None

    def labels(self, raw: np.ndarray) -> np.ndarray:
        assert self.predictor is not None
        return self.predictor(list(raw)) == self.label

    def concat(self, raws: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(raws)

    def examples(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw.tolist(), dtype=str) if len(raw) else np.array([], dtype=str)


class _WordSampler(_TextOutputs):
    """Common part: the text split into spaCy tokens; feature i is token i."""

    UNK = "UNK"

    #: ``lucb_arms='auto'``: the paper's two arms per KL-LUCB round. A text pipeline's cost grows with
    #: the rows (the benchmark's CountVectorizer + logistic regression: ~0.3 ms per call, ~4-5 us per
    #: sentence), so sampling every blocking arm labels 2.5x more sentences than it saves in calls
    #: (benchmark text task: 301 vs 751 sentences, 0.006 vs 0.010 s per explanation; 26-word
    #: sentences: 0.017 s with 2 arms vs 0.043 s with all).
    lucb_arms_auto = 2

    def __init__(self, doc: Any, sample_proba: float) -> None:
        self.words = [t.text for t in doc]
        self.positions = [t.idx for t in doc]
        self.n_features = len(self.words)
        self.sample_proba = float(sample_proba)
        self.perturbable = np.ones(self.n_features, dtype=bool)
        self.label: Any = None
        self.predictor: Callable | None = None

    def _mask(self, anchor: tuple[int, ...], n: int, rng: np.random.Generator) -> np.ndarray:
        """Bool (n, words): True where the word is changed."""
        changed = rng.random((n, self.n_features)) < self.sample_proba
        changed &= self.perturbable
        if anchor:
            changed[:, list(anchor)] = False
        return changed

    def coverage_data(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return ~self._mask((), n, rng)



class UnknownSampler(_WordSampler):
    """Replace words outside the anchor by ``UNK``."""

    def perturb(self, anchor: tuple[int, ...], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        changed = self._mask(anchor, n, rng)
        toks = np.empty((n, self.n_features), dtype=object)
        toks[:] = self.words
        toks[changed] = self.UNK
        return _join(toks), ~changed


class Neighbors:
    """Nearest neighbours of words in a spaCy pipeline's vectors (cosine similarity), cached per word."""

    def __init__(self, nlp: Any, n_similar: int = 500, w_prob: float = -15.0) -> None:
        self.nlp = nlp
        self.n_similar = n_similar
        vecs = nlp.vocab.vectors
        keys = list(vecs.keys())
        strings = nlp.vocab.strings
        has_prob = "lexeme_prob" in getattr(nlp.vocab.lookups, "tables", [])
        words, rows = [], []
        for k in keys:
            if k not in strings:
                continue
            w = strings[k]
            if has_prob and nlp.vocab[w].prob < w_prob:
                continue
            words.append(w)
            rows.append(vecs.find(key=k))
        self.words = np.array(words, dtype=object)
        self.is_lower = np.array([w.islower() for w in words], dtype=bool)
        mat = np.asarray(vecs.data)[rows] if rows else np.zeros((0, vecs.shape[1]))
        norms = np.linalg.norm(mat, axis=1, keepdims=True)
        self.mat = mat / np.where(norms == 0, 1.0, norms)
        self.tagger = _has_tagger(nlp)
        self._cache: dict[tuple[str, str, int], dict] = {}
        self._lock = threading.Lock()

    def neighbors(self, word: str, tag: str, top_n: int) -> dict:
        key = (word, tag, top_n)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        texts: list[str] = []
        sims: list[float] = []
        vocab = self.nlp.vocab
        if vocab.has_vector(word) and len(self.words):
            v = np.asarray(vocab.get_vector(word), dtype=float)
            nv = np.linalg.norm(v)
            sim = self.mat @ (v / nv if nv else v)
            sim = np.where(self.is_lower == word.islower(), sim, -np.inf)
            order = np.argsort(-sim, kind="stable")[:self.n_similar]
            for i in order:
                if len(texts) == top_n or not np.isfinite(sim[i]):
                    break
                w = self.words[i]
                if w == word:
                    continue
                if self.tagger and self.nlp(w)[0].tag_ != tag:
                    continue
                texts.append(w)
                sims.append(float(sim[i]))
        out = {"words": np.array(texts, dtype=object), "similarities": np.array(sims)}
        with self._lock:
            self._cache[key] = out
        return out


class SimilaritySampler(_WordSampler):
    """Replace words outside the anchor by similar words (spaCy vectors; same tag when tagged)."""

    def __init__(self, doc: Any, neighbors: Neighbors, sample_proba: float = 0.5, top_n: int = 100,
                 temperature: float = 1.0, use_proba: bool = False) -> None:
        super().__init__(doc, sample_proba)
        tagged = neighbors.tagger
        self.choices: list[np.ndarray] = []
        self.probs: list[np.ndarray | None] = []
        for i, t in enumerate(doc):
            ok = t.text not in _FORBIDDEN_WORDS and (not tagged or (t.pos_ in _POS and t.tag_ not in _FORBIDDEN_TAGS))
            nb = neighbors.neighbors(t.text, t.tag_, int(top_n)) if ok else {"words": np.array([], dtype=object)}
            words = nb["words"]
            self.perturbable[i] = ok and len(words) > 0
            self.choices.append(words)
            if use_proba and len(words):
                w = np.exp((nb["similarities"] - nb["similarities"].max()) / temperature)
                self.probs.append(np.cumsum(w / w.sum()))
            else:
                self.probs.append(None)

    def perturb(self, anchor: tuple[int, ...], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        changed = self._mask(anchor, n, rng)
        toks = np.empty((n, self.n_features), dtype=object)
        toks[:] = self.words
        for i in np.nonzero(changed.any(axis=0))[0]:
            rows = np.nonzero(changed[:, i])[0]
            cum = self.probs[i]
            if cum is None:
                pick = rng.integers(0, len(self.choices[i]), size=len(rows))
            else:
                pick = np.minimum(np.searchsorted(cum, rng.random(len(rows)), side="right"), len(cum) - 1)
            toks[rows, i] = self.choices[i][pick]
        return _join(toks), ~changed


class LanguageModelSampler(_TextOutputs):
    """Mask words outside the anchor and refill them with a masked language model."""

    #: ``lucb_arms='auto'``: two arms per round; every sample costs a language-model fill, so rows
    #: dominate the time.
    lucb_arms_auto = 2

    def __init__(self, lm: LanguageModel, text: str, filling: str = "parallel", sample_proba: float = 0.5,
                 top_n: int = 100, temperature: float = 1.0, use_proba: bool = False,
                 frac_mask_templates: float = 0.1, batch_size_lm: int = 32,
                 punctuation: str = string.punctuation, stopwords: Sequence[str] = (),
                 sample_punctuation: bool = False) -> None:
        self.lm = lm
        tok = lm.tokenizer
        text = text.strip()
        if not text:
            raise ValueError("the text is empty")
        tokens = tok.tokenize(text)
        head_n = len(tokens)
        if head_n > lm.max_num_tokens:
            head_n = lm.max_num_tokens
            while head_n > 0 and lm.is_subword_prefix(tokens[head_n]):
                head_n -= 1
            if head_n == 0:
                raise ValueError("the first word of the text is longer than the language model's input")
        self.head_tokens, self.tail_tokens = tokens[:head_n], tokens[head_n:]
        self.tail = tok.convert_tokens_to_string(self.tail_tokens).strip() if self.tail_tokens else ""
        self.filling, self.sample_proba = filling, float(sample_proba)
        self.top_n, self.temperature, self.use_proba = int(top_n), float(temperature), bool(use_proba)
        self.frac = float(np.clip(frac_mask_templates, 0, 1))
        self.batch_size_lm, self.punctuation = int(batch_size_lm), punctuation
        stop = {w.lower().strip() for w in stopwords}
        ids_sample = []
        for i, t in enumerate(self.head_tokens):
            if lm.is_punctuation(t, punctuation) or lm.is_subword_prefix(t):
                continue
            if stop and lm.select_word(self.head_tokens, i, punctuation).lower() in stop:
                continue
            ids_sample.append(i)
        self.ids_sample = np.array(ids_sample, dtype=np.int64)
        self.n_features = len(ids_sample)
        # word pieces following each sampled head token (removed when the word is masked)
        self.pieces: list[list[int]] = []
        for i in ids_sample:
            j, p = i + 1, []
            while j < len(self.head_tokens) and lm.is_subword_prefix(self.head_tokens[j]) \
                    and not lm.is_punctuation(self.head_tokens[j], punctuation):
                p.append(j)
                j += 1
            self.pieces.append(p)
        vocab = tok.get_vocab()
        banned = np.zeros(max(len(vocab), lm.model.config.vocab_size), dtype=bool)
        for t, i in vocab.items():
            if lm.is_subword_prefix(t) or (not sample_punctuation and lm.is_punctuation(t, punctuation)):
                banned[i] = True
        banned[[i for i in tok.all_special_ids if i is not None]] = True
        self.banned = banned[:lm.model.config.vocab_size]
        self.head_ids = np.array(tok.convert_tokens_to_ids(self.head_tokens), dtype=np.int64)
        # the special tokens the tokenizer wraps a single sequence in (e.g. [CLS] ... [SEP])
        full = tok("x")["input_ids"]
        inner = tok("x", add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(full)) if full[i:i + len(inner)] == inner)
        self.prefix_ids = np.array(full[:at], dtype=np.int64)
        self.suffix_ids = np.array(full[at + len(inner):], dtype=np.int64)
        self.label: Any = None
        self.predictor: Callable | None = None

    def _templates(self, anchor: tuple[int, ...], n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Bool (m, n_features) masks (True: word masked) and the number m of templates."""
        allowed = np.setdiff1d(np.arange(self.n_features), np.array(anchor, dtype=np.int64))
        if len(allowed) == 0 or self.filling == "autoregressive":
            m = n
        else:
            m = 1 if np.isclose(self.sample_proba, 1) else max(1, int(n * self.frac))
        masked = np.zeros((m, self.n_features), dtype=bool)
        if len(allowed):
            n_changed = np.maximum(1, rng.binomial(len(allowed), self.sample_proba, size=m))
            keys = rng.random((m, len(allowed)))
            order = np.argsort(keys, axis=1)
            for i in range(m):
                masked[i, allowed[order[i, :n_changed[i]]]] = True
        return masked, m

    def _replicate(self, m: int, n: int) -> np.ndarray:
        """Template index of each of the n samples (alibi's split: the first n % m templates get one more)."""
        mult, rem = divmod(n, m)
        return np.repeat(np.arange(m), mult + (np.arange(m) < rem))

    def coverage_data(self, n: int, rng: np.random.Generator) -> np.ndarray:
        masked, m = self._templates((), n, rng)
        return ~masked[self._replicate(m, n)]

    def _encode(self, masked: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Token ids (padded, with special tokens), attention masks, and the mask positions per row."""
        tok = self.lm.tokenizer
        rows, positions = [], []
        for mrow in masked:
            ids = self.head_ids.copy()
            keep = np.ones(len(ids), dtype=bool)
            for f in np.nonzero(mrow)[0]:
                ids[self.ids_sample[f]] = self.lm.mask_id
                keep[self.pieces[f]] = False
            full = np.concatenate([self.prefix_ids, ids[keep], self.suffix_ids])
            rows.append(full)
            positions.append(np.nonzero(full == self.lm.mask_id)[0])
        length = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = np.full((len(rows), length), pad, dtype=np.int64)
        att = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            att[i, :len(r)] = 1
        return ids, att, positions

    def _decode(self, ids: np.ndarray, att: np.ndarray) -> np.ndarray:
        tok = self.lm.tokenizer
        out = np.empty(len(ids), dtype=object)
        texts = tok.batch_decode([r[a.astype(bool)].tolist() for r, a in zip(ids, att)], skip_special_tokens=True)
        out[:] = [t + " " + self.tail if self.tail else t for t in texts]
        return out

    def perturb(self, anchor: tuple[int, ...], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        masked, m = self._templates(anchor, n, rng)
        ids, att, pos = self._encode(masked)
        if len(anchor) == self.n_features or not masked.any():
            rep = self._replicate(m, n)
            return self._decode(ids[rep], att[rep]), ~masked[rep]
        if self.filling == "parallel":
            logits = self.lm.logits(ids, att, self.batch_size_lm)
            rep = self._replicate(m, n)
            out_ids = ids[rep].copy()
            start = 0
            for i in range(m):
                reps = int((rep == i).sum())
                if reps and len(pos[i]):
                    draws = sample_top(logits[i, pos[i]], self.banned, self.top_n, self.temperature,
                                       self.use_proba, reps, rng)
                    out_ids[start:start + reps][:, pos[i]] = draws
                start += reps
            return self._decode(out_ids, att[rep]), ~masked[rep]
        # autoregressive: fill the k-th mask of every row, left to right, one forward pass per step
        ids = ids.copy()
        for step in range(max(len(p) for p in pos)):
            rows = [r for r in range(len(ids)) if len(pos[r]) > step]
            logits = self.lm.logits(ids[rows], att[rows], self.batch_size_lm)
            cols = np.array([pos[r][step] for r in rows])
            sel = logits[np.arange(len(rows)), cols]
            draws = sample_top(sel, self.banned, self.top_n, self.temperature, self.use_proba, 1, rng)[0]
            ids[rows, cols] = draws
        return self._decode(ids, att), ~masked


__all__ = ["UnknownSampler", "SimilaritySampler", "LanguageModelSampler", "Neighbors", "load_nlp"]
