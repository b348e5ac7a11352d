"""Service machinery against a real gRPC server on 127.0.0.1 port 0: health, auth, limits, metrics,
reflection, TLS, config. Queries against a real index are in tests/test_server_queries.py."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import GradIndexServer
from server.client import GradIndexClient
from server.config import ServerConfig
from server.protos import service_pb2 as pb
from server.protos import types_pb2
from server.tensors import from_tensor, to_tensor
from server_setup import digits_index, rpc_error

TOKEN, ADMIN = "s3cret-token", "admin-token"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real 200-example digits index (the shipped config, built by the indexer)."""
    return digits_index(tmp_path_factory, "tiny", queries=20)


@pytest.fixture(scope="module")
def authed(tiny):
    cfg = ServerConfig(workdir=str(tiny.workdir), indexes=[tiny.name], port=0, token=TOKEN, admin_token=ADMIN,
                       metrics_port=0, max_message_mb=1.0)
    srv = GradIndexServer(cfg).start()
    yield srv
    srv.stop(0)


def test_tensor_roundtrip_and_validation():
    for a in (np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((0, 4)), np.array([1, 2], dtype=np.int64),
              np.zeros((2, 1, 3, 3), dtype=np.float16)):
        b = from_tensor(to_tensor(a))
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    t = to_tensor(np.ones((2, 3), dtype=np.float32))
    t.shape[:] = [2, 4]
    with pytest.raises(ValueError, match="bytes of data do not match"):
        from_tensor(t)
    with pytest.raises(ValueError, match="NaN"):
        from_tensor(to_tensor(np.array([1.0, np.nan])), finite=True)
    with pytest.raises(ValueError, match="not accepted"):
        from_tensor(types_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8))
    with pytest.raises(TypeError):
        to_tensor(np.array(["a"]))


def test_health_needs_no_token_and_rpcs_do(authed, tiny):
    target = f"127.0.0.1:{authed.port}"
    anon = GradIndexClient(target)
    assert anon.health() == "SERVING"
    assert anon.health("gradindex.v1.GradIndex") == "SERVING"
    code, msg = rpc_error(anon.list_indexes)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in msg
    code, msg = rpc_error(GradIndexClient(target, token="wrong").list_indexes)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid token" in msg
    # Malformed header.
    stub = GradIndexClient(target).stub
    code, msg = rpc_error(lambda: stub.ListIndexes(pb.ListIndexesRequest(), metadata=(("authorization", TOKEN),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "malformed" in msg
    ok = GradIndexClient(target, token=TOKEN)
    assert [i.name for i in ok.list_indexes()] == [tiny.name]
    # Admin RPC with the query token: denied; with the admin token: allowed.
    code, msg = rpc_error(lambda: ok.reload_index(tiny.name))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin token" in msg
    assert GradIndexClient(target, token=ADMIN).reload_index(tiny.name).name == tiny.name
    # Still answering after all of that.
    assert ok.describe_index(tiny.name).count == tiny.count


def test_oversized_message_is_resource_exhausted_and_server_survives(authed, tiny):
    c = GradIndexClient(f"127.0.0.1:{authed.port}", token=TOKEN)
    big = np.zeros((1400, *tiny.input_shape), dtype=np.float32)  # > 1 MiB limit of this server
    code, _ = rpc_error(lambda: c.find_similar(tiny.name, big, k=1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert c.find_similar(tiny.name, tiny.X[:1], k=1).ids.shape == (1, 1)


def test_metrics_endpoint_counts_requests(authed, tiny):
    c = GradIndexClient(f"127.0.0.1:{authed.port}", token=TOKEN)
    c.find_similar(tiny.name, tiny.X[:2], k=2)
    rpc_error(lambda: c.describe_index("no-such-index"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{authed.metrics_port}/metrics", timeout=5).read().decode()
    assert 'gradindex_requests_total{code="OK",method="FindSimilar"}' in text
    assert 'gradindex_requests_total{code="NOT_FOUND",method="DescribeIndex"}' in text
    assert 'gradindex_stage_seconds_count{stage="gradient"}' in text
    assert f'gradindex_index_examples{{index="{tiny.name}"}} {float(tiny.count)}' in text


def test_reflection_off_by_default_and_on_by_flag(tiny):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def list_services(port):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=5)))
        return {s.name for s in resp.list_services_response.service}

    for flag in (False, True):
        srv = GradIndexServer(ServerConfig(workdir=str(tiny.workdir), indexes=[tiny.name], port=0,
                                           reflection=flag)).start()
        try:
            if flag:
                assert "gradindex.v1.GradIndex" in list_services(srv.port)
            else:
                with pytest.raises(grpc.RpcError) as e:
                    list_services(srv.port)
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            srv.stop(0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_tls(tiny, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    srv = GradIndexServer(ServerConfig(workdir=str(tiny.workdir), indexes=[tiny.name], port=0,
                                       tls_cert=str(cert), tls_key=str(key), token=TOKEN)).start()
    try:
        with GradIndexClient(f"localhost:{srv.port}", token=TOKEN, tls_root_cert=str(cert)) as c:
            assert c.describe_index(tiny.name).count == tiny.count
        # A plaintext client cannot talk to it.
        with GradIndexClient(f"localhost:{srv.port}", token=TOKEN, timeout=2) as c:
            assert rpc_error(c.list_indexes)[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0)


def test_config_from_toml(tmp_path, monkeypatch):
    (tmp_path / "tok").write_text("from-file\n")
    p = tmp_path / "server.toml"
    p.write_text('workdir = "wd"\nindexes = ["a"]\nport = 0\ntoken_file = "tok"\nmax_k = 7\n'
                 '[tls]\ncert = "c.pem"\nkey = "k.pem"\n')
    cfg = ServerConfig.from_toml(p)
    assert cfg.workdir == str(tmp_path / "wd") and cfg.indexes == ["a"] and cfg.token == "from-file"
    assert cfg.max_k == 7 and cfg.tls_cert == str(tmp_path / "c.pem")
    p.write_text('prot = 1\n')
    with pytest.raises(ValueError, match="unknown key"):
        ServerConfig.from_toml(p)
    p.write_text('[tls]\ncert = "c.pem"\n')
    with pytest.raises(ValueError, match="both"):
        ServerConfig.from_toml(p)


def test_health_direct_stub_reports_not_serving_after_stop(tiny):
    srv = GradIndexServer(ServerConfig(workdir=str(tiny.workdir), indexes=[tiny.name], port=0)).start()
    ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    stub = health_pb2_grpc.HealthStub(ch)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    srv.health.enter_graceful_shutdown()
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    srv.stop(0)
    with pytest.raises(grpc.RpcError):
        stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
