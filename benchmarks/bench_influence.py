"""BiLRP cost and the sanity figures of the influence literature on the digits CNN and VAE.

Prints, each with a baseline measured in the same run:

1. BiLRP time per pair (the zennit-based explainer against the previous explicit implementation
   from tests/bilrp_reference.py, with and without a k = 32 projection, measured pair by pair in
   turn) on the digits CNN's penultimate embedding (256 dims), with the brute-force loop (one
   modified-gradient backward per embedding dimension) and the agreement of the three; the same on
   torchvision's VGG-16 feature stack; VGG-16 end to end (its own forward, which the previous
   implementation refuses) with a projection; the PNGs of one explained pair each.
2. The closed-form influences of k-NN, KDE and GMM densities on a 2-D six-cluster set: time
   against a brute-force leave-one-out refit loop (and their largest difference), the paper's
   observations as numbers (which points carry the highest self-influence, whether z's strongest
   proponents are its nearest neighbours, opponents from z's own cluster); two PNGs.
3. VAE-TracIn with the paper's recipe (its MNIST VAE layout scaled down, beta = 4, plain SGD,
   fresh independent encoder draws per gradient, its squared-error TracIn loss and the Bernoulli
   one): the error of each encoder-noise estimator (S = 1 .. 64) against a many-sample reference,
   the check after a dense projection; the share of training digits that are their own strongest
   proponent (Kong & Chaudhuri report > 99%; baseline: raw pixels), over all checkpoints and the
   last, and where the misses come from; self-influence against the loss
   (Spearman and a scatter PNG); the share of held-out digits' strongest proponents / opponents with
   the query's label (paper ~80% / ~40%); the green/red-box sanity-check PNG.
4. Hanawa's identical-class test per kernel on the digits CNN: share of test digits whose top
   training example has the test digit's predicted class (grad_cos expected near 1, grad_dot
   lower); baseline: cosine of raw pixels.
5. Mislabel detection: 10% of the training labels flipped, the CNN retrained on them, AUC of
   TracIn self-influence (sum over checkpoints of lr * ||g||^2) for finding the flipped ones;
   baseline: AUC of the final loss.

The paper's figures and this run's are printed side by side in one table at the end. Gradients come
from ``indexer.engine.make_engine`` (the service's own engine); every optimizer runs at a constant
learning rate, so TracIn's checkpoint weights are equal (lr each).

    python benchmarks/bench_influence.py --out docs   # full (~15 min on a shared 2-core CPU)
    python benchmarks/bench_influence.py --quick      # about a minute
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _util import median_time  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    return median_time(fn, repeats, warmup=0)


def _interleaved(impls: dict, pairs: list, X, repeats: int) -> dict[str, float]:
    """Median ms per pair of each implementation, measured pair by pair in turn (so load on a shared
    machine hits all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    for i, j in pairs:
        for name, e in impls.items():
            times[name].append(_median_time(lambda: e.explain(X[i], X[j]), repeats))
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def _print_table(title: str, ms: dict[str, float], baseline: str, extra: dict[str, str] | None = None) -> None:
    print(title)
    for name, v in ms.items():
        ratio = "(baseline)" if name == baseline else f"x{ms[baseline] / v:.2f} vs {baseline}"
        print(f"  {name:28s} {v:9.1f} ms/pair   {ratio}   {(extra or {}).get(name, '')}")


def bench_bilrp(X, y, cnn, args, out_dir: Path) -> None:
    """BiLRP (zennit-based) against the previous explicit implementation in the same run, with and
    without a k = 32 projection, on the digits CNN and on torchvision's VGG-16; the pair figures."""
    import torch

    from bilrp_models import torchvision_models  # tests/: torchvision even without its compiled ops
    from bilrp_reference import ExplicitBiLRP, bilrp_reference  # tests/: the previous implementation, the loop
    from explainers.bilrp import BiLRP, pca_projection, penultimate_embedding, plot_pair

    rng = np.random.default_rng(args.seed)
    pairs = [tuple(rng.choice(len(X), 2, replace=False)) for _ in range(args.pairs)]

    # 1. digits CNN, penultimate embedding (256 dims), the rules recommended for it
    emb = penultimate_embedding(cnn)
    opts = dict(rule=["gamma", "gamma", "epsilon"], input_rule="zb", bounds=(0.0, 1.0), pool=(4, 4))
    with torch.no_grad():
        E = emb(torch.as_tensor(X[:min(len(X), 500)])).numpy()
    P = pca_projection(E, 32)
    impls = {"zennit (this)": BiLRP(emb, **opts), "previous (explicit)": ExplicitBiLRP(emb, **opts),
             "zennit, projection k=32": BiLRP(emb, projection=P, **opts),
             "previous, projection k=32": ExplicitBiLRP(emb, projection=P, **opts)}
    for e in impls.values():
        e.explain(X[0], X[1])  # warm-up (the zennit explainer prepares its graph on the first input shape)
    ms = _interleaved(impls, pairs, X, args.repeats)
    ref_pairs = pairs[:max(1, args.pairs // 3)]
    ms["brute-force loop (ref)"] = statistics.median(
        _median_time(lambda: bilrp_reference(impls["previous (explicit)"], X[i], X[j]), 1) for i, j in ref_pairs) * 1e3
    d_prev, d_loop = [], []
    for i, j in ref_pairs:
        r = impls["zennit (this)"].explain(X[i], X[j]).relevance
        prev = impls["previous (explicit)"].explain(X[i], X[j]).relevance
        ref = bilrp_reference(impls["previous (explicit)"], X[i], X[j])
        d_prev.append(np.abs(r - prev).max() / np.abs(prev).max())
        d_loop.append(np.abs(r - ref).max() / np.abs(ref).max())
    i, j = pairs[0]
    full, proj = impls["zennit (this)"].explain(X[i], X[j]), impls["zennit, projection k=32"].explain(X[i], X[j])
    e0 = impls["zennit (this)"]
    active = int(np.sum((e0.embed(X[i]) != 0) & (e0.embed(X[j]) != 0)))
    _print_table(f"[bilrp] digits CNN penultimate embedding (256 dims, {active} active in both for pair 0), "
                 f"4x4 patches, {len(pairs)} pairs", ms, "previous (explicit)",
                 {"zennit, projection k=32": f"explains {proj.explained:.4g} of y = {full.similarity:.4g}"})
    print(f"  max |zennit - previous| / max |previous| = {max(d_prev):.2e}; "
          f"max |zennit - loop| / max |loop| = {max(d_loop):.2e}")
    same = [(a, b) for a in range(len(X)) for b in range(a + 1, len(X)) if y[a] == y[b]][:1]
    if same:
        a, b = same[0]
        res = impls["zennit (this)"].explain(X[a], X[b])
        path = out_dir / "bilrp_pair.png"
        plot_pair(res, X[a], X[b], path=str(path), k=15,
                  title=f"BiLRP, digits CNN penultimate layer: {y[a]} vs {y[b]}, y = {res.similarity:.3g}")
        print(f"  plot: {path}")

    # 2. torchvision VGG-16 as shipped, random init, digits padded to 3 x 32 x 32
    tvm = torchvision_models()
    torch.manual_seed(args.seed)
    vgg = tvm.vgg16(weights=None, num_classes=10).eval()
    Xv = np.repeat(np.pad(X[:64], ((0, 0), (0, 0), (2, 2), (2, 2))), 3, axis=1).astype(np.float32)
    vopts = dict(rule=["gamma"] * 13 + ["epsilon"] * 2, input_rule="zb", bounds=(0.0, 1.0), pool=(4, 4))
    vpairs = [(int(a) % len(Xv), int(b) % len(Xv)) for a, b in pairs[:args.vgg_pairs]]
    with torch.no_grad():
        Ef = vgg.features(torch.as_tensor(Xv)).reshape(len(Xv), -1).numpy()
    Pf = pca_projection(Ef, 32)
    fopts = dict(vopts, rule=["gamma"] * 13)
    impls = {"zennit (this)": BiLRP(vgg.features, **fopts), "previous (explicit)": ExplicitBiLRP(vgg.features, **fopts),
             "zennit, projection k=32": BiLRP(vgg.features, projection=Pf, **fopts),
             "previous, projection k=32": ExplicitBiLRP(vgg.features, projection=Pf, **fopts)}
    for e in impls.values():
        e.explain(Xv[0], Xv[1])  # warm-up: the zennit explainer prepares its graph on the first input shape
    ms = _interleaved(impls, vpairs, Xv, 1)
    i, j = vpairs[0]
    r, prev = impls["zennit (this)"].explain(Xv[i], Xv[j]), impls["previous (explicit)"].explain(Xv[i], Xv[j])
    e0 = impls["zennit (this)"]
    active = int(np.sum((e0.embed(Xv[i]) != 0) & (e0.embed(Xv[j]) != 0)))
    _print_table(f"[bilrp] VGG-16 features (nn.Sequential: 13 conv + 5 max-pool, random init), 3x32x32, 512 dims "
                 f"({active} active in both for pair 0), {len(vpairs)} pairs", ms, "previous (explicit)")
    print(f"  max |zennit - previous| / max |previous| = "
          f"{np.abs(r.relevance - prev.relevance).max() / np.abs(prev.relevance).max():.2e}")

    phi = penultimate_embedding(vgg)  # the shipped forward: features, avgpool, flatten, classifier[:-1]
    try:
        ExplicitBiLRP(phi, **vopts)
        refused = "accepted"
    except TypeError as exc:
        refused = f"refused: {str(exc).split(';')[0]}"
    with torch.no_grad():
        Ep = phi(torch.as_tensor(Xv)).numpy()
    e2e = BiLRP(phi, projection=pca_projection(Ep, 32), **vopts)
    e2e.explain(Xv[0], Xv[1])
    ms = {"zennit, projection k=32": statistics.median(
        _median_time(lambda: e2e.explain(Xv[a], Xv[b]), 1) for a, b in vpairs) * 1e3}
    print(f"[bilrp] VGG-16 end to end (torchvision forward up to the last Linear, 4096 dims), 3x32x32, "
          f"{len(vpairs)} pairs; previous implementation {refused}")
    print(f"  {'zennit, projection k=32':28s} {ms['zennit, projection k=32']:9.1f} ms/pair")
    a, b = next((a, b) for a in range(len(Xv)) for b in range(a + 1, len(Xv)) if y[a] == y[b])
    res = e2e.explain(Xv[a], Xv[b])
    # random weights: a check of the pipeline, not the docs figure (examples/bilrp_vgg16/run.py trains
    # VGG-16 and draws docs/bilrp_vgg16_pair.png)
    path = out_dir / "bilrp_vgg16_random_pair.png"
    plot_pair(res, Xv[a], Xv[b], path=str(path), k=15,
              title=f"BiLRP, VGG-16 (random init) end to end, PCA k=32: {y[a]} vs {y[b]}, "
                    f"explains {res.explained:.3g} of y = {res.similarity:.3g}")
    print(f"  plot: {path}")


# Every figure the paper states, beside what this run measured: printed as one table at the end.
PAPER_TABLE: list[tuple[str, str, str, str]] = []


def _row(figure: str, measured: str, paper: str, verdict: str) -> None:
    PAPER_TABLE.append((figure, measured, paper, verdict))


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # a script, not a library module: choosing the backend here is fine
    import matplotlib.pyplot as plt

    return plt


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _vae_grads(path: str, X: np.ndarray, S: int, seed: int, likelihood: str, noise: str = "per_example") -> np.ndarray:
    """Per-example gradients (n, D) of a VAE checkpoint's loss through the service's engine."""
    from indexer.engine import make_engine
    from indexer.influence import load_vae

    m = load_vae(path, n_samples=S, noise_seed=seed, noise=noise, likelihood=likelihood)
    return make_engine(m, None, task="unsupervised", chunk_size=100).grads(X).astype(np.float64)


def _estimator_errors(last_ckpt: str, Xt: np.ndarray, args) -> dict:
    """Error of each encoder-noise estimator of the VAE's loss gradient against a many-sample
    reference (S_ref per-example draws, ~ the expected gradient), at the last checkpoint, and what
    each does to the self-proponent check: S = 1 .. 64 fresh draws per example, the query's draws
    the training gradient's own or independent of them (the paper: independent, S = 16), one set of
    draws shared by all examples; and the reference's own share after a random projection."""
    from indexer.influence import self_proponent_rate
    from indexer.projection import BlockInfo, ProjectionSpec, Projector

    L = args.likelihood
    t = time.perf_counter()
    ref = _vae_grads(last_ckpt, Xt, args.s_ref, 99, L)
    t_ref = time.perf_counter() - t
    Sref = ref @ ref.T
    own_ref = self_proponent_rate(Sref)
    rn = np.linalg.norm(ref, axis=1)
    print(f"  encoder-noise estimators at the last checkpoint vs a reference of S={args.s_ref} draws per example "
          f"({t_ref:.0f}s; its own share {_pct(own_ref)}):")
    print(f"    {'estimator':42s} {'grad err':>9s} {'score err':>9s} {'err corr':>9s} {'own top-1':>9s}  {'s/grad':>7s}")
    errs, owns = {}, {}
    runs = [("per_example", s, i) for s in args.s_list for i in (False, True)] + [("shared", 16, False)]
    for noise, S, indep in runs:
        t = time.perf_counter()
        A = _vae_grads(last_ckpt, Xt, S, 1, L, noise)
        dt = (time.perf_counter() - t) / len(Xt)
        B = _vae_grads(last_ckpt, Xt, S, 2, L, noise) if indep else A
        Sm = B @ A.T
        E = A - ref
        En = E / np.linalg.norm(E, axis=1, keepdims=True)
        C = En @ En.T
        corr = (C.sum() - np.trace(C)) / (len(C) * (len(C) - 1))
        g_err = float(np.median(np.linalg.norm(E, axis=1) / rn))
        s_err = float(np.linalg.norm(Sm - Sref) / np.linalg.norm(Sref))
        errs[(noise, S, indep)] = s_err
        own = owns[(noise, S, indep)] = self_proponent_rate(Sm)
        tag = f"{noise}, S={S}" + (", query draws independent" if indep else ", query = training draws")
        print(f"    {tag:42s} {g_err:9.3f} {s_err:9.3f} {corr:9.3f} {_pct(own):>9s}  {dt * 1e3:6.1f}ms   "
              f"(vs reference share x{own / max(own_ref, 1e-9):.2f})")
    lo, hi = min(args.s_list), max(args.s_list)
    ratio = errs[("per_example", hi, True)] / errs[("per_example", lo, True)]
    print(f"    score error (independent draws) S={lo} -> S={hi}: x{ratio:.2f} (1/sqrt(S) predicts x{np.sqrt(lo / hi):.2f}); "
          "err corr = mean cosine between two examples' gradient errors (shared draws: one common error direction)")
    _row("VAE loss estimator: score error vs S (fresh draws)", ", ".join(
        f"S={s}: {errs[('per_example', s, True)]:.2f}" for s in args.s_list) + f" (vs S={args.s_ref})",
         "error <= eps w.p. 1-delta with Theta(1/(eps^2 delta)) samples", f"measured (x{ratio:.2f}, 1/sqrt(S): "
         f"x{np.sqrt(lo / hi):.2f})")
    # projection: the reference gradients through the service's dense JL projection
    D = ref.shape[1]
    proj = {}
    for k in args.proj_dims:
        pr = Projector(ProjectionSpec("dense", k, seed=0), [BlockInfo("all", "full", D, [("all", 0, D)])])
        P = pr.project_flat(ref).astype(np.float64)
        proj[k] = self_proponent_rate(P @ P.T)
    print(f"  projection (dense JL, service's projector) of the S={args.s_ref} gradients, last checkpoint: full "
          f"D={D}: {_pct(own_ref)}; " + "; ".join(f"k={k}: {_pct(v)}" for k, v in proj.items()))
    _row("VAE: self-proponent share, full gradient vs projected", f"full {_pct(own_ref)}; " + ", ".join(
        f"k={k} {_pct(v)}" for k, v in proj.items()), "full gradient, all parameters", "measured")
    return {"own_ref": own_ref, "owns": owns}


def bench_vae(X, y, args, tmp: Path, out: Path) -> None:
    """VAE-TracIn as Kong & Chaudhuri's code (zhifengkong/VAE-TracIn-pytorch) does it, scaled to
    the digits: their MNIST VAE (BetaVAE_MNIST: 784-8d-4d-2d, Kaiming init, d latents; d = 128 there,
    16 here), beta = 4, trained with plain SGD at a constant lr (batch 64), checkpoints evenly
    spaced, TracIn = sum over checkpoints of lr * <g_c(query), g_c(train)> on all parameters, no
    projection, each gradient with its own 16 fresh encoder samples (the query's independent of the
    training example's), on the loss their tracin.py differentiates (squared error of the decoded
    means + beta * KL; the Bernoulli one beside it); every training example as a query against the
    whole training set (they use the first 128 of 60k)."""
    from scipy.stats import spearmanr

    from indexer.influence import self_proponent_rate
    from indexer.vae import paper_hidden, train_vae, vae_loss_model

    n = args.n_vae
    Xt, yt = X[:n], y[:n]
    Xq, yq = X[n:n + args.n_query], y[n:n + args.n_query]
    P = Xt.reshape(n, -1).astype(np.float64)
    pix = self_proponent_rate(P @ P.T)
    D2 = ((P[:, None, :] - P[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(D2, np.inf)
    S = args.vae_samples
    d = args.vae_latent
    print(f"[vae-tracin] the paper's VAE 784-{'-'.join(map(str, paper_hidden(d)))}-({d} latents), beta 4, {n} training "
          f"digits; TracIn loss {args.likelihood} (paper's code), S={S} fresh draws per gradient; paper > 99%; "
          f"baseline pixel dot product {_pct(pix)}")
    print(f"  exact duplicates among the training digits: {int((D2 == 0).sum() // 2)} pairs (nearest other digit: "
          f"median squared pixel distance {np.median(D2.min(1)):.2f}, min {D2.min():.2f})")
    t = time.perf_counter()
    ck = [str(tmp / f"sgd{c}.pt") for c in range(args.sgd_ckpts)]
    vae = train_vae(Xt, epochs=args.sgd_epochs, seed=args.seed, checkpoints=ck, optimizer="sgd", lr=args.sgd_lr,
                    hidden=paper_hidden(d), latent=d, beta=4.0, init="kaiming", n_samples=S)
    t_sgd = time.perf_counter() - t
    steps = args.sgd_epochs * -(-n // 64)
    print(f"  trained: SGD lr {args.sgd_lr:g}, batch 64, {args.sgd_epochs} epochs ({steps} steps, lr x steps "
          f"{args.sgd_lr * steps:.1f}; paper 1e-4 x 1.5M = 150), {args.sgd_ckpts} checkpoints ({t_sgd:.0f}s)")
    est = _estimator_errors(ck[-1], Xt, args)

    # the sanity check over the checkpoints: one pass of gradients, several estimators
    t = time.perf_counter()
    XQ = np.concatenate([Xt, Xq])
    acc = {k: np.zeros((len(XQ), n)) for k in ("indep", "same", "bern_indep", "bern_same")}
    last = {}
    for c, path in enumerate(ck):
        for L, pre in ((args.likelihood, ""), ("bernoulli" if args.likelihood != "bernoulli" else "gaussian", "bern_")):
            A = _vae_grads(path, Xt, S, 1, L)
            B = _vae_grads(path, XQ, S, 2, L)
            Si, Ss = B @ A.T, A @ A.T
            acc[pre + "indep"] += vae.train_lr * Si
            acc[pre + "same"][:n] += vae.train_lr * Ss
            if c == len(ck) - 1:
                last[pre + "indep"], last[pre + "same"] = Si[:n], Ss
    t_main = time.perf_counter() - t
    other = "bernoulli" if args.likelihood != "bernoulli" else "gaussian"
    G = acc["indep"][:n]
    own = self_proponent_rate(G)
    r = {k: (self_proponent_rate(acc[k][:n]), self_proponent_rate(last[k])) for k in acc}
    print(f"  own strongest proponent ({len(ck)} checkpoints / last alone; {t_main:.0f}s):")
    for k, lab in (("indep", f"{args.likelihood}, independent query draws (paper)"),
                   ("same", f"{args.likelihood}, query = training draws"),
                   ("bern_indep", f"{other}, independent query draws"), ("bern_same", f"{other}, query = training draws")):
        print(f"    {lab:48s} {_pct(r[k][0]):>7s} / {_pct(r[k][1]):>7s}")
    print(f"    (vs pixel baseline x{own / max(pix, 1e-9):.1f})")
    _row(f"VAE: training digits their own strongest proponent ({len(ck)} ckpts, S={S}, fresh draws)", _pct(own),
         "> 99%", "met" if own > 0.99 else "MISSED")
    _row("VAE: the same, last checkpoint alone", _pct(r["indep"][1]), "> 99%", "met" if r["indep"][1] > 0.99 else "MISSED")
    _row(f"VAE: same, expected gradient (S={args.s_ref}), last checkpoint", _pct(est["own_ref"]), "> 99%",
         "met" if est["own_ref"] > 0.99 else "MISSED")

    # where the misses come from
    dg = np.diag(G)
    off = G.copy()
    np.fill_diagonal(off, -np.inf)
    win = off.argmax(1)
    miss = dg <= off.max(1)
    ranks = (G > dg[:, None]).sum(1) + 1
    if miss.any():
        mi = np.flatnonzero(miss)
        sq = np.diag(acc["same"][:n])  # squared-norm self-influence (same draws): the gradient's size
        pix_rank = np.array([(D2[i] < D2[i, win[i]]).sum() + 1 for i in mi])  # 1 = the pixel-nearest other digit
        norm_ratio = np.sqrt(np.maximum(sq[win[mi]], 0) / np.maximum(sq[mi], 1e-30))
        print(f"  misses ({miss.sum()}): self ranks {np.median(ranks[mi]):.0f} (median, max {ranks[mi].max()}) of {n}; "
              f"the winner has a larger gradient (norm ratio, median {np.median(norm_ratio):.2f}) in "
              f"{_pct(np.mean(norm_ratio > 1))}, is among the 5 pixel-nearest digits in {_pct(np.mean(pix_rank <= 5))}, "
              f"has the same label in {_pct(np.mean(yt[win[mi]] == yt[mi]))}")
        _row("VAE: a miss still ranks high", f"self ranked {np.median(ranks[mi]):.0f} (median) of {n}",
             "'still ranks very high'", "met" if np.median(ranks[mi]) <= 5 else "MISSED")
    _plot_self_proponents(out / "vae_self_proponents.png", Xt, G, win, miss, args.seed)

    # self-influence against the loss (the paper: the loss of the model, its TracIn loss)
    si = np.diag(acc["same"][:n])
    with torch_no_grad():
        loss = vae_loss_model(vae, n_samples=args.s_ref, noise_seed=3, likelihood=args.likelihood)(torch_tensor(Xt)).numpy()
        bloss = vae_loss_model(vae, n_samples=args.s_ref, noise_seed=3, likelihood="bernoulli")(torch_tensor(Xt)).numpy()
    rho = spearmanr(si, loss).statistic
    xc = np.clip(P, 1e-12, 1 - 1e-12)
    H = -(xc * np.log(xc) + (1 - xc) * np.log1p(-xc)).sum(1)
    rho_b, rho_ex = spearmanr(si, bloss).statistic, spearmanr(si, bloss - H).statistic
    print(f"  self-influence vs loss (final model, S={args.s_ref}): Spearman {rho:.3f} with its {args.likelihood} loss; "
          f"Bernoulli negative ELBO {rho_b:.3f}, above the data's own Bernoulli entropy (loss - H(x)) {rho_ex:.3f}; "
          f"baseline: self-influence vs pixel mass {spearmanr(si, P.sum(1)).statistic:.3f}")
    _row("VAE: self-influence vs loss (Spearman)", f"{rho:.3f} ({args.likelihood}); Bernoulli {rho_b:.3f}, "
         f"minus H(x) {rho_ex:.3f}", "'the larger loss, the larger self influence'", "met" if rho > 0.3 else "MISSED")
    _plot_self_influence(out / "vae_self_influence_vs_loss.png", Xt, si, loss, rho)

    # proponents and opponents of held-out digits: share with the query's label
    Q = acc["indep"][n:]
    chance = float(np.mean([np.mean(yt == c) for c in yq]))
    top = np.argsort(-Q, 1)[:, :10]
    bot = np.argsort(Q, 1)[:, :10]
    p1, o1 = np.mean(yt[top[:, 0]] == yq), np.mean(yt[bot[:, 0]] == yq)
    p10, o10 = np.mean(yt[top] == yq[:, None]), np.mean(yt[bot] == yq[:, None])
    print(f"  held-out digits ({len(Xq)}): strongest proponent has the query's label {_pct(p1)} (top-10 {_pct(p10)}; "
          f"paper ~80%), strongest opponent {_pct(o1)} (top-10 {_pct(o10)}; paper ~40%); chance {_pct(chance)}; "
          f"queries with no negative score {_pct(np.mean(Q.min(1) >= 0))}")
    _row("VAE: strongest proponents with the query's label", f"{_pct(p1)} top-1, {_pct(p10)} top-10", "~80%",
         "met" if abs(p1 - 0.8) <= 0.1 else "MISSED")
    _row("VAE: strongest opponents with the query's label", f"{_pct(o1)} top-1, {_pct(o10)} top-10", "~40%",
         "met" if abs(o1 - 0.4) <= 0.1 else "MISSED")


def torch_no_grad():
    import torch

    return torch.no_grad()


def torch_tensor(a):
    import torch

    return torch.as_tensor(a)


def _plot_self_proponents(path: Path, Xt, G, win, miss, seed: int) -> None:
    """The paper's sanity-check figure: training digits boxed green when they are their own strongest
    proponent, red otherwise; under each, its strongest other proponent."""
    plt = _plt()
    rng = np.random.default_rng(seed)
    picks = list(rng.choice(np.flatnonzero(~miss), size=min(12, int((~miss).sum())), replace=False))
    picks += list(np.flatnonzero(miss)[:12 - min(12, len(picks)) + 6])[:6]
    cols = len(picks)
    fig, axes = plt.subplots(2, cols, figsize=(cols * 0.95, 2.4))
    axes = np.atleast_2d(axes).reshape(2, cols)
    for c, i in enumerate(picks):
        for r, (j, colr) in enumerate(((i, "green" if not miss[i] else "red"), (win[i], "gray"))):
            ax = axes[r, c]
            ax.imshow(Xt[j].reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_edgecolor(colr)
                sp.set_linewidth(3 if r == 0 else 0.5)
        axes[1, c].set_xlabel(f"{G[i, win[i]] / G[i, i]:.2f}", fontsize=6)
    axes[0, 0].set_ylabel("train", fontsize=7)
    axes[1, 0].set_ylabel("top other", fontsize=7)
    fig.suptitle("VAE-TracIn: green = the digit is its own strongest proponent, red = not; below: its strongest "
                 "other proponent (score / self-influence)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"  plot: {path}")


def _plot_self_influence(path: Path, Xt, si, loss, rho: float) -> None:
    """Self-influence against the loss (scatter), and the 8 highest / lowest self-influence digits."""
    plt = _plt()
    fig = plt.figure(figsize=(9, 3.6))
    ax = fig.add_axes([0.07, 0.14, 0.38, 0.76])
    ax.scatter(loss, si, s=6, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("TracIn loss of the final model")
    ax.set_ylabel("TracIn self-influence")
    ax.set_title(f"Spearman {rho:.2f}", fontsize=9)
    order = np.argsort(-si)
    for r, (ids, name) in enumerate(((order[:8], "highest"), (order[::-1][:8], "lowest"))):
        for c, i in enumerate(ids):
            a = fig.add_axes([0.5 + c * 0.062, 0.55 - r * 0.4, 0.058, 0.058 * 9 / 3.6])  # square in inches
            a.imshow(Xt[i].reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
            a.axis("off")
            if c == 0:
                a.set_title(f"{name} self-influence", fontsize=7, loc="left")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"  plot: {path}")


def bench_closed_form(args, out: Path) -> None:
    """k-NN, KDE and GMM on the 2-D six-cluster set: closed-form self-influences and influences over a
    test point, against a brute-force leave-one-out loop (time and largest difference), and the
    paper's observations as numbers; two PNGs."""
    from scipy.stats import spearmanr

    from indexer.density_influence import GMMDensity, KDEDensity, KNNDensity, six_clusters

    k, h = 5, 0.5
    X, lab = six_clusters(k=k, seed=args.seed)
    n = len(X)
    z = np.array([[0.9, 0.7]])  # inside the largest cluster, off its centre
    models = {f"k-NN (k={k})": KNNDensity(k).fit(X), f"KDE (h={h})": KDEDensity(h).fit(X),
              "GMM (6 components)": GMMDensity(6, seed=args.seed).fit(X)}
    print(f"[closed-form] 2-D six clusters (sizes {np.bincount(lab).tolist()}), test point z = {z[0].tolist()}")
    dist = np.linalg.norm(X - z, axis=1)
    knn_z = set(np.argsort(dist)[:k])
    zc = int(np.argmin([np.linalg.norm(X[lab == c].mean(0) - z) for c in range(6)]))
    res = {}
    for name, m in models.items():
        t = time.perf_counter()
        si, IF = m.self_influence(), m.influence(z)[0]
        t_closed = time.perf_counter() - t
        t = time.perf_counter()
        brute_si, brute_if = _brute_loo(m, X, z)
        t_brute = time.perf_counter() - t
        diff = max(np.abs(brute_si - si).max(), np.abs(brute_if - IF).max())
        res[name] = (si, IF)
        props = np.argsort(-IF)[:k]
        opps = np.argsort(IF)[:10]
        print(f"  {name:20s} closed form {t_closed * 1e3:7.1f} ms   brute-force refits {t_brute * 1e3:8.1f} ms "
              f"(x{t_brute / t_closed:.0f})   max |difference| {diff:.1e}")
        share_knn = len(knn_z & set(props)) / k
        prop10 = np.argsort(-IF)[:10]
        side = np.mean((X[prop10] - X[lab == zc].mean(0)) @ (z[0] - X[lab == zc].mean(0)) > 0)
        print(f"    top-{k} proponents of z = its {k} nearest neighbours: {_pct(share_knn)}; top-10 proponents in z's "
              f"cluster {_pct(np.mean(lab[prop10] == zc))}, on z's side of its centre {_pct(side)}; top-10 opponents "
              f"in z's cluster: {_pct(np.mean(lab[opps] == zc))}; Spearman(influence over z, -distance) "
              f"{spearmanr(IF, -dist).statistic:.3f}")
        if name.startswith("k-NN"):
            small = np.mean(lab[np.argsort(-si)[:k]] == 5)
            print(f"    highest {k} self-influences in the cluster of exactly {k} points: {_pct(small)}")
            _row(f"k-NN: highest self-influences in the {k}-point cluster", _pct(small),
                 "'come from a cluster with exactly k points'", "met" if small == 1 else "MISSED")
            _row("k-NN: strongest proponents of z = its k nearest neighbours", _pct(share_knn), "'exactly'",
                 "met" if share_knn == 1 else "MISSED")
        elif name.startswith("KDE"):
            dens = m.log_density(X)
            r = spearmanr(si, dens).statistic
            print(f"    Spearman(self-influence, log-density): {r:.3f} (high self-influence in sparse regions)")
            _row("KDE: self-influence vs log-density (Spearman)", f"{r:.3f}",
                 "'high in sparse, low in dense regions' (< 0)", "met" if r < -0.5 else "MISSED")
            _row("KDE: strongest proponents of z = its k nearest neighbours", _pct(share_knn), "'exactly'",
                 "met" if share_knn == 1 else "MISSED")
        else:
            comp = m.component(X)
            g = m.gmm
            maha = np.array([np.sqrt((X[i] - g.means_[c]) @ g.precisions_[c] @ (X[i] - g.means_[c]))
                             for i, c in enumerate(comp)])
            r = spearmanr(si, maha).statistic
            same = np.mean(lab[opps] == zc)
            print(f"    Spearman(self-influence, Mahalanobis distance to own centre): {r:.3f}")
            _row("GMM: self-influence vs distance to the cluster centre (Spearman)", f"{r:.3f}",
                 "'far from centres: high; near: low' (> 0)", "met" if r > 0.5 else "MISSED")
            _row("GMM: strongest proponents of z", f"{_pct(share_knn)} of top {k} are its {k} NN; top 10: "
                 f"{_pct(np.mean(lab[prop10] == zc))} in its cluster, {_pct(side)} on its side",
                 "'in all these models ... the nearest neighbours of z'",
                 "met" if share_knn == 1 else "partly: z's cluster and side, not its nearest")
            _row("GMM: strong opponents of z from z's own cluster", f"{_pct(same)} of the top 10",
                 "'some strong opponents are from the same cluster'", "met" if same > 0 else "MISSED")
    _plot_closed_form(out, X, z, res, models)


def _brute_loo(m, X: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Self-influences and influences over z by refitting the estimator on X without each x_i (the
    GMM keeps the other examples' responsibilities, as its closed form does)."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    from indexer.density_influence import GMMDensity, KNNDensity

    n = len(X)
    si, IF = np.empty(n), np.empty(n)
    if isinstance(m, GMMDensity):
        def loss(Xs, R, pts):
            logs = []
            for c in range(R.shape[1]):
                w = R[:, c]
                mu = np.average(Xs, axis=0, weights=w)
                cov = np.cov(Xs.T, aweights=w, bias=True) + m.reg_covar * np.eye(Xs.shape[1])
                logs.append(np.log(w.sum() / len(Xs)) + np.atleast_1d(multivariate_normal(mu, cov).logpdf(pts)))
            return -logsumexp(np.stack(logs), axis=0)
        full = lambda pts: loss(X, m.resp, pts)  # noqa: E731
        drop = lambda i, pts: loss(np.delete(X, i, 0), np.delete(m.resp, i, 0), pts)  # noqa: E731
    else:
        param = m.k if isinstance(m, KNNDensity) else m.bandwidth
        drop = lambda i, pts: type(m)(param).fit(np.delete(X, i, 0)).loss(pts)  # noqa: E731
        full = m.loss
    base_z = full(z)
    base_x = full(X)
    for i in range(n):
        pts = np.concatenate([z, X[i:i + 1]])
        lz, lx = drop(i, pts)
        IF[i], si[i] = lz - base_z[0], lx - base_x[i]
    return si, IF


def _plot_closed_form(out: Path, X, z, res, models) -> None:
    """docs figures: self-influence per estimator; influence over z per estimator, with the influence
    of every training point against its distance to z."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _plt()
    names = list(res)
    lo, hi = X.min(0) - 1.5, X.max(0) + 1.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 160), np.linspace(lo[1], hi[1], 160))
    grid = np.c_[gx.ravel(), gy.ravel()]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.2))
    for c, name in enumerate(names):
        dens = models[name].log_density(grid).reshape(gx.shape)
        ax = axes[0, c]
        ax.contourf(gx, gy, np.maximum(dens, np.percentile(dens, 20)), levels=20, cmap="Greys")
        ax.scatter(X[:, 0], X[:, 1], s=4, c="tab:blue")
        ax.set_title(f"{name}: log-density", fontsize=9)
        si = res[name][0]
        rank = np.argsort(np.argsort(si)) / (len(si) - 1)  # colour by rank: heavy tails stay readable
        ax = axes[1, c]
        sc = ax.scatter(X[:, 0], X[:, 1], s=9, c=rank, cmap="coolwarm")
        ax.set_title(f"{name}: self-influence", fontsize=9)
    fig.colorbar(sc, ax=axes[1, :].tolist(), shrink=0.6, label="self-influence rank (red high, blue low)")
    path = out / "influence_2d_self.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"  plot: {path}")

    fig, axes = plt.subplots(2, 3, figsize=(13, 8.2))
    dist = np.linalg.norm(X - z, axis=1)
    for c, name in enumerate(names):
        IF = res[name][1]
        a = np.abs(IF).max()
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-a if IF.min() < 0 else -1e-12, vmax=a)
        order = np.argsort(np.abs(IF))
        ax = axes[0, c]
        ax.scatter(X[order, 0], X[order, 1], s=10, c=IF[order], cmap="coolwarm", norm=norm)
        ax.scatter(z[:, 0], z[:, 1], marker="x", s=120, c="green", linewidths=3)
        ax.set_title(f"{name}: influence over z (green x)", fontsize=8)
        ax = axes[1, c]
        ax.scatter(dist, IF, s=6, c=IF, cmap="coolwarm", norm=norm)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=max(1e-4, a * 1e-3))
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("distance to z")
        ax.set_ylabel("IF(x_i, z)")
        ax.set_title(f"{name}: influence of every training point", fontsize=8)
    fig.suptitle("red: proponents (removing them lowers the density at z), blue: opponents", fontsize=9)
    fig.tight_layout()
    path = out / "influence_2d_proponents.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"  plot: {path}")


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
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "gradindex-bench"),
                    help="folder for the PNGs (the full run writes docs/)")
    ap.add_argument("--only", choices=["bilrp", "vae", "closed", "cnn"], default=None)
    ap.add_argument("--figures", default=None, help="folder for the VGG-16 pair figure (default: --out)")
    args = ap.parse_args(argv)
    q = args.quick
    args.pairs, args.repeats = (3, 2) if q else (10, 3)
    args.vgg_pairs = 1  # a VGG-16 pair without projection takes minutes on one core
    args.n_vae, args.n_cnn, args.n_query = (150, 400, 40) if q else (500, 1000, 200)
    args.cnn_epochs, args.vae_epochs = (3, 6) if q else (3, 30)
    args.sgd_epochs, args.sgd_ckpts, args.vae_samples = (40, 4, 16) if q else (800, 10, 16)
    args.sgd_lr, args.vae_latent, args.likelihood = 1e-3, 4 if q else 16, "gaussian"
    args.s_ref, args.s_list, args.proj_dims = (32, (1, 16), (64,)) if q else (256, (1, 4, 16, 64), (128, 1024))

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
        if args.only in (None, "closed"):
            bench_closed_form(args, out)
        if args.only in (None, "vae"):
            bench_vae(X, y, args, Path(tmp), out)
        if args.only in (None, "cnn"):
            bench_cnn(X, y, args, Path(tmp))
    if PAPER_TABLE:
        print("\n[paper] each figure against Kong & Chaudhuri 2021 (VAE-TracIn and the closed forms)")
        w = max(len(r[0]) for r in PAPER_TABLE)
        print(f"  {'figure':{w}s} | {'measured':34s} | {'paper':48s} | verdict")
        for fig, meas, paper, verdict in PAPER_TABLE:
            print(f"  {fig:{w}s} | {meas:34s} | {paper:48s} | {verdict}")


if __name__ == "__main__":
    main()
