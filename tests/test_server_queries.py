"""Queries against a real server on 127.0.0.1 port 0 over real indexes built by the indexer:
scores equal in-process GradientSimilarity, every bad input gets its status code (and the server
answers the next request), filters, SearchByGradient, SelfInfluence, swaps while queries run."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from indexer.demo import load_digits_28
from server.app import GradIndexServer
from server.client import GradIndexClient
from server.config import ServerConfig
from server.demo import CONFIG, ensure_digits_index
from server.protos import service_pb2 as pb
from server.tensors import to_tensor

N = 200
EXACT = {"projection": {"kind": "none"}, "model": {"params": ["^14\\."]}}  # last Linear, unprojected


def _model():
    from indexer.config import load_model, parse_config

    return load_model(parse_config(CONFIG).model)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("q")
    weights = wd / "weights.pt"
    shutil.copy(CONFIG.parent / "weights.pt", weights)
    ensure_digits_index(wd, "digits", n=N, progress=False, overrides={"model": {"weights": str(weights)}})
    ensure_digits_index(wd, "exact_dot", n=N, progress=False, overrides={**EXACT, "index": {"kernel": "grad_dot"}})
    ensure_digits_index(wd, "exact_asym", n=N, progress=False,
                        overrides={**EXACT, "index": {"kernel": "grad_asym_dot"}})
    ensure_digits_index(wd, "exact_cos", n=N, progress=False, overrides={**EXACT, "index": {"kernel": "grad_cos"}})
    srv = GradIndexServer(ServerConfig(workdir=str(wd), port=0, max_batch=64, log_level="WARNING",
                                       reload_without_admin_token=True)).start()
    client = GradIndexClient(f"127.0.0.1:{srv.port}", timeout=30)
    Xall, yall = load_digits_28()
    yield {"wd": wd, "srv": srv, "c": client, "Xt": Xall[:N], "yt": yall[:N], "Xq": Xall[-8:], "yq": yall[-8:],
           "weights": weights}
    client.close()
    srv.stop(0)


@pytest.mark.parametrize("index,kernel", [("exact_dot", "grad_dot"), ("exact_asym", "grad_asym_dot"),
                                          ("exact_cos", "grad_cos")])
def test_scores_equal_in_process_gradient_similarity(env, index, kernel):
    from explainers.similarity import GradientSimilarity

    # The index stores exact cosines (alibi's eps on the norm product cannot be split per side).
    eps = 0.0 if kernel == "grad_cos" else 1e-7
    gs = GradientSimilarity(_model(), torch.nn.CrossEntropyLoss(), sim_fn=kernel, backend="pytorch",
                            params=["^14\\."], precompute_grads=True, eps=eps).fit(env["Xt"], env["yt"])
    ref = gs.explain(env["Xq"], env["yq"])
    k = 10
    res = env["c"].find_similar(index, env["Xq"], targets=env["yq"], k=k, direction="both")
    ref_scores, ref_ids = np.asarray(ref.data["scores"]), np.asarray(ref.data["ordered_indices"])
    np.testing.assert_allclose(res.most.scores, ref_scores[:, :k], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(res.least.scores, ref_scores[:, ::-1][:, :k], rtol=2e-4, atol=1e-5)
    assert (res.most.ids[:, :3] == ref_ids[:, :3]).all()
    assert (res.most.labels == env["yt"][res.most.ids]).all()
    # Without targets the model's predicted class is used, and reported back.
    pred = _model()(torch.as_tensor(env["Xq"])).argmax(1).numpy()
    res2 = env["c"].find_similar(index, env["Xq"], k=k)
    assert (res2.targets == pred).all()
    ref2 = gs.explain(env["Xq"])
    np.testing.assert_allclose(res2.scores, np.asarray(ref2.data["scores"])[:, :k], rtol=2e-4, atol=1e-5)


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_every_bad_input_gets_its_code_and_the_server_keeps_answering(env):
    c, X = env["c"], env["Xq"]
    IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
    nan = X[:2].copy()
    nan[0, 0, 3, 3] = np.nan
    corrupt = pb.FindSimilarRequest(index="digits", k=3, inputs=to_tensor(X[:2]))
    corrupt.inputs.shape[:] = [3, 1, 28, 28]
    cases = [
        (lambda: c.find_similar("digits", X[:2].astype(np.int64), k=3), IA, "dtype"),
        (lambda: c.find_similar("digits", X[:2, 0], k=3), IA, "expects (batch, 1, 28, 28)"),
        (lambda: c.find_similar("digits", nan, k=3), IA, "NaN"),
        (lambda: c.find_similar("digits", X[:2], k=0), IA, "k must be >= 1"),
        (lambda: c.find_similar("digits", X[:2], k=-4), IA, "k must be >= 1"),
        (lambda: c.find_similar("digits", X[:2], k=N + 1), IA, f"holds {N} examples"),
        (lambda: c.find_similar("digits", X[:0], k=3), IA, "empty batch"),
        (lambda: c.find_similar("digits", np.repeat(X[:1], 65, 0), k=3), RE, "max_batch=64"),
        (lambda: c.find_similar("nope", X[:2], k=3), NF, "served indexes: digits, exact_asym, exact_cos, exact_dot"),
        (lambda: c.find_similar("digits", X[:2], targets=np.array([1]), k=3), IA, "one target per input"),
        (lambda: c.find_similar("digits", X[:2], targets=np.array([1, 12]), k=3), IA, "class ids in [0, 10)"),
        (lambda: c.describe_model("nope"), NF, "served models: digits-cnn"),
        (lambda: c.describe_index("nope"), NF, "ListIndexes"),
        (lambda: c.stub.FindSimilar(pb.FindSimilarRequest(index="digits", k=3), timeout=10), IA, "inputs is missing"),
        (lambda: c.stub.FindSimilar(corrupt, timeout=10), IA, "do not match shape"),
        (lambda: c.get_examples("digits", [0, N + 5]), NF, f"ids run from 0 to {N - 1}"),
        (lambda: c.get_examples("digits", []), IA, "ids is empty"),
        (lambda: c.self_influence("digits", k=0), IA, "k must be >= 1"),
        (lambda: c.search_by_gradient("digits", np.ones((1, 7), np.float32), k=3, projected=True), IA, "expects 2048"),
    ]
    for fn, code, text in cases:
        got, msg = _code(fn)
        assert got == code and text in msg, (code, text, got, msg)
        assert c.find_similar("digits", X[:1], k=2).ids.shape == (1, 2)


def test_expired_deadline_is_abandoned_between_stages(env):
    c, srv = env["c"], env["srv"]
    lab = srv.metrics.requests.labels
    gave_up = [lab("FindSimilar", code) for code in ("DEADLINE_EXCEEDED", "CANCELLED")]
    done = lab("FindSimilar", "OK")

    def count(ctrs) -> float:
        return sum(ctr._value.get() for ctr in ctrs)

    before, ok_before = count(gave_up), done._value.get()
    big = np.repeat(env["Xq"], 8, axis=0)  # 64 queries: the gradient stage alone takes far longer than 5 ms
    # A loaded machine can let a 5 ms deadline pass before the call reaches the handler (gRPC then drops
    # it unseen, and there is nothing to abandon); the next attempts give the handler time to start.
    for timeout in (0.005, 0.01, 0.02, 0.04):
        code, _ = _code(lambda: c.find_similar("digits", big, k=3, timeout=timeout))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        t0 = time.time()
        while count(gave_up) == before and time.time() - t0 < 5:
            time.sleep(0.05)
        if count(gave_up) > before:
            break
    # The server gave up instead of finishing the work: recorded as an expired deadline, or as a
    # cancellation when the client's departure reaches the server before its own deadline check.
    assert count(gave_up) == before + 1
    assert done._value.get() == ok_before
    assert c.find_similar("digits", env["Xq"][:1], k=2).ids.shape == (1, 2)


def test_filters_match_brute_force(env):
    c = env["c"]
    res = c.find_similar("exact_dot", env["Xq"], targets=env["yq"], k=5, labels=[3, 5])
    full = c.find_similar("exact_dot", env["Xq"], targets=env["yq"], k=N)
    for q in range(len(env["Xq"])):
        keep = np.isin(full.labels[q], [3, 5])
        np.testing.assert_allclose(res.scores[q], full.scores[q][keep][:5], rtol=1e-6)
        assert set(res.labels[q]) <= {3, 5}
    none = c.find_similar("exact_dot", env["Xq"][:1], k=3, splits=["val"])  # no such split: padded
    assert (none.ids == -1).all() and np.isnan(none.scores).all()


def test_search_by_gradient_equals_find_similar(env):
    from indexer.query import open_index

    c, X, y = env["c"], env["Xq"], env["yq"]
    ref = c.find_similar("exact_dot", X, targets=y, k=5)
    idx = open_index(env["wd"], "exact_dot")
    G = idx.embedder().engines[0].grads(X, y)  # raw per-example gradients of the selected parameters
    got = c.search_by_gradient("exact_dot", G, k=5)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5)
    assert (got.ids == ref.ids).all()
    # Factored projection: projected vectors work, raw gradients are refused with what to do instead.
    ref = c.find_similar("digits", X, targets=y, k=5)
    V = open_index(env["wd"], "digits").embedder().raw(X, y)[0]
    got = c.search_by_gradient("digits", V, k=5, projected=True)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4)
    code, msg = _code(lambda: c.search_by_gradient("digits", np.ones((1, int(c.describe_index("digits").gradient_dim)),
                                                                          np.float32), k=3))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "projected=true" in msg


def test_self_influence_is_squared_gradient_norm(env):
    from indexer.query import open_index

    idx = open_index(env["wd"], "exact_dot")
    sq = (idx.embedder().engines[0].grads(env["Xt"], env["yt"]).astype(np.float64) ** 2).sum(1)
    got = env["c"].self_influence("exact_dot", k=5)
    assert list(got["ids"]) == list(np.argsort(-sq, kind="stable")[:5])
    np.testing.assert_allclose(got["scores"], np.sort(sq)[::-1][:5], rtol=1e-4)
    low = env["c"].self_influence("exact_dot", k=5, lowest=True)  # the most typical examples
    assert list(low["ids"]) == list(np.argsort(sq, kind="stable")[:5])
    np.testing.assert_allclose(low["scores"], np.sort(sq)[:5], rtol=1e-4)


def test_queries_keep_succeeding_while_the_index_is_swapped(env):
    c, X = env["c"], env["Xq"][:2]
    errors, gens, stop = [], [], threading.Event()

    def hammer():
        with GradIndexClient(f"127.0.0.1:{env['srv'].port}", timeout=30) as cc:
            while not stop.is_set():
                try:
                    r = cc.find_similar("digits", X, k=3)
                    gens.append(r.generation)
                    assert r.ids.shape == (2, 3) and (r.ids >= 0).all()
                except Exception as exc:  # noqa: BLE001 - collected and asserted below
                    errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    first = c.describe_index("digits").generation
    for _ in range(3):
        time.sleep(0.2)
        info = c.reload_index("digits")
        assert info.generation > first
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(gens) > 10 and min(gens) == first and max(gens) == info.generation


def test_changed_weights_are_refused_and_the_old_index_keeps_serving(env):
    c = env["c"]
    before = c.describe_index("digits").generation
    state = torch.load(env["weights"], weights_only=True)
    original = {k: v.clone() for k, v in state.items()}
    state["14.bias"] += 0.5
    torch.save(state, env["weights"])
    try:
        code, msg = _code(lambda: c.reload_index("digits"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "rebuild the index" in msg
    finally:
        torch.save(original, env["weights"])
    assert c.describe_index("digits").generation == before
    assert c.find_similar("digits", env["Xq"][:1], k=2).ids.shape == (1, 2)


def test_explain_pair_with_a_training_id(env):
    from google.protobuf import struct_pb2

    from server.tensors import from_tensor

    c = env["c"]
    req = pb.ExplainPairRequest(index="digits", query=to_tensor(env["Xq"][0]), training_id=3)
    opts = struct_pb2.Struct()
    opts.update({"pool": 4})
    req.options.CopyFrom(opts)
    resp = c.stub.ExplainPair(req, timeout=60)
    R = from_tensor(resp.relevances)
    assert R.shape == (49, 49) and np.isfinite(R).all()
    from explainers.bilrp import penultimate_embedding

    emb = penultimate_embedding(_model())
    with torch.no_grad():
        phi = emb(torch.as_tensor(np.stack([env["Xq"][0], env["Xt"][3]]))).numpy()
    assert resp.score == pytest.approx(float(phi[0] @ phi[1]), rel=1e-4)
    code, _ = _code(lambda: c.stub.ExplainPair(pb.ExplainPairRequest(index="digits", query=to_tensor(env["Xq"][0]),
                                                                     training_id=N + 1), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
