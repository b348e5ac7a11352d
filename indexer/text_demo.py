"""Small text models made on the spot from data the project generates or that installs with Python.

Nothing is downloaded. The tokenizer is a ``tokenizers`` WordLevel model trained on the corpus at hand
and wrapped in ``PreTrainedTokenizerFast``; models are random-init Hugging Face configs trained for a
few steps; everything is saved with ``save_pretrained`` so the index config points at a directory,
as a user's own fine-tuned model would be.

- :func:`sentiment_sentences`: seeded template sentences with labels (0 negative, 1 positive).
- :func:`python_doc_corpus`: docstrings of standard-library modules (they install with Python).
- :func:`make_classifier_dir`: tokenizer + a tiny BERT sequence classifier trained on the sentences.
- :func:`make_lm_dir`: tokenizer + a tiny GPT-2 trained on token blocks of the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending", "the story",
            "the cast", "the script", "the director", "the camera work", "the dialogue"]
POSITIVE = ["wonderful", "brilliant", "delightful", "moving", "superb", "charming", "gripping", "excellent",
            "beautiful", "clever"]
NEGATIVE = ["terrible", "boring", "awful", "dull", "clumsy", "tedious", "weak", "dreadful", "messy", "bland"]
INTENS = ["", "really ", "truly ", "quite ", "very ", "utterly "]
TAILS = ["", " from start to finish", " in every scene", " despite the hype", " for a sequel", " overall"]
STDLIB_DOCS = ("json", "textwrap", "collections", "itertools", "functools", "pathlib", "re", "string",
               "heapq", "bisect", "datetime", "fractions", "statistics", "csv", "argparse", "shutil", "tempfile",
               "random", "math", "difflib", "enum", "dataclasses", "contextlib", "logging", "typing")


def sentiment_sentences(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """n template sentences about films and their labels (1 = positive), seeded."""
    rng = np.random.default_rng(seed)
    texts, labels = [], np.zeros(n, dtype=np.int64)
    for i in range(n):
        pos = bool(rng.integers(2))
        adj = (POSITIVE if pos else NEGATIVE)[rng.integers(10)]
        s = f"{SUBJECTS[rng.integers(len(SUBJECTS))]} was {INTENS[rng.integers(len(INTENS))]}{adj}" \
            f"{TAILS[rng.integers(len(TAILS))]}"
        texts.append(s)
        labels[i] = int(pos)
    return texts, labels


def python_doc_corpus(modules: Sequence[str] = STDLIB_DOCS, max_chars: int | None = None) -> list[str]:
    """The docstrings of standard-library modules and their public functions/classes, one document per module."""
    import importlib
    import inspect

    docs = []
    for name in modules:
        mod = importlib.import_module(name)
        parts = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                d = inspect.getdoc(obj)
                if d:
                    parts.append(d)
        text = "\n\n".join(p for p in parts if p)
        docs.append(text[:max_chars] if max_chars else text)
    return docs


def train_tokenizer(texts: Sequence[str], out_dir: str | Path, special: dict[str, str], cls_sep: bool,
                    vocab_size: int = 2000) -> Any:
    """A lower-casing WordLevel tokenizer trained on ``texts`` (PreTrainedTokenizerFast), saved to ``out_dir``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    from indexer.text import import_transformers

    tr = import_transformers()
    tok = Tokenizer(models.WordLevel(unk_token=special["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    toks = list(dict.fromkeys(special.values()))
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=toks))
    if cls_sep:
        cls_id, sep_id = tok.token_to_id(special["cls_token"]), tok.token_to_id(special["sep_token"])
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
            ("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = tr.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(str(out_dir))
    return fast


def make_classifier_dir(out_dir: str | Path, n_train: int = 400, epochs: int = 3, hidden: int = 32, layers: int = 2,
                        max_length: int = 32, seed: int = 0) -> dict[str, Any]:
    """Train a tiny BERT sentiment classifier on generated sentences; save model + tokenizer (+ data) in
    ``out_dir``. Returns {dir, texts, labels, accuracy}. Reuses a directory made before."""
    import torch

    out = Path(out_dir)
    meta = out / "train_meta.json"
    texts, labels = sentiment_sentences(n_train, seed)
    if meta.exists():
        return {"dir": str(out), "texts": texts, "labels": labels, **json.loads(meta.read_text())}
    tr = __import__("indexer.text", fromlist=["import_transformers"]).import_transformers()
    torch.manual_seed(seed)
    special = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
               "mask_token": "[MASK]"}
    tok = train_tokenizer(texts + sentiment_sentences(200, seed + 1)[0], out, special, cls_sep=True)
    cfg = tr.BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=max(64, max_length),
                        num_labels=2, pad_token_id=tok.pad_token_id)
    model = tr.BertForSequenceClassification(cfg)
    enc = tok(texts, truncation=True, padding="max_length", max_length=max_length, return_tensors="pt")
    y = torch.as_tensor(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(texts), generator=g).split(32):
            loss = model(input_ids=enc["input_ids"][b], attention_mask=enc["attention_mask"][b], labels=y[b]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(1)
                     == y).float().mean())
    model.save_pretrained(str(out))
    with open(out / "train.jsonl", "w") as fh:
        for i, (t, l) in enumerate(zip(texts, labels)):
            fh.write(json.dumps({"id": f"s{i}", "text": t, "label": ["negative", "positive"][int(l)]}) + "\n")
    meta.write_text(json.dumps({"accuracy": acc}))
    return {"dir": str(out), "texts": texts, "labels": labels, "accuracy": acc}


def make_lm_dir(out_dir: str | Path, docs: Sequence[str] | None = None, block_size: int = 32, steps: int = 150,
                hidden: int = 32, layers: int = 2, seed: int = 0) -> dict[str, Any]:
    """Train a tiny GPT-2 on token blocks of ``docs`` (default: stdlib docstrings); save model +
    tokenizer and the corpus (``corpus/*.txt``) in ``out_dir``. Returns {dir, loss}."""
    import torch

    out = Path(out_dir)
    meta = out / "train_meta.json"
    if meta.exists():
        return {"dir": str(out), **json.loads(meta.read_text())}
    from indexer.text import TextEncoder, TextSpec, import_transformers

    tr = import_transformers()
    docs = list(docs) if docs is not None else python_doc_corpus()
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (out / "corpus" / f"doc{i:03d}.txt").write_text(d)
    special = {"unk_token": "<unk>", "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<eos>"}
    tok = train_tokenizer(docs, out, special, cls_sep=False, vocab_size=3000)
    torch.manual_seed(seed)
    cfg = tr.GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=2, n_positions=max(64, block_size),
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = tr.GPT2LMHeadModel(cfg)
    model.save_pretrained(str(out))  # the encoder below needs the directory complete
    enc = TextEncoder(out, TextSpec("causal_lm", block_size, True, ("input_ids", "attention_mask")))
    X = torch.as_tensor(enc.blocks(docs, block_size))
    labels = torch.as_tensor(enc.lm_labels(X.numpy()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for s in range(steps):
        b = torch.randint(len(X), (32,), generator=g)
        loss = model(input_ids=X[b, 0], attention_mask=X[b, 1], labels=labels[b]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out))
    meta.write_text(json.dumps({"loss": float(loss.detach()), "blocks": len(X)}))
    return {"dir": str(out), "loss": float(loss.detach()), "blocks": len(X)}


__all__ = ["sentiment_sentences", "python_doc_corpus", "train_tokenizer", "make_classifier_dir", "make_lm_dir"]
