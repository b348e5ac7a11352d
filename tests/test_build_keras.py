"""A saved Keras model (.keras) as the config's model: the index equals a per-example GradientTape loop."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from indexer.build import build_index  # noqa: E402
from indexer.query import open_index  # noqa: E402


def test_keras_model_file_build_matches_tape_loop(tmp_path):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(shape=(6,))
    h = tf.keras.layers.Dense(5, activation="tanh")(inp)
    out = tf.keras.layers.Dense(3)(h)
    model = tf.keras.Model(inp, out)
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    (tmp_path / "k.toml").write_text(textwrap.dedent('''
        [model]
        name = "keras-mlp"
        framework = "tensorflow"
        keras_model = "m.keras"
        loss = "cross_entropy"
        [data]
        path = "d.npz"
        [index]
        name = "k"
        kernel = "grad_dot"
        [build]
        chunk_size = 16
        threads = 1
        '''))
    build_index(tmp_path / "k.toml", tmp_path / "wd", progress=False)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ref = []
    for i in range(len(X)):
        with tf.GradientTape() as tape:
            lv = loss(y[i:i + 1], model(X[i:i + 1], training=False))
        ref.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(lv, model.trainable_variables)]))
    idx = open_index(tmp_path / "wd", "k")
    V, _ = idx.vectors()
    np.testing.assert_allclose(V, np.stack(ref), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(idx.embed(X[:3], y[:3]), V[:3], rtol=1e-5, atol=1e-7)
