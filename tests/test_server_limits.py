"""One owner per limit, and status codes by exception class, against a real gRPC server on 127.0.0.1.

- The server's ``max_k`` is the only k limit a client meets: an index of 10,050 examples served
  with ``max_k = 20,000`` answers k = 10,050 (the in-process default limit of 10,000 does not
  refuse it deep in the query path).
- A builtin TypeError raised by a bug reaches the client as INTERNAL with a one-line message and no
  traceback (the traceback goes to the server log); errors raised on purpose keep their codes.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import numpy as np
import pytest

from indexer.build import build_index
from indexer.defaults import MAX_K
from indexer.errors import ConfigError, FailedPrecondition, ModelMismatch, NotFound, ResourceExhausted
from indexer.query import open_index
from server.app import GradIndexServer
from server.client import GradIndexClient
from server.config import ServerConfig
from server.observability import LOGGER_NAME, Metrics
from server.protos import service_pb2 as pb
from server.protos import service_pb2_grpc as pb_grpc
from server.registry import NotServed
from server.rpc import RpcError, rpc, status_for
from test_build_support import digits8, write_config

N = MAX_K + 50


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A flat grad_dot index of N > MAX_K noisy copies of the 8x8 digits (last layer only, so the build takes seconds)."""
    tmp = tmp_path_factory.mktemp("big")
    X, y = digits8(1797)
    reps = -(-N // len(X))
    rng = np.random.default_rng(0)
    Xb = (np.tile(X, (reps, 1, 1, 1))[:N] + rng.normal(0, 0.02, (N, 1, 8, 8))).astype(np.float32)
    yb = np.tile(y, reps)[:N]
    np.savez(tmp / "digits.npz", X=Xb, y=yb, ids=np.asarray([f"ex{i}" for i in range(N)]))
    cfg = write_config(tmp, n=N, chunk_size=2048, extra_model='params = ["^3\\\\."]')
    build_index(cfg, tmp / "wd", progress=False)
    return tmp / "wd", Xb


def test_server_max_k_above_the_in_process_default_is_honoured(big):
    wd, X = big
    idx = open_index(wd, "tiny")
    with pytest.raises(ResourceExhausted, match=str(MAX_K)):  # the in-process default still applies in-process
        idx.find_similar(X[:1], k=N)
    idx.close()
    srv = GradIndexServer(ServerConfig(workdir=str(wd), indexes=["tiny"], port=0, max_k=2 * MAX_K,
                                       log_level="WARNING")).start()
    try:
        with GradIndexClient(f"127.0.0.1:{srv.port}", timeout=120) as c:
            res = c.find_similar("tiny", X[:1], k=N)
            assert res.ids.shape == (1, N) and sorted(res.ids[0].tolist()) == list(range(N))
            assert np.all(np.diff(res.scores[0]) <= 0)
            ref = open_index(wd, "tiny")
            want = ref.find_similar(X[:1], res.targets[:1], k=5)
            ref.close()
            np.testing.assert_array_equal(res.ids[0, :5], want.ids[0])
    finally:
        srv.stop(0)


def test_status_codes_by_exception_class():
    SC = grpc.StatusCode
    assert status_for(NotFound("x")) == SC.NOT_FOUND and status_for(NotServed("x")) == SC.NOT_FOUND
    assert status_for(ConfigError("data.x", "bad")) == SC.INVALID_ARGUMENT
    assert status_for(ModelMismatch("x")) == SC.FAILED_PRECONDITION
    assert status_for(FailedPrecondition("x")) == SC.FAILED_PRECONDITION
    assert status_for(ResourceExhausted("x")) == SC.RESOURCE_EXHAUSTED
    assert status_for(ValueError("x")) == SC.INVALID_ARGUMENT
    assert status_for(RpcError(SC.UNAVAILABLE, "x")) == SC.UNAVAILABLE
    assert status_for(TypeError("x")) == SC.INTERNAL
    assert status_for(KeyError("x")) == SC.INTERNAL

    class NotFound2(Exception):  # a foreign class that merely shares a name maps to nothing
        pass

    NotFound2.__name__ = "NotFound"
    assert status_for(NotFound2("x")) == SC.INTERNAL


class _Buggy(pb_grpc.GradIndexServicer):
    """A servicer whose ListModels has a bug (a builtin TypeError) and whose ListIndexes refuses on purpose."""

    metrics = Metrics()

    @rpc
    def ListModels(self, request, context):
        return len(None)  # TypeError: object of type 'NoneType' has no len()

    @rpc
    def ListIndexes(self, request, context):
        raise ValueError("model must name a served model")


def test_a_bug_is_internal_without_traceback_and_logged(caplog):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GradIndexServicer_to_server(_Buggy(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, caplog.at_level(logging.INFO, logger=LOGGER_NAME):
            stub = pb_grpc.GradIndexStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert "TypeError" in e.value.details() and "Traceback" not in e.value.details()
            assert "NoneType" not in e.value.details()  # the bug's own message stays in the log
            with pytest.raises(grpc.RpcError) as e:
                stub.ListIndexes(pb.ListIndexesRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "served model" in e.value.details()
        failed = [r for r in caplog.records if r.getMessage() == "rpc failed"]
        assert failed and failed[0].exc_info is not None and failed[0].exc_info[0] is TypeError
    finally:
        server.stop(0)
