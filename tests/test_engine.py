"""Per-example gradients of the engine against an independent reference: autograd one example at a time."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from indexer.engine import make_engine


class TorchNet(nn.Module):
    """Embedding, Conv2d, BatchNorm (eval), LayerNorm, Dropout, Linear, and a PReLU (the fallback path)."""

    def __init__(self, prelu: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 3, padding_idx=0, sparse=True)  # sparse gradients in autograd
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(4 * 3 * 3 + 3 * 4, 8)
        self.ln = nn.LayerNorm(8)
        self.act = nn.PReLU() if prelu else nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = x[:, :36].reshape(-1, 1, 6, 6)
        tok = x[:, 36:].long()
        h = self.pool(torch.relu(self.bn(self.conv(img)))).flatten(1)
        e = self.emb(tok).flatten(1)
        h = self.act(self.ln(self.fc1(self.drop(torch.cat([h, e], 1)))))
        return self.fc2(h)


def _torch_data(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(size=(n, 36)), rng.integers(0, 11, size=(n, 4))], axis=1)
    return X, rng.integers(0, 3, size=n)


def _torch_loop(model: nn.Module, loss: nn.Module, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    model.eval()
    rows = []
    for i in range(len(X)):
        model.zero_grad()
        loss(model(torch.as_tensor(X[i:i + 1])), torch.as_tensor(Y[i:i + 1])).backward()
        grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in model.parameters() if p.requires_grad]
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


def _torch_model(prelu: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = TorchNet(prelu).double()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2.0)
    return m


def test_torch_per_example_gradients_equal_autograd_loop():
    m = _torch_model()
    X, Y = _torch_data()
    with pytest.warns(RuntimeWarning, match="no vectorized rule"):
        G = make_engine(m, nn.CrossEntropyLoss(), chunk_size=4).grads(X, Y, dtype=np.float64)
    ref = _torch_loop(m, nn.CrossEntropyLoss(), X, Y)
    np.testing.assert_allclose(G, ref, rtol=1e-6, atol=1e-12)
    assert np.abs(ref).max() > 0.1  # a real comparison, not of zeros


def test_torch_fallback_announced_once_and_hooks_alone_cover_common_layers():
    X, Y = _torch_data(9)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        make_engine(_torch_model(), nn.CrossEntropyLoss(), chunk_size=3).grads(X, Y)
    assert sum("no vectorized rule" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback for Embedding/Conv/BN/LN/Linear
        make_engine(_torch_model(prelu=False), nn.CrossEntropyLoss()).grads(X, Y)


def test_torch_mean_sum_and_none_reductions_give_the_same_per_example_gradients():
    m = _torch_model(prelu=False)
    X, Y = _torch_data()
    ref = _torch_loop(m, nn.CrossEntropyLoss(), X, Y)
    for red in ("mean", "sum", "none"):
        G = make_engine(m, nn.CrossEntropyLoss(reduction=red)).grads(X, Y, dtype=np.float64)
        np.testing.assert_allclose(G, ref, rtol=1e-6, atol=1e-12)


def test_torch_float32_model_with_float64_input_and_predicted_targets():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    X = np.random.default_rng(0).normal(size=(8, 5))  # float64 input, float32 model
    eng = make_engine(m, nn.CrossEntropyLoss())
    G = eng.grads(X)
    pred = m(torch.as_tensor(X, dtype=torch.float32)).argmax(1).numpy()
    ref = _torch_loop(m, nn.CrossEntropyLoss(), X.astype(np.float32), pred)
    assert G.dtype == np.float32
    np.testing.assert_allclose(G, ref, rtol=1e-4, atol=1e-6)


def test_torch_regression_and_parameter_selection_and_frozen():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    X = np.random.default_rng(0).normal(size=(5, 4))
    Y = np.random.default_rng(1).normal(size=(5, 1))
    eng = make_engine(m, nn.MSELoss(), task="regression", params=[r"^2\."])
    assert eng.param_names == ["2.weight", "2.bias"]
    G = eng.grads(X, Y, dtype=np.float64)
    full = _torch_loop(m, nn.MSELoss(), X, Y)
    np.testing.assert_allclose(G, full[:, -7:], rtol=1e-6)
    with pytest.raises(ValueError, match="regression"):
        eng.grads(X)
    m[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="1 frozen"):
        eng2 = make_engine(m, nn.MSELoss(), task="regression")
    assert "0.weight" not in eng2.param_names
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_engine(m, nn.MSELoss(), task="regression")
    with pytest.raises(ValueError, match="params"):
        make_engine(nn.Linear(2, 2), nn.MSELoss(), params=["nomatch"])


def test_bad_inputs_are_named():
    eng = make_engine(nn.Linear(3, 2), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="NaN"):
        eng.grads(np.array([[1.0, np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="lengths differ"):
        eng.grads(np.zeros((3, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="Unknown task"):
        make_engine(nn.Linear(3, 2), nn.CrossEntropyLoss(), task="ranking")
    with pytest.raises(ValueError, match="framework"):
        make_engine(nn.Linear(3, 2), nn.CrossEntropyLoss(), framework="jax")


def test_torch_conv1d_and_shared_layer_and_unsupervised():
    torch.manual_seed(3)

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3, padding="same")
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.conv(x)).transpose(1, 2)  # (n, L, 3)
            h = self.fc(torch.tanh(self.fc(h)))  # the same layer applied twice, at every position
            return (h ** 2).mean(dim=(1, 2))  # per-example "loss" of an unsupervised model

    m = Seq().double()
    X = np.random.default_rng(0).normal(size=(4, 2, 5))
    G = make_engine(m, None, task="unsupervised").grads(X, dtype=np.float64)
    ref = []
    for i in range(4):
        m.zero_grad()
        m(torch.as_tensor(X[i:i + 1])).sum().backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).numpy())
    np.testing.assert_allclose(G, np.stack(ref), rtol=1e-6, atol=1e-12)


def test_fingerprint_changes_with_weights():
    m = nn.Linear(3, 2)
    e = make_engine(m, nn.CrossEntropyLoss())
    f1 = e.fingerprint()
    assert f1 == make_engine(m, nn.CrossEntropyLoss()).fingerprint()
    with torch.no_grad():
        m.weight[0, 0] += 1e-3
    assert e.fingerprint() != f1


def test_layer_objects_select_parameters_and_unused_layers_get_zero_gradients():
    torch.manual_seed(4)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.unused = nn.Linear(4, 4)  # trainable, never called: its gradient is exactly zero
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    m = Branchy().double()
    X, Y = np.random.default_rng(0).normal(size=(5, 3)), np.array([0, 1, 0, 1, 1])
    eng = make_engine(m, nn.CrossEntropyLoss(), params=[m.b])
    assert eng.param_names == ["b.weight", "b.bias"]
    full = make_engine(m, nn.CrossEntropyLoss())
    for _ in range(2):  # a reused buffer must not leak the previous chunk into the unused columns
        for _, rows in full.iter_grads(X, Y, chunk_size=2, reuse_buffer=True, dtype=np.float64):
            off = full.offsets()["unused.weight"]
            assert np.all(rows[:, off:off + 20] == 0)
    G = full.grads(X, Y, dtype=np.float64)
    m.eval()
    ref = []
    for i in range(5):
        m.zero_grad()
        nn.CrossEntropyLoss()(m(torch.as_tensor(X[i:i + 1])), torch.as_tensor(Y[i:i + 1])).backward()
        ref.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                              for p in m.parameters()]).numpy())
    np.testing.assert_allclose(G, np.stack(ref), rtol=1e-6, atol=1e-12)
    with pytest.raises(TypeError, match="regex strings or layers"):
        make_engine(m, nn.CrossEntropyLoss(), params=[nn.Linear(1, 1)])
