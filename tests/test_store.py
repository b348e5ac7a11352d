"""FAISS store on real index files: GEMM exact search = brute force = IndexFlatIP, filters, atomic and
memory-mapped files, approximate kinds' recall, MIPS augmentation for raw inner products."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.errors import InvalidArgument
from indexer.store import ExactSearcher, IndexSpec, VectorStore, recall_at_k


def _brute(Q, X, ids, k):
    S = Q.astype(np.float64) @ X.astype(np.float64).T
    o = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, o, 1), ids[o]


def _clustered(n, d, seed=0, norms=False):
    """Vectors with cluster structure (as gradient embeddings have), unit norm unless ``norms``."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((20, d))
    X = C[rng.integers(0, 20, n)] + 0.35 * rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    if norms:
        X *= rng.lognormal(0, 0.5, (n, 1))
    return X.astype(np.float32)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    X = _clustered(3000, 32, norms=True)
    ids = np.arange(3000, dtype=np.int64) * 3 + 7  # stable, non-contiguous ids
    st = VectorStore.create(IndexSpec("flat"), 32, "grad_dot", len(X))
    st.add(X, ids)
    path = tmp_path_factory.mktemp("flat") / "idx" / "index.faiss"
    st.save(path)
    return X, ids, path


@pytest.mark.parametrize("m", [1, 7, 64])
def test_exact_paths_agree_with_brute_force(flat, m):
    X, ids, path = flat
    st = VectorStore.load(path, IndexSpec("flat"), "grad_dot", 32)
    Q = np.random.default_rng(m).standard_normal((m, 32)).astype(np.float32)
    S_ref, I_ref = _brute(Q, X, ids, 10)
    for use_faiss in (True, False):
        S, I = st.search(Q, 10, use_faiss=use_faiss)
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_allclose(S, S_ref, rtol=1e-4, atol=1e-4)


def test_filters_and_missing_hits(flat):
    X, ids, path = flat
    st = VectorStore.load(path, IndexSpec("flat"), "grad_dot", 32)
    Q = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    allowed = ids[::5]
    mask = np.isin(ids, allowed)
    S_ref, I_ref = _brute(Q, X[mask], ids[mask], 4)
    for use_faiss in (True, False):
        S, I = st.search(Q, 4, allowed_ids=allowed, use_faiss=use_faiss)
        np.testing.assert_array_equal(I, I_ref)
    few = ids[[3, 10]]
    for use_faiss in (True, False):
        S, I = st.search(Q, 4, allowed_ids=few, use_faiss=use_faiss)
        assert set(I[:, :2].ravel()) <= set(few) and (I[:, 2:] == -1).all() and np.isneginf(S[:, 2:]).all()


def test_gemm_searcher_large_mask_path_and_chunking():
    X = _clustered(20000, 8, seed=3, norms=True)
    ids = np.arange(20000, dtype=np.int64)
    Q = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    mask = np.random.default_rng(1).random(20000) < 0.6
    S, I = ExactSearcher(X, ids).search(Q, 7, mask)
    S_ref, I_ref = _brute(Q, X[mask], ids[mask], 7)
    np.testing.assert_array_equal(I, I_ref)


def test_atomic_write_and_mmap(flat, tmp_path):
    X, ids, path = flat
    assert [p.name for p in path.parent.iterdir()] == ["index.faiss"]  # no temp file left behind
    st = VectorStore.load(path, IndexSpec("flat"), "grad_dot", 32, mmap=True)
    V, got_ids = st.vectors()
    np.testing.assert_array_equal(V, X)
    np.testing.assert_array_equal(got_ids, ids)
    assert not V.flags.writeable or V.base is not None  # a view on the mapped file, not a copy
    Q = X[:3]
    np.testing.assert_array_equal(st.search(Q, 5)[1], VectorStore.load(path, IndexSpec("flat"), "grad_dot", 32,
                                                                       mmap=False).search(Q, 5)[1])


@pytest.mark.parametrize("kind", ["ivf", "ivf_sq8", "hnsw", "ivf_pq"])
def test_approximate_kinds_recall_on_cosine(kind, tmp_path):
    X = _clustered(4000, 32, seed=2)
    ids = np.arange(len(X), dtype=np.int64)
    spec = IndexSpec(kind, nprobe=8, pq_m=16, pq_bits=4)
    st = VectorStore.create(spec, 32, "grad_cos", len(X))
    st.train(X)
    st.add(X, ids)
    st.save(tmp_path / "a.faiss")
    st2 = VectorStore.load(tmp_path / "a.faiss", IndexSpec.from_dict(spec.to_dict()), "grad_cos", 32)
    Q = X[:200]
    _, I_ref = _brute(Q, X, ids, 10)
    _, I = st2.search(Q, 10)
    r = recall_at_k(I, I_ref, 10)
    assert r >= (0.35 if kind == "ivf_pq" else 0.85), r  # 4-bit PQ is lossy; random would be 0.0025


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_mips_augmentation_for_raw_inner_products(kind):
    X = _clustered(3000, 16, seed=4, norms=True)
    ids = np.arange(len(X), dtype=np.int64)
    spec = IndexSpec(kind, nprobe=16, ef_search=128)
    spec.max_norm = float(np.linalg.norm(X, axis=1).max())
    st = VectorStore.create(spec, 16, "grad_dot", len(X))
    assert st.augmented
    st.train(X)
    st.add(X, ids)
    Q = np.random.default_rng(5).standard_normal((100, 16)).astype(np.float32)
    S_ref, I_ref = _brute(Q, X, ids, 10)
    S, I = st.search(Q, 10)
    assert recall_at_k(I, I_ref, 10) >= 0.85
    true = np.einsum("md,mkd->mk", Q, X[I])  # scores are converted back to inner products
    np.testing.assert_allclose(S, true, rtol=1e-3, atol=1e-3)


def test_raw_inner_product_refused_when_asked():
    with pytest.raises(InvalidArgument, match="grad_cos"):
        VectorStore.create(IndexSpec("hnsw", mips="refuse"), 16, "grad_asym_dot", 100)
    with pytest.raises(InvalidArgument, match="pq_m"):
        VectorStore.create(IndexSpec("ivf_pq", pq_m=7), 16, "grad_cos", 100)
    with pytest.raises(InvalidArgument, match="unknown"):
        IndexSpec("lsh")


def test_bad_queries(flat):
    X, ids, path = flat
    st = VectorStore.load(path, IndexSpec("flat"), "grad_dot", 32)
    with pytest.raises(InvalidArgument, match="32"):
        st.search(np.zeros((2, 31), np.float32), 3)
    with pytest.raises(InvalidArgument, match="k"):
        st.search(np.zeros((2, 32), np.float32), 0)


def test_hits_at_k_counts_exact_top_k_among_all_candidates() -> None:
    """Hand-computed: every candidate column counts (a re-rank list longer than k), -1 padding never does;
    recall_at_k stays the top-k special case."""
    from indexer.store import hits_at_k

    exact = np.array([[1, 2, 3], [4, 5, -1]])
    cand = np.array([[9, 8, 3, 2, 7], [5, -1, -1, -1, -1]])
    assert hits_at_k(cand, exact, 3).tolist() == [2, 1]
    assert hits_at_k(cand[:, :2], exact, 3).tolist() == [0, 1]
    assert recall_at_k(cand[:, :3], exact, 3) == (1 / 3 + 1 / 2) / 2
