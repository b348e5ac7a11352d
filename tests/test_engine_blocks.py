"""Embedding blocks kept as token ids: every consumer (materialize, norms, weighted sums, projections)
gives what the dense one-hot factors give."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from indexer.engine import make_engine
from indexer.projection import ProjectionSpec, Projector, layout_of


def _blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 6), nn.Flatten(), nn.Linear(30, 3))
    X = np.random.default_rng(0).integers(0, 40, size=(7, 5))
    eng = make_engine(model, nn.CrossEntropyLoss())
    _, blocks = next(eng.iter_blocks(X, np.arange(7) % 3))
    return eng, X, blocks


def test_index_block_consumers_equal_dense_one_hot():
    eng, X, blocks = _blocks()
    emb = blocks[0]
    assert emb.idx is not None and emb.kind == "outer"
    dense = np.einsum("nli,nlo->nio", emb.a.astype(np.float64), emb.d.astype(np.float64)).reshape(len(X), -1)
    np.testing.assert_allclose(emb.materialize(), dense, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(emb.sq_norms(), (dense ** 2).sum(1), rtol=1e-5)
    w = np.linspace(0.5, 1.5, len(X))
    np.testing.assert_allclose(emb.weighted_sums(w)["0.weight"], w @ dense, rtol=1e-6, atol=1e-7)


def test_factored_and_sketch_projection_of_index_blocks_equal_dense_factors():
    eng, X, blocks = _blocks()
    layout = layout_of(blocks, eng.offsets())
    for kind, k in (("factored", 16), ("sketch", 8)):
        pr = Projector(ProjectionSpec(kind, k, seed=1), layout)
        assert pr.uses_factors(0)
        V = pr.project(blocks)
        emb = blocks[0]
        as_dense = type(emb)(emb.name, "outer", emb.parts, a_in=emb.a.copy(), d=emb.d, layout=emb.layout)
        ref = pr.project([as_dense] + blocks[1:])
        np.testing.assert_allclose(V, ref, rtol=1e-5, atol=1e-6)


def test_layout_does_not_form_one_hot_rows():
    eng, X, blocks = _blocks()
    layout = layout_of(blocks, eng.offsets())
    assert layout[0].din == 40 and layout[0].dout == 6
    assert not isinstance(blocks[0].a_in, np.ndarray)  # still token ids
