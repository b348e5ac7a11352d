"""Conformance zoo: every trainable parameter of small random-init models vs a float64 per-example loop.

Each model is built from a config (nothing downloaded), in float64, and its per-example gradients
from ``make_engine(...).grads`` are compared parameter by parameter with an independent reference:
autograd on one example at a time. The criterion is max |engine - loop| ≤ 1e-6 of that tensor's
largest entry. Sequence models run with padding (an attention mask hiding it and -100 labels) so
that padded tokens are shown to contribute nothing. ``ZOO_REPORT`` collects rules and errors for
docs/engine_conformance.md (``python -m tests.test_engine_zoo`` prints the table).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from indexer.compat import ensure_torchvision_importable
from indexer.engine import make_engine
from indexer.engine.losses import causal_lm_loss, sequence_classification_loss, token_classification_loss

TOL = 1e-6
ZOO_REPORT: dict[str, dict[str, Any]] = {}


def _transformers():
    """Import transformers (torchvision kept importable beside the CPU-only torch)."""
    ensure_torchvision_importable()
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def reference_loop(model: nn.Module, loss_fn: Callable, X: np.ndarray, Y: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-example gradients (n, size) per parameter name, one example at a time, float64."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows: dict[str, list[np.ndarray]] = {n: [] for n, _ in named}
    for i in range(len(X)):
        out = model(torch.as_tensor(X[i:i + 1]))
        L = loss_fn(out, None if Y is None else torch.as_tensor(Y[i:i + 1])).sum()
        gs = torch.autograd.grad(L, [p for _, p in named], allow_unused=True)
        for (n, p), g in zip(named, gs):
            rows[n].append((torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1).detach().numpy())
    return {n: np.stack(r) for n, r in rows.items()}


def check_model(name: str, model: nn.Module, loss_fn: Callable, X: np.ndarray, Y: np.ndarray | None,
                task: str = "classification", chunk_size: int = 3) -> dict[str, str]:
    """Engine vs loop for every parameter; returns the engine's rules. Records the errors in ZOO_REPORT."""
    model = model.double().eval()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        eng = make_engine(model, loss_fn, task=task, chunk_size=chunk_size)
        G = eng.grads(X, Y, dtype=np.float64)
    ref = reference_loop(model, loss_fn, X, Y)
    offs = eng.offsets()
    errs = {}
    # A tensor whose exact gradient is zero (key biases under softmax) holds rounding noise only: its
    # error is measured against 1e-3 of the model's largest gradient instead of its own noise.
    floor = 1e-3 * max(np.abs(r).max() for r in ref.values())
    for n, size in zip(eng.param_names, eng.param_sizes):
        r = ref[n]
        g = G[:, offs[n]:offs[n] + size]
        errs[n] = float(np.abs(g - r).max() / max(np.abs(r).max(), floor))
    assert eng.verified
    rules = eng.rules
    generic_warnings = [str(w.message) for w in rec if "generic path" in str(w.message)]
    ZOO_REPORT[name] = {"rules": rules, "errors": errs, "warnings": generic_warnings}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, f"{name}: {worst} off by {errs[worst]:.3g} of its largest entry (rule {rules[worst]})"
    # every parameter got a real comparison: at least most gradients are non-zero
    assert sum(np.abs(ref[n]).max() > 0 for n in ref) >= 0.8 * len(ref)
    # the generic path is announced once, naming what it took
    generic = [n for n, r in rules.items() if r in ("vmap", "loop")]
    if generic:
        assert len(generic_warnings) >= 1 and all(any(n in w for w in generic_warnings) for n in generic)
    else:
        assert not generic_warnings
    return rules


# --------------------------------------------------------------------------- data
def _ids(n: int, T: int, vocab: int, pad: int, seed: int = 0, min_len: int = 3) -> np.ndarray:
    """Token ids with right padding: sequence i has a random length in [min_len, T]."""
    rng = np.random.default_rng(seed)
    X = rng.integers(pad + 1 if pad < 3 else 3, vocab, size=(n, T))
    lens = rng.integers(min_len, T + 1, size=n)
    lens[0] = T
    for i, L in enumerate(lens):
        X[i, L:] = pad
    return X


class HFWrap(nn.Module):
    """Wrap a Hugging Face model to take token ids only: attention mask = ids != pad; returns logits."""

    def __init__(self, hf: nn.Module, pad: int) -> None:
        super().__init__()
        self.hf = hf
        self.pad = pad

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        return self.hf(input_ids=ids, attention_mask=(ids != self.pad).long()).logits


def _hf_small(**kw: Any) -> dict[str, Any]:
    base = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return base


# --------------------------------------------------------------------------- HF models
def test_hf_bert_sequence_classification_with_padding():
    tr = _transformers()
    torch.manual_seed(0)
    m = HFWrap(tr.BertForSequenceClassification(tr.BertConfig(**_hf_small(num_labels=3))), pad=0)
    X = _ids(5, 7, 50, 0)
    rules = check_model("HF BERT (sequence classification, padded)", m, sequence_classification_loss(), X,
                        np.array([0, 1, 2, 1, 0]))
    assert rules["hf.bert.embeddings.position_embeddings.weight"] == "embedding"
    assert rules["hf.bert.encoder.layer.0.attention.self.query.weight"] == "linear"


def test_hf_distilbert_token_classification_with_padding():
    tr = _transformers()
    torch.manual_seed(1)
    cfg = tr.DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
                              dropout=0.0, attention_dropout=0.0, num_labels=4)
    m = HFWrap(tr.DistilBertForTokenClassification(cfg), pad=0)
    X = _ids(5, 7, 50, 0, seed=1)
    Y = np.where(X == 0, -100, np.random.default_rng(2).integers(0, 4, size=X.shape))
    rules = check_model("HF DistilBERT (token classification, padded)", m, token_classification_loss("mean"), X, Y)
    assert rules["hf.distilbert.embeddings.position_embeddings.weight"] == "embedding"


def test_hf_roberta_sequence_classification():
    tr = _transformers()
    torch.manual_seed(2)
    cfg = tr.RobertaConfig(**_hf_small(num_labels=2, pad_token_id=1, max_position_embeddings=20))
    m = HFWrap(tr.RobertaForSequenceClassification(cfg), pad=1)
    X = _ids(5, 7, 50, 1, seed=3)
    check_model("HF RoBERTa (sequence classification, padded)", m, sequence_classification_loss(), X,
                np.array([0, 1, 1, 0, 1]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hf_gpt2_causal_lm_tied_embeddings_with_padding(reduction: str):
    tr = _transformers()
    torch.manual_seed(3)
    cfg = tr.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    hf = tr.GPT2LMHeadModel(cfg)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    m = HFWrap(hf, pad=0)
    X = _ids(5, 7, 50, 0, seed=4)
    Y = np.where(X == 0, -100, X)
    rules = check_model(f"HF GPT-2 (causal LM, tied, padded, {reduction})", m, causal_lm_loss(reduction), X, Y)
    assert rules["hf.transformer.wte.weight"] == "tied"
    assert rules["hf.transformer.wpe.weight"] == "embedding"
    assert rules["hf.transformer.h.0.attn.c_attn.weight"] == "hf_conv1d"


def test_hf_vit_image_classification():
    tr = _transformers()
    torch.manual_seed(4)
    cfg = tr.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    vit = tr.ViTForImageClassification(cfg)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = vit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.hf(pixel_values=x).logits

    X = np.random.default_rng(5).normal(size=(4, 1, 8, 8))
    rules = check_model("HF ViT (image classification)", Wrap(), nn.CrossEntropyLoss(), X, np.array([0, 1, 2, 0]))
    assert rules["hf.vit.embeddings.patch_embeddings.projection.weight"] == "conv"
    assert rules["hf.vit.embeddings.cls_token"] in ("vmap", "loop")  # a learned parameter added/concatenated
    assert rules["hf.vit.layers.0.attention.k_proj.bias"] == "linear"


# --------------------------------------------------------------------------- torch models
class TorchEncoder(nn.Module):
    """Token + learned position embedding, nn.TransformerEncoder (batch first, padding mask), mean pool."""

    def __init__(self, vocab: int = 40, d: int = 16, T: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(T, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        pos = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, T): broadcast over the batch
        h = self.tok(ids) + self.pos(pos)
        pad = ids == 0
        h = self.enc(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class RNNClassifier(nn.Module):
    def __init__(self, cell: type, vocab: int = 30, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = cell(d, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids.long()))
        return self.head(out[:, -1])


class TextCNN(nn.Module):
    def __init__(self, vocab: int = 30, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.emb(ids.long()).transpose(1, 2)))
        return self.head(h.max(dim=2).values)


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)
        for bn in (self.b1, self.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)) + x)
        return self.head(h.mean(dim=(2, 3)))


class GroupedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, groups=2)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.depthwise(torch.tanh(self.grouped(x)))).mean(dim=(2, 3)))


class Deconv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.up(x)).mean(dim=(2, 3)))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(torch.tanh(self.fc(torch.tanh(self.fc(x))))))


class FunctionalLinear(nn.Module):
    """A weight applied through F.linear by the model itself (no nn.Linear around it)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) * 0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.linear(x, self.w)))


class AddedParameter(nn.Module):
    """A learned offset added to the activations (a broadcast parameter no layer rule covers)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.offset = nn.Parameter(torch.randn(4) * 0.3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x) + self.offset))


class LlamaStyleRMSNorm(nn.Module):
    """An RMSNorm written as Hugging Face's Llama/T5 models write theirs (no torch norm op)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


class RMSNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.rms = nn.RMSNorm(6)
        self.llama = LlamaStyleRMSNorm(6)
        self.head = nn.Linear(6, 2)
        with torch.no_grad():
            self.rms.weight.add_(0.1 * torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.llama(torch.tanh(self.rms(self.fc(x)))))


def _cls(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=n)


def _normal(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


TORCH_ZOO: dict[str, Callable[[], tuple[nn.Module, np.ndarray, np.ndarray, dict[str, str]]]] = {
    "torch TransformerEncoder (padded)": lambda: (TorchEncoder(), _ids(5, 8, 40, 0, seed=6), _cls(5, 3),
                                                  {"enc.layers.0.self_attn.out_proj.weight": "linear",
                                                   "enc.layers.0.self_attn.in_proj_weight": "linear",
                                                   "pos.weight": "embedding"}),
    "torch LSTM": lambda: (RNNClassifier(nn.LSTM), _ids(4, 6, 30, 0, seed=7, min_len=6), _cls(4, 3), {}),
    "torch GRU": lambda: (RNNClassifier(nn.GRU), _ids(4, 6, 30, 0, seed=8, min_len=6), _cls(4, 3), {}),
    "torch Conv1d text CNN": lambda: (TextCNN(), _ids(4, 7, 30, 0, seed=9, min_len=7), _cls(4, 2),
                                      {"conv.weight": "conv"}),
    "torch ResNet block (BatchNorm eval)": lambda: (ResBlock(), _normal(4, 3, 5, 5), _cls(4, 2),
                                                    {"b1.weight": "batchnorm", "c1.weight": "conv"}),
    "torch grouped + depthwise Conv2d": lambda: (GroupedConvs(), _normal(4, 4, 6, 6), _cls(4, 2),
                                                 {"grouped.weight": "conv", "depthwise.weight": "conv"}),
    "torch ConvTranspose2d": lambda: (Deconv(), _normal(4, 2, 3, 3), _cls(4, 2), {}),
    "torch module called twice": lambda: (Twice(), _normal(5, 5), _cls(5, 2), {"fc.weight": "linear",
                                                                               "ln.weight": "norm"}),
    "torch RMSNorm (nn.RMSNorm, Llama-style module)": lambda: (RMSNorms(), _normal(5, 5), _cls(5, 2),
                                                                {"rms.weight": "norm", "llama.weight": "norm"}),
    "torch weight used via F.linear": lambda: (FunctionalLinear(), _normal(5, 5), _cls(5, 2), {"w": "linear"}),
    "torch nn.Parameter added to activations": lambda: (AddedParameter(), _normal(5, 5), _cls(5, 2),
                                                        {"fc.weight": "linear"}),
}


@pytest.mark.parametrize("name", list(TORCH_ZOO))
def test_torch_zoo(name: str):
    torch.manual_seed(10)
    model, X, Y, expect = TORCH_ZOO[name]()
    rules = check_model(name, model, nn.CrossEntropyLoss(), X, Y)
    for p, r in expect.items():
        assert rules[p] == r, (p, rules[p])


def report_markdown() -> str:
    """The zoo table for docs/engine_conformance.md: per model, each rule with the parameters it took."""
    lines = ["| model | rule: parameters (count) | max rel. error |", "|---|---|---|"]
    for name, rec in ZOO_REPORT.items():
        by_rule: dict[str, list[str]] = {}
        for p, r in rec["rules"].items():
            by_rule.setdefault(r, []).append(p)
        cells = []
        for r, ps in sorted(by_rule.items()):
            kinds = sorted({_kind_of(p) for p in ps})
            cells.append(f"**{r}**: {', '.join(kinds)} ({len(ps)})")
        lines.append(f"| {name} | {'; '.join(cells)} | {max(rec['errors'].values()):.1e} |")
    return "\n".join(lines)


def _kind_of(param: str) -> str:
    """A short parameter kind from its name: the last two path components, layer numbers dropped."""
    import re

    parts = [re.sub(r"_\d+$", "", p) for p in param.replace("/", ".").split(".") if not p.isdigit()]
    return ".".join(parts[-2:]) if len(parts) > 1 else parts[0]


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-p", "no:cacheprovider"])
    print(report_markdown())
