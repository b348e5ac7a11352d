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

Training (``--minutes``, default 8, two CPU threads) runs in two stages and stops early once the
running accuracy of the last 10 batches reaches 98 %: first the classifier head (its three Linear
layers, 120M of VGG-16's 134M parameters) on the convolutional features of the training images,
computed once with the seeded random-init convolutions frozen; then, if the head has not converged
within 60 % of the time, every layer end to end. Why: trained from scratch end to end, VGG-16 (no
BatchNorm) costs ~2.3 s per step of 16 images on two quiet CPU threads and stayed at chance for the
first tens of steps, whereas a head step on cached features costs a fraction of that. A run stopped
by the time limit is continued by the next run (from the cached weights). The accuracy on 256
training images and on 512 held-out renderings (another seed) is printed, and the held-out figure
is in the figure's title with the stage reached.
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
RECIPE = "head on frozen features, then end to end"  # cached weights of another recipe are retrained
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


def features_of(model, X: np.ndarray, batch: int = 64):
    """The flattened input of VGG-16's classifier head (``avgpool(features(x))``, 25088 values) for X."""
    import torch

    with torch.no_grad():
        return torch.cat([torch.flatten(model.avgpool(model.features(torch.as_tensor(X[i:i + batch]))), 1)
                          for i in range(0, len(X), batch)])


HEAD, END_TO_END = "head", "head, then end to end"  # the stage a training run reached


def train(X: np.ndarray, y: np.ndarray, minutes: float, seed: int, batch: int = 64, state: dict | None = None,
          stage: str | None = None):
    """torchvision's VGG-16 (num_classes=4; seeded random init, or ``state`` to resume), trained in two
    stages until ``minutes`` pass or the last 10 batches average >= 98 % accuracy: first its classifier
    head (three Linear layers, 120M of its 134M parameters) on the convolutional features of X, computed
    once with the convolutions frozen (for at most 60 % of the time); then, if time is left and the head has not converged, every layer
    end to end. Why: from scratch and without BatchNorm, VGG-16's end-to-end steps cost ~2.3 s for 16
    images on two CPU threads and stayed at chance for the first tens of steps, whereas a head step on
    cached features costs a fraction of that. Resuming (``state``) from a run whose ``stage`` already
    reached END_TO_END goes straight on end to end. Returns (model in eval mode, steps, converged,
    stage reached)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = torchvision_models().vgg16(weights=None, num_classes=len(CLASSES))
    if state is not None:
        model.load_state_dict(state)
    start = time.perf_counter()
    left = lambda share=1.0: share * minutes * 60 - (time.perf_counter() - start)  # noqa: E731
    yt = torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)

    def run(stage: str, params, forward, n: int, lr: float, bs: int, share: float) -> tuple[int, bool]:
        opt = torch.optim.Adam(params, lr=lr)
        recent: list[float] = []
        steps = 0
        with tqdm(desc=f"training VGG-16 ({stage})", unit="step") as bar:
            while left(share) > 0:
                idx = torch.randint(0, n, (bs,), generator=g)
                opt.zero_grad()
                logits = forward(idx)
                loss = torch.nn.functional.cross_entropy(logits, yt[idx])
                loss.backward()
                opt.step()
                steps += 1
                recent = (recent + [float((logits.detach().argmax(1) == yt[idx]).float().mean())])[-10:]
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{np.mean(recent):.2f}")
                if len(recent) == 10 and np.mean(recent) >= 0.98:
                    return steps, True
        return steps, False

    steps, converged = 0, False
    if stage != END_TO_END:
        F = features_of(model.eval(), X)
        model.train()
        steps, converged = run("classifier head on frozen features", model.classifier.parameters(),
                               lambda idx: model.classifier(F[idx]), len(F), 1e-4, batch, 0.6)
        stage = HEAD
    if not converged and left() > 0:
        model.train()
        Xt = torch.as_tensor(X)
        more, converged = run("end to end", model.parameters(), lambda idx: model(Xt[idx]), len(Xt), 2e-5, 16, 1.0)
        steps += more
        stage = END_TO_END
    return model.eval(), steps, converged, stage


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
    settings = {"n_train": args.n_train, "seed": args.seed, "size": SIZE, "classes": CLASSES, "recipe": RECIPE}
    wpath = Path(args.weights)
    cached = torch.load(wpath, weights_only=False) if wpath.exists() and not args.retrain else None
    if cached is not None and cached.get("settings") != settings:
        cached = None
    if cached is not None and cached["converged"]:
        model = torchvision_models().vgg16(weights=None, num_classes=len(CLASSES))
        model.load_state_dict(cached["state_dict"])
        model.eval()
        steps, minutes, stage = cached["steps"], cached["minutes"], cached["stage"]
        print(f"loaded cached weights {wpath} ({steps} steps, {minutes:.1f} min of training)")
    else:
        # no cache, or a run that stopped at its time limit: train (on from the cached weights)
        t0 = time.perf_counter()
        model, steps, converged, stage = train(X, y, args.minutes, args.seed + (cached or {}).get("steps", 0),
                                               state=None if cached is None else cached["state_dict"],
                                               stage=None if cached is None else cached["stage"])
        minutes = (time.perf_counter() - t0) / 60
        if cached is not None:
            steps, minutes = steps + cached["steps"], minutes + cached["minutes"]
        torch.save({"settings": settings, "state_dict": model.state_dict(), "steps": steps, "minutes": minutes,
                    "converged": converged, "stage": stage}, wpath)
        how = "converged" if converged else "time limit; the next run trains on"
        print(f"trained {steps} steps ({stage}) in {minutes:.1f} min ({how}); weights cached in {wpath}")
    sub = slice(0, 256)
    acc = accuracy(model, X[sub], y[sub])
    Xh, yh = render(512, args.seed + 2)
    held = accuracy(model, Xh, yh)
    print(f"accuracy: {acc:.3f} on {len(X[sub])} training images, {held:.3f} on {len(Xh)} held-out images "
          f"(chance {1 / len(CLASSES):.2f})")

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
              title=f"BiLRP, VGG-16 trained here ({stage}; held-out acc {held:.2f}): two {CLASSES[c]}s, "
                    f"y = {res.similarity:.3g}")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
