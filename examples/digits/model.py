"""The digits example's model code: the torch digits CNN of ``indexer.demo``, and its one-time setup.

``build_model()`` is the factory ``index.toml`` names; ``prepare(base)`` is its ``setup`` hook: it
writes ``digits.npz`` (scikit-learn's digits at 28x28) and trains the CNN into ``weights.pt`` when
they are absent, so the example runs on a fresh checkout without downloads.
"""

from __future__ import annotations

from pathlib import Path


def build_model():
    """A fresh (untrained) digits CNN; the build loads ``weights.pt`` into it."""
    from indexer.demo import digits_cnn_torch

    return digits_cnn_torch()


def prepare(base: Path) -> None:
    """Create ``digits.npz`` and ``weights.pt`` next to the config if missing (a few seconds)."""
    import numpy as np
    import torch

    from indexer.demo import load_digits_28, train_digits_cnn

    base = Path(base)
    data, weights = base / "digits.npz", base / "weights.pt"
    if not data.exists():
        X, y = load_digits_28()
        ids = np.asarray([f"digit-{i:04d}" for i in range(len(X))])
        tmp = data.with_name(".digits.npz.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, X=X, y=y, ids=ids)
        tmp.replace(data)
    if not weights.exists():
        z = np.load(data)
        torch.set_num_threads(1)
        # The last 200 digits stay out of training: the demo queries with them as unseen examples.
        model = train_digits_cnn(z["X"][:-200], z["y"][:-200], epochs=12, seed=0)
        tmp = weights.with_name(".weights.pt.tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(weights)
