"""BiLRP's pair figure on a trained torchvision VGG-16 (Eberle et al. 2020 explain VGG-16 similarities).

No weights can be downloaded here, so ``torchvision.models.vgg16(num_classes=4)`` (the architecture
as shipped, its own ``forward``) is trained on the spot on an image set this script renders: 32x32
RGB images of four shape classes (disc, square, triangle, cross) at a random position, size and
colour on a noise texture. The weights are cached in ``weights.pt`` next to this file (git-ignored)
with the settings they were trained with; a second run loads them. Then BiLRP explains the
similarity of two images of the same class on the penultimate embedding (the input of the last
Linear layer, 4096 dims, reduced to a PCA basis of k dimensions fitted on training embeddings) and
draws the paper's pair figure.

    python examples/bilrp_vgg16/run.py                      # writes docs/bilrp_vgg16_pair.png
    python examples/bilrp_vgg16/run.py --minutes 3 --out /tmp/pair.png

Training stops at ``--minutes`` or when the running accuracy of the last 10 batches reaches 98 %;
a run stopped by the time limit is continued by the next run (from the cached weights). The accuracy
on 256 training images is printed (and in the figure's title).

Cost: a step of 16 images (32x32) is about 24 GFLOP (forward and backward, the 25088x4096 classifier
layer included). On the shared 2-core machine this was written on, niced under a load of ~13, a step
took 15-30 s: the first run reached 36 steps in 12 minutes and stayed at chance accuracy (VGG-16
without BatchNorm needs a few hundred steps). On the same machine when quiet, a step takes ~2.3 s with
2 threads (a further 4-minute run also stayed at chance), so a converged run needs well over 10 minutes
of an otherwise idle machine; docs/bilrp_vgg16_pair.png is still the random-weights figure of
benchmarks/bench_influence.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CLASSES = ("disc", "square", "triangle", "cross")
SIZE = 32


def torchvision_models():
    """``torchvision.models`` (importable even where torchvision's compiled ops are missing)."""
    from indexer.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torchvision.models as tvm

    return tvm


def render(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, 3, SIZE, SIZE) in [0, 1] and their labels: one shape per image at a random
    centre, radius and colour, on a low-contrast noise texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    X = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    y = rng.integers(0, len(CLASSES), n)
    for k in range(n):
        r = rng.uniform(6, 11)
        cx, cy = rng.uniform(r, SIZE - r, 2)
        dx, dy = xx - cx, yy - cy
        c = y[k]
        if c == 0:
            mask = dx ** 2 + dy ** 2 <= r ** 2
        elif c == 1:
            mask = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
        elif c == 2:
            mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        else:
            w = r / 3
            mask = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
        background = rng.uniform(0, 0.35, (3, 1, 1)) * rng.uniform(0.5, 1.0, (1, SIZE, SIZE))
        colour = rng.uniform(0.55, 1.0, (3, 1, 1))
        X[k] = np.where(mask[None], colour, background).astype(np.float32)
    return X, y


def train(X: np.ndarray, y: np.ndarray, minutes: float, seed: int, batch: int = 16, state: dict | None = None):
    """torchvision's VGG-16 (num_classes=4; random init, or ``state`` to resume) trained with Adam
    until ``minutes`` pass or the last 10 batches average >= 98 % accuracy. Returns the model (eval
    mode), the step count and whether the accuracy criterion stopped it."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = torchvision_models().vgg16(weights=None, num_classes=len(CLASSES))
    if state is not None:
        model.load_state_dict(state)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)
    recent: list[float] = []
    start = time.perf_counter()
    step = 0
    bar = tqdm(desc="training VGG-16", unit="step")
    model.train()
    while time.perf_counter() - start < minutes * 60:
        idx = torch.randint(0, len(Xt), (batch,), generator=g)
        opt.zero_grad()
        logits = model(Xt[idx])
        loss = torch.nn.functional.cross_entropy(logits, yt[idx])
        loss.backward()
        opt.step()
        step += 1
        recent = (recent + [float((logits.detach().argmax(1) == yt[idx]).float().mean())])[-10:]
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{np.mean(recent):.2f}")
        if len(recent) == 10 and np.mean(recent) >= 0.98:
            bar.close()
            return model.eval(), step, True
    bar.close()
    return model.eval(), step, False


def accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat([model(torch.as_tensor(X[i:i + 64])).argmax(1) for i in range(0, len(X), 64)])
    return float((pred.numpy() == y).mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=8.0, help="training time limit (default 8)")
    ap.add_argument("--n-train", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=32, help="PCA dimensions of the explained embedding")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default=str(Path(__file__).with_name("weights.pt")))
    ap.add_argument("--retrain", action="store_true", help="ignore cached weights")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bilrp_vgg16_pair.png"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from explainers.bilrp import BiLRP, pca_projection, penultimate_embedding, plot_pair
    X, y = render(args.n_train, args.seed)
    settings = {"n_train": args.n_train, "seed": args.seed, "size": SIZE, "classes": CLASSES}
    wpath = Path(args.weights)
    cached = torch.load(wpath, weights_only=False) if wpath.exists() and not args.retrain else None
    if cached is not None and cached.get("settings") != settings:
        cached = None
    if cached is not None and cached["converged"]:
        model = torchvision_models().vgg16(weights=None, num_classes=len(CLASSES))
        model.load_state_dict(cached["state_dict"])
        model.eval()
        steps, minutes = cached["steps"], cached["minutes"]
        print(f"loaded cached weights {wpath} ({steps} steps, {minutes:.1f} min of training)")
    else:
        # no cache, or a run that stopped at its time limit: train (on from the cached weights)
        t0 = time.perf_counter()
        model, steps, converged = train(X, y, args.minutes, args.seed + (cached or {}).get("steps", 0),
                                        state=None if cached is None else cached["state_dict"])
        minutes = (time.perf_counter() - t0) / 60
        if cached is not None:
            steps, minutes = steps + cached["steps"], minutes + cached["minutes"]
        torch.save({"settings": settings, "state_dict": model.state_dict(), "steps": steps, "minutes": minutes,
                    "converged": converged}, wpath)
        how = "converged" if converged else "time limit; the next run trains on"
        print(f"trained {steps} steps of 16 images in {minutes:.1f} min ({how}); weights cached in {wpath}")
    sub = slice(0, 256)
    acc = accuracy(model, X[sub], y[sub])
    print(f"train accuracy ({len(X[sub])} training images): {acc:.3f} (chance {1 / len(CLASSES):.2f})")

    phi = penultimate_embedding(model)
    with torch.no_grad():
        E = torch.cat([phi(torch.as_tensor(X[i:i + 64])) for i in range(0, 256, 64)]).numpy()
    P = pca_projection(E, args.k)
    bilrp = BiLRP(phi, rule=["gamma"] * 13 + ["epsilon"] * 2, input_rule="zb", bounds=(0.0, 1.0),
                  projection=P, pool=(4, 4))
    Xq, yq = render(64, args.seed + 1)  # held-out images; the pair: the first two of one class
    c = int(yq[0])
    a, b = [int(i) for i in np.nonzero(yq == c)[0][:2]]
    t0 = time.perf_counter()
    res = bilrp.explain(Xq[a], Xq[b])
    print(f"BiLRP pair ({CLASSES[c]} vs {CLASSES[c]}): {time.perf_counter() - t0:.1f} s; explains "
          f"{res.explained:.4g} of y = {res.similarity:.4g} (PCA k={args.k}); relevance sum {res.total:.4g}")
    plot_pair(res, Xq[a], Xq[b], path=args.out, k=15,
              title=f"BiLRP, VGG-16 trained here (train acc {acc:.2f}): two {CLASSES[c]}s, "
                    f"y = {res.similarity:.3g}")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
