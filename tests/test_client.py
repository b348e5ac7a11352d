"""The numpy client against a real server on 127.0.0.1 port 0 and a real 120-example index."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from indexer.demo import load_digits_28
from server.app import GradIndexServer
from server.client import GradIndexClient
from server.config import ServerConfig
from server.demo import ensure_digits_index


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("client")
    ensure_digits_index(wd, "digits", n=120, progress=False)
    srv = GradIndexServer(ServerConfig(workdir=str(wd), port=0, token="t", log_level="WARNING")).start()
    with GradIndexClient(f"127.0.0.1:{srv.port}", token="t") as c:
        yield c
    srv.stop(0)


def test_numpy_in_numpy_out(client):
    X, _ = load_digits_28()
    Xall, yall = load_digits_28(120)
    res = client.find_similar("digits", X[-3:].astype(np.float64), k=4, direction="both", include_data=True)
    for hits in (res.most, res.least):
        assert hits.scores.shape == hits.ids.shape == hits.labels.shape == (3, 4)
        assert hits.ids.dtype == np.int64 and hits.scores.dtype == np.float64
        assert hits.data.shape == (3, 4, 1, 28, 28) and hits.data.dtype == np.float32
        assert np.array_equal(hits.data, Xall[hits.ids])  # the stored examples themselves
        assert (hits.labels == yall[hits.ids]).all()
        assert (hits.external_ids == np.vectorize(lambda i: f"digit-{i:05d}")(hits.ids)).all()
    assert (np.diff(res.most.scores, axis=1) <= 0).all() and (np.diff(res.least.scores, axis=1) >= 0).all()
    assert res.most.scores[:, 0].min() > res.least.scores[:, 0].max()
    assert {"gradient", "search", "fetch"} <= set(res.server_timing)
    ex = client.get_examples("digits", [5, 0, 5], include_data=True)
    assert list(ex["ids"]) == [5, 0, 5] and np.array_equal(ex["data"], Xall[[5, 0, 5]])


def test_fewer_candidates_than_k_are_padded(client):
    _, yall = load_digits_28(120)
    n7 = int((yall == 7).sum())
    res = client.find_similar("digits", load_digits_28()[0][-1:], k=n7 + 3, labels=[7])
    assert (res.labels[0, :n7] == 7).all() and (res.ids[0, n7:] == -1).all() and np.isnan(res.scores[0, n7:]).all()


def test_errors_are_rpc_errors_with_codes(client):
    with pytest.raises(grpc.RpcError) as e:
        client.find_similar("digits", np.zeros((1, 28, 28), np.float32), k=1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expects (batch, 1, 28, 28)" in e.value.details()
    assert client.health() == "SERVING"
    assert [m.name for m in client.list_models()] == ["digits-cnn"]
    assert client.list_models()[0].indexes == ["digits"]
