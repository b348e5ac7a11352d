"""Random projection: seeded and reproducible, JL-normalized, block path = flat reference, factored =
explicit Kronecker product, independent of batch size and of the process/thread count."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from indexer.engine import make_engine
from indexer.projection import (BlockInfo, ProjectionSpec, Projector, factor_dims, layout_of, random_matrix)
from test_build_support import MODEL_PY, digits8


@pytest.fixture(scope="module")
def tiny():
    ns: dict = {}
    exec(MODEL_PY, ns)
    torch.manual_seed(0)
    model = ns["build_model"]().eval()
    X, y = digits8(24)
    eng = make_engine(model, torch.nn.CrossEntropyLoss(), chunk_size=24)
    _, blocks = next(eng.iter_blocks(X, y))
    return eng, X, y, blocks, layout_of(blocks, eng.offsets())


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_matrix_is_seeded_and_same_in_another_process_with_other_threads():
    a = random_matrix(64, 48, "rademacher", 48, 7, 0, 3)
    assert _digest(a) == _digest(random_matrix(64, 48, "rademacher", 48, 7, 0, 3))
    assert _digest(a) != _digest(random_matrix(64, 48, "rademacher", 48, 8, 0, 3))
    code = ("import torch,hashlib,numpy as np; torch.set_num_threads(2);"
            "from indexer.projection import random_matrix as r;"
            "print(hashlib.sha256(r(64,48,'rademacher',48,7,0,3).tobytes()).hexdigest(),"
            "hashlib.sha256(r(64,48,'gaussian',48,7,0,3).tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin"}).stdout.split()
    assert out == [_digest(a), _digest(random_matrix(64, 48, "gaussian", 48, 7, 0, 3))]


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_entries_have_jl_scale(dist):
    k = 256
    M = random_matrix(512, k, dist, k, 1, 0, 0).astype(np.float64)
    assert abs(M.mean()) < 0.01 / np.sqrt(k) * 10
    assert M.var() == pytest.approx(1.0 / k, rel=0.02)
    if dist == "rademacher":
        assert set(np.unique(M * np.sqrt(k)).round(5)) == {-1.0, 1.0}


def test_dense_blocks_equal_flat_projection_of_materialized_gradient(tiny):
    eng, X, y, blocks, layout = tiny
    spec = ProjectionSpec("dense", 96, seed=5, block_rows=128)  # several row blocks, one straddling params
    pr = Projector(spec, layout)
    G = eng.grads(X, y)
    V = pr.project(blocks)
    P = np.concatenate([pr.dense_rows(j) for j in range((G.shape[1] + 127) // 128)])[:G.shape[1]]
    np.testing.assert_allclose(V, G.astype(np.float64) @ P.astype(np.float64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(V, pr.project_flat(G), rtol=1e-5, atol=1e-6)


def test_factored_equals_explicit_kronecker_projection(tiny):
    eng, X, y, blocks, layout = tiny
    spec = ProjectionSpec("factored", 64, seed=2)  # 8 x 8
    pr = Projector(spec, layout)
    V = pr.project(blocks)
    ref = np.zeros_like(V, dtype=np.float64)
    for bi, (b, info) in enumerate(zip(blocks, layout)):
        if pr.uses_factors(bi):
            Po, Pi = pr.factors(bi)
            K = np.kron(Po, Pi).astype(np.float64)  # ((dout*din) x (k_out*k_in))
            Gm = np.einsum("nlo,nli->noi", b.d.astype(np.float64), b.a.astype(np.float64)).reshape(len(V), -1)
            ref += Gm @ K
        else:
            m = b.materialize().astype(np.float64)
            off = info.parts[0][1]
            R = spec.block_rows
            P = np.concatenate([pr.dense_rows(j) for j in range(off // R, (off + b.size - 1) // R + 1)])
            ref += m @ P[off - (off // R) * R: off - (off // R) * R + b.size]
    assert any(pr.uses_factors(i) for i in range(len(layout)))
    np.testing.assert_allclose(V, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "factored", "sketch"])
def test_independent_of_batch_size(tiny, kind):
    eng, X, y, blocks, layout = tiny
    pr = Projector(ProjectionSpec(kind, 64, seed=3), layout)
    whole = pr.project(blocks)
    parts = [pr.project(b) for _, b in eng.iter_blocks(X, y, chunk_size=5)]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,dist", [("dense", "rademacher"), ("dense", "gaussian"), ("factored", "rademacher"),
                                       ("factored", "gaussian"), ("sketch", "rademacher")])
def test_jl_normalized_inner_products_unbiased(tiny, kind, dist):
    """Mean over seeds of projected inner products equals the exact ones (scores comparable)."""
    eng, X, y, blocks, layout = tiny
    G = eng.grads(X[:6], y[:6]).astype(np.float64)
    exact = G @ G.T
    sub = [type(b)(**{**b.__dict__}) for b in blocks]
    for b in sub:
        if b.kind == "outer":
            b.a, b.d = b.a[:6], b.d[:6]
        else:
            b.full = b.full[:6]
    acc = np.zeros_like(exact)
    seeds = 150
    for s in range(seeds):
        k = 32 if kind == "sketch" else 256  # k = 32: the Linear block goes through the TensorSketch
        pr = Projector(ProjectionSpec(kind, k, dist=dist, seed=s), layout)
        assert kind != "sketch" or any(pr.uses_factors(i) for i in range(len(layout)))
        V = pr.project(sub).astype(np.float64)
        acc += V @ V.T
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.max(np.abs(acc / seeds - exact) / scale) < 0.12
    assert np.mean(np.diag(acc / seeds) / np.diag(exact)) == pytest.approx(1.0, abs=0.08)  # ~3 sigma


def test_sketch_equals_countsketch_of_the_formed_gradient(tiny):
    """TensorSketch of the factors = CountSketch of d aᵀ under hash (h_out + h_in) mod k, sign s_out·s_in."""
    eng, X, y, blocks, layout = tiny
    k = 32
    pr = Projector(ProjectionSpec("sketch", k, seed=9), layout)
    V = pr.project(blocks)
    ref = np.zeros((len(V), k))
    for bi, (b, info) in enumerate(zip(blocks, layout)):
        if pr.uses_factors(bi):
            hi, si = pr.hashes(bi, 0, info.din)
            ho, so = pr.hashes(bi, 1, info.dout)
            Gm = np.einsum("nlo,nli->noi", b.d.astype(np.float64), b.a.astype(np.float64))
            bucket = (ho[:, None] + hi[None, :]) % k
            sign = so[:, None] * si[None, :]
            for j in range(len(V)):
                np.add.at(ref[j], bucket.ravel(), (sign * Gm[j]).ravel())
        else:
            h, sg = pr.hashes(bi, 0, info.size)
            m = b.materialize().astype(np.float64)
            for j in range(len(V)):
                np.add.at(ref[j], h, sg * m[j])
    assert any(pr.uses_factors(i) for i in range(len(layout)))
    np.testing.assert_allclose(V, ref, rtol=1e-4, atol=1e-5)


def test_memory_bounded_cache(tiny):
    eng, X, y, blocks, layout = tiny
    pr = Projector(ProjectionSpec("dense", 64, block_rows=64), layout, cache_bytes=1024)
    pr.project(blocks)
    assert pr._cache == {}  # too big for the budget: regenerated per chunk, never held whole
    pr2 = Projector(ProjectionSpec("dense", 64, block_rows=64), layout)
    np.testing.assert_array_equal(pr.project(blocks), pr2.project(blocks))
    assert pr2._cache  # small: kept


def test_factor_dims_and_bad_specs():
    assert factor_dims(2048) == (32, 64) and factor_dims(512) == (16, 32) and factor_dims(8192) == (64, 128)
    with pytest.raises(ValueError, match="factorization"):
        ProjectionSpec("factored", 2039)  # prime
    with pytest.raises(ValueError, match="kind"):
        ProjectionSpec("sparse", 64)
    with pytest.raises(ValueError, match="dim"):
        ProjectionSpec("dense", 0)
    with pytest.raises(ValueError, match="dist"):
        ProjectionSpec("dense", 8, dist="uniform")


def test_layout_mismatch_is_refused(tiny):
    eng, X, y, blocks, layout = tiny
    bad = [BlockInfo("x", "full", 3, [("x", 0, 3)])]
    with pytest.raises(ValueError, match="blocks"):
        Projector(ProjectionSpec("dense", 8), bad).project(blocks)
