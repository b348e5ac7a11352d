"""GradientSimilarity on sequence models: the compact store keeps per-position factors and token ids,
and its exact "ghost" inner products equal the ones of the full per-example gradients."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from explainers.similarity import GradientSimilarity
from indexer.kernels import scores
from tests.test_engine_zoo import HFWrap, TorchEncoder, _ids, _transformers


def _full_scores(explainer: GradientSimilarity, Xq: np.ndarray, Yq: np.ndarray, X: np.ndarray, Y: np.ndarray,
                 kernel: str) -> np.ndarray:
    eng = explainer.engine
    return scores(eng.grads(Xq, Yq, dtype=np.float64), eng.grads(X, Y, dtype=np.float64), kernel,
                  eps=explainer.eps)


@pytest.mark.parametrize("kernel", ["grad_dot", "grad_cos", "grad_asym_dot"])
def test_compact_sequence_store_scores_equal_full_gradient_scores(kernel: str):
    torch.manual_seed(0)
    model = TorchEncoder(vocab=40, d=16, T=8).double()
    X, Y = _ids(12, 8, 40, 0, seed=1), np.random.default_rng(1).integers(0, 3, 12)
    Xq, Yq = _ids(3, 8, 40, 0, seed=2), np.array([0, 2, 1])
    gs = GradientSimilarity(model, nn.CrossEntropyLoss(), sim_fn=kernel, backend="pytorch", precompute_grads=True)
    gs.fit(X, Y)
    kinds = gs._store.layout.kinds
    assert "index" in kinds and "outer" in kinds  # token/position ids and per-position factors kept
    assert gs.grad_bytes < 0.8 * len(X) * gs.engine.dim * 8  # tiny layers: only some are worth factoring
    exp = gs.explain(Xq, Yq)
    ref = _full_scores(gs, Xq, Yq, X, Y, kernel)
    got = np.take_along_axis(exp.data["scores"], np.argsort(exp.data["ordered_indices"], axis=1), axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def test_compact_store_on_hf_bert_matches_full_gradients_and_no_precompute_path():
    tr = _transformers()
    torch.manual_seed(1)
    cfg = tr.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = HFWrap(tr.BertForSequenceClassification(cfg), pad=0).double()
    X, Y = _ids(8, 6, 50, 0, seed=3), np.random.default_rng(3).integers(0, 2, 8)
    Xq, Yq = _ids(2, 6, 50, 0, seed=4), np.array([1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no generic path needed for BERT
        pre = GradientSimilarity(model, nn.CrossEntropyLoss(), backend="pytorch", precompute_grads=True).fit(X, Y)
        lazy = GradientSimilarity(model, nn.CrossEntropyLoss(), backend="pytorch").fit(X, Y)
    ref = _full_scores(pre, Xq, Yq, X, Y, "grad_dot")
    for gs in (pre, lazy):
        e = gs.explain(Xq, Yq)
        got = np.take_along_axis(e.data["scores"], np.argsort(e.data["ordered_indices"], axis=1), axis=1)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
