"""BiLRP cost and the sanity figures of the influence literature on the digits CNN and VAE.

Prints, each with a baseline measured in the same run:

1. BiLRP time per pair on the digits CNN's penultimate embedding (256 dims): the batched pass vs
   the brute-force loop (one modified-gradient backward per embedding dimension), and with a
   low-rank projection (k = 32); plus the PNG of one explained pair.
2. VAE-TracIn self-proponent share: the share of training digits that are their own strongest
   proponent under TracIn over the VAE's checkpoints (Kong & Chaudhuri report > 99%); baseline:
   the same with raw pixels (dot product). Also how often the strongest proponent / opponent of a
   held-out digit has its label (the paper: ~80% / ~40% on MNIST).
3. Hanawa's identical-class test per kernel on the digits CNN: share of test digits whose top
   training example has the test digit's predicted class (grad_cos expected near 1, grad_dot
   lower); baseline: cosine of raw pixels.
4. Mislabel detection: 10% of the training labels flipped, the CNN retrained on them, AUC of
   TracIn self-influence (sum over checkpoints of lr * ||g||^2) for finding the flipped ones;
   baseline: AUC of the final loss.

Gradients come from ``indexer.engine.make_engine`` (the service's own engine). Adam with a constant
learning rate trains both models, so TracIn's checkpoint weights are equal (lr each).

    python benchmarks/bench_influence.py            # full (a few minutes on 2 cores)
    python benchmarks/bench_influence.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_bilrp(X, y, cnn, args, out_dir: Path) -> None:
    import torch

    from explainers.bilrp import BiLRP, bilrp_reference, pca_projection, penultimate_embedding, plot_pair

    emb = penultimate_embedding(cnn)
    opts = dict(rule=["gamma", "gamma", "epsilon"], input_rule="zb", bounds=(0.0, 1.0), pool=(4, 4))
    e = BiLRP(emb, **opts)
    rng = np.random.default_rng(args.seed)
    pairs = [tuple(rng.choice(len(X), 2, replace=False)) for _ in range(args.pairs)]
    e.explain(X[0], X[1])  # warm-up
    t_batched = statistics.median(_median_time(lambda: e.explain(X[i], X[j]), args.repeats) for i, j in pairs)
    ref_pairs = pairs[:max(1, args.pairs // 3)]
    t_loop = statistics.median(_median_time(lambda: bilrp_reference(e, X[i], X[j]), 1) for i, j in ref_pairs)
    diffs = []
    for i, j in ref_pairs:
        r, ref = e.explain(X[i], X[j]).relevance, bilrp_reference(e, X[i], X[j])
        diffs.append(np.abs(r - ref).max() / np.abs(ref).max())
    with torch.no_grad():
        E = emb(torch.as_tensor(X[:min(len(X), 500)])).numpy()
    ep = BiLRP(emb, projection=pca_projection(E, 32), **opts)
    t_proj = statistics.median(_median_time(lambda: ep.explain(X[i], X[j]), args.repeats) for i, j in pairs)
    i, j = pairs[0]
    full, proj = e.explain(X[i], X[j]), ep.explain(X[i], X[j])
    active = int(np.sum((e.embed(X[i]) != 0) & (e.embed(X[j]) != 0)))
    print(f"[bilrp] digits CNN penultimate embedding (256 dims, {active} active in both for pair 0), 4x4 patches")
    print(f"  batched pass            {t_batched * 1e3:8.1f} ms/pair   speedup vs loop x{t_loop / t_batched:.1f}")
    print(f"  brute-force loop (ref)  {t_loop * 1e3:8.1f} ms/pair   (baseline)")
    print(f"  projection k=32         {t_proj * 1e3:8.1f} ms/pair   speedup vs loop x{t_loop / t_proj:.1f}; "
          f"explains {proj.explained:.4g} of y = {full.similarity:.4g}")
    print(f"  max |batched - loop| / max |loop| = {max(diffs):.2e}")
    same = [(a, b) for a in range(len(X)) for b in range(a + 1, len(X)) if y[a] == y[b]][:1]
    if same:
        a, b = same[0]
        res = e.explain(X[a], X[b])
        path = out_dir / "bilrp_pair.png"
        plot_pair(res, X[a], X[b], path=str(path), k=15,
                  title=f"BiLRP, digits CNN penultimate layer: {y[a]} vs {y[b]}, y = {res.similarity:.3g}")
        print(f"  plot: {path}")


def _tracin_gram(make_model, ckpts, X, Y, lr: float, task: str, loss_fn, Xq=None, Yq=None):
    """Sum over checkpoints of lr * <g(query), g(train)>, and the train self-influences."""
    import torch

    from indexer.engine import make_engine

    Xq = X if Xq is None else Xq
    S = np.zeros((len(Xq), len(X)))
    self_inf = np.zeros(len(X))
    for path in ckpts:
        model = make_model()
        model.load_state_dict(torch.load(path))
        eng = make_engine(model, loss_fn, task=task, chunk_size=128)
        Gt = eng.grads(X, Y).astype(np.float32)
        Gq = Gt if Xq is X else eng.grads(Xq, Yq).astype(np.float32)
        S += lr * (Gq @ Gt.T)
        self_inf += lr * np.einsum("ij,ij->i", Gt, Gt)
    return S, self_inf


def bench_vae(X, y, args, tmp: Path) -> None:
    from indexer.vae import VAE, train_vae

    n = args.n_vae
    Xt, yt = X[:n], y[:n]
    Xq, yq = X[n:n + args.n_query], y[n:n + args.n_query]
    ckpts = [str(tmp / f"vae{c}.pt") for c in range(args.checkpoints)]
    t = time.perf_counter()
    vae = train_vae(Xt, epochs=args.vae_epochs, seed=args.seed, checkpoints=ckpts)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    S, _ = _tracin_gram(lambda: VAE(784, n_samples=vae.n_samples), ckpts, Xt, None, vae.train_lr,
                        "unsupervised", None)
    t_grads = time.perf_counter() - t
    own = np.argmax(S, axis=1) == np.arange(n)
    ranks = (S > np.diag(S)[:, None]).sum(axis=1)  # how many beat self
    P = Xt.reshape(n, -1).astype(np.float64)
    Sp = P @ P.T
    own_pix = np.argmax(Sp, axis=1) == np.arange(n)
    nrm = np.sqrt(np.diag(S))
    shared = np.sqrt(max(S.mean(), 0.0)) / nrm.mean()  # ||mean gradient|| / mean ||gradient|| (TracIn-weighted)
    print(f"[vae-tracin] VAE 784-128-8, {n} training digits, {args.vae_epochs} epochs, {args.checkpoints} checkpoints, "
          f"S={vae.n_samples} encoder samples (train {t_train:.1f}s, TracIn {t_grads:.1f}s)")
    print(f"  own strongest proponent   {own.mean() * 100:6.2f}%   (paper: > 99%); "
          f"baseline pixel dot product {own_pix.mean() * 100:.2f}%  ratio x{own.mean() / max(own_pix.mean(), 1e-9):.2f}")
    print(f"  shared gradient direction: ||mean g|| / mean ||g|| = {shared:.2f} (large: the model is not at a "
          "stationary point, and large-norm digits win grad_dot)")
    if (~own).any():
        print(f"  misses: self ranked {np.median(ranks[~own]) + 1:.0f} (median) among {n}")
    Sq, _ = _tracin_gram(lambda: VAE(784, n_samples=vae.n_samples), ckpts, Xt, None, vae.train_lr,
                         "unsupervised", None, Xq=Xq)
    prop_same = np.mean(yt[np.argmax(Sq, axis=1)] == yq)
    opp_same = np.mean(yt[np.argmin(Sq, axis=1)] == yq)
    chance = np.mean([np.mean(yt == c) for c in yq])
    print(f"  held-out digits ({len(Xq)}): strongest proponent same label {prop_same * 100:.1f}% (paper ~80%), "
          f"strongest opponent {opp_same * 100:.1f}% (paper ~40%); chance {chance * 100:.1f}%")


def bench_cnn(X, y, args, tmp: Path) -> None:
    import torch

    from indexer.demo import digits_cnn_torch, train_digits_cnn
    from indexer.engine import make_engine
    from indexer.kernels import KERNELS, scores

    n, m = args.n_cnn, args.n_query
    Xt, yt = X[:n], y[:n]
    Xq = X[n:n + m]
    loss = torch.nn.CrossEntropyLoss()
    cnn = train_digits_cnn(Xt, yt, epochs=args.cnn_epochs, seed=args.seed)
    eng = make_engine(cnn, loss, task="classification", chunk_size=128)
    pred = eng.resolve_targets(Xq)  # queries explained w.r.t. the model's prediction, as alibi does
    Gq = eng.grads(Xq)  # Y=None: predicted labels
    D = np.zeros((m, n))
    tn = np.zeros(n)
    for start, G in eng.iter_grads(Xt, yt):
        D[:, start:start + len(G)] = Gq @ G.T
        tn[start:start + len(G)] = np.einsum("ij,ij->i", G, G)
        if start == 0:  # the streamed formulas agree with the kernels module's brute force
            chk = {k: scores(Gq, G, k) for k in KERNELS}
            G0 = G
    qn = np.einsum("ij,ij->i", Gq, Gq)
    S = {"grad_dot": D, "grad_cos": D / (np.sqrt(qn)[:, None] * np.sqrt(tn)[None, :] + 1e-7),
         "grad_asym_dot": D / (tn[None, :] + 1e-7)}
    for k in KERNELS:
        np.testing.assert_allclose(S[k][:, :len(G0)], chk[k], rtol=1e-3, atol=1e-6 * np.abs(chk[k]).max())
    P = Xt.reshape(n, -1)
    Q = Xq.reshape(m, -1)
    pix = (Q @ P.T) / (np.linalg.norm(Q, axis=1)[:, None] * np.linalg.norm(P, axis=1)[None, :] + 1e-7)
    base = np.mean(yt[np.argmax(pix, axis=1)] == pred)
    acc = np.mean(pred == y[n:n + m])
    print(f"[identical-class] digits CNN, {n} train / {m} test digits (test accuracy {acc * 100:.1f}%), "
          "top-1 training example has the predicted class:")
    for k in KERNELS:
        rate = np.mean(yt[np.argmax(S[k], axis=1)] == pred)
        print(f"  {k:14s} {rate * 100:6.1f}%   ratio vs pixel-cosine baseline ({base * 100:.1f}%) x{rate / base:.2f}")

    # mislabel detection with 10% flipped labels
    rng = np.random.default_rng(args.seed)
    flip = rng.random(n) < 0.10
    yf = yt.copy()
    yf[flip] = (yt[flip] + rng.integers(1, 10, flip.sum())) % 10
    ckpts = [str(tmp / f"cnn{c}.pt") for c in range(args.cnn_epochs)]
    t = time.perf_counter()
    noisy = train_digits_cnn(Xt, yf, epochs=args.cnn_epochs, seed=args.seed, checkpoints=ckpts)
    self_inf = np.zeros(n)
    for path in ckpts:
        model = digits_cnn_torch()
        model.load_state_dict(torch.load(path))
        e = make_engine(model, loss, task="classification", chunk_size=128)
        for start, G in e.iter_grads(Xt, yf):
            self_inf[start:start + len(G)] += 1e-3 * np.einsum("ij,ij->i", G, G)
    t_si = time.perf_counter() - t
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        logits = noisy(torch.as_tensor(Xt))
        final_loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(yf), reduction="none").numpy()
    auc = roc_auc_score(flip, self_inf)
    auc_loss = roc_auc_score(flip, final_loss)
    order = np.argsort(-self_inf)
    top = flip[order[:int(flip.sum())]].mean()
    print(f"[mislabel] {flip.sum()} of {n} labels flipped, {args.cnn_epochs} checkpoints ({t_si:.1f}s): "
          f"self-influence AUC {auc:.3f}, precision in top {flip.sum()} {top * 100:.1f}%; "
          f"baseline final-loss AUC {auc_loss:.3f}, ratio x{auc / auc_loss:.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "gradindex-bench"))
    ap.add_argument("--only", choices=["bilrp", "vae", "cnn"], default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.pairs, args.repeats = (3, 2) if q else (10, 3)
    args.n_vae, args.n_cnn, args.n_query = (300, 400, 40) if q else (800, 1000, 200)
    args.checkpoints, args.cnn_epochs, args.vae_epochs = (3, 3, 6) if q else (3, 3, 30)

    import torch

    torch.set_num_threads(args.threads)
    from indexer.demo import load_digits_28, train_digits_cnn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    X, y = load_digits_28()
    perm = np.random.default_rng(args.seed).permutation(len(X))
    X, y = X[perm], y[perm]
    print(f"bench_influence: {'quick' if q else 'full'}, torch threads {args.threads}, seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "bilrp"):
            cnn = train_digits_cnn(X[:args.n_cnn], y[:args.n_cnn], epochs=args.cnn_epochs, seed=args.seed)
            bench_bilrp(X[:args.n_cnn], y[:args.n_cnn], cnn, args, out)
        try:
            import indexer.engine  # noqa: F401
        except ImportError:
            print("[influence] indexer.engine not available yet: skipped")
            return
        if args.only in (None, "vae"):
            bench_vae(X, y, args, Path(tmp))
        if args.only in (None, "cnn"):
            bench_cnn(X, y, args, Path(tmp))


if __name__ == "__main__":
    main()
