"""Server hardening against a real gRPC server on 127.0.0.1: what a hostile client or a careless
operator can no longer do. One test (or a few) per finding:

1. auth fails closed on config mistakes; 2. metric labels only from the method table;
3. a per-request reply/memory budget checked before any work; 4. explainer knobs capped, model
passes chunked; 5. long RPCs stop at the deadline and do not stall the query path;
6. loadable resources only by configured name; 7. ReloadIndex limits; 8. INVALID_ARGUMENT for
malformed fields and garbage bytes; 9. one build per index name; 10. smaller items (echo
truncation, host paths, corrupt index, TLS mismatch, Bearer case).
"""

from __future__ import annotations

import random
import string
import urllib.request

import grpc
import numpy as np
import pytest

from server.app import GradIndexServer
from server.config import ServerConfig
from server.protos import service_pb2 as pb
from server.protos import service_pb2_grpc as pb_grpc
from server.tensors import to_tensor
from server_setup import digits_index, rpc_error

TOKEN, ADMIN = "user-secret", "admin-secret"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real 200-example digits index (the shipped config, built by the indexer)."""
    return digits_index(tmp_path_factory, "sec", queries=8)


def _serve(tiny, **kw) -> GradIndexServer:
    kw.setdefault("log_level", "WARNING")
    return GradIndexServer(ServerConfig(workdir=str(tiny.workdir), indexes=[tiny.name], port=0, **kw)).start()


def _stub(port: int, token: str | None = None):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    md = (("authorization", f"Bearer {token}"),) if token else None
    return ch, pb_grpc.GradIndexStub(ch), md


# ---- 1. auth fails closed ----------------------------------------------------------------------
def test_auth_settings_that_resolve_to_no_secret_refuse_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("GI_TEST_UNSET", raising=False)
    p = tmp_path / "server.toml"
    p.write_text('token_env = "GI_TEST_UNSET"\n')
    with pytest.raises(ValueError, match="token_env.*GI_TEST_UNSET"):
        ServerConfig.from_toml(p)
    (tmp_path / "empty").write_text("\n")
    p.write_text('token_file = "empty"\n')
    with pytest.raises(ValueError, match="token_file.*empty"):
        ServerConfig.from_toml(p)
    p.write_text('token_file = "missing"\n')
    with pytest.raises(ValueError, match="token_file.*missing"):
        ServerConfig.from_toml(p)
    p.write_text('admin_token = "x"\n')  # admin token alone: refused, it would leave queries open
    with pytest.raises(ValueError, match="admin_token is set but token is not"):
        ServerConfig.from_toml(p)
    with pytest.raises(ValueError, match="token is set but empty"):
        ServerConfig(token="  ").validate()
    monkeypatch.setenv("GI_TEST_SET", "abc")
    p.write_text('token_env = "GI_TEST_SET"\nadmin_token = "xyz"\n')
    cfg = ServerConfig.from_toml(p)
    assert cfg.token == "abc" and cfg.admin_token == "xyz"


def test_admin_token_alone_does_not_start_a_server(tiny):
    with pytest.raises(ValueError, match="admin_token"):
        _serve(tiny, admin_token=ADMIN)


def test_bearer_scheme_is_case_insensitive_and_tokens_still_checked(tiny):
    srv = _serve(tiny, token=TOKEN)
    try:
        ch, stub, _ = _stub(srv.port)
        for scheme in ("bearer", "BEARER", "Bearer"):
            stub.ListIndexes(pb.ListIndexesRequest(), metadata=(("authorization", f"{scheme} {TOKEN}"),), timeout=10)
        code, _ = rpc_error(lambda: stub.ListIndexes(pb.ListIndexesRequest(),
                                                     metadata=(("authorization", "bearer wrong"),), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        ch.close()
    finally:
        srv.stop(0)


# ---- 2. metric labels only from the method table ------------------------------------------------
def test_random_method_names_do_not_grow_metrics(tiny):
    srv = _serve(tiny, token=TOKEN, metrics_port=0)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        rng = random.Random(0)
        names = ["".join(rng.choices(string.ascii_letters, k=24)) for _ in range(200)]
        for n in names:
            call = ch.unary_unary(f"/gradindex.v1.GradIndex/{n}")
            with pytest.raises(grpc.RpcError):
                call(b"", timeout=10)
        stub = pb_grpc.GradIndexStub(ch)
        with pytest.raises(grpc.RpcError):
            stub.ListIndexes(pb.ListIndexesRequest(), timeout=10)
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        assert not any(n in body for n in names)
        assert '{code="UNAUTHENTICATED",method="unknown"} 200.0' in body
        assert '{code="UNAUTHENTICATED",method="ListIndexes"} 1.0' in body
        ch.close()
    finally:
        srv.stop(0)


@pytest.fixture(scope="module")
def srv(tiny):
    """A token-protected server with an admin token, an allow-list, a small budget and one explain slot."""
    s = _serve(tiny, token=TOKEN, admin_token=ADMIN, request_memory_mb=8.0, explain_concurrency=1,
               explain_chunk=64, max_served=2, metrics_port=0)
    yield s
    s.stop(0)


def _fs(tiny, n=4, **kw) -> pb.FindSimilarRequest:
    return pb.FindSimilarRequest(index=tiny.name, inputs=to_tensor(tiny.X[:n]), **kw)


# ---- 3. per-request reply budget, checked before any work -------------------------------------
def test_a_reply_over_the_budget_is_refused_before_any_work(srv, tiny):
    ch, stub, md = _stub(srv.port, TOKEN)
    X = np.repeat(tiny.X[:1], 64, axis=0)
    for call, req in (
        (stub.FindSimilar, pb.FindSimilarRequest(index=tiny.name, inputs=to_tensor(X), k=200, direction=pb.BOTH,
                                                 include_data=True)),
        (stub.SearchByGradient, pb.SearchByGradientRequest(index=tiny.name, k=200, direction=pb.BOTH,
                                                           include_data=True, projected=True,
                                                           gradients=to_tensor(np.ones((64, 1), np.float32)))),
    ):
        if call is stub.SearchByGradient:  # the projected dimension of this index
            dim = stub.DescribeIndex(pb.DescribeIndexRequest(name=tiny.name), metadata=md, timeout=10).dim
            req.gradients.CopyFrom(to_tensor(np.ones((64, dim), np.float32)))
        code, msg = rpc_error(lambda: call(req, metadata=md, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "MiB" in msg and "send at most" in msg, msg
    # 200 records x 3 KB fit 8 MiB: answered, the budget is not a blanket refusal
    assert len(stub.SelfInfluence(pb.SelfInfluenceRequest(index=tiny.name, k=200, include_data=True),
                                  metadata=md, timeout=30).examples) == 200
    stage = srv.metrics.stages.labels("gradient")._sum.get()  # no query was embedded for them
    r = stub.FindSimilar(_fs(tiny, k=5, direction=pb.BOTH, include_data=True), metadata=md, timeout=30)
    assert len(r.results) == 4 and srv.metrics.stages.labels("gradient")._sum.get() > stage
    ch.close()


def _anchor_image(tiny, **params) -> pb.ExplainAnchorsRequest:
    from google.protobuf import struct_pb2

    p = struct_pb2.Struct()
    p.update({"seed": 0, **params})
    img = np.moveaxis(tiny.X[0], 0, -1).astype(np.float32)  # (28, 28, 1) channel-last
    return pb.ExplainAnchorsRequest(model="digits_cnn", image=to_tensor(img), params=p)


# ---- 4. explainer knobs capped by the budget; forward passes chunked ------------------------------
def test_anchor_knobs_beyond_the_memory_budget_are_refused(srv, tiny):
    ch, stub, md = _stub(srv.port, TOKEN)
    model = stub.DescribeIndex(pb.DescribeIndexRequest(name=tiny.name), metadata=md, timeout=10).model
    for knob in ({"batch_size": 20000}, {"coverage_samples": 1_000_000}, {"batch_size": 1.5}):
        req = _anchor_image(tiny, **knob)
        req.model = model
        code, msg = rpc_error(lambda: stub.ExplainAnchors(req, metadata=md, timeout=30))
        want = grpc.StatusCode.INVALID_ARGUMENT if knob.get("batch_size") == 1.5 else grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code == want and next(iter(knob)) in msg, msg
    ch.close()


def test_chunked_model_calls_bound_rows_and_check_the_deadline():
    from server.limits import chunked

    seen = []

    def predict(X):
        seen.append(len(X))
        return X.sum(axis=1, keepdims=True)

    X = np.arange(1000 * 3, dtype=np.float32).reshape(1000, 3)
    out = chunked(predict, 64, None, "test")(X)
    assert max(seen) == 64 and sum(seen) == 1000
    np.testing.assert_array_equal(out, X.sum(axis=1, keepdims=True))


# ---- 5. long RPCs stop at the deadline; the explain slot bounds them ------------------------------
def test_cancelled_anchors_stop_and_free_their_slot(srv, tiny):
    import time

    ch, stub, md = _stub(srv.port, TOKEN)
    model = stub.DescribeIndex(pb.DescribeIndexRequest(name=tiny.name), metadata=md, timeout=10).model
    # a search that runs for minutes on this model (measured: > 60 s) unless stopped
    slow = _anchor_image(tiny, batch_size=400, threshold=0.99999, delta=0.001, tau=0.001, beam_size=4,
                         coverage_samples=400, segmentation_kwargs={"n_segments": 100, "compactness": 1}, p_sample=0.9)
    slow.model = model
    counter = srv.metrics.requests.labels("ExplainAnchors", "DEADLINE_EXCEEDED")
    before = counter._value.get()
    fut = stub.ExplainAnchors.future(slow, metadata=md, timeout=0.5)
    time.sleep(0.1)
    # while it runs, a second explanation is refused at once (the query path keeps its threads)
    code, msg = rpc_error(lambda: stub.ExplainAnchors(slow, metadata=md, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at a time" in msg
    assert rpc_error(fut.result)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    r = stub.FindSimilar(_fs(tiny, k=3), metadata=md, timeout=30)  # queries answer meanwhile
    assert len(r.results) == 4
    # the server's handler itself ended with DEADLINE_EXCEEDED (it stopped, not finished the search)
    t0 = time.monotonic()
    while counter._value.get() == before and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    assert counter._value.get() == before + 1
    assert srv.metrics.requests.labels("ExplainAnchors", "OK")._value.get() == 0
    ch.close()


# ---- 6. loadable resources only by configured name --------------------------------------------
def test_language_models_and_spacy_pipelines_only_by_configured_name(srv, tiny, tmp_path):
    from google.protobuf import struct_pb2

    ch, stub, md = _stub(srv.port, TOKEN)
    msgs = []
    for key, value in (("nlp", "pytest"), ("nlp", str(tmp_path)), ("nlp", str(tmp_path / "missing")),
                       ("language_model", str(tmp_path)), ("language_model", "/nonexistent/dir")):
        p = struct_pb2.Struct()
        p.update({key: value, "sampling_strategy": "similarity" if key == "nlp" else "language_model"})
        req = pb.ExplainAnchorsRequest(model="digits_cnn", text="a good movie", params=p)
        req.model = stub.DescribeIndex(pb.DescribeIndexRequest(name=tiny.name), metadata=md, timeout=10).model
        code, msg = rpc_error(lambda: stub.ExplainAnchors(req, metadata=md, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "names this server configures" in msg, msg
        msgs.append(msg.split(" (got ")[0])
    # the same answer whether the path exists or not: nothing to probe
    assert len({m for m in msgs if m.startswith("nlp")}) == 1 and len({m for m in msgs if m.startswith("language")}) == 1
    ch.close()


# ---- 7. ReloadIndex: admin only, allow-list, bounded names, corrupt index --------------------
def test_reload_is_disabled_without_an_admin_token(tiny):
    s = _serve(tiny, token=TOKEN)
    try:
        ch, stub, md = _stub(s.port, TOKEN)
        code, msg = rpc_error(lambda: stub.ReloadIndex(pb.ReloadIndexRequest(index=tiny.name), metadata=md, timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin_token" in msg
        ch.close()
    finally:
        s.stop(0)
    s = _serve(tiny, token=TOKEN, reload_without_admin_token=True)  # the operator opts in
    try:
        ch, stub, md = _stub(s.port, TOKEN)
        assert stub.ReloadIndex(pb.ReloadIndexRequest(index=tiny.name), metadata=md, timeout=60).generation == 2
        ch.close()
    finally:
        s.stop(0)


def test_reload_honours_allow_list_and_max_served(srv, tiny):
    ch, stub, md = _stub(srv.port, ADMIN)
    code, msg = rpc_error(lambda: stub.ReloadIndex(pb.ReloadIndexRequest(index="x", from_index="other"),
                                                   metadata=md, timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "allow-list" in msg
    names = [f"alias{i}" for i in range(3)]
    codes = []
    for n in names:
        try:
            stub.ReloadIndex(pb.ReloadIndexRequest(index=n, from_index=tiny.name), metadata=md, timeout=60)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(stub.ListIndexes(pb.ListIndexesRequest(), metadata=md, timeout=10).indexes) == 2
    ch.close()


def test_reload_of_a_corrupt_index_is_failed_precondition(tiny, tmp_path):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(tiny.workdir, wd)
    s = GradIndexServer(ServerConfig(workdir=str(wd), indexes=[tiny.name], port=0, token=TOKEN, admin_token=ADMIN,
                                     log_level="WARNING")).start()
    try:
        for f in wd.rglob("*.faiss"):
            f.write_bytes(b"not a faiss index")
        ch, stub, md = _stub(s.port, ADMIN)
        code, msg = rpc_error(lambda: stub.ReloadIndex(pb.ReloadIndexRequest(index=tiny.name), metadata=md, timeout=60))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cannot be opened" in msg, (code, msg)
        assert stub.DescribeIndex(pb.DescribeIndexRequest(name=tiny.name), metadata=md, timeout=10).generation == 1
        ch.close()
    finally:
        s.stop(0)


# ---- 8. malformed fields and garbage bytes are INVALID_ARGUMENT ---------------------------------
def test_malformed_fields_are_invalid_argument_saying_what_to_fix(srv, tiny):
    ch, stub, md = _stub(srv.port, TOKEN)
    n = 4
    cases = [
        (_fs(tiny, k=3, direction=7), "direction"),
        (_fs(tiny, k=3, targets=to_tensor(np.zeros(n, np.float32))), "targets"),
        (_fs(tiny, k=3, targets=to_tensor(np.zeros(n, bool))), "targets"),
        (_fs(tiny, k=3, targets=to_tensor(np.full(n, 10**15, np.int64))), "targets"),
        (_fs(tiny, k=3, targets=to_tensor(np.full(n, -1, np.int64))), "targets"),
        (_fs(tiny, k=3, filter=pb.Filter(labels=list(range(100_000)))), "filter.labels"),
        (pb.FindSimilarRequest(index="x" * 1_000_000, k=3), "index"),
    ]
    for req, field in cases:
        code, msg = rpc_error(lambda: stub.FindSimilar(req, metadata=md, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in msg and len(msg) < 600, (field, code, msg[:300])
    code, msg = rpc_error(lambda: stub.SearchByGradient(pb.SearchByGradientRequest(index=tiny.name, k=3, direction=9),
                                                        metadata=md, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "direction" in msg
    raw = ch.unary_unary("/gradindex.v1.GradIndex/FindSimilar")
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
        code, msg = rpc_error(lambda: raw(garbage, metadata=md, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "FindSimilarRequest" in msg, (code, msg)
    assert len(stub.FindSimilar(_fs(tiny, k=2), metadata=md, timeout=30).results) == 4
    ch.close()


# ---- 10. smaller items -------------------------------------------------------------------------
def test_describe_index_shows_no_host_paths(srv, tiny):
    from google.protobuf import json_format

    ch, stub, md = _stub(srv.port, TOKEN)
    info = stub.DescribeIndex(pb.DescribeIndexRequest(name=tiny.name), metadata=md, timeout=10)
    details = json_format.MessageToJson(info.details)
    assert str(tiny.workdir) not in details and "/tmp" not in details
    assert "weights" in details or "checkpoints" in details  # the file names are still there
    ch.close()


def test_tls_mismatch_and_startup_errors_are_one_clear_line(tiny, tmp_path):
    import subprocess
    import sys

    for n in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / f"{n}.key"),
                        "-out", str(tmp_path / f"{n}.crt"), "-days", "1", "-subj", "/CN=localhost"],
                       check=True, capture_output=True)
    with pytest.raises(ValueError, match="tls.cert and tls.key are not a matching"):
        _serve(tiny, tls_cert=str(tmp_path / "a.crt"), tls_key=str(tmp_path / "b.key"))
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'workdir = "{tiny.workdir}"\nport = 0\ntoken_env = "GI_TEST_SURELY_UNSET"\n')
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "token_env" in r.stderr, r.stderr[-2000:]
