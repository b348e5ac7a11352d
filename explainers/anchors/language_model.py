"""The masked language model behind AnchorText's ``'language_model'`` strategy.

:class:`LanguageModel` wraps a Hugging Face masked LM and its tokenizer, loaded from local files
only (nothing is downloaded), and knows how that tokenizer marks word pieces and punctuation;
:func:`sample_top` draws replacement tokens from its logits with the per-call generator.
torch and transformers are imported when a model is built, not when this module is imported.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

_BPE_MODEL_TYPES = frozenset(["roberta", "xlm-roberta", "camembert", "bart", "longformer", "gpt2", "deberta"])


class LanguageModel:
    """A masked language model and its tokenizer loaded from a local Hugging Face directory (PyTorch).

    ``LanguageModel('/path/to/dir')`` loads with ``local_files_only=True``: nothing is downloaded.
    Word pieces are recognised by the ``##`` prefix (BERT/WordPiece) or, for byte-level BPE models
    (RoBERTa family), by the absence of the ``Ġ`` word-start marker, as alibi does.
    """

    def __init__(self, model_path: str | Path | Any, tokenizer: Any = None, subword_prefix: str | None = None) -> None:
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        if isinstance(model_path, (str, Path)):
            path = Path(model_path)
            if not path.is_dir():
                raise ValueError(f"language_model must be a local directory with a saved model, got {str(path)!r}")
            self.model = AutoModelForMaskedLM.from_pretrained(str(path), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer with an in-memory model")
            self.model, self.tokenizer = model_path, tokenizer
        self.model.eval()
        self.torch = torch
        mtype = getattr(self.model.config, "model_type", "")
        self.bpe = mtype in _BPE_MODEL_TYPES if subword_prefix is None else subword_prefix == "Ġ"
        self.SUBWORD_PREFIX = subword_prefix or ("Ġ" if self.bpe else "##")
        if self.tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token: not a masked language model")
        self.mask_token = self.tokenizer.mask_token
        self.mask_id = int(self.tokenizer.mask_token_id)
        self.max_num_tokens = int(getattr(self.model.config, "max_position_embeddings", 512)) \
            - self.tokenizer.num_special_tokens_to_add(pair=False)
        self._lock = threading.Lock()

    def is_subword_prefix(self, token: str) -> bool:
        if self.bpe:
            return not token.startswith("Ġ")
        return token.startswith(self.SUBWORD_PREFIX)

    def is_punctuation(self, token: str, punctuation: str) -> bool:
        s = self.tokenizer.convert_tokens_to_string([token]).strip()
        if s.startswith(self.SUBWORD_PREFIX):
            s = s.replace(self.SUBWORD_PREFIX, "", 1)
        return any(c in punctuation for c in s) if s else False

    def select_word(self, tokens: list[str], start: int, punctuation: str) -> str:
        end = start + 1
        while end < len(tokens) and self.is_subword_prefix(tokens[end]) \
                and not self.is_punctuation(tokens[end], punctuation):
            end += 1
        return self.tokenizer.convert_tokens_to_string(tokens[start:end]).strip()

    def logits(self, ids: np.ndarray, attention: np.ndarray, batch_size: int) -> np.ndarray:
        """Forward pass in batches: float32 (n, length, vocab)."""
        torch = self.torch
        outs = []
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                out = self.model(input_ids=torch.as_tensor(ids[i:i + batch_size]),
                                 attention_mask=torch.as_tensor(attention[i:i + batch_size]))
                outs.append(out.logits.float().numpy())
        return np.concatenate(outs)


def sample_top(logits: np.ndarray, banned: np.ndarray, top_n: int, temperature: float, use_proba: bool,
               reps: int, rng: np.random.Generator) -> np.ndarray:
    """For each row of ``logits`` (k, V): ``reps`` draws among the top_n allowed tokens -> (reps, k) ids."""
    lg = np.where(banned, -np.inf, logits)
    k_top = int(min(top_n, int((~banned).sum())))
    top = np.argpartition(-lg, k_top - 1, axis=1)[:, :k_top]
    if not use_proba:
        pick = rng.integers(0, k_top, size=(reps, lg.shape[0]))
    else:
        tl = np.take_along_axis(lg, top, axis=1) / temperature
        p = np.exp(tl - tl.max(axis=1, keepdims=True))
        cum = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
        u = rng.random((reps, lg.shape[0], 1))
        pick = np.minimum((cum[None] < u).sum(axis=2), k_top - 1)
    return top[np.arange(lg.shape[0])[None, :], pick]



__all__ = ["LanguageModel", "sample_top"]
