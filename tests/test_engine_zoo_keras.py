"""Keras conformance zoo: every trainable weight vs a float64 per-example GradientTape loop.

Runs in the suite's own process, with torch imported (conftest) and TensorFlow's default oneDNN
setting: the generic path must not be able to take the process down on attention models (it used
``tf.vectorized_map``, which aborted the process here).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import torch  # noqa: E402,F401  (imported on purpose: the crash reproduced with torch loaded)

from indexer.engine import make_engine  # noqa: E402
from indexer.engine.losses import keras_causal_lm_loss  # noqa: E402
from tests.test_engine_zoo import TOL, ZOO_REPORT  # noqa: E402

keras = tf.keras
L = keras.layers
F64 = "float64"
T, V, D = 6, 30, 8


class TokenAndPosition(L.Layer):
    """Token embedding plus a learned position embedding of positions 0..T-1 (no batch axis)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.tok = L.Embedding(V, D, dtype=F64)
        self.pos = L.Embedding(T, D, dtype=F64)

    def call(self, ids: Any) -> Any:
        positions = tf.range(tf.shape(ids)[-1])
        return self.tok(ids) + self.pos(positions)


def _encoder(extra_gru: bool = False) -> Any:
    """Token+position embedding, MultiHeadAttention (padding mask), LayerNormalization, pooled Dense head."""
    keras.utils.set_random_seed(0)
    ids = L.Input((T,), dtype="int32")
    h = TokenAndPosition(dtype=F64)(ids)
    att = PaddingMHA(dtype=F64)([h, ids])
    h = L.LayerNormalization(dtype=F64)(h + att)
    if extra_gru:
        h = L.GRU(5, return_sequences=True, dtype=F64)(h)
    h = L.GlobalAveragePooling1D(dtype=F64)(h)
    return keras.Model(ids, L.Dense(3, dtype=F64)(h))


class PaddingMHA(L.Layer):
    """Self-attention whose padded keys (id 0) are masked out."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.mha = L.MultiHeadAttention(num_heads=2, key_dim=4, dtype=F64)

    def call(self, inputs: Any) -> Any:
        h, ids = inputs
        keep = tf.not_equal(ids, 0)
        return self.mha(h, h, attention_mask=keep[:, None, :])


class TinyLM(keras.Model):
    """Subclassed causal LM: embeddings, causal self-attention, LayerNorm, a learned offset, vocab head."""

    def __init__(self) -> None:
        super().__init__(dtype=F64)
        self.emb = TokenAndPosition(dtype=F64)
        self.mha = L.MultiHeadAttention(num_heads=2, key_dim=4, dtype=F64)
        self.ln = L.LayerNormalization(dtype=F64)
        self.offset = self.add_weight(shape=(D,), initializer="random_normal", name="offset", dtype=F64)
        self.head = L.Dense(V, dtype=F64)

    def call(self, ids: Any, training: bool = False) -> Any:
        h = self.emb(ids)
        h = self.ln(h + self.mha(h, h, use_causal_mask=True))
        return self.head(h + self.offset)


def _twice() -> Any:
    keras.utils.set_random_seed(2)
    inp = L.Input((5,), dtype=F64)
    shared = L.Dense(5, activation="tanh", dtype=F64)
    return keras.Model(inp, L.Dense(2, dtype=F64)(shared(shared(inp))))


def _conv1d() -> Any:
    keras.utils.set_random_seed(3)
    ids = L.Input((T,), dtype="int32")
    h = L.Embedding(V, D, dtype=F64)(ids)
    h = L.Conv1D(4, 3, padding="same", activation="relu", dtype=F64)(h)
    return keras.Model(ids, L.Dense(2, dtype=F64)(L.GlobalMaxPooling1D(dtype=F64)(h)))


def _ids(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.integers(1, V, size=(n, T)).astype(np.int32)
    for i, length in enumerate(rng.integers(3, T + 1, size=n)):
        X[i, length:] = 0
    X[0] = rng.integers(1, V, size=T)
    return X


def _tape_loop(model: Any, loss: Callable, X: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
    ws = model.trainable_weights
    rows: dict[str, list[np.ndarray]] = {w.path: [] for w in ws}
    for i in range(len(X)):
        with tf.GradientTape() as tape:
            lv = tf.reduce_sum(loss(Y[i:i + 1], model(X[i:i + 1], training=False)))
        for w, g in zip(ws, tape.gradient(lv, ws, unconnected_gradients=tf.UnconnectedGradients.ZERO)):
            rows[w.path].append(np.asarray(tf.convert_to_tensor(g)).reshape(-1))
    return {k: np.stack(v) for k, v in rows.items()}


SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)

ZOO: dict[str, Callable[[], tuple[Any, Any, np.ndarray, np.ndarray, dict[str, str]]]] = {
    "Keras token+position Embedding, MultiHeadAttention, LayerNormalization (padded)": lambda: (
        _encoder(), SCCE, _ids(5, 0), np.array([0, 1, 2, 1, 0]),
        {"embedding_1": "embedding", "query": "einsum_dense", "attention_output": "einsum_dense",
         "layer_normalization": "layernorm"}),
    "Keras attention + GRU (GRU on the generic path, oneDNN on)": lambda: (
        _encoder(extra_gru=True), SCCE, _ids(4, 1), np.array([0, 1, 2, 1]), {"gru": "tape_loop"}),
    "Keras subclassed causal LM (learned offset, padded)": lambda: (
        TinyLM(), keras_causal_lm_loss("mean"), _ids(4, 2), None, {"offset": "tape_loop", "dense": "dense"}),
    "Keras layer called twice": lambda: (_twice(), SCCE, np.random.default_rng(5).normal(size=(5, 5)),
                                         np.array([0, 1, 1, 0, 1]), {"kernel": "dense"}),
    "Keras Conv1D text CNN": lambda: (_conv1d(), SCCE, _ids(4, 3), np.array([0, 1, 1, 0]),
                                      {"conv1d": "conv"}),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_keras_zoo(name: str):
    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"  # oneDNN as TensorFlow ships it
    model, loss, X, Y, expect = ZOO[name]()
    if Y is None:  # causal LM: the labels are the ids, padding ignored
        Y = np.where(X == 0, -100, X)
    model(X[:1])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        eng = make_engine(model, loss, chunk_size=3)
        G = eng.grads(X, Y, dtype=np.float64)
    ref = _tape_loop(model, loss, X, Y)
    offs = eng.offsets()
    floor = 1e-3 * max(np.abs(r).max() for r in ref.values())
    errs = {}
    for n, size in zip(eng.param_names, eng.param_sizes):
        errs[n] = float(np.abs(G[:, offs[n]:offs[n] + size] - ref[n]).max() / max(np.abs(ref[n]).max(), floor))
    rules = eng.rules
    msgs = [str(w.message) for w in rec if "generic path" in str(w.message)]
    ZOO_REPORT[name] = {"rules": rules, "errors": errs, "warnings": msgs}
    worst = max(errs, key=errs.get)
    assert eng.verified
    assert errs[worst] <= TOL, f"{name}: {worst} off by {errs[worst]:.3g} (rule {rules[worst]})"
    for frag, rule in expect.items():
        hits = [n for n in rules if frag in n]
        assert hits and all(rules[n] == rule for n in hits), (frag, {n: rules[n] for n in hits})
    generic = [n for n, r in rules.items() if r == "tape_loop"]
    assert (len(msgs) == 1 and all(n in msgs[0] for n in generic)) if generic else not msgs


class TiedKeras(keras.Model):
    """A Dense kernel also used through a matmul outside the layer (a tied weight no rule covers)."""

    def __init__(self) -> None:
        super().__init__(dtype=F64)
        self.fc = L.Dense(5, dtype=F64)
        self.head = L.Dense(2, dtype=F64)

    def call(self, x: Any, training: bool = False) -> Any:
        h = tf.tanh(self.fc(x))
        return self.head(tf.tanh(tf.matmul(h, self.fc.kernel)))


def test_keras_guard_catches_a_tied_weight_and_stays_exact():
    keras.utils.set_random_seed(7)
    model = TiedKeras()
    X, Y = np.random.default_rng(7).normal(size=(6, 5)), np.array([0, 1, 1, 0, 1, 0])
    model(X[:1])
    with pytest.warns(RuntimeWarning, match="numeric check failed") as rec:
        eng = make_engine(model, SCCE, chunk_size=3)
        G = eng.grads(X, Y, dtype=np.float64)
    assert sum("generic path" in str(w.message) for w in rec) == 1
    kernel = model.fc.kernel.path
    assert eng.rules[kernel] == "tape_loop" and eng.rules[model.head.kernel.path] == "dense"
    ref = _tape_loop(model, SCCE, X, Y)
    offs = eng.offsets()
    for n, size in zip(eng.param_names, eng.param_sizes):
        np.testing.assert_allclose(G[:, offs[n]:offs[n] + size], ref[n], rtol=1e-7, atol=1e-12, err_msg=n)
