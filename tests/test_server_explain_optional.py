"""The explainer RPCs on a server without the explainer packages: UNIMPLEMENTED naming what is
missing, before the request or the index is looked at (the packages are imported on first use)."""

from __future__ import annotations

import sys

import grpc
import pytest

from server import explain
from server.protos import service_pb2 as pb
from server.rpc import RpcError


@pytest.mark.parametrize("module, call, request_, what", [
    ("explainers.anchors.serve", explain.anchors, pb.ExplainAnchorsRequest(), "anchors are not installed"),
    ("explainers.bilrp", explain.pair, pb.ExplainPairRequest(), "BiLRP is not installed"),
])
def test_a_missing_explainer_is_unimplemented(monkeypatch, module, call, request_, what):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError, as if not installed
    with pytest.raises(RpcError, match=f"{what} on this server") as e:
        call(None, request_)
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert module in str(e.value)  # the ImportError says which module
