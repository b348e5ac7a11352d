"""Shared helpers of the indexer tests (no tests here): a tiny real model, data, configs, and the
independent per-example reference (a plain autograd loop, one example at a time)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

MODEL_PY = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn

    def build_model():
        """Tiny CNN on 8x8 digits: conv (L = 36 positions) + linear; ~1.5k parameters."""
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 10))

    def build_mlp():
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def build_text():
        return nn.Sequential(nn.Linear(16, 2))

    def preprocess(texts):
        """Hashed bag of words (deterministic: no Python hash salt)."""
        out = np.zeros((len(texts), 16), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % 16] += 1.0
        return out

    def build_vae():
        from indexer.vae import VAE
        return VAE(input_dim=64, hidden=12, latent=3, n_samples=64, noise_seed=1)
''')


def digits8(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as (n, 1, 8, 8) float32 in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:n, None] / 16.0).astype(np.float32), d.target[:n].astype(np.int64)


def write_model(tmp: Path, factory: str = "build_model", seed: int = 0, name: str = "weights.pt") -> Path:
    """Write model.py and seeded-init weights for ``factory``; return the weights path."""
    (tmp / "model.py").write_text(MODEL_PY)
    ns: dict = {}
    exec(MODEL_PY, ns)
    torch.manual_seed(seed)
    model = ns[factory]()
    path = tmp / name
    torch.save(model.state_dict(), path)
    return path


def load_tiny(tmp: Path, factory: str = "build_model", weights: str = "weights.pt") -> torch.nn.Module:
    ns: dict = {}
    exec(MODEL_PY, ns)
    m = ns[factory]()
    m.load_state_dict(torch.load(tmp / weights, weights_only=True))
    return m.eval()


def write_config(tmp: Path, n: int = 200, name: str = "tiny", kernel: str = "grad_dot", faiss: str = "flat",
                 projection: str = "", chunk_size: int = 64, extra_model: str = "", extra_index: str = "",
                 data: str | None = None, model: str | None = None, fname: str = "index.toml") -> Path:
    """A config for the tiny CNN on ``n`` 8x8 digits (writes model.py, weights.pt, digits.npz)."""
    if not (tmp / "weights.pt").exists():
        write_model(tmp)
    if not (tmp / "digits.npz").exists():
        X, y = digits8(n)
        np.savez(tmp / "digits.npz", X=X, y=y, ids=np.asarray([f"ex{i}" for i in range(len(X))]))
    model = model if model is not None else textwrap.dedent(f'''
        [model]
        name = "tiny"
        entry = "model.py:build_model"
        weights = "weights.pt"
        loss = "cross_entropy"
        {extra_model}
        ''')
    data = data if data is not None else textwrap.dedent('''
        [data]
        format = "npz"
        path = "digits.npz"
        x = "X"
        y = "y"
        ids = "ids"
        ''')
    text = model + data + textwrap.dedent(f'''
        [index]
        name = "{name}"
        kernel = "{kernel}"
        faiss = "{faiss}"
        {extra_index}
        [projection]
        {projection}
        [build]
        chunk_size = {chunk_size}
        threads = 1
        ''')
    p = tmp / fname
    p.write_text(text)
    return p


def loop_grads(model: torch.nn.Module, loss_fn, X: np.ndarray, Y: np.ndarray | None) -> np.ndarray:
    """Per-example gradients by a plain loop (one backward per example): the independent reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(X)):
        model.zero_grad()
        x = torch.as_tensor(X[i:i + 1])
        out = model(x)
        loss = out.sum() if loss_fn is None else loss_fn(out, torch.as_tensor(Y[i:i + 1]))
        loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]).detach().numpy().copy())
    return np.stack(rows).astype(np.float32)
