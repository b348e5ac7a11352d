"""The engine never uses a vectorized rule it has not proven: planted failures are caught, results stay exact.

Each model plants one way a layer-hook rule goes wrong (a broadcast input whose leading axis merely
looks like the batch, a weight tied between a layer and a use no rule covers, a functional use that
bypasses the layer), in a place where no exact rule applies. The engine must notice (structural check
or numeric guard), send the parameter to the exact generic path with one warning naming it, record
that in ``engine.rules``, and still return the per-example loop's gradients.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from indexer.engine import make_engine
from indexer.engine.pytorch import TorchEngine
from tests.test_engine_zoo import reference_loop

B = 4


class BroadcastTable(nn.Module):
    """A learned (B, D) table run through a Linear and broadcast over the batch: its leading axis has
    the batch's length by coincidence, so the batch-axis check passes; only the numeric guard can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(B, 5))
        self.proj = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.proj(self.table).sum(0)  # (5,), shared by every example
        return self.head(torch.tanh(x + ctx))


class TiedOutsideRule(nn.Module):
    """fc.weight is used by nn.Linear and again through a matmul that no rule covers (a tied weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        h = torch.tanh(h @ self.fc.weight)  # second, tied use outside the Linear
        return self.head(h)


class BypassedLayer(nn.Module):
    """A layer whose weight is applied with torch.addmm instead of calling it (as nn.MultiheadAttention
    does with out_proj): the layer's rule never sees the use."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(torch.addmm(self.proj.bias, x, self.proj.weight.t())))


CASES = {
    "broadcast input": (BroadcastTable, ["proj.weight", "proj.bias"]),
    "tied weight": (TiedOutsideRule, ["fc.weight"]),
    "functional use": (BypassedLayer, ["proj.weight", "proj.bias"]),
}


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2 * B, 5)), rng.integers(0, 2, size=2 * B)


def _check_exact(eng: TorchEngine, model: nn.Module, X: np.ndarray, Y: np.ndarray, G: np.ndarray) -> None:
    ref = reference_loop(model, nn.CrossEntropyLoss(), X, Y)
    offs = eng.offsets()
    for n, size in zip(eng.param_names, eng.param_sizes):
        np.testing.assert_allclose(G[:, offs[n]:offs[n] + size], ref[n], rtol=1e-7, atol=1e-10 * np.abs(ref[n]).max(),
                                   err_msg=n)


@pytest.mark.parametrize("case", list(CASES))
def test_planted_failure_is_caught_named_once_and_results_stay_exact(case: str):
    klass, culprits = CASES[case]
    torch.manual_seed(0)
    model = klass().double()
    X, Y = _data()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        eng = make_engine(model, nn.CrossEntropyLoss(), chunk_size=B)
        G = eng.grads(X, Y, dtype=np.float64)  # two chunks: the first is checked
    msgs = [str(w.message) for w in rec if "generic path" in str(w.message)]
    assert len(msgs) == 1, msgs
    for n in culprits:
        assert n in msgs[0]
        assert eng.rules[n] in ("vmap", "loop")
    assert eng.rules["head.weight"] == "linear"  # untouched layers keep their rule
    _check_exact(eng, model, X, Y, G)


@pytest.mark.parametrize("case", ["tied weight", "functional use"])
def test_numeric_guard_alone_catches_what_the_structural_check_would(case: str, monkeypatch):
    """With the autograd-graph check switched off, the weighted-sum guard still catches the failure."""
    monkeypatch.setattr(TorchEngine, "_structural", lambda self, L, cap, hooked: {})
    klass, culprits = CASES[case]
    torch.manual_seed(0)
    model = klass().double()
    X, Y = _data(1)
    with pytest.warns(RuntimeWarning, match="numeric check failed"):
        eng = make_engine(model, nn.CrossEntropyLoss(), chunk_size=B)
        G = eng.grads(X, Y, dtype=np.float64)
    for n in culprits:
        assert eng.rules[n] in ("vmap", "loop")
    _check_exact(eng, model, X, Y, G)


def test_without_the_guard_the_planted_failures_would_be_wrong(monkeypatch):
    """The planted models really break a naive hook engine (so the tests above can fail)."""
    monkeypatch.setattr(TorchEngine, "_structural", lambda self, L, cap, hooked: {})
    monkeypatch.setattr(TorchEngine, "_numeric_guard", lambda self, *a: {})
    for klass, culprits in CASES.values():
        torch.manual_seed(0)
        model = klass().double()
        X, Y = _data()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eng = make_engine(model, nn.CrossEntropyLoss(), chunk_size=B)
            G = eng.grads(X, Y, dtype=np.float64)
        ref = reference_loop(model, nn.CrossEntropyLoss(), X, Y)
        n = culprits[0]
        off = eng.offsets()[n]
        err = np.abs(G[:, off:off + ref[n].shape[1]] - ref[n]).max() / np.abs(ref[n]).max()
        assert err > 1e-2, (klass.__name__, err)


def test_guard_waits_for_a_chunk_of_two_and_reruns_after_reset():
    torch.manual_seed(0)
    model = TiedOutsideRule().double()
    X, Y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = make_engine(model, nn.CrossEntropyLoss(), chunk_size=1)
        eng.grads(X[:1], Y[:1])
        assert not eng.verified  # one example proves nothing about the batch axis
        eng.grads(X, Y, chunk_size=3)
        assert eng.verified
        eng.reset_guard()
        assert not eng.verified


def test_rules_of_a_plain_model_and_no_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Flatten(), nn.Linear(12, 2)).double()
    X = np.random.default_rng(0).integers(0, 10, size=(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng = make_engine(model, nn.CrossEntropyLoss())
        G = eng.grads(X, np.array([0, 1, 0, 1, 1]), dtype=np.float64)
    assert eng.rules == {"0.weight": "embedding", "1.weight": "norm", "1.bias": "norm", "3.weight": "linear",
                         "3.bias": "linear"}
    _check_exact(eng, model, X, np.array([0, 1, 0, 1, 1]), G)


def test_only_an_unused_layer_selected_gives_zero_rows_and_other_threads_are_not_captured():
    import threading

    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    m = M().double()
    X = np.random.default_rng(0).normal(size=(5, 3))
    eng = make_engine(m, nn.CrossEntropyLoss(), params=[m.unused])
    G = eng.grads(X, np.array([0, 1, 0, 1, 1]), dtype=np.float64)
    assert G.shape == (5, 12) and not G.any()
    # a plain forward of the same model in another thread while the engine captures is left alone
    eng2 = make_engine(m, nn.CrossEntropyLoss())
    stop = threading.Event()

    def other():
        while not stop.is_set():
            with torch.no_grad():
                m(torch.zeros(7, 3, dtype=torch.float64))

    t = threading.Thread(target=other)
    t.start()
    try:
        G2 = eng2.grads(X, np.array([0, 1, 0, 1, 1]), dtype=np.float64)
    finally:
        stop.set()
        t.join()
    ref = reference_loop(m, nn.CrossEntropyLoss(), X, np.array([0, 1, 0, 1, 1]))
    np.testing.assert_allclose(G2[:, :8], np.concatenate([ref["used.weight"], ref["used.bias"]], 1), rtol=1e-9)
