"""Micro-batching of concurrent FindSimilar requests (server/batching.py) against a real gRPC server on
127.0.0.1 port 0 over a real 200-example digits index: batched answers equal per-request in-process
queries, bad requests fail alone with their own code, expired requests are dropped uncomputed, swaps
never mix generations in a batch, a lone request does not wait for the window, batching can be off."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from indexer.demo import load_digits_28
from server.app import GradIndexServer
from server.batching import Batcher, Job
from server.client import GradIndexClient
from server.config import ServerConfig
from server.demo import ensure_digits_index
from server.observability import Metrics

N = 200


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from indexer.query import open_index

    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("batching")
    ensure_digits_index(wd, "digits", n=N, progress=False)
    srv = GradIndexServer(ServerConfig(workdir=str(wd), port=0, workers=24, log_level="WARNING",
                                       reload_without_admin_token=True)).start()
    client = GradIndexClient(f"127.0.0.1:{srv.port}", timeout=30)
    X = load_digits_28()[0]
    ref = open_index(wd, "digits")  # independent in-process index: the per-request reference
    yield {"wd": wd, "srv": srv, "c": client, "Xq": X[-40:], "ref": ref}
    client.close()
    srv.stop(0)
    ref.close()


def _requests(Xq: np.ndarray, n: int) -> list[dict]:
    """A mix of what clients send: k, direction, explicit targets, label filters, multi-example calls."""
    out = []
    for i in range(n):
        rows = Xq[i % len(Xq):i % len(Xq) + (3 if i % 6 == 0 else 1)]
        out.append({"X": rows, "k": (3, 5, 7, 4)[i % 4], "direction": ("most", "both", "least")[i % 3],
                    "targets": np.full(len(rows), i % 10, dtype=np.int64) if i % 4 == 1 else None,
                    "labels": [3, 5] if i % 5 == 2 else ()})
    return out


def _send(c: GradIndexClient, r: dict, **kw):
    return c.find_similar("digits", r["X"], targets=r["targets"], k=r["k"], direction=r["direction"],
                          labels=r["labels"], **kw)


def _check(ref, r: dict, res) -> None:
    """The server's answer equals the same request run alone, in-process (GradIndex.find_similar).

    Ids must be identical; scores agree to float32 rounding, which depends on the batch's composition
    (BLAS blocking) and is amplified for confidently predicted queries, whose loss gradient (p - 1)
    cancels: observed up to ~5e-5 relative, hence rtol 2e-4."""
    Y = r["targets"] if r["targets"] is not None else ref.embedder().engines[-1].resolve_targets(r["X"])
    exp = ref.find_similar(r["X"], Y, k=r["k"], mode=r["direction"], labels=list(r["labels"]) or None)
    assert (res.targets == Y).all()
    if r["direction"] == "both":
        pairs = [(res.most, exp.scores, exp.ids), (res.least, exp.least_scores, exp.least_ids)]
    else:
        pairs = [(res.most or res.least, exp.scores, exp.ids)]
    for hits, s, i in pairs:
        assert (hits.ids == i).all(), (r["k"], r["direction"], hits.ids, i)
        np.testing.assert_allclose(hits.scores, s, rtol=2e-4, atol=1e-6)
        if r["labels"]:
            assert set(hits.labels.ravel()) <= set(r["labels"])


def _hist(h) -> tuple[float, float]:
    """(count, sum) of a prometheus histogram."""
    samples = {s.name: s.value for s in h.collect()[0].samples if not s.labels or "le" not in s.labels}
    return next(v for k, v in samples.items() if k.endswith("_count")), next(
        v for k, v in samples.items() if k.endswith("_sum"))


def _wait_for(cond, what: str, timeout: float = 10.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def _in_threads(fns) -> list:
    """Run each callable in its own thread at once; return results (or the exceptions raised)."""
    out: list = [None] * len(fns)

    def run(i):
        try:
            out[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - returned for the test to assert on
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    return threads, out


def _from_client_threads(port: int, reqs: list[dict], n: int) -> list[tuple[dict, object]]:
    """Send ``reqs`` from ``n`` client threads at once, each on its own channel (thread i sends
    ``reqs[i::n]`` in order); wait for all and return (request, answer) pairs. A thread that raised
    fails the test."""

    def client_loop(part):
        with GradIndexClient(f"127.0.0.1:{port}", timeout=30) as cc:
            return [_send(cc, r) for r in part]

    threads, out = _in_threads([lambda p=reqs[i::n]: client_loop(p) for i in range(n)])
    for t in threads:
        t.join()
    pairs = []
    for i, results in enumerate(out):
        assert not isinstance(results, Exception), results
        pairs.extend(zip(reqs[i::n], results))
    return pairs


def test_concurrent_requests_are_batched_and_equal_sequential_single_requests(env):
    srv, c, ref = env["srv"], env["c"], env["ref"]
    served = srv.registry.get("digits")
    reqs = _requests(env["Xq"], 16)
    n0, s0 = _hist(srv.metrics.batch_requests)
    # Hold the engine so that all 16 requests are queued before the first batch runs: a deterministic batch.
    with served.engine_lock:
        threads, out = _in_threads([lambda r=r: _send(c, r) for r in reqs])
        _wait_for(lambda: srv.metrics.inflight._value.get() == len(reqs) and srv.servicer.batcher.arriving == 0,
                  "the requests to queue")
    for t in threads:
        t.join()
    for r, res in zip(reqs, out):
        assert not isinstance(res, Exception), res
        _check(ref, r, res)
        assert res.server_timing["batch"] >= 1 and "gradient" in res.server_timing
    n1, s1 = _hist(srv.metrics.batch_requests)
    assert s1 - s0 == len(reqs) and n1 - n0 <= 2  # 16 requests in at most 2 batches (one engine call each)
    assert max(res.server_timing["batch"] for res in out) >= len(reqs) // 2

    # Free-running: 8 client threads (own channels) x 6 requests, batched however they happen to arrive.
    reqs = _requests(np.ascontiguousarray(env["Xq"][::-1]), 48)
    for r, res in _from_client_threads(srv.port, reqs, 8):
        _check(ref, r, res)


def test_a_bad_request_fails_alone_with_its_code(env):
    srv, c, ref, X = env["srv"], env["c"], env["ref"], env["Xq"]
    IA, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    nan = X[:2].copy()
    nan[1, 0, 5, 5] = np.nan
    bad = [
        (lambda: c.find_similar("digits", nan, k=3), IA, "NaN"),
        (lambda: c.find_similar("digits", X[:1], k=N + 1), IA, f"holds {N} examples"),
        (lambda: c.find_similar("digits", X[:1], k=0), IA, "k must be >= 1"),
        (lambda: c.find_similar("digits", X[:1, 0], k=3), IA, "expects (batch, 1, 28, 28)"),
        (lambda: c.find_similar("digits", X[:2], targets=np.array([1, 12]), k=3), IA, "class ids in [0, 10)"),
        (lambda: c.find_similar("digits", X[:0], k=3), IA, "empty batch"),
        (lambda: c.find_similar("nope", X[:1], k=3), NF, "served indexes: digits"),
    ]
    good = _requests(X[5:], 6)
    served = srv.registry.get("digits")
    with served.engine_lock:
        threads, out = _in_threads([lambda r=r: _send(c, r) for r in good] + [fn for fn, _, _ in bad])
        # The bad ones are answered while the good ones still wait for their batch: validated alone.
        for t in threads[len(good):]:
            t.join(10)
            assert not t.is_alive()
        assert all(t.is_alive() for t in threads[:len(good)])
    for t in threads:
        t.join()
    for r, res in zip(good, out):
        assert not isinstance(res, Exception), res
        _check(ref, r, res)
    for (_, code, text), exc in zip(bad, out[len(good):]):
        assert isinstance(exc, grpc.RpcError) and exc.code() == code and text in exc.details(), (code, text, exc)


def test_a_request_failing_inside_a_batch_fails_alone(env):
    """Targets that pass the shape checks but break the engine (class 10 of 10) share an engine call
    with good requests: the batch is retried request by request, only the bad one gets the error."""
    ref, X = env["ref"], env["Xq"]
    served = env["srv"].registry.get("digits")
    b = Batcher(Metrics(), window_ms=50, max_examples=64)
    try:
        Y = ref.embedder().engines[-1].resolve_targets(X[:3])
        jobs = [Job(served, X[i:i + 1], Y[i:i + 1], 4, "most", None, None, None) for i in range(3)]
        jobs[1].Y = np.array([10], dtype=np.int64)  # out of range for the 10-class model
        with served.engine_lock:
            for j in jobs:
                b.submit(j)
            _wait_for(lambda: b.pending("digits") <= 2, "the worker to take a batch")
        for j in (jobs[0], jobs[2]):
            b.wait(j)
            exp = ref.find_similar(j.X, j.Y, k=4)
            assert (j.hits["most"][1] == exp.ids).all()
            np.testing.assert_allclose(j.hits["most"][0], exp.scores, rtol=1e-5, atol=1e-6)
        with pytest.raises(Exception) as e:
            b.wait(jobs[1])
        assert jobs[1].hits is None and "10" in str(e.value)
    finally:
        b.close()


def test_an_expired_request_in_the_queue_is_dropped_without_computing_it(env):
    srv, c, X = env["srv"], env["c"], env["Xq"]
    m = srv.metrics
    served = srv.registry.get("digits")
    computed0 = m.batched_examples._value.get()
    dropped0 = m.batch_dropped.labels("expired")._value.get()
    deadline0 = m.requests.labels("FindSimilar", "DEADLINE_EXCEEDED")._value.get()
    with served.engine_lock:  # the engine is busy (e.g. an explainer): the request waits in the queue
        t0 = time.time()
        with pytest.raises(grpc.RpcError) as e:
            c.find_similar("digits", X[:4], k=3, timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.time() - t0 < 5
        _wait_for(lambda: m.requests.labels("FindSimilar", "DEADLINE_EXCEEDED")._value.get() == deadline0 + 1,
                  "the handler to give up")
    _wait_for(lambda: m.batch_dropped.labels("expired")._value.get() == dropped0 + 1, "the drop")
    assert m.batched_examples._value.get() == computed0  # its 4 examples were never embedded
    res = c.find_similar("digits", X[:2], k=3)  # and the server keeps answering
    assert res.ids.shape == (2, 3) and m.batched_examples._value.get() == computed0 + 2


def test_a_swap_while_requests_are_queued_never_mixes_generations(env):
    srv, c, ref = env["srv"], env["c"], env["ref"]
    old = srv.registry.get("digits")
    reqs = _requests(env["Xq"][10:], 8)
    with old.engine_lock:
        threads, out = _in_threads([lambda r=r: _send(c, r) for r in reqs[:4]])
        _wait_for(lambda: srv.metrics.inflight._value.get() == 4 and srv.servicer.batcher.arriving == 0,
                  "the first requests to queue")
        new = c.reload_index("digits")
        assert new.generation > old.generation
        t2, out2 = _in_threads([lambda r=r: _send(c, r) for r in reqs[4:]])
        _wait_for(lambda: srv.metrics.inflight._value.get() == 8 and srv.servicer.batcher.arriving == 0,
                  "the second requests to queue")
    for t in threads + t2:
        t.join()
    assert [r.generation for r in out] == [old.generation] * 4
    assert [r.generation for r in out2] == [new.generation] * 4
    for r, res in zip(reqs, out + out2):
        _check(ref, r, res)


def test_a_lone_request_does_not_wait_for_the_window(env):
    srv = GradIndexServer(ServerConfig(workdir=str(env["wd"]), port=0, batch_window_ms=1000,
                                       log_level="WARNING")).start()
    try:
        with GradIndexClient(f"127.0.0.1:{srv.port}", timeout=30) as c:
            for i in range(5):
                t0 = time.perf_counter()
                res = c.find_similar("digits", env["Xq"][i:i + 1], k=3)
                assert time.perf_counter() - t0 < 0.5  # a 1,000 ms window would show
                assert res.server_timing["queue"] < 200 and res.server_timing["batch"] == 1
    finally:
        srv.stop(0)


def test_batching_off(env, tmp_path):
    cfg_file = tmp_path / "server.toml"
    cfg_file.write_text(f'workdir = "{env["wd"]}"\nport = 0\nbatch_max_examples = 0\nbatch_window_ms = 0\n'
                        'log_level = "WARNING"\n')
    cfg = ServerConfig.from_toml(cfg_file)
    assert cfg.batch_max_examples == 0
    for bad in ({"batch_max_examples": -1}, {"batch_window_ms": -2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerConfig(**bad).validate()
    srv = GradIndexServer(cfg).start()
    try:
        assert srv.servicer.batcher is None
        reqs = _requests(env["Xq"][20:], 12)
        for r, res in _from_client_threads(srv.port, reqs, 4):
            _check(env["ref"], r, res)
            assert "batch" not in res.server_timing and "queue" not in res.server_timing
        assert _hist(srv.metrics.batch_requests) == (0.0, 0.0)
    finally:
        srv.stop(0)
