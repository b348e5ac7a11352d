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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import median_time  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    return median_time(fn, repeats, warmup=0)


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


def _vae_check(tag, vae, ckpts, Xt, n_samples):
    """Self-proponent share of TracIn over the VAE checkpoints, with the diagnostics behind it."""
    from indexer.influence import self_proponent_rate, vae_tracin

    t = time.perf_counter()
    tr = vae_tracin(ckpts, vae.train_lr, n_samples=n_samples, noise_seed=1, chunk_size=128)
    S = np.zeros((len(Xt), len(Xt)))
    Sc = np.zeros_like(S)
    for e, lr in zip(tr.engines, tr.lrs):
        G = e.grads(Xt).astype(np.float64)
        S += lr * (G @ G.T)
        Gc = G - G.mean(0)
        Sc += lr * (Gc @ Gc.T)
        shared = np.linalg.norm(G.mean(0)) / np.linalg.norm(G, axis=1).mean()  # at the last checkpoint
    own_last = self_proponent_rate(G @ G.T)
    own = self_proponent_rate(S)
    ranks = (S > np.diag(S)[:, None]).sum(axis=1)
    miss = f"misses: self ranked {np.median(ranks[ranks > 0]) + 1:.0f} (median)" if (ranks > 0).any() else "no misses"
    print(f"  {tag:44s} own strongest proponent {own * 100:6.2f}% (last ckpt alone {own_last * 100:.2f}%)   "
          f"||mean g||/mean||g|| {shared:.2f}   "
          f"mean-removed {self_proponent_rate(Sc) * 100:6.2f}%   {miss}  ({time.perf_counter() - t:.0f}s)")
    return own, tr


def bench_vae(X, y, args, tmp: Path) -> None:
    """VAE-TracIn sanity check. Kong & Chaudhuri's code (zhifengkong/VAE-TracIn-pytorch): plain SGD
    (lr 1e-4, batch 64) for 1.5M iterations (~1,600 epochs), a checkpoint every 50k iterations, all
    30 used with equal weights lr*batch*interval/N, 16 encoder samples, all parameters; queries =
    128 training examples ranked against all 60k. Here: the same recipe scaled to the digits (SGD,
    per-example noise, long training, 10 checkpoints, equal weights), beside the Adam recipe."""
    from indexer.vae import train_vae

    n = args.n_vae
    Xt, yt = X[:n], y[:n]
    Xq, yq = X[n:n + args.n_query], y[n:n + args.n_query]
    P = Xt.reshape(n, -1).astype(np.float64)
    from indexer.influence import self_proponent_rate

    pix = self_proponent_rate(P @ P.T)
    print(f"[vae-tracin] VAE 784-128-8, {n} training digits, S={args.vae_samples} encoder samples for the loss; "
          f"paper > 99%; baseline pixel dot product {pix * 100:.2f}%")
    t = time.perf_counter()
    ck_adam = [str(tmp / f"adam{c}.pt") for c in range(3)]
    adam = train_vae(Xt, epochs=args.vae_epochs, seed=args.seed, checkpoints=ck_adam, optimizer="adam", lr=2e-3)
    own_adam, _ = _vae_check(f"Adam lr 2e-3, {args.vae_epochs} ep, 3 ckpts ({time.perf_counter() - t:.0f}s train)",
                             adam, ck_adam, Xt, args.vae_samples)
    t = time.perf_counter()
    ck_sgd = [str(tmp / f"sgd{c}.pt") for c in range(args.sgd_ckpts)]
    sgd = train_vae(Xt, epochs=args.sgd_epochs, seed=args.seed, checkpoints=ck_sgd, optimizer="sgd", lr=1e-3)
    own_sgd, tr = _vae_check(f"SGD lr 1e-3, {args.sgd_epochs} ep, {args.sgd_ckpts} ckpts "
                             f"({time.perf_counter() - t:.0f}s train)", sgd, ck_sgd, Xt, args.vae_samples)
    print(f"  SGD (paper recipe) vs Adam: x{own_sgd / max(own_adam, 1e-9):.2f}; vs pixel baseline "
          f"x{own_sgd / max(pix, 1e-9):.2f}")
    inf = tr.influence(Xq, Xt, k=1)
    prop_same = np.mean(yt[inf.proponent_ids[:, 0]] == yq)
    opp_same = np.mean(yt[inf.opponent_ids[:, 0]] == yq)
    chance = np.mean([np.mean(yt == c) for c in yq])
    print(f"  held-out digits ({len(Xq)}, SGD model): strongest proponent same label {prop_same * 100:.1f}% "
          f"(paper ~80%), strongest opponent {opp_same * 100:.1f}% (paper ~40%); chance {chance * 100:.1f}%")


def _identical_class(model, Xt, yt, Xq, loss, sub_t=None, sub_q=None):
    """Hanawa et al.'s identical-class test per kernel: the top training example (by its given
    label's gradient) has the class the model predicts for the test example."""
    from indexer.influence import identical_class_rate
    from indexer.engine import make_engine
    from indexer.kernels import KERNELS, scores

    eng = make_engine(model, loss, task="classification", chunk_size=128)
    pred = eng.resolve_targets(Xq)  # the model's predicted class: the decision being explained
    Gq = eng.grads(Xq, pred)
    Gt = eng.grads(Xt, yt)
    # identical-subclass test (Hanawa et al.): train on superclasses, compare the subclasses
    ref_t, ref_q = (yt, pred) if sub_t is None else (sub_t, sub_q)
    rates = {k: identical_class_rate(scores(Gq, Gt, k), ref_t, ref_q) for k in KERNELS}
    P, Q = Xt.reshape(len(Xt), -1), Xq.reshape(len(Xq), -1)
    rates["pixel_cos"] = identical_class_rate(scores(Q, P, "grad_cos"), ref_t, ref_q)
    tn = np.linalg.norm(Gt, axis=1)
    top = np.argmax(scores(Gq, Gt, "grad_dot"), axis=1)
    # how dominated grad_dot is by large-norm training gradients
    rates["dot_top_norm_pct"] = float(np.mean(tn[top][:, None] >= tn[None, :]) * 100)
    return rates, pred


def bench_cnn(X, y, args, tmp: Path) -> None:
    import torch

    from indexer.demo import digits_cnn_torch, train_digits_cnn
    from indexer.influence import TracIn, mislabel_auc, precision_at_k

    n, m = args.n_cnn, args.n_query
    Xt, yt = X[:n], y[:n]
    Xq, yq = X[n:n + m], y[n:n + m]
    loss = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(args.seed)
    flip = rng.random(n) < 0.10
    yf = yt.copy()
    yf[flip] = (yt[flip] + rng.integers(1, 10, flip.sum())) % 10
    ckpts = [str(tmp / f"cnn{c}.pt") for c in range(args.cnn_epochs)]
    settings = [
        ("clean labels, trained", lambda: train_digits_cnn(Xt, yt, epochs=args.cnn_epochs, seed=args.seed), yt),
        ("under-trained (20 Adam steps)", lambda: _steps_cnn(Xt, yt, 20, args.seed), yt),
        ("10% labels flipped, trained", lambda: train_digits_cnn(Xt, yf, epochs=args.cnn_epochs, seed=args.seed,
                                                                  checkpoints=ckpts), yf),
    ]
    print(f"[identical-class] digits CNN, {n} train / {m} test digits: share of test digits whose top training "
          "example carries the model's predicted class (Hanawa et al. 2021)")
    print(f"  {'setting':32s} {'acc':>6s} {'grad_dot':>9s} {'grad_cos':>9s} {'asym_dot':>9s} {'pixel cos':>10s}   "
          "grad_dot top-1's gradient norm percentile")
    even_t, even_q = yt % 2, yq % 2
    settings.append(("identical-SUBclass (even/odd)", lambda: train_digits_cnn(Xt, even_t, epochs=args.cnn_epochs,
                                                                               seed=args.seed), even_t))
    for name, make, labels in settings:
        model = make()
        sub = "SUBclass" in name
        rates, pred = _identical_class(model, Xt, labels, Xq, loss, yt if sub else None, yq if sub else None)
        print(f"  {name:32s} {np.mean(pred == (even_q if sub else yq)) * 100:5.1f}% {rates['grad_dot'] * 100:8.1f}% "
              f"{rates['grad_cos'] * 100:8.1f}% {rates['grad_asym_dot'] * 100:8.1f}% {rates['pixel_cos'] * 100:9.1f}%   "
              f"{rates['dot_top_norm_pct']:.0f}   (cos vs dot x{rates['grad_cos'] / max(rates['grad_dot'], 1e-9):.2f})")

    # mislabel detection: TracIn self-influence over the noisy model's checkpoints (Adam lr 1e-3)
    t = time.perf_counter()
    models = []
    for path in ckpts:
        mdl = digits_cnn_torch()
        mdl.load_state_dict(torch.load(path))
        models.append(mdl.eval())
    si = TracIn(models, 1e-3, loss, task="classification", chunk_size=128).self_influence(Xt, yf)
    t_si = time.perf_counter() - t
    with torch.no_grad():
        final_loss = torch.nn.functional.cross_entropy(models[-1](torch.as_tensor(Xt)), torch.as_tensor(yf),
                                                       reduction="none").numpy()
    auc, auc_loss = mislabel_auc(si, flip), mislabel_auc(final_loss, flip)
    print(f"[mislabel] {flip.sum()} of {n} labels flipped, {args.cnn_epochs} checkpoints ({t_si:.1f}s): "
          f"self-influence AUC {auc:.3f}, precision in top {flip.sum()} {precision_at_k(si, flip) * 100:.1f}%; "
          f"baseline final-loss AUC {auc_loss:.3f}, ratio x{auc / auc_loss:.3f}")


def _steps_cnn(X, y, steps: int, seed: int):
    """The digits CNN after only ``steps`` Adam steps (batch 64): an under-trained model."""
    import torch

    from indexer.demo import digits_cnn_torch

    torch.manual_seed(seed)
    model = digits_cnn_torch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(Xt), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(Xt[idx]), yt[idx]).backward()
        opt.step()
    return model.eval()


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
    args.n_vae, args.n_cnn, args.n_query = (150, 400, 40) if q else (500, 1000, 200)
    args.cnn_epochs, args.vae_epochs = (3, 6) if q else (3, 30)
    args.sgd_epochs, args.sgd_ckpts, args.vae_samples = (40, 4, 8) if q else (400, 10, 64)

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
