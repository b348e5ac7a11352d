"""ExplainAnchors end to end against a real server on 127.0.0.1 port 0, over a real index built by
the indexer for a registered tabular model whose rule is known by construction:

    class 1  iff  x2 > t  and  x5 == 0 ('a')

(a hand-weighted ``Linear -> Hardtanh(0, 1) -> Linear`` network, so the rule is exact, not learned).
The anchor must be exactly those two predicates, and its precision re-measured on fresh rows drawn
from the anchor must reach the threshold. Bad parameters get INVALID_ARGUMENT and the server keeps
answering."""

from __future__ import annotations

import textwrap

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format, struct_pb2

from indexer.build import build_index
from server.app import GradIndexServer
from server.client import GradIndexClient
from server.config import ServerConfig
from server.protos import service_pb2 as pb
from server.tensors import to_tensor
from test_build_support import write_config

N, D, CAT, RULE_COL = 400, 6, 5, 2
CATS = ["a", "b", "c"]

RULE_PY = textwrap.dedent('''
    from torch import nn

    def build_rule():
        """6 features -> 2 logits; weights come from rule.pt (set by the test)."""
        return nn.Sequential(nn.Linear(6, 2), nn.Hardtanh(0.0, 1.0), nn.Linear(2, 2))
''')


def _rule_weights(t: float) -> dict:
    """State dict of the rule net: h0 = clamp(1e4 (x2 - t)), h1 = clamp(1 - x5); logit1 - logit0 = h0 + h1 - 1.5."""
    w1 = torch.zeros(2, D)
    b1 = torch.zeros(2)
    w1[0, RULE_COL], b1[0] = 1e4, -1e4 * t
    w1[1, CAT], b1[1] = -1.0, 1.0
    w2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    b2 = torch.tensor([0.0, -1.5])
    return {"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2}


def _rule(X: np.ndarray, t: float) -> np.ndarray:
    """The rule in plain numpy: the independent reference for the model's labels."""
    return ((X[:, RULE_COL] > t) & (X[:, CAT] == 0)).astype(np.int64)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("anchors_srv")
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (N, D)).round(4)
    X[:, CAT] = rng.integers(0, len(CATS), N)
    t = float(np.percentile(X[:, RULE_COL], 50))  # the rule's cut is the median quantile border
    y = _rule(X, t)
    (tmp / "rule.py").write_text(RULE_PY)
    torch.save(_rule_weights(t), tmp / "rule.pt")
    np.savez(tmp / "rows.npz", X=X.astype(np.float32), y=y)
    model = ('[model]\nname = "rule"\nentry = "rule.py:build_rule"\nweights = "rule.pt"\n'
             'loss = "cross_entropy"\nclass_names = ["no", "yes"]\n')
    data = '[data]\nformat = "npz"\npath = "rows.npz"\nx = "X"\ny = "y"\n'
    cfg = write_config(tmp, name="rules", model=model, data=data, fname="rule.toml", chunk_size=200)
    build_index(cfg, tmp / "wd", progress=False)
    srv = GradIndexServer(ServerConfig(workdir=str(tmp / "wd"), port=0, log_level="WARNING")).start()
    client = GradIndexClient(f"127.0.0.1:{srv.port}", timeout=60)
    yield {"c": client, "X": X, "t": t}
    client.close()
    srv.stop(0)


def _request(X: np.ndarray, x: np.ndarray, model: str = "rule", cat: int = CAT, **params) -> pb.ExplainAnchorsRequest:
    p = struct_pb2.Struct()
    p.update({"train_data": X.tolist(), "categorical_names": {str(cat): CATS}, "seed": 0, **params})
    return pb.ExplainAnchorsRequest(model=model, kind="tabular", row=to_tensor(np.asarray(x, np.float32)), params=p)


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_tabular_anchor_is_the_models_rule(env):
    X, t, c = env["X"], env["t"], env["c"]
    x = X[(X[:, RULE_COL] > 0.8) & (X[:, CAT] == 0)][0]
    resp = c.stub.ExplainAnchors(_request(X, x), timeout=60)
    raw = json_format.MessageToDict(resp.raw)
    assert np.ravel(raw["prediction"])[0] == 1 and raw["success"]
    assert sorted(resp.anchor) == sorted([f"x{CAT} = a", f"x{RULE_COL} > {t:.2f}"])
    assert sorted(int(f) for f in raw["feature"]) == [RULE_COL, CAT]
    assert resp.precision >= 0.95
    # Coverage by hand: the fraction of training rows where both predicates hold (the anchor's operators).
    # The server estimates it on coverage_samples rows drawn from the training data, so allow sampling noise.
    true_cov = float(((X[:, RULE_COL] > t) & (X[:, CAT] == 0)).mean())
    assert abs(resp.coverage - true_cov) < 0.03
    # Precision re-measured independently: fresh rows satisfying the anchor (other features from the
    # training data, the anchored ones resampled inside their bins) are labelled by the numpy rule.
    rng = np.random.default_rng(1)
    fresh = X[rng.integers(0, N, 2000)].copy()
    fresh[:, CAT] = 0
    above = X[X[:, RULE_COL] > t, RULE_COL]
    fresh[:, RULE_COL] = above[rng.integers(0, len(above), 2000)]
    assert _rule(fresh, t).mean() >= 0.95 - 0.05


def test_bad_parameters_are_invalid_argument_and_the_server_keeps_answering(env):
    X, c = env["X"], env["c"]
    x = X[0]
    IA = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (_request(X, x, threshold=0.0), "threshold"),
        (_request(X, x, threshold=1.5), "threshold"),
        (pb.ExplainAnchorsRequest(model="rule", kind="text", text="not good",
                                  params=struct_pb2.Struct(fields={"sampling_strategy": struct_pb2.Value(
                                      string_value="nonsense")})), "sampling_strategy"),
        (_request(X, x[:-1]), "features"),                       # row shorter than train_data
        (_request(X[:, 1:], x[1:], cat=CAT - 1), "6 features"),  # consistent, but the model takes 6
        (_request(X, x, kind_typo=1), "unknown request keys"),
        (pb.ExplainAnchorsRequest(model="rule", image=to_tensor(np.zeros((8, 8), np.float32))), "not images"),
    ]
    for req, word in cases:
        code, msg = _code(lambda: c.stub.ExplainAnchors(req, timeout=30))
        assert code == IA, (word, code, msg)
        assert word in msg, msg
    code, msg = _code(lambda: c.stub.ExplainAnchors(_request(X, x, model="nope"), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and "rule" in msg
    # Still serving: a valid request right after the failures is answered.
    resp = c.stub.ExplainAnchors(_request(X, x, threshold=0.9), timeout=60)
    assert resp.precision >= 0.9 and np.ravel(json_format.MessageToDict(resp.raw)["prediction"])[0] == _rule(x[None], env["t"])[0]
