"""Text models: local Hugging Face directories, their tokenizers, and the packed token arrays the engine takes.

Why one packed array: the gradient engine differentiates a model of one input array ``X``. A text
model takes several named tensors (``input_ids``, ``attention_mask``, ``token_type_ids``), so an
example is stored and sent as one int64 array (n_inputs, T), the named tensors stacked in the order
:attr:`TextSpec.inputs` records; :class:`HFModel` unpacks it and calls the Hugging Face model with
keyword arguments. Raw text becomes that array through the model's own tokenizer with the settings
recorded in the catalog (:class:`TextSpec`: ``max_length``, padding to ``max_length``, truncation),
at build time and at query time alike. Padding to a fixed length makes an example's array — and
with the attention mask and -100 labels, its gradient — independent of the batch it travels in.

Nothing is downloaded: every load uses ``local_files_only=True``, and a missing file is named in
the error before ``transformers`` is asked. ``transformers`` is imported only after
:func:`indexer.compat.ensure_torchvision_importable` (the PyPI torchvision beside a CPU torch).

Kinds (``model.hf_kind``): ``sequence_classification`` (label per text, cross-entropy),
``token_classification`` (label per token, -100 ignored) and ``causal_lm`` (next-token loss over
the tokens whose label is not -100; for a query "prompt + completion" only the completion's tokens
count, see :meth:`TextEncoder.encode_completions`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import ConfigError, InvalidArgument

HF_KINDS = {"sequence_classification": "AutoModelForSequenceClassification",
            "token_classification": "AutoModelForTokenClassification",
            "causal_lm": "AutoModelForCausalLM"}
HF_LOSSES = {"sequence_classification": "sequence_classification", "token_classification": "token_classification",
             "causal_lm": "causal_lm"}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
MAX_TEXT_CHARS = 100_000  # one query text; longer is refused before tokenization (a guard, not a model limit)
IGNORE = -100


def import_transformers() -> Any:
    """``transformers``, imported after the torchvision shim (the one way this project imports it)."""
    from indexer.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import transformers

    return transformers


def check_hf_dir(path: str | Path, field: str = "model.hf_dir") -> Path:
    """The directory of a ``save_pretrained`` model with its tokenizer; ConfigError naming the missing file."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(field, f"not a directory: {p} (save the model with model.save_pretrained(dir) and "
                                 "tokenizer.save_pretrained(dir)).")
    if not (p / "config.json").exists():
        raise ConfigError(field, f"missing file {p / 'config.json'}: save the model with save_pretrained().")
    if not any((p / f).exists() for f in WEIGHT_FILES):
        raise ConfigError(field, f"missing weights in {p}: expected one of {', '.join(WEIGHT_FILES)} "
                                 "(model.save_pretrained(dir)).")
    if not (p / "tokenizer_config.json").exists():
        raise ConfigError(field, f"missing file {p / 'tokenizer_config.json'}: save the tokenizer with "
                                 "tokenizer.save_pretrained(dir) next to the model.")
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(field, f"missing tokenizer vocabulary in {p}: expected one of {', '.join(TOKENIZER_FILES)}.")
    return p


@dataclass(frozen=True)
class TextSpec:
    """How texts become model inputs; recorded in the catalog so queries tokenize exactly like the build.

    ``inputs``: the named tensors stacked into one example, in order. ``padding`` is always to
    ``max_length`` (fixed shape: no dependence on the batch). ``truncation``: cut longer texts at
    ``max_length`` tokens (build and query alike); False refuses them instead.
    """

    hf_kind: str
    max_length: int = 128
    truncation: bool = True
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    padding: str = "max_length"
    padding_side: str = "right"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = list(self.inputs)
        return d

    @classmethod
    def from_model(cls, model_cfg: dict[str, Any]) -> "TextSpec":
        """The spec of a checked ``[model]`` table with ``hf_dir``."""
        t = dict(model_cfg.get("text") or {})
        return cls(model_cfg["hf_kind"], int(t.get("max_length", 128)), bool(t.get("truncation", True)),
                   tuple(t.get("inputs", ("input_ids", "attention_mask"))))


def check_text_section(model: dict[str, Any], base: Path) -> None:
    """Validate the Hugging Face keys of ``[model]`` in place: ``hf_dir``, ``hf_kind``, ``text`` (settings)."""
    p = check_hf_dir((base / str(model["hf_dir"])).resolve())
    model["hf_dir"] = str(p)
    kind = model.get("hf_kind")
    if kind not in HF_KINDS:
        raise ConfigError("model.hf_kind", f"{kind!r} is unknown: use one of {', '.join(HF_KINDS)}.")
    t = dict(model.get("text") or {})
    bad = set(t) - {"max_length", "truncation", "inputs"}
    if bad:
        raise ConfigError(f"model.text.{sorted(bad)[0]}", "unknown key; allowed: inputs, max_length, truncation.")
    ml = t.setdefault("max_length", 128)
    if not isinstance(ml, int) or ml < 2:
        raise ConfigError("model.text.max_length", f"must be an integer >= 2, got {ml!r}.")
    t.setdefault("truncation", True)
    inputs = t.setdefault("inputs", ["input_ids", "attention_mask"])
    if not inputs or inputs[0] != "input_ids" or any(i not in INPUT_NAMES for i in inputs) or len(set(inputs)) != len(inputs):
        raise ConfigError("model.text.inputs", f"must start with 'input_ids' and name distinct tensors of "
                                               f"{', '.join(INPUT_NAMES)}, got {inputs!r}.")
    model["text"] = t
    model.setdefault("loss", HF_LOSSES[kind])
    if kind == "causal_lm":
        model["task"] = "regression"  # targets (the label ids) are always given: never predicted
    model["framework"] = "pytorch"


def text_description(model_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """What an index description says about a text model (kind, directory, tokenization); None otherwise."""
    if "hf_dir" not in model_cfg:
        return None
    return {"hf_kind": model_cfg["hf_kind"], "hf_dir": model_cfg["hf_dir"], **(model_cfg.get("text") or {})}


def _torch_module() -> Any:
    import torch

    class HFModel(torch.nn.Module):
        """A Hugging Face model over one packed int64 array (n, len(inputs), T); returns the logits."""

        def __init__(self, hf: Any, inputs: Sequence[str]) -> None:
            super().__init__()
            self.hf = hf
            self.inputs = tuple(inputs)

        def forward(self, X: Any) -> Any:
            X = X.long()
            return self.hf(**{name: X[:, i] for i, name in enumerate(self.inputs)}).logits

    return HFModel


def load_hf_model(model_cfg: dict[str, Any]) -> Any:
    """The model of ``model.hf_dir`` (local files only), wrapped to take the packed array, in eval mode."""
    tr = import_transformers()
    p = check_hf_dir(model_cfg["hf_dir"])
    cls = getattr(tr, HF_KINDS[model_cfg["hf_kind"]])
    try:
        hf = cls.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("model.hf_dir", f"cannot load a {model_cfg['hf_kind']} model from {p}: {exc}") from exc
    spec = TextSpec.from_model(model_cfg)
    m = _torch_module()(hf, spec.inputs)
    m.eval()
    return m


def make_hf_loss(name: str) -> Any:
    """The per-sequence loss for a Hugging Face kind's loss name (indexer.engine.losses)."""
    from indexer.engine import losses

    return {"sequence_classification": losses.sequence_classification_loss,
            "token_classification": lambda: losses.token_classification_loss("mean"),
            "causal_lm": lambda: losses.causal_lm_loss("mean")}[name]()


class TextEncoder:
    """Texts → packed int64 arrays (n, len(inputs), T) with the model's tokenizer and a :class:`TextSpec`."""

    def __init__(self, hf_dir: str | Path, spec: TextSpec) -> None:
        tr = import_transformers()
        p = check_hf_dir(hf_dir)
        self.tok = tr.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        self.tok.padding_side = spec.padding_side
        if self.tok.pad_token is None:
            raise ConfigError("model.hf_dir", f"the tokenizer in {p} has no pad token: set one before "
                                              "save_pretrained (e.g. tokenizer.pad_token = tokenizer.eos_token).")
        self.spec = spec
        self._lock = threading.Lock()  # a fast tokenizer refuses concurrent calls ("Already borrowed")

    @classmethod
    def from_model(cls, model_cfg: dict[str, Any]) -> "TextEncoder":
        return cls(model_cfg["hf_dir"], TextSpec.from_model(model_cfg))

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    def _check_texts(self, texts: Any, what: str = "texts") -> list[str]:
        if isinstance(texts, str):
            raise InvalidArgument(f"{what} must be a list of strings, got one string: wrap it in a list.")
        texts = list(texts)
        if not texts:
            raise InvalidArgument(f"{what} is empty: send at least one text.")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidArgument(f"{what}[{i}] is a {type(t).__name__}, not a string.")
            if not t.strip():
                raise InvalidArgument(f"{what}[{i}] is empty: send some text.")
            if len(t) > MAX_TEXT_CHARS:
                raise InvalidArgument(f"{what}[{i}] has {len(t)} characters; the limit is {MAX_TEXT_CHARS}.")
        return texts

    def _pack(self, enc: Any, n: int) -> np.ndarray:
        cols = []
        for name in self.spec.inputs:
            if name in enc:
                cols.append(np.asarray(enc[name], dtype=np.int64))
            elif name == "token_type_ids":
                cols.append(np.zeros((n, self.spec.max_length), dtype=np.int64))
            else:
                raise ConfigError("model.text.inputs", f"the tokenizer does not produce {name!r}.")
        return np.stack(cols, axis=1)

    def encode(self, texts: Any, what: str = "texts") -> np.ndarray:
        """Packed inputs (n, len(inputs), max_length) of texts; InvalidArgument for empty, non-string or
        (without truncation) too long texts."""
        texts = self._check_texts(texts, what)
        if not self.spec.truncation:
            with self._lock:
                lens = [len(ids) for ids in self.tok(texts, add_special_tokens=True)["input_ids"]]
            long_ = [i for i, n in enumerate(lens) if n > self.max_length]
            if long_:
                raise InvalidArgument(f"{what}[{long_[0]}] has {lens[long_[0]]} tokens; the index's limit is "
                                      f"{self.max_length} (max_length, truncation off).")
        with self._lock:
            enc = self.tok(texts, truncation=True, padding="max_length", max_length=self.max_length,
                           return_tensors="np")
        return self._pack(enc, len(texts))

    def trim_padding(self, X: np.ndarray, Y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(X, Y) cut after the batch's last position that counts: the last attention-mask 1 of any
        row, and for per-token targets (token classification, causal LM) the last label that is not
        -100. Why: a query of 8 tokens padded to T = 128 costs the model, its backward pass and
        the projection 16x the work; the cut positions are masked keys (zero attention weight),
        right of every real token, with no label, so they contribute exactly zero to the loss and
        to every parameter's gradient. The stored and sent arrays keep their ``max_length``
        contract; this is a query-time shortcut that :meth:`indexer.query.GradIndex.warm_up` checks
        against the padded path before it is used. Unchanged (no cut) when the inputs have no
        attention mask or the padding is not on the right."""
        X = np.asarray(X)
        if "attention_mask" not in self.spec.inputs or self.spec.padding_side != "right" or X.ndim != 3:
            return X, Y
        T = X.shape[2]
        mask = X[:, self.spec.inputs.index("attention_mask")] != 0
        cols = mask.any(axis=0)
        if Y is not None and np.ndim(Y) == 2 and np.shape(Y)[1] == T:
            cols = cols | (np.asarray(Y) != IGNORE).any(axis=0)
        L = int(np.flatnonzero(cols)[-1]) + 1 if cols.any() else 1
        if L >= T:
            return X, Y
        if Y is not None and np.ndim(Y) == 2 and np.shape(Y)[1] == T:
            Y = np.ascontiguousarray(np.asarray(Y)[:, :L])
        return np.ascontiguousarray(X[:, :, :L]), Y

    def decode(self, X: np.ndarray) -> list[str]:
        """The text of packed inputs (padding dropped)."""
        ids, mask = X[:, 0], X[:, 1] if "attention_mask" in self.spec.inputs else None
        return [self.tok.decode(r[m.astype(bool)] if mask is not None else r, skip_special_tokens=True)
                for r, m in zip(ids, mask if mask is not None else ids)]

    @staticmethod
    def lm_labels(X: np.ndarray) -> np.ndarray:
        """Causal-LM labels of packed inputs: the ids, -100 where the attention mask is 0 (padding)."""
        ids = X[:, 0]
        return np.where(X[:, 1] > 0, ids, IGNORE).astype(np.int64) if X.shape[1] > 1 else ids.astype(np.int64)

    def encode_completions(self, prompts: Any, completions: Any) -> tuple[np.ndarray, np.ndarray]:
        """(packed inputs, labels) of prompt + completion pairs: the labels keep only the completion's
        token ids (-100 on the prompt and the padding), so the causal-LM loss — and the query's
        gradient — is the completion's given the prompt. A pair longer than max_length tokens is
        refused (cutting it would change what is asked)."""
        prompts = self._check_texts(prompts, "texts")
        completions = self._check_texts(completions, "completions")
        if len(prompts) != len(completions):
            raise InvalidArgument(f"{len(prompts)} prompts but {len(completions)} completions: send one per prompt.")
        T, n = self.max_length, len(prompts)
        pad = int(self.tok.pad_token_id)
        ids = np.full((n, T), pad, dtype=np.int64)
        mask = np.zeros((n, T), dtype=np.int64)
        labels = np.full((n, T), IGNORE, dtype=np.int64)
        with self._lock:
            toks = [(self.tok(p, add_special_tokens=False)["input_ids"], self.tok(c, add_special_tokens=False)["input_ids"])
                    for p, c in zip(prompts, completions)]
        for i, (pi, ci) in enumerate(toks):
            if not ci:
                raise InvalidArgument(f"completions[{i}] has no tokens.")
            if len(pi) + len(ci) > T:
                raise InvalidArgument(f"prompt + completion {i} has {len(pi) + len(ci)} tokens; the index's limit "
                                      f"is {T} (max_length).")
            L = len(pi) + len(ci)
            ids[i, :L] = pi + ci
            mask[i, :L] = 1
            labels[i, len(pi):L] = ci
        cols = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return np.stack([cols[name] for name in self.spec.inputs], axis=1), labels

    def blocks(self, documents: Sequence[str], block_size: int) -> np.ndarray:
        """Fixed-length token blocks (n, len(inputs), block_size) of documents for an LM index: the
        documents' tokens, each document followed by the EOS token when the tokenizer has one, cut
        into consecutive blocks; the last, shorter block is padded (and masked)."""
        if block_size > self.max_length:
            raise ConfigError("data.block_size", f"{block_size} exceeds model.text.max_length {self.max_length}.")
        eos = self.tok.eos_token_id
        stream: list[int] = []
        for d in documents:
            stream.extend(self.tok(d, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(int(eos))
        if not stream:
            raise ConfigError("data.path", "the documents contain no tokens.")
        n = (len(stream) + block_size - 1) // block_size
        T = self.max_length
        ids = np.full((n, T), int(self.tok.pad_token_id), dtype=np.int64)
        mask = np.zeros((n, T), dtype=np.int64)
        for b in range(n):
            chunk = stream[b * block_size:(b + 1) * block_size]
            ids[b, :len(chunk)] = chunk
            mask[b, :len(chunk)] = 1
        cols = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return np.stack([cols[name] for name in self.spec.inputs], axis=1)


__all__ = ["HF_KINDS", "INPUT_NAMES", "TextSpec", "TextEncoder", "check_hf_dir", "check_text_section",
           "load_hf_model", "make_hf_loss", "import_transformers", "MAX_TEXT_CHARS"]
