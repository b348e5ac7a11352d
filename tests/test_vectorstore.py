"""Two-stage search (compressed FAISS candidates + exact re-scoring from memory-mapped vectors) and the
Milvus backend (Milvus Lite file), both checked against the exact flat FAISS index built from the same
data; a Milvus build SIGKILLed mid-way resumes to the same collection; one build per index name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from indexer.build import build_index
from indexer.catalog import Catalog, IndexRow
from indexer.errors import FailedPrecondition, InvalidArgument
from indexer.query import open_index
from indexer.store import IndexSpec
from indexer.vectorstore import BuildLocked, TwoStageStore, build_lock
from indexer.vectorstore.base import exact_topk, sample_rows
from test_build_support import write_config

N = 300
TWO_STAGE = {"factory": "IVF8,SQ8", "nprobe": 8, "rerank": 60}  # SQ8 codes pick 60, exact re-scoring ranks them


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The shipped digits index (sketch projection to 2,048 dims, grad_cos) on N examples, three ways."""
    from indexer.demo import load_digits_28
    from server.demo import ensure_digits_index

    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("digits")
    ensure_digits_index(wd, "flat", n=N, progress=False)
    ensure_digits_index(wd, "two", n=N, progress=False, overrides={"index": TWO_STAGE})
    ensure_digits_index(wd, "mil", n=N, progress=False, overrides={"index": {"backend": "milvus"}})
    X, y = load_digits_28()
    return wd, X[-12:], y[-12:]


def test_two_stage_returns_the_flat_top10_exactly_on_digits(digits):
    wd, Xq, yq = digits
    flat, two = open_index(wd, "flat"), open_index(wd, "two")
    assert two.dim == flat.dim == 2048 and two.count == flat.count == N
    assert isinstance(two.store, TwoStageStore) and isinstance(two.store.X, np.memmap)  # never all resident
    Q = flat.embed(Xq, yq)
    np.testing.assert_array_equal(Q, two.embed(Xq, yq))
    a, b = flat.search(Q, 10, mode="both"), two.search(Q, 10, mode="both")
    np.testing.assert_array_equal(b.ids, a.ids)
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.least_ids, a.least_ids)
    np.testing.assert_allclose(b.least_scores, a.least_scores, rtol=1e-5, atol=1e-6)
    # recall against exact flat search, measured at build time and recorded in the catalog
    info = two.describe().to_dict()
    assert info["recall_at_10"] == 1.0 and info["faiss_params"]["recall_least"] == 1.0
    assert 0.0 <= info["faiss_params"]["recall_stage1"] <= 1.0
    # rerank=0: the candidate index's own top 10, re-scored; every returned score is still exact
    stage1 = two.search(Q, 10, rerank=0)
    V, ids = flat.vectors()
    for r in range(len(Q)):
        ok = stage1.ids[r] >= 0
        np.testing.assert_allclose(stage1.scores[r, ok], V[stage1.ids[r, ok]] @ Q[r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,extra", [
    ("grad_dot", 'factory = "HNSW8,SQ8"\nrerank = 60'),           # raw inner products: MIPS augmentation
    ("grad_asym_dot", 'factory = "PCA16,IVF4,PQ4x4"\nnprobe = 2\nrerank = 120\ntrain_sample = 300'),
])
def test_two_stage_against_brute_force_with_filters(tmp_path, kernel, extra):
    cfg = write_config(tmp_path, n=N, kernel=kernel, chunk_size=64, extra_index=extra)
    r = build_index(cfg, tmp_path / "wd", progress=False)
    assert r.path.endswith("store.json") and r.recall_at_10 is not None
    idx = open_index(tmp_path / "wd", "tiny", load_model=False)
    X, ids = idx.vectors()
    np.testing.assert_array_equal(ids, np.arange(N))
    Q = X[::25] + 0.01
    S = Q.astype(np.float64) @ X.astype(np.float64).T
    res = idx.search(Q, 8, mode="both")
    np.testing.assert_array_equal(res.ids, np.argsort(-S, 1, kind="stable")[:, :8])
    np.testing.assert_allclose(res.scores, -np.sort(-S, 1)[:, :8], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(res.least_ids, np.argsort(S, 1, kind="stable")[:, :8])
    labels = np.asarray([int(e["label"]) for e in idx.get_examples(np.arange(N), payload=False)])
    for keep in ([3], [0, 1, 2, 3, 4, 5, 6]):  # a small allowed set (exact scan) and a large one (stage-1 filter)
        m = np.isin(labels, keep)
        f = idx.search(Q, 5, labels=keep)
        np.testing.assert_array_equal(f.ids, np.flatnonzero(m)[np.argsort(-S[:, m], 1, kind="stable")[:, :5]])


def test_sample_rows_and_exact_topk_stream_the_shards():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 6)).astype(np.float32)
    shards = lambda: ((X[s:s + 128], np.arange(s, min(s + 128, 1000))) for s in range(0, 1000, 128))  # noqa: E731
    sample, pick = sample_rows(shards, 1000, 77, seed=3)
    assert len(np.unique(pick)) == 77 and pick.max() > 500  # spread over the whole data, not its head
    np.testing.assert_array_equal(sample, X[pick])
    S, I = exact_topk(shards, X[:4], 5)
    np.testing.assert_array_equal(I, np.argsort(-(X[:4] @ X.T), 1)[:, :5])


def test_bad_two_stage_and_milvus_settings_are_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="already exact"):
        IndexSpec("flat", rerank=100)
    with pytest.raises(InvalidArgument, match="replaces index.faiss"):
        IndexSpec("ivf_sq8", factory="IVF8,SQ8")
    with pytest.raises(InvalidArgument, match="backend"):
        IndexSpec(backend="pinecone")
    cfg = write_config(tmp_path, n=64, kernel="grad_dot", extra_index='factory = "IVF8,NoSuchCodec"')
    with pytest.raises(InvalidArgument, match="index_factory"):
        build_index(cfg, tmp_path / "a", progress=False)
    cfg = write_config(tmp_path, n=64, kernel="grad_dot", extra_index='backend = "milvus"\nmilvus_index = "HNSW"',
                       fname="m.toml")
    with pytest.raises(InvalidArgument, match="raw inner products"):
        build_index(cfg, tmp_path / "b", progress=False)


def test_milvus_lite_through_a_real_server_equals_faiss_flat(digits):
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig

    wd, Xq, yq = digits
    assert (wd / "milvus.db").exists()
    srv = GradIndexServer(ServerConfig(workdir=str(wd), indexes=["flat", "mil"], port=0, log_level="WARNING")).start()
    try:
        with GradIndexClient(f"127.0.0.1:{srv.port}", timeout=60) as c:
            a = c.find_similar("flat", Xq, targets=yq, k=10, direction="both")
            b = c.find_similar("mil", Xq, targets=yq, k=10, direction="both")
            assert c.describe_index("mil").count == N
    finally:
        srv.stop(0)
    np.testing.assert_array_equal(b.most.ids, a.most.ids)
    np.testing.assert_allclose(b.most.scores, a.most.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b.least.ids, a.least.ids)
    np.testing.assert_allclose(b.least.scores, a.least.scores, rtol=1e-5, atol=1e-5)


def _milvus_rows(wd):
    idx = open_index(wd, "tiny", load_model=False)
    try:
        return idx.vectors()
    finally:
        idx.close()


def test_milvus_build_killed_mid_write_resumes_to_the_same_collection(tmp_path):
    extra = 'backend = "milvus"\nmilvus_batch = 3'
    cfg = write_config(tmp_path, n=N, kernel="grad_dot", chunk_size=32, extra_index=extra)
    wd = tmp_path / "killed"
    code = f"from indexer.build import build_index; build_index({str(cfg)!r}, {str(wd)!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    prog = wd / "indexes" / "tiny" / "v1" / "milvus-progress.json"
    deadline, rows = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            rows = json.loads(prog.read_text())["rows"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            rows = 0
        if rows >= 30:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    rows = json.loads(prog.read_text())["rows"]
    assert 30 <= rows < N, "the build must be killed while writing to Milvus"
    cat = Catalog(wd)
    with cat.session() as s:
        assert s.query(IndexRow).one().status == "building"
    cat.close()
    with pytest.raises(FailedPrecondition, match="not built"):
        open_index(wd, "tiny", load_model=False)

    r = build_index(cfg, wd, resume=True, progress=False)
    assert r.count == N and r.chunks_computed == 0 and r.recall_at_10 == 1.0
    ref = build_index(cfg, tmp_path / "clean", progress=False)
    flat_cfg = write_config(tmp_path, n=N, kernel="grad_dot", chunk_size=32, fname="flat.toml")
    build_index(flat_cfg, tmp_path / "flat", progress=False)
    Va, ia = _milvus_rows(wd)
    Vb, ib = _milvus_rows(tmp_path / "clean")
    Vf, idf = open_index(tmp_path / "flat", "tiny", load_model=False).vectors()
    np.testing.assert_array_equal(ia, np.arange(N))  # every row exactly once: no duplicates from the re-sent batch
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(Va, Vb)
    np.testing.assert_array_equal(Va, Vf)
    assert ref.count == N
    # --replace builds version 2 and drops version 1's collection once version 2 is ready
    from pymilvus import MilvusClient

    from indexer.vectorstore.milvus import collection_name

    assert build_index(cfg, wd, replace=True, progress=False).version == 2
    c = MilvusClient(str(wd / "milvus.db"))
    try:
        assert c.list_collections() == [collection_name("tiny", 2)]
    finally:
        c.close()


def test_a_second_build_of_the_same_name_gets_a_clear_error(tmp_path):
    cfg = write_config(tmp_path, n=64, chunk_size=32)
    wd = tmp_path / "wd"
    wd.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from indexer.vectorstore import build_lock\n"
                               f"with build_lock({str(wd)!r}, 'tiny'):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(BuildLocked, match=rf"being built by another process \(pid {holder.pid} "):
            build_index(cfg, wd, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert build_index(cfg, wd, progress=False).count == 64  # the lock died with its holder
    with build_lock(wd, "other"):  # locks are per name
        with pytest.raises(BuildLocked):
            with build_lock(wd, "other"):
                pass
