"""Text datasets for builds with a Hugging Face model: JSONL/CSV text columns with labels, and plain
text documents cut into fixed-length token blocks (LM indexes).

Each example is tokenized by the model's own tokenizer with the settings the catalog records
(:class:`indexer.text.TextSpec`), so queries tokenize the same way. Every example's text is stored
with it (in its ``payload_ref``) and comes back from ``GetExamples``: for a token block, the
decoded text of the block's tokens.

- ``format = "jsonl"``: one JSON object per line, ``text_field`` (default "text"), optional
  ``label_field`` (default "label"), ``id_field``.
- ``format = "csv"`` with ``text_field``: the same from a CSV file's columns (``label`` names the
  label column).
- ``format = "text"``: a ``.txt`` file (one document) or a folder of ``.txt`` files (one document
  each, sorted by name); the documents' tokens (EOS between documents) in blocks of ``block_size``
  tokens (default ``model.text.max_length``). For ``hf_kind = "causal_lm"`` the targets are the
  block's ids (-100 on padding); with JSONL/CSV the same holds per text.
- ``hf_kind = "token_classification"`` with ``format = "jsonl"``: one object per line with a list of
  words (``tokens_field``, default "tokens") and one label per word (``label_field``, default
  "labels"; class ids, names from ``model.class_names``, or -100 for a word that does not count).
  The words are tokenized as pre-split words (``is_split_into_words``) and each word's label goes
  to its first sub-token through the tokenizer's ``word_ids``; later sub-tokens, special tokens and
  padding get -100 (ignored by the loss). Truncation cuts the words past ``max_length`` tokens
  with their labels; with truncation off a longer example is refused.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from indexer.data import ArrayDataset, _labels_to_int, iter_jsonl, open_dataset, read_jsonl_texts, record_labels
from indexer.errors import ConfigError


def _read_records(data: dict[str, Any]) -> tuple[list[str], list[Any], list[str]]:
    path, fmt = data["path"], data["format"]
    tf = data.get("text_field", "text")
    lf = data.get("label_field", "label") if fmt == "jsonl" else data.get("label")
    idf = data.get("id_field") or data.get("ids")
    texts, labels, ids = [], [], []
    if fmt == "jsonl":
        texts, labels, ids = read_jsonl_texts(path, tf, lf, idf)
    else:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            raise ConfigError("data.path", f"{path} has no data rows under its header.")
        if tf not in rows[0]:
            raise ConfigError("data.text_field", f"column {tf!r} not in the header ({', '.join(rows[0])}).")
        if lf and lf not in rows[0]:
            raise ConfigError("data.label", f"column {lf!r} not in the header ({', '.join(rows[0])}).")
        for i, r in enumerate(rows):
            texts.append(r[tf])
            labels.append(r[lf] if lf else None)
            ids.append(str(r[idf]) if idf and idf in r else str(i))
    for i, t in enumerate(texts):
        if not t.strip():
            raise ConfigError("data.text_field", f"example {i} ({ids[i]}) has an empty text.")
    return texts, labels, ids


def _documents(path: str) -> tuple[list[str], list[str]]:
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*.txt"))
    if not files:
        raise ConfigError("data.path", f"no .txt documents under {p}.")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files], [str(f) for f in files]


def _word_records(data: dict[str, Any]) -> tuple[list[list[str]], list[list[Any]], list[str]]:
    """Words, per-word labels and ids of a token-classification JSONL file."""
    path = data["path"]
    wf, lf, idf = data.get("tokens_field", "tokens"), data.get("label_field", "labels"), data.get("id_field")
    words, labels, ids = [], [], []
    for ln, rec in iter_jsonl(path):
        w, lab = rec.get(wf), rec.get(lf)
        if not isinstance(w, list) or not w or not all(isinstance(t, str) and t.strip() for t in w):
            raise ConfigError("data.tokens_field", f"line {ln + 1}: {wf!r} must be a non-empty list of words "
                                                   "(non-empty strings).")
        if not isinstance(lab, list) or len(lab) != len(w):
            raise ConfigError("data.label_field", f"line {ln + 1}: {lf!r} must be a list of one label per word "
                                                  f"({len(w)} words).")
        words.append(w)
        labels.append(lab)
        ids.append(str(rec[idf]) if idf and idf in rec else str(ln))
    if not words:
        raise ConfigError("data.path", f"{path} has no examples.")
    return words, labels, ids


def align_word_labels(enc: Any, words: list[list[str]], labels: list[list[Any]],
                      class_names: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """(packed inputs (n, len(inputs), T), per-token labels (n, T) int64) of pre-split words: each
    word's label on its first sub-token, -100 on the others, on special tokens and on padding."""
    from indexer.text import IGNORE

    T = enc.max_length
    with enc._lock:
        be = enc.tok(words, is_split_into_words=True, truncation=True, padding="max_length", max_length=T,
                     return_tensors="np")
        if not enc.spec.truncation:
            full = enc.tok(words, is_split_into_words=True)
    if not enc.spec.truncation:
        long_ = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > T]
        if long_:
            raise ConfigError("data.tokens_field", f"example {long_[0]} has {len(full['input_ids'][long_[0]])} tokens; "
                                                   f"the limit is {T} (model.text.max_length, truncation off).")
    X = enc._pack(be, len(words))
    Y = np.full((len(words), T), IGNORE, dtype=np.int64)
    for i, lab in enumerate(labels):
        ints = _labels_to_int([IGNORE if v == IGNORE else v for v in lab], class_names, "data.label_field")
        prev = None
        for t, w in enumerate(be.word_ids(i)):
            if w is not None and w != prev:
                Y[i, t] = ints[w]
            prev = w
    bad = (Y != IGNORE) & ((Y < 0) | (class_names is not None and Y >= len(class_names or [])))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ConfigError("data.label_field", f"example {r}: label {Y[r, c]} is not a class id"
                                              + (f" of model.class_names ({len(class_names)} classes)." if class_names
                                                 else " (use -100 for words that do not count)."))
    return X, Y


def open_text_dataset(data: dict[str, Any], task: str, class_names: list[str] | None,
                      model: dict[str, Any]) -> ArrayDataset:
    """The dataset of a text ``[data]`` table, tokenized by ``model``'s tokenizer."""
    from indexer.text import TextEncoder

    enc = TextEncoder.from_model(model)
    lm = model.get("hf_kind") == "causal_lm"
    limit = data.get("limit") or None
    split = data.get("split", "train")
    if data["format"] == "text":
        docs, _ = _documents(data["path"])
        X = enc.blocks(docs, int(data.get("block_size") or enc.max_length))
        if limit:
            X = X[:limit]
        texts = enc.decode(X)
        ids = [f"block-{i}" for i in range(len(X))]
        payload = (lambda i: json.dumps({"t": "inline", "value": texts[i]}))
        return ArrayDataset(X, enc.lm_labels(X), ids, payload, split, data["path"])
    if model.get("hf_kind") == "token_classification":
        if data["format"] != "jsonl":
            raise ConfigError("data.format", "token classification builds read JSONL with a list of words and one "
                                             "label per word (data.tokens_field, data.label_field).")
        words, wlabels, ids = _word_records(data)
        if limit:
            words, wlabels, ids = words[:limit], wlabels[:limit], ids[:limit]
        X, Y = align_word_labels(enc, words, wlabels, class_names)
        texts = [" ".join(w) for w in words]
        payload = (lambda i: json.dumps({"t": "inline", "value": texts[i]}))
        return ArrayDataset(X, Y, ids, payload, split, data["path"])
    texts, labels, ids = _read_records(data)
    if limit:
        texts, labels, ids = texts[:limit], labels[:limit], ids[:limit]
    if lm:
        X = enc.encode(texts, "data.text_field")
        payload = (lambda i: json.dumps({"t": "inline", "value": texts[i]}))
        return ArrayDataset(X, enc.lm_labels(X), ids, payload, split, data["path"])
    Y = record_labels(labels, task, class_names)
    payload = (lambda i: json.dumps({"t": "inline", "value": texts[i]}))
    return ArrayDataset(np.asarray(texts, dtype=object), Y, ids, payload, split, data["path"],
                        transform=lambda xs: enc.encode(list(xs), "data.text_field"))


def open_build_dataset(data: dict[str, Any], task: str, class_names: list[str] | None,
                       model: dict[str, Any]) -> ArrayDataset:
    """The dataset of a build: text formats through the model's tokenizer when the model is a Hugging
    Face directory and no ``data.preprocess`` is given, everything else through :func:`open_dataset`."""
    fmt = data["format"]
    if "hf_dir" in model and "preprocess" not in data and (
            fmt in ("jsonl", "text") or (fmt == "csv" and "text_field" in data)):
        return open_text_dataset(data, task, class_names, model)
    return open_dataset(data, task, class_names)


__all__ = ["open_text_dataset", "open_build_dataset", "align_word_labels"]
