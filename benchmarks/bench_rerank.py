"""Exact re-ranking of a projected index: recall@10 and score error against exact gradients, and its cost.

The digits CNN index (20,000 examples, TensorSketch to k = 2,048, stage 1 an exact scan of the
projected vectors: ``factory = "Flat"``) built with ``index.exact_rerank``. For held-out queries:

* **projected only**: the top-10 by projected scores (what an index without the factors answers);
* **projected + exact re-rank (R)**: the top R candidates by projected score re-scored with the exact
  kernel values of the unprojected gradients (the stored compact factors), for several R;

both against the truth, brute-force :class:`explainers.GradientSimilarity` over all training examples
(exact gradients): recall@10 and the relative error of each returned score against the exact score of
the same example. Cost per query at batch 1 (median over the queries): the search with exact
re-ranking vs the same search re-scoring against the projected vectors (the baseline, same run), and
the query's embedding with and without its exact factors. One thread.

    python benchmarks/bench_rerank.py --prepare   # builds the indexes (niced, untimed)
    flock /work/bench.lock python benchmarks/bench_rerank.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._util import pin_threads  # noqa: E402

OUT = Path("/tmp/gradindex_bench_rerank")
RESULTS = Path(__file__).resolve().parent / "results"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "exact_rerank_digits.png"


def build(wd: Path, kernel: str, n: int, k: int, rmax: int) -> str:
    from server.demo import ensure_digits_index

    name = f"{kernel}_{n}_{k}"
    ensure_digits_index(wd, name, n=n, progress=True, overrides={
        "index": {"kernel": kernel, "faiss": "flat", "factory": "Flat", "rerank": rmax, "exact_rerank": True},
        "projection": {"kind": "sketch", "dim": k}, "build": {"recall_sample": 0}})
    return name


def truth(n: int, kernel: str, Xq: np.ndarray, yq: np.ndarray, cache: Path) -> np.ndarray:
    """Exact scores (m, n) by brute force: GradientSimilarity over every training example (cached in ``cache``,
    computed by ``--prepare`` so the timed run does not wait for it)."""
    if cache.exists():
        z = np.load(cache)
        if np.array_equal(z["Xq"], Xq):
            return z["S"]
    import torch

    from explainers.similarity import GradientSimilarity
    from indexer.demo import digits_cnn_torch, load_digits_28
    from indexer.kernels import EPS
    from server.demo import CONFIG

    Xt, yt = load_digits_28(n)
    model = digits_cnn_torch()
    model.load_state_dict(torch.load(CONFIG.parent / "weights.pt", weights_only=True))
    model.eval()
    gs = GradientSimilarity(model, torch.nn.CrossEntropyLoss(), sim_fn=kernel, precompute_grads=True, backend="pytorch",
                            eps=0.0 if kernel == "grad_cos" else EPS, verbose=True).fit(Xt, yt)
    e = gs.explain(Xq, yq)
    S = np.empty_like(e.data["scores"])
    np.put_along_axis(S, e.data["ordered_indices"], e.data["scores"], 1)
    np.savez(cache, S=S, Xq=Xq)
    return S


def fidelity(ids: np.ndarray, scores: np.ndarray, S: np.ndarray, k: int = 10) -> tuple[float, float, float]:
    """(recall@k against the exact top-k, median and max relative error of returned scores vs exact)."""
    true = np.argsort(-S, 1, kind="stable")[:, :k]
    rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), true.tolist())]))
    ex = np.take_along_axis(S, ids, 1)
    err = np.abs(scores - ex) / np.maximum(np.abs(ex), 1e-12)
    return rec, float(np.median(err)), float(err.max())


def per_query_ms(fn, m: int, repeat: int = 3) -> float:
    """Median over queries of the median of ``repeat`` timed calls of fn(i) (ms), after one warm-up each."""
    out = []
    for i in range(m):
        fn(i)
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn(i)
            ts.append(time.perf_counter() - t)
        out.append(statistics.median(ts))
    return 1e3 * statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 examples, k = 512, 10 queries")
    ap.add_argument("--prepare", action="store_true", help="only build the indexes (untimed)")
    ap.add_argument("--kernels", default="grad_cos,grad_dot")
    args = ap.parse_args(argv)
    pin_threads(1)
    from indexer.chunks import set_threads

    set_threads(1)  # torch, BLAS (threadpoolctl) and FAISS's OpenMP: one thread each
    from indexer.demo import load_digits_28
    from indexer.query import open_index

    n, k, m = (1000, 512, 10) if args.quick else (20_000, 2048, 50)
    Rs = (20, 50, 100) if args.quick else (50, 100, 200, 500, 1000)
    kernels = args.kernels.split(",")
    wd = OUT / ("quick" if args.quick else "full")
    names = {kn: build(wd, kn, n, k, max(Rs)) for kn in kernels}
    Xq, yq = load_digits_28(n + m, seed=7)  # other seeded shifts than the index's copies: unseen images
    Xq, yq = Xq[-m:], yq[-m:]
    if args.prepare:
        for kn in kernels:
            truth(n, kn, Xq, yq, wd / f"truth_{kn}.npz")
        return 0
    print(f"# bench_rerank: digits CNN, n={n:,} training examples, TensorSketch k={k}, {m} queries, 1 thread, "
          f"quick={args.quick}")
    rows = {}
    for kernel in kernels:
        S = truth(n, kernel, Xq, yq, wd / f"truth_{kernel}.npz")
        idx = open_index(wd, names[kernel])
        fs = idx.store.factors
        print(f"\n## {kernel}: factors {fs.record_bytes:,} B/example ({fs.record_bytes * n / 2**20:,.0f} MiB on disk) "
              f"vs projected {4 * k:,} B/example")
        Q, E = idx.embed(Xq, yq, exact=True)
        t_embed = per_query_ms(lambda i: idx.embed(Xq[i:i + 1], yq[i:i + 1]), m)
        t_embed_f = per_query_ms(lambda i: idx.embed(Xq[i:i + 1], yq[i:i + 1], exact=True), m)
        print(f"query embedding: {t_embed:.2f} ms; with its exact factors {t_embed_f:.2f} ms "
              f"({t_embed_f / t_embed:.2f}x)")
        p = idx.search(Q, 10, rerank=10)
        base = fidelity(p.ids, p.scores, S)
        print(f"{'search':<32} {'recall@10':>9} {'score err med':>13} {'max':>9} {'ms/query':>9} {'x proj.':>8}")
        print(f"{'projected only':<32} {base[0]:>9.3f} {base[1]:>13.2e} {base[2]:>9.2e}")
        rows[kernel] = {"proj": base, "R": []}
        for R in Rs:
            r = idx.search(Q, 10, rerank=R, exact=E)
            assert r.exact_scores
            f = fidelity(r.ids, r.scores, S)
            t_proj = per_query_ms(lambda i: idx.search(Q[i:i + 1], 10, rerank=R), m)
            t_ex = per_query_ms(lambda i: idx.search(Q[i:i + 1], 10, rerank=R, exact=E.rows(i, i + 1)), m)
            rows[kernel]["R"].append((R, f, t_ex, t_proj))
            print(f"{f'projected + exact re-rank R={R}':<32} {f[0]:>9.3f} {f[1]:>13.2e} {f[2]:>9.2e} {t_ex:>9.2f} "
                  f"{t_ex / t_proj:>7.2f}x  (same search re-scoring against the projected vectors: {t_proj:.2f} ms; "
                  f"exact re-ranking adds {t_ex - t_proj:+.2f} ms)")
        idx.close()
    _plot(rows, n, k)
    print(f"\nfigure: {FIGURE.relative_to(FIGURE.parents[1])}")
    return 0


def _plot(rows: dict, n: int, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for kernel, r in rows.items():
        Rs = [x[0] for x in r["R"]]
        line = ax[0].plot(Rs, [x[1][0] for x in r["R"]], "o-", label=f"{kernel}: + exact re-rank")[0]
        ax[0].axhline(r["proj"][0], ls="--", color=line.get_color(), label=f"{kernel}: projected only")
        ax[1].plot(Rs, [max(x[1][2], 1e-9) for x in r["R"]], "o-", color=line.get_color(), label=f"{kernel}: re-ranked")
        ax[1].axhline(r["proj"][2], ls="--", color=line.get_color(), label=f"{kernel}: projected only")
        ax[2].plot(Rs, [x[2] for x in r["R"]], "o-", color=line.get_color(), label=f"{kernel}: exact re-rank")
        ax[2].plot(Rs, [x[3] for x in r["R"]], "x:", color=line.get_color(), label=f"{kernel}: projected re-score")
    ax[0].set(xscale="log", xlabel="candidates re-ranked R", ylabel="recall@10 vs exact gradients")
    ax[1].set(xscale="log", yscale="log", xlabel="candidates re-ranked R", ylabel="max relative score error")
    ax[2].set(xscale="log", xlabel="candidates re-ranked R", ylabel="search ms / query (batch 1)")
    for a in ax:
        a.legend(fontsize=7)
    fig.suptitle(f"digits CNN, {n:,} examples, TensorSketch k={k}: projected-only vs exact re-ranking")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
