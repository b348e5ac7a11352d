"""Make the alibi 0.9.6 reference scores that tests/test_similarity.py compares against.

Run in a throwaway environment that has alibi (never in the project's):
    python3 -m venv /tmp/alibi-venv && /tmp/alibi-venv/bin/pip install alibi==0.9.6 torch==2.13.0 scikit-learn
    /tmp/alibi-venv/bin/python tests/reference/alibi_reference.py
It writes tests/reference/alibi_scores.npz: the model weights, the data, and alibi's explanation
(scores, ordered indices) for each kernel, with targets given and with targets left to the model.
"""

from pathlib import Path

import numpy as np
import torch
from alibi.explainers import GradientSimilarity
from sklearn.datasets import load_digits
from torch import nn


def small_cnn() -> nn.Module:
    """A small conv + linear classifier on 8x8 digits (the test rebuilds the same architecture)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))


def main() -> None:
    torch.manual_seed(0)
    d = load_digits()
    X = (d.images[:60, None] / 16.0).astype(np.float32)
    y = d.target[:60].astype(np.int64)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):  # a little training so gradients are not those of a random net
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(torch.as_tensor(X)), torch.as_tensor(y)).backward()
        opt.step()
    model.eval()
    Xt, yt, Xq, yq = X[:50], y[:50], X[50:], y[50:]
    out = {f"w_{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    out.update(X_train=Xt, Y_train=yt, X_query=Xq, Y_query=yq)
    for kernel in ("grad_dot", "grad_cos", "grad_asym_dot"):
        for pre in (False, True):
            gs = GradientSimilarity(model, nn.CrossEntropyLoss(), sim_fn=kernel, precompute_grads=pre,
                                    backend="pytorch")
            gs.fit(Xt, yt)
            e = gs.explain(Xq, yq)
            out[f"{kernel}_{int(pre)}_scores"] = e.data["scores"]
            out[f"{kernel}_{int(pre)}_order"] = e.data["ordered_indices"]
        e = gs.explain(Xq)  # targets from the model's prediction
        out[f"{kernel}_pred_scores"] = e.data["scores"]
    np.savez(Path(__file__).with_name("alibi_scores.npz"), **out)


if __name__ == "__main__":
    main()
