"""VAE-TracIn on the digits: an unsupervised model's proponents, opponents and self-influence.

Trains the paper's MNIST VAE layout scaled to the digits (``indexer.vae``: 784-8d-4d-2d with d
latents, Kaiming init, beta = 4) with plain SGD and checkpoints (the recipe of Kong & Chaudhuri
2021; see docs/influence.md for why SGD rather than Adam), then with ``indexer.influence``
(VAE-TracIn: each gradient with its own fresh encoder draws, the queries' independent of the
training gradients'):

* ranks the training digits by TracIn self-influence Σ_c lr_c‖∇ℓ_c(x)‖² (high: atypical digits);
* finds the strongest proponents (training digits that most lowered a test digit's negative ELBO)
  and opponents (most raised it) of a few held-out digits;
* prints the self-proponent share (the paper's sanity check) and writes one PNG.

    python examples/vae/vae_influence.py [--n 500] [--epochs 400] [--out vae_influence.png]
    python examples/vae/vae_influence.py --quick        # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def plot(path: Path, Xt, Xq, inf, hi_ids, lo_ids, si, k: int) -> None:
    """Rows: each test digit, its top-k proponents, its top-k opponents; then the most and least
    self-influential training digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = len(Xq)
    cols = 1 + 2 * k
    fig, axes = plt.subplots(m + 2, cols, figsize=(cols * 0.9, (m + 2) * 1.05))
    for ax in axes.ravel():
        ax.axis("off")

    def show(ax, img, title, color="black"):
        ax.imshow(img.reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=6, color=color)

    for q in range(m):
        show(axes[q, 0], Xq[q], "test", "blue")
        for j in range(k):
            show(axes[q, 1 + j], Xt[inf.proponent_ids[q, j]], f"+{inf.proponent_scores[q, j]:.2g}", "green")
            show(axes[q, 1 + k + j], Xt[inf.opponent_ids[q, j]], f"{inf.opponent_scores[q, j]:.2g}", "red")
    for j in range(min(cols, len(hi_ids))):
        show(axes[m, j], Xt[hi_ids[j]], f"high {si[hi_ids[j]]:.2g}", "purple")
        show(axes[m + 1, j], Xt[lo_ids[j]], f"low {si[lo_ids[j]]:.2g}", "gray")
    fig.suptitle(f"VAE-TracIn: test digit | top-{k} proponents (green) | top-{k} opponents (red);\n"
                 "bottom rows: highest / lowest self-influence training digits", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="training digits")
    ap.add_argument("--epochs", type=int, default=800, help="SGD epochs")
    ap.add_argument("--latent", type=int, default=16, help="latents d (the paper: 128)")
    ap.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli",
                    help="TracIn's reconstruction term (gaussian: the squared error the paper's code uses)")
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=16, help="fresh encoder samples averaged in each gradient's loss (paper: 16)")
    ap.add_argument("--queries", type=int, default=4, help="held-out test digits to explain")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="vae_influence.png")
    ap.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.checkpoints, args.queries, args.k, args.samples, args.latent = 120, 20, 2, 2, 3, 8, 4

    import torch

    from indexer.demo import load_digits_28
    from indexer.influence import self_proponent_rate, vae_tracin
    from indexer.vae import paper_hidden, train_vae

    torch.set_num_threads(1)
    X, y = load_digits_28()
    perm = np.random.default_rng(args.seed).permutation(len(X))
    X, y = X[perm], y[perm]
    Xt, yt = X[:args.n], y[:args.n]
    Xq, yq = X[args.n:args.n + args.queries], y[args.n:args.n + args.queries]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(tmp) / f"vae{c}.pt") for c in range(args.checkpoints)]
        t = time.perf_counter()
        vae = train_vae(Xt, epochs=args.epochs, seed=args.seed, checkpoints=paths, optimizer="sgd", lr=args.lr,
                        hidden=paper_hidden(args.latent), latent=args.latent, beta=4.0, init="kaiming")
        print(f"trained the VAE on {args.n} digits: {args.epochs} SGD epochs, {args.checkpoints} checkpoints "
              f"({time.perf_counter() - t:.0f}s)")
        tr = vae_tracin(paths, vae.train_lr, n_samples=args.samples, noise_seed=1, query_noise_seed=2,
                        likelihood=args.likelihood)
        t = time.perf_counter()
        S = tr.gram(Xt)
        si = np.diag(S).copy()
        order = np.argsort(-si)
        inf = tr.influence(Xq, Xt, k=args.k)
        print(f"TracIn over {args.checkpoints} checkpoints ({time.perf_counter() - t:.0f}s): "
              f"{self_proponent_rate(S) * 100:.1f}% of training digits are their own strongest proponent")
    print(f"most self-influential training digits (ids): {order[:8].tolist()}, labels {yt[order[:8]].tolist()}")
    print(f"least self-influential: {order[::-1][:8].tolist()}, labels {yt[order[::-1][:8]].tolist()}")
    for q in range(len(Xq)):
        print(f"test digit {yq[q]}: proponents' labels {yt[inf.proponent_ids[q]].tolist()}, "
              f"opponents' labels {yt[inf.opponent_ids[q]].tolist()}")
    out = Path(args.out)
    plot(out, Xt, Xq, inf, order, order[::-1], si, args.k)
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
