"""Keras per-example gradients against a per-example GradientTape loop, and PyTorch/TensorFlow agreement."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

tf = pytest.importorskip("tensorflow")
from indexer.engine import make_engine  # noqa: E402

keras = tf.keras
L = keras.layers
F64 = "float64"


def _tape_loop(model, loss, X, Y) -> np.ndarray:
    rows = []
    for i in range(len(X)):
        with tf.GradientTape() as tape:
            lv = loss(Y[i:i + 1], model(X[i:i + 1], training=False))
        gs = tape.gradient(lv, model.trainable_weights)
        rows.append(np.concatenate([tf.convert_to_tensor(g).numpy().reshape(-1) for g in gs]))
    return np.stack(rows)


def _image_model(prelu: bool = True):
    keras.utils.set_random_seed(0)
    inp = L.Input((6, 6, 2), dtype=F64)
    h = L.Conv2D(3, 2, padding="same", activation="relu", dtype=F64)(inp)
    h = L.BatchNormalization(dtype=F64)(h)
    h = L.MaxPooling2D(2, dtype=F64)(h)
    h = L.Dropout(0.3, dtype=F64)(h)
    h = L.Flatten(dtype=F64)(h)
    h = L.Dense(5, activation="tanh", dtype=F64)(h)
    if prelu:
        h = L.PReLU(dtype=F64)(h)
    out = L.Dense(3, dtype=F64)(h)
    m = keras.Model(inp, out)
    bn = m.layers[2]
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 3))
    bn.moving_variance.assign(np.linspace(0.6, 1.8, 3))
    return m


def test_keras_per_example_gradients_equal_tape_loop():
    m = _image_model()
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(7, 6, 6, 2)), rng.integers(0, 3, 7)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)  # reduces by mean
    with pytest.warns(RuntimeWarning, match="no vectorized rule"):
        G = make_engine(m, loss, chunk_size=3).grads(X, Y, dtype=np.float64)
    ref = _tape_loop(m, loss, X, Y)
    np.testing.assert_allclose(G, ref, rtol=1e-6, atol=1e-12)
    assert np.abs(ref).max() > 0.1


def test_keras_embedding_indexed_slices_densified_and_no_fallback():
    keras.utils.set_random_seed(1)
    inp = L.Input((4,), dtype="int32")
    h = L.Embedding(9, 3, dtype=F64)(inp)
    h = L.Conv1D(2, 2, padding="causal", dtype=F64)(h)
    h = L.Flatten(dtype=F64)(h)
    out = L.Dense(2, dtype=F64)(h)
    m = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    X, Y = rng.integers(0, 9, size=(5, 4)).astype(np.int32), rng.integers(0, 2, 5)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        G = make_engine(m, loss).grads(X, Y, dtype=np.float64)
    np.testing.assert_allclose(G, _tape_loop(m, loss, X, Y), rtol=1e-6, atol=1e-12)


def test_keras_function_loss_regression_and_predicted_targets():
    keras.utils.set_random_seed(2)
    inp = L.Input((4,), dtype=F64)
    out = L.Dense(1, dtype=F64)(L.Dense(6, activation="relu", dtype=F64)(inp))
    m = keras.Model(inp, out)
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(6, 4)), rng.normal(size=(6, 1))
    eng = make_engine(m, keras.losses.MSE, task="regression")
    np.testing.assert_allclose(eng.grads(X, Y, dtype=np.float64), _tape_loop(m, keras.losses.MSE, X, Y),
                               rtol=1e-6, atol=1e-12)
    m2 = _image_model(prelu=False)
    Xi = rng.normal(size=(4, 6, 6, 2))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    pred = np.asarray(m2(Xi, training=False)).argmax(1)
    np.testing.assert_allclose(make_engine(m2, loss).grads(Xi, dtype=np.float64), _tape_loop(m2, loss, Xi, pred),
                               rtol=1e-6, atol=1e-12)


def test_pytorch_and_tensorflow_give_equal_gradients_for_the_same_weights():
    torch.manual_seed(0)
    tm = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    inp = L.Input((5, 5, 2), dtype=F64)
    h = L.Conv2D(3, 3, padding="same", activation="relu", dtype=F64)(inp)
    h = L.GlobalAveragePooling2D(dtype=F64)(h)
    h = L.Dense(4, activation="tanh", dtype=F64)(h)
    km = keras.Model(inp, L.Dense(3, dtype=F64)(h))
    conv, fc1, fc2 = tm[0], tm[4], tm[6]
    km.layers[1].set_weights([conv.weight.detach().numpy().transpose(2, 3, 1, 0), conv.bias.detach().numpy()])
    km.layers[3].set_weights([fc1.weight.detach().numpy().T, fc1.bias.detach().numpy()])
    km.layers[4].set_weights([fc2.weight.detach().numpy().T, fc2.bias.detach().numpy()])
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(6, 2, 5, 5)), rng.integers(0, 3, 6)
    Gt = make_engine(tm, nn.CrossEntropyLoss()).grads(X, Y, dtype=np.float64)
    Gk = make_engine(km, keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)).grads(
        X.transpose(0, 2, 3, 1), Y, dtype=np.float64)
    # Map Keras layouts back to torch's: conv (kh,kw,in,out) -> (out,in,kh,kw), dense (in,out) -> (out,in).
    n = len(X)
    ck, cb, d1k, d1b, d2k, d2b = np.split(Gk, np.cumsum([54, 3, 12, 4, 12])[:], axis=1)
    mapped = np.concatenate([
        ck.reshape(n, 3, 3, 2, 3).transpose(0, 4, 3, 1, 2).reshape(n, -1), cb,
        d1k.reshape(n, 3, 4).transpose(0, 2, 1).reshape(n, -1), d1b,
        d2k.reshape(n, 4, 3).transpose(0, 2, 1).reshape(n, -1), d2b], axis=1)
    np.testing.assert_allclose(mapped, Gt, rtol=1e-6, atol=1e-12)
