"""The shipped demo: scikit-learn's digits upsampled to 28x28 and the seed notebook's CNN.

Everything that needs a small real image classifier (the ``gradindex demo`` command, tests, benchmarks) takes it
from here, so that all of them measure the same model on the same data. Nothing is downloaded:
the digits ship with scikit-learn and the CNN is trained on the spot in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_digits_28(n: int | None = None, seed: int = 0, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return digits as float32 images of shape (n, 1, 28, 28) in [0, 1] and int64 labels.

    With ``n`` larger than the 1,797 shipped digits, the extra examples are seeded random
    shifts (up to 2 pixels) plus small noise of the originals, so benchmarks can run at 20,000
    examples with the structure of real images rather than isotropic noise.
    """
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    d = load_digits()
    base = d.images.astype(np.float32) / 16.0  # (1797, 8, 8)
    up = zoom(base, (1, 3.5, 3.5), order=1).astype(np.float32)  # (1797, 28, 28)
    up = np.clip(up, 0.0, 1.0)
    labels = d.target.astype(np.int64)
    if n is None or n <= len(up):
        m = len(up) if n is None else n
        return up[:m, None].copy(), labels[:m].copy()
    rng = np.random.default_rng(seed)
    extra = n - len(up)
    src = rng.integers(0, len(up), size=extra)
    shifts = rng.integers(-2, 3, size=(extra, 2))
    out = np.empty((extra, 28, 28), dtype=np.float32)
    for sy in range(-2, 3):
        for sx in range(-2, 3):
            sel = np.nonzero((shifts[:, 0] == sy) & (shifts[:, 1] == sx))[0]
            if len(sel):
                out[sel] = np.roll(up[src[sel]], (sy, sx), axis=(1, 2))
    out += rng.normal(0.0, 0.03, size=out.shape).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    X = np.concatenate([up, out])[:, None]
    y = np.concatenate([labels, labels[src]])
    return X, y


def digits_cnn_torch():
    """The seed notebook's MNIST CNN in PyTorch (~413k parameters, NCHW input (n, 1, 28, 28)).

    'same' padding with an even kernel pads one pixel right/bottom, as Keras does.
    """
    from torch import nn

    return nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(1, 64, 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.3),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(64, 32, 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 256),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(256, 10),
    )


def digits_cnn_keras(dtype: str = "float32"):
    """The seed notebook's MNIST CNN in Keras, NHWC input (n, 28, 28, 1), logits output."""
    import tensorflow as tf

    L = tf.keras.layers
    inputs = L.Input(shape=(28, 28, 1), dtype=dtype)
    x = L.Conv2D(64, 2, padding="same", activation="relu", dtype=dtype)(inputs)
    x = L.MaxPooling2D(pool_size=2, dtype=dtype)(x)
    x = L.Dropout(0.3, dtype=dtype)(x)
    x = L.Conv2D(32, 2, padding="same", activation="relu", dtype=dtype)(x)
    x = L.MaxPooling2D(pool_size=2, dtype=dtype)(x)
    x = L.Dropout(0.3, dtype=dtype)(x)
    x = L.Flatten(dtype=dtype)(x)
    x = L.Dense(256, activation="relu", dtype=dtype)(x)
    x = L.Dropout(0.5, dtype=dtype)(x)
    logits = L.Dense(10, name="logits", dtype=dtype)(x)
    return tf.keras.Model(inputs=inputs, outputs=logits)


def train_digits_cnn(X: np.ndarray, y: np.ndarray, epochs: int = 3, seed: int = 0, lr: float = 1e-3,
                     checkpoints: list[str] | None = None):
    """Train the PyTorch digits CNN with Adam; return the model in eval mode.

    ``checkpoints``: optional paths, one per epoch, where the weights after each epoch are saved
    (for TracIn).
    """
    import torch

    torch.manual_seed(seed)
    model = digits_cnn_torch()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(Xt), generator=g)
        for i in range(0, len(Xt), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            loss_fn(model(Xt[idx]), yt[idx]).backward()
            opt.step()
        if checkpoints is not None and epoch < len(checkpoints):
            Path(checkpoints[epoch]).parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), checkpoints[epoch])
    model.eval()
    return model
