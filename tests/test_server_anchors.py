"""ExplainAnchors end to end against a real server on 127.0.0.1 port 0, over real indexes built by
the indexer for three registered models:

* a tabular model whose rule is known by construction: class 1 iff x2 > t and x5 == 0 ('a') (a
  hand-weighted ``Linear -> Hardtanh(0, 1) -> Linear`` network, so the rule is exact, not
  learned). The anchor must be exactly those two predicates, and its precision re-measured on
  fresh rows drawn from the anchor must reach the threshold;
* a JSONL text model with its own ``preprocess`` (a hashed bag of words) and hand-set weights:
  class 1 iff 'not' and 'good' both occur;
* the tiny 8x8 digits CNN (PyTorch, channel-first).

For each modality the served anchor equals the one the in-process explainer finds for the same seed
with the same model loaded directly (torch, the model's own preprocess function). Bad parameters
get INVALID_ARGUMENT and the server keeps answering."""

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
from test_build_support import MODEL_PY, digits8, load_tiny, write_config

N, D, CAT, RULE_COL = 400, 6, 5, 2
CATS = ["a", "b", "c"]
TEXT = "this film is not good"

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
    # the tiny digits CNN (write_config wrote model.py, weights.pt and digits.npz above)
    build_index(write_config(tmp, name="digits8", fname="img.toml", chunk_size=100), tmp / "wd", progress=False)
    # a JSONL text model: hashed bag of words (model.py's preprocess) -> Linear(16, 2), logit1 = 2 not + 2 good - 3
    ns: dict = {}
    exec(MODEL_PY, ns)
    pre = ns["preprocess"]
    w = torch.zeros(2, 16)
    for word in ("not", "good"):
        w[1, int(np.argmax(pre([word])[0]))] = 2.0
    torch.save({"0.weight": w, "0.bias": torch.tensor([0.0, -3.0])}, tmp / "text.pt")
    lines = [f'{{"text": "{s}", "label": "{lab}"}}' for s, lab in
             [("not good", "pos"), ("good film", "neg"), ("this is not it", "neg"), ("not good at all", "pos")] * 3]
    (tmp / "t.jsonl").write_text("\n".join(lines) + "\n")
    model = ('[model]\nname = "txt"\nentry = "model.py:build_text"\nweights = "text.pt"\n'
             'class_names = ["neg", "pos"]\n')
    build_index(write_config(tmp, name="texts", model=model, fname="txt.toml",
                             data='[data]\npath = "t.jsonl"\npreprocess = "model.py:preprocess"\n'),
                tmp / "wd", progress=False)
    srv = GradIndexServer(ServerConfig(workdir=str(tmp / "wd"), port=0, log_level="WARNING")).start()
    client = GradIndexClient(f"127.0.0.1:{srv.port}", timeout=60)
    yield {"c": client, "X": X, "t": t, "tmp": tmp, "preprocess": pre}
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
        (pb.ExplainAnchorsRequest(model="txt", kind="text", text="not good",
                                  params=struct_pb2.Struct(fields={"sampling_strategy": struct_pb2.Value(
                                      string_value="nonsense")})), "sampling_strategy"),
        (pb.ExplainAnchorsRequest(model="rule", text="not good"), "not text"),  # a tabular model gets text
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


# ---- served == in-process, per modality ------------------------------------------------------------
def _torch_labels(model: torch.nn.Module):
    def predict(X) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(X, np.float32))).argmax(-1).numpy()
    return predict


def _same(resp, raw: dict, exp) -> None:
    """The served reply carries the in-process explanation: anchor, precision, coverage, trace, examples."""
    assert resp.precision == exp.precision and resp.coverage == exp.coverage
    assert raw["feature"] == [int(f) for f in exp.raw["feature"]]
    assert raw["num_preds"] == exp.raw["num_preds"] and raw["success"] == exp.raw["success"]
    assert raw["precision"] == list(exp.raw["precision"]) and raw["coverage"] == list(exp.raw["coverage"])
    for got, want in zip(raw["examples"], exp.raw["examples"]):
        for key in ("covered_true", "covered_false"):
            w = np.asarray(want[key])
            if w.dtype.kind in "USO":
                assert got[key] == w.tolist()
            else:
                np.testing.assert_allclose(np.asarray(got[key], dtype=float).reshape(w.shape), w)


def test_served_tabular_equals_in_process(env):
    from explainers.anchors import AnchorTabular

    X, c, tmp = env["X"], env["c"], env["tmp"]
    x = X[(X[:, RULE_COL] > 0.7) & (X[:, CAT] == 0)][1]
    resp = c.stub.ExplainAnchors(_request(X, x, seed=4), timeout=60)
    net = __import__("torch").nn.Sequential(torch.nn.Linear(6, 2), torch.nn.Hardtanh(0.0, 1.0), torch.nn.Linear(2, 2))
    net.load_state_dict(torch.load(tmp / "rule.pt", weights_only=True))
    ex = AnchorTabular(_torch_labels(net.eval()), [f"x{i}" for i in range(D)], categorical_names={CAT: CATS}).fit(X)
    exp = ex.explain(x, seed=4)
    assert list(resp.anchor) == exp.anchor
    _same(resp, json_format.MessageToDict(resp.raw), exp)
    meta = json_format.MessageToDict(resp.meta)
    assert meta["name"] == "AnchorTabular" and meta["params"]["seed"] == 4


def test_served_text_goes_through_the_models_preprocess_and_equals_in_process(env):
    import spacy

    from explainers.anchors import AnchorText

    c, tmp, pre = env["c"], env["tmp"], env["preprocess"]
    p = struct_pb2.Struct()
    p.update({"seed": 2})
    resp = c.stub.ExplainAnchors(pb.ExplainAnchorsRequest(model="txt", text=TEXT, params=p), timeout=60)
    model = load_tiny(tmp, "build_text", "text.pt")
    ex = AnchorText(lambda texts: _torch_labels(model)(pre(list(texts))), "unknown", nlp=spacy.blank("en"))
    exp = ex.explain(TEXT, seed=2)
    assert sorted(resp.anchor) == ["good", "not"] == sorted(exp.anchor)  # the hand-set weights' rule
    assert list(resp.anchor) == exp.anchor
    raw = json_format.MessageToDict(resp.raw)
    _same(resp, raw, exp)
    assert raw["positions"] == exp.raw["positions"] and raw["instance"] == TEXT
    assert json_format.MessageToDict(resp.meta)["name"] == "AnchorText"


def test_served_image_answers_masked_image_and_segments_equal_in_process(env):
    from explainers.anchors import AnchorImage
    from server.tensors import from_tensor

    c, tmp = env["c"], env["tmp"]
    cnn = load_tiny(tmp)
    X8, _ = digits8(40)
    r, col = np.indices((8, 8))
    grid = (r // 2) * 4 + col // 2

    def labels_hwc(images):  # anchors hand over channel-last batches; the CNN takes (n, 1, 8, 8)
        return _torch_labels(cnn)(np.moveaxis(np.asarray(images, np.float32), -1, 1))

    ex = AnchorImage(labels_hwc, (8, 8, 1), segmentation_fn=lambda im: grid)
    # a digit whose anchor is not empty (the random-init CNN keeps its label on some perturbations only)
    for img in X8[:, 0]:
        exp = ex.explain(img[..., None], seed=1, segments=grid, coverage_samples=2000)
        if exp.raw["feature"]:
            break
    assert exp.raw["feature"], "no digit with a non-empty anchor among 40"
    p = struct_pb2.Struct()
    p.update({"seed": 1, "segments": grid.tolist(), "coverage_samples": 2000})
    resp = c.stub.ExplainAnchors(pb.ExplainAnchorsRequest(model="tiny", image=to_tensor(img.astype(np.float32)),
                                                          params=p), timeout=60)
    assert [int(a) for a in resp.anchor] == [int(f) for f in exp.raw["feature"]]
    _same(resp, json_format.MessageToDict(resp.raw), exp)
    np.testing.assert_array_equal(from_tensor(resp.anchor_image, "anchor_image"), exp.anchor)  # alibi's data.anchor
    np.testing.assert_array_equal(from_tensor(resp.segments, "segments"), exp.segments)
    # the masked image shows exactly the anchor's superpixels
    shown = np.isin(grid, exp.raw["feature"])
    assert np.all(from_tensor(resp.anchor_image, "anchor_image")[~shown] == 0)
