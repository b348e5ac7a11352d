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
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from indexer.data import ArrayDataset, _labels_to_int, open_dataset, read_jsonl_texts
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
    texts, labels, ids = _read_records(data)
    if limit:
        texts, labels, ids = texts[:limit], labels[:limit], ids[:limit]
    if lm:
        X = enc.encode(texts, "data.text_field")
        payload = (lambda i: json.dumps({"t": "inline", "value": texts[i]}))
        return ArrayDataset(X, enc.lm_labels(X), ids, payload, split, data["path"])
    Y = None
    if any(v is not None for v in labels):
        if any(v is None for v in labels):
            raise ConfigError("data.label_field", "some examples have a label and some do not.")
        Y = _labels_to_int(labels, class_names, "data.label_field") if task == "classification" else np.asarray(
            labels, dtype=np.float32)
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


__all__ = ["open_text_dataset", "open_build_dataset"]
