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
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from server.app import GradIndexServer
from server.client import GradIndexClient
from server.config import ServerConfig
from server.protos import service_pb2 as pb
from server.protos import service_pb2_grpc as pb_grpc
from server.tensors import to_tensor

TOKEN, ADMIN = "user-secret", "admin-secret"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real 200-example digits index (the shipped config, built by the indexer)."""
    import torch

    from indexer.demo import load_digits_28
    from server.demo import ensure_digits_index

    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("sec")
    name = ensure_digits_index(wd, n=200, progress=False)
    X, y = load_digits_28()
    return SimpleNamespace(workdir=wd, name=name, X=X[-8:].astype(np.float32), y=y[-8:], count=200)


def _serve(tiny, **kw) -> GradIndexServer:
    kw.setdefault("log_level", "WARNING")
    return GradIndexServer(ServerConfig(workdir=str(tiny.workdir), indexes=[tiny.name], port=0, **kw)).start()


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


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
        code, _ = _code(lambda: stub.ListIndexes(pb.ListIndexesRequest(),
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
