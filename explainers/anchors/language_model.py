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


def _load_local(name_or_path: str, cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Masked LM and tokenizer from a directory or the local Hugging Face cache; never downloads."""
    from indexer.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": True}
    if cache_dir is not None:
        kw["cache_dir"] = str(cache_dir)
    model = AutoModelForMaskedLM.from_pretrained(name_or_path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kw)
    return model, tokenizer


class LanguageModel:
    """A masked language model and its tokenizer loaded from a local Hugging Face directory (PyTorch).

    ``LanguageModel('/path/to/dir')`` loads with ``local_files_only=True``: nothing is downloaded.
    Word pieces are recognised by the ``##`` prefix (BERT/WordPiece) or, for byte-level BPE models
    (RoBERTa family), by the absence of the ``Ġ`` word-start marker, as alibi does.
    """

    def __init__(self, model_path: str | Path | Any, tokenizer: Any = None, subword_prefix: str | None = None) -> None:
        if isinstance(model_path, (str, Path)):
            path = Path(model_path)
            if not path.is_dir():
                raise ValueError(f"language_model must be a local directory with a saved model, got {str(path)!r}")
            model, tokenizer = _load_local(str(path))
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer with an in-memory model")
            model = model_path
        self._setup(model, tokenizer, subword_prefix)

    def _setup(self, model: Any, tokenizer: Any, subword_prefix: str | None) -> None:
        import torch

        self.model, self.tokenizer = model, tokenizer
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



class _NamedLanguageModel(LanguageModel):
    """A named Hugging Face masked LM (alibi's ``DistilbertBaseUncased`` etc.), from local files only.

    ``Name()`` loads the model from the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, or
    ``cache_dir``); ``Name(path=dir)`` or ``Name(preloading=False).from_disk(dir)`` (alibi's
    spelling) loads a directory saved with ``save_pretrained``. Nothing is downloaded: when the
    model is absent the error says how to provide it.
    """

    HF_NAME: str = ""
    SUBWORD_MARK: str = "##"

    def __init__(self, preloading: bool = True, path: str | Path | None = None,
                 cache_dir: str | Path | None = None) -> None:
        self.model_path = self.HF_NAME if path is None else str(path)
        self.cache_dir = cache_dir
        if preloading:
            if path is not None:
                self.from_disk(path)
            else:
                self._load(self.HF_NAME, cache_dir)

    def _load(self, name_or_path: str, cache_dir: str | Path | None = None) -> None:
        try:
            model, tokenizer = _load_local(name_or_path, cache_dir)
        except OSError as e:
            raise FileNotFoundError(
                f"{type(self).__name__}: {name_or_path!r} is not available locally and nothing is downloaded "
                f"at run time. Provide it either as a directory (on a machine with network: "
                f"AutoModelForMaskedLM.from_pretrained({self.HF_NAME!r}).save_pretrained(dir) and the same "
                f"for AutoTokenizer; then {type(self).__name__}(path=dir)), or in the Hugging Face cache "
                f"(`huggingface-cli download {self.HF_NAME}` there, then copy the cache and point HF_HOME "
                f"or cache_dir= at it). ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        self._setup(model, tokenizer, self.SUBWORD_MARK)

    def from_disk(self, path: str | Path) -> "_NamedLanguageModel":
        """Load the model and tokenizer saved in directory ``path`` (alibi's ``from_disk``)."""
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: {str(p)!r} is not a directory with a saved model")
        self.model_path = str(p)
        self._load(str(p))
        return self

    @property
    def mask(self) -> str:
        """The mask token as it appears among the tokens (RoBERTa: with its word-start mark)."""
        return (self.SUBWORD_MARK + self.mask_token) if self.bpe else self.mask_token


class DistilbertBaseUncased(_NamedLanguageModel):
    """``distilbert-base-uncased`` (WordPiece, ``##`` marks a word piece), from local files only."""

    HF_NAME = "distilbert-base-uncased"


class BertBaseUncased(_NamedLanguageModel):
    """``bert-base-uncased`` (WordPiece, ``##`` marks a word piece), from local files only."""

    HF_NAME = "bert-base-uncased"


class RobertaBase(_NamedLanguageModel):
    """``roberta-base`` (byte-level BPE, ``Ġ`` marks a word start), from local files only."""

    HF_NAME = "roberta-base"
    SUBWORD_MARK = "Ġ"


__all__ = ["LanguageModel", "DistilbertBaseUncased", "BertBaseUncased", "RobertaBase", "sample_top"]
