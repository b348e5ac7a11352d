"""Exact re-ranking: a TensorSketch-projected digits index that keeps the exact compact gradient factors
answers FindSimilar (through a real gRPC server) with exactly the top-10 ids and scores of brute-force
GradientSimilarity over all training examples, whenever the true top-10 is among the candidates (which
the test checks holds on its data, as it checks that the projected scores alone differ); a build
interrupted mid-way resumes to the same factor file; bad settings are refused with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explainers.similarity import GradientSimilarity
from indexer.build import build_index
from indexer.config import parse_config
from indexer.errors import ConfigError, FailedPrecondition, InvalidArgument
from indexer.kernels import EPS
from indexer.query import open_index
from indexer.store import IndexSpec
from indexer.vectorstore.factors import FactorStore
from test_build_support import write_config

N, R, K = 400, 200, 10
KERNELS = ("grad_dot", "grad_cos", "grad_asym_dot")
RERANK = {"faiss": "flat", "factory": "Flat", "rerank": R, "exact_rerank": True}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Digits CNN indexes on N examples, TensorSketch k=512, exact re-ranking of R candidates, per kernel."""
    from indexer.demo import load_digits_28
    from server.demo import CONFIG, ensure_digits_index

    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("rerank")
    for kernel in KERNELS:
        ensure_digits_index(wd, kernel, n=N, progress=False, overrides={
            "index": {**RERANK, "kernel": kernel}, "projection": {"kind": "sketch", "dim": 512}})
    X, y = load_digits_28()
    Xt, yt = load_digits_28(N)
    return wd, X[-24:], y[-24:], Xt, yt, CONFIG.parent / "weights.pt"


def _reference(weights, Xt, yt, Xq, yq, kernel):
    """Brute force: alibi-compatible GradientSimilarity over every training example (exact cosine for
    grad_cos, as the index defines it; alibi's 1e-7 on ‖g_t‖² for grad_asym_dot, as the index does)."""
    from indexer.demo import digits_cnn_torch

    model = digits_cnn_torch()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    gs = GradientSimilarity(model, torch.nn.CrossEntropyLoss(), sim_fn=kernel, precompute_grads=True,
                            backend="pytorch", eps=0.0 if kernel == "grad_cos" else EPS).fit(Xt, yt)
    e = gs.explain(Xq, yq)
    return e.data["ordered_indices"], e.data["scores"]


def test_find_similar_through_a_server_equals_brute_force_exact_gradients(digits):
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig

    wd, Xq, yq, Xt, yt, weights = digits
    srv = GradIndexServer(ServerConfig(workdir=str(wd), indexes=list(KERNELS), port=0, log_level="WARNING")).start()
    try:
        with GradIndexClient(f"127.0.0.1:{srv.port}", timeout=120) as c:
            got = {kn: c.find_similar(kn, Xq, targets=yq, k=K, direction="both") for kn in KERNELS}
            info = {kn: c.describe_index(kn) for kn in KERNELS}
            by_grad = c.search_by_gradient("grad_cos", np.ones((1, 512), np.float32), k=K, projected=True)
    finally:
        srv.stop(0)
    assert not by_grad.exact_scores  # projected vectors alone: the reply says the scores are not exact
    for kernel in KERNELS:
        assert info[kernel].exact_rerank and got[kernel].exact_scores
        order, scores = _reference(weights, Xt, yt, Xq, yq, kernel)
        idx = open_index(wd, kernel)
        try:
            Q = idx.embed(Xq, yq)
            cand_most, cand_least = idx.store.candidates(Q, R), idx.store.candidates(-Q, R)
            projected = idx.search(Q, K, mode="both")  # re-scored against the projected vectors only
        finally:
            idx.close()
        assert not projected.exact_scores
        covered = {"most": 0, "least": 0}
        for i in range(len(Xq)):
            exact_of = dict(zip(order[i].tolist(), scores[i].tolist()))
            for d, hits, true, cand in (("most", got[kernel].most, order[i, :K], cand_most[i]),
                                        ("least", got[kernel].least, order[i, ::-1][:K], cand_least[i])):
                # every returned score is the exact kernel value of the returned example ...
                np.testing.assert_allclose(hits.scores[i], [exact_of[j] for j in hits.ids[i]], rtol=1e-5, atol=1e-7)
                # ... and where the true top-10 made it into the candidates, the answer is the true top-10
                if np.isin(true, cand).all():
                    covered[d] += 1
                    np.testing.assert_array_equal(hits.ids[i], true)
                    np.testing.assert_allclose(hits.scores[i], [exact_of[j] for j in true], rtol=1e-5, atol=1e-7)
        # The candidates cover the true top-10 on this data for all cosine queries; a raw dot product of a
        # well-fit query (tiny gradient) drowns in the sketch's noise (measured: true neighbours ranked
        # ~390th of 400 by the projection), which no re-ranking of candidates can recover.
        assert covered["most"] == len(Xq) if kernel == "grad_cos" else covered["most"] >= 2 * len(Xq) // 3, \
            (kernel, covered)
        assert covered["least"] >= len(Xq) // 2, (kernel, covered)
        # ... and without the exact factors the projected scores differ, so the comparison above can fail
        rel = np.abs(projected.scores - scores[:, :K]) / np.abs(scores[:, :K])
        assert rel.max() > 1e-2, kernel


def test_filtered_exact_search_and_the_factor_store_stay_on_disk(digits):
    wd, Xq, yq, Xt, yt, weights = digits
    order, scores = _reference(weights, Xt, yt, Xq, yq, "grad_cos")
    idx = open_index(wd, "grad_cos")
    try:
        fs = idx.store.factors
        assert isinstance(fs, FactorStore) and fs.n == N
        assert (wd / "indexes" / "grad_cos" / "v1" / "factors.bin").stat().st_size == N * fs.record_bytes
        assert fs.record_bytes < 412_778 * 4 / 30  # compact: rank-one layers as factors, not 412,778 floats
        keep = [1, 7]
        res = idx.find_similar(Xq, yq, k=5, labels=keep)  # a small allowed set: exact scan, then exact re-ranking
        assert res.exact_scores
        for i in range(len(Xq)):
            allowed = np.flatnonzero(np.isin(yt, keep))
            s = np.full(N, -np.inf)
            s[order[i]] = scores[i]
            true = allowed[np.argsort(-s[allowed], kind="stable")[:5]]
            np.testing.assert_array_equal(res.ids[i], true)
            np.testing.assert_allclose(res.scores[i], s[true], rtol=1e-5)
    finally:
        idx.close()


class _FailingBatches:
    """(X, Y) batches of 16; on pass ``fail_pass`` over the data (the chunk loop's: the build first reads a
    probe and scans the data) it raises after 3 batches, a build dying mid-way."""

    def __init__(self, X, Y, fail_pass=None):
        self.X, self.Y, self.fail_pass, self.passes = X, Y, fail_pass, 0

    def __iter__(self):
        self.passes += 1
        for j, s in enumerate(range(0, len(self.X), 16)):
            if self.passes == self.fail_pass and j == 3:
                raise RuntimeError("the data source died")
            yield self.X[s:s + 16], self.Y[s:s + 16]


def test_interrupted_build_resumes_to_the_same_factors(tmp_path):
    cfg = write_config(tmp_path, n=96, chunk_size=16, kernel="grad_asym_dot",
                       projection='kind = "sketch"\ndim = 32\nseed = 1',
                       extra_index='factory = "Flat"\nrerank = 20\nexact_rerank = true')
    z = np.load(tmp_path / "digits.npz")
    X, Y = z["X"], z["y"]
    full = _FailingBatches(X, Y)
    build_index(cfg, tmp_path / "a", dataset=full, progress=False)
    with pytest.raises(RuntimeError, match="died"):
        build_index(cfg, tmp_path / "b", dataset=_FailingBatches(X, Y, fail_pass=full.passes), progress=False)
    r = build_index(cfg, tmp_path / "b", dataset=_FailingBatches(X, Y), resume=True, progress=False)
    assert r.chunks_resumed == 3 and r.chunks_computed == 3
    fa = (tmp_path / "a" / "indexes" / "tiny" / "v1" / "factors.bin").read_bytes()
    fb = (tmp_path / "b" / "indexes" / "tiny" / "v1" / "factors.bin").read_bytes()
    assert len(fa) > 0 and fa == fb
    idx = open_index(tmp_path / "b", "tiny")
    try:  # the exact score of a stored example against itself: ‖g‖² / (‖g‖² + 1e-7), ‖g‖² its self-influence
        res = idx.find_similar(X[:4], Y[:4], k=96)
        assert res.exact_scores
        sq = np.asarray([e["self_influence"] for e in idx.get_examples(np.arange(4), payload=False)])
        self_scores = np.asarray([res.scores[i, list(res.ids[i]).index(i)] for i in range(4)])
        np.testing.assert_allclose(self_scores, sq / (sq + EPS), rtol=1e-5)
    finally:
        idx.close()


def test_bad_exact_rerank_settings_are_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="exact_rerank"):
        IndexSpec("flat", exact_rerank=True)  # no candidates to re-rank
    with pytest.raises(InvalidArgument, match="exact_rerank"):
        IndexSpec(backend="milvus", exact_rerank=True)
    cfg = write_config(tmp_path, n=64, extra_index='factory = "Flat"\nrerank = 20\nexact_rerank = true',
                       extra_model='[[model.checkpoints]]\nweights = "weights.pt"\n[[model.checkpoints]]\n'
                                   'weights = "weights.pt"\nlearning_rate = 0.5')
    with pytest.raises(ConfigError, match="checkpoints"):
        parse_config(cfg)
    # an index without factors refuses exact query gradients with a clear error
    cfg = write_config(tmp_path, n=64, extra_index='factory = "Flat"\nrerank = 20', fname="plain.toml")
    build_index(cfg, tmp_path / "p", progress=False)
    idx = open_index(tmp_path / "p", "tiny")
    try:
        from indexer.vectorstore.factors import ExactQueries

        Q = idx.embed(np.zeros((1, 1, 8, 8), np.float32))
        assert idx.embed(np.zeros((1, 1, 8, 8), np.float32), exact=True)[1] is None
        with pytest.raises(FailedPrecondition, match="exact_rerank"):
            idx.store.search(Q, 3, exact=ExactQueries.of(np.zeros(1, [("sq", "<f8")])))
    finally:
        idx.close()


def test_transformer_exact_rerank_through_a_server_equals_gradient_similarity(tmp_path):
    """A tiny random-init-then-trained BERT classifier (sequence blocks: token embeddings as ids + output
    gradients, attention/MLP layers as L factor pairs or rows), TensorSketch k=64, exact re-ranking."""
    from explainers.similarity import GradientSimilarity
    from indexer.engine.losses import sequence_classification_loss
    from indexer.text_demo import make_classifier_dir
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig

    torch.set_num_threads(1)
    info = make_classifier_dir(tmp_path / "model", n_train=60, epochs=2, hidden=16, layers=1, max_length=16)
    r = 40  # candidates of the 60 training texts
    cfg = {"model": {"name": "clf", "hf_dir": info["dir"], "hf_kind": "sequence_classification",
                     "class_names": ["negative", "positive"], "text": {"max_length": 16}},
           "data": {"format": "jsonl", "path": info["dir"] + "/train.jsonl", "id_field": "id"},
           "index": {"name": "clf", "kernel": "grad_dot", **RERANK, "rerank": r},
           "projection": {"kind": "sketch", "dim": 64}, "build": {"chunk_size": 32}}
    build_index(cfg, tmp_path / "wd", progress=False)
    queries = ["the film was really wonderful", "the plot was dull in every scene", "a fine cast and a great story",
               "boring and far too long"]
    srv = GradIndexServer(ServerConfig(workdir=str(tmp_path / "wd"), indexes=["clf"], port=0,
                                       log_level="WARNING")).start()
    try:
        with GradIndexClient(f"127.0.0.1:{srv.port}", timeout=120) as c:
            got = c.find_similar("clf", texts=queries, k=K)
    finally:
        srv.stop(0)
    assert got.exact_scores
    idx = open_index(tmp_path / "wd", "clf")
    try:
        X, _ = idx.text_inputs(queries)
        Xtr, _ = idx.text_inputs(info["texts"])
        Q = idx.embed(X, got.targets)
        cand = idx.store.candidates(Q, r)
        projected = idx.search(Q, K)
        gs = GradientSimilarity(idx.model(), sequence_classification_loss(), sim_fn="grad_dot", backend="pytorch",
                                precompute_grads=True).fit(Xtr, np.asarray(info["labels"]))
        e = gs.explain(X, got.targets)
    finally:
        idx.close()
    S = np.empty_like(e.data["scores"])
    np.put_along_axis(S, e.data["ordered_indices"], e.data["scores"], 1)
    covered = 0
    for i in range(len(queries)):
        np.testing.assert_allclose(got.scores[i], S[i, got.ids[i]], rtol=1e-4, atol=1e-6)
        true = e.data["ordered_indices"][i, :K]
        if np.isin(true, cand[i]).all():  # the generated sentences have near-duplicate gradients: ties
            covered += 1                    # within float error, so the top-10 is compared by its scores
            np.testing.assert_allclose(got.scores[i], e.data["scores"][i, :K], rtol=1e-4, atol=1e-6)
    assert covered >= len(queries) // 2
    assert np.abs(projected.scores - np.take_along_axis(S, projected.ids, 1)).max() > 1e-3  # projection alone differs
