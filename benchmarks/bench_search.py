"""Search benchmark: 1,000,000 gradient-like vectors (d = 512), flat / IVF / HNSW, batch 1 / 64 / 1000.

Vectors with the structure of real gradient embeddings: factored-projected (k = 512) per-example
gradients of the trained digits CNN, augmented to 1M by random rescaling and noise (not isotropic
noise, on which every ANN index fails). Vectors are L2-normalized (grad_cos), the kernel ANN
indexes are built for. Reports build time, memory, query latency and throughput and recall@10 for
each index, and the flat scan's speed as a fraction of the memory bandwidth (batch 1) and of the
GEMM peak (batches 64 and 1000), both measured in the same run. Exact search is served two ways,
FAISS ``IndexFlatIP`` and ``indexer.store.ExactSearcher`` (chunked GEMM + top-k); ``VectorStore``
keeps the faster one behind its ``search``.

    python benchmarks/bench_search.py            # full run (a few minutes, ~6 GB RAM)
    python benchmarks/bench_search.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import median_time as _median_time  # noqa: E402


def median_time(fn, reps: int) -> float:
    """Median of ``reps`` timed runs, no warm-up (searches are warm after the first batch)."""
    return _median_time(fn, reps, warmup=0)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def base_vectors(n_base: int, n_query: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Projected gradients of the trained digits CNN for n_base training and n_query held-out examples."""
    import torch

    from indexer.demo import digits_cnn_torch, load_digits_28, train_digits_cnn
    from indexer.engine import make_engine
    from indexer.projection import ProjectionSpec, Projector, layout_of

    X, y = load_digits_28(n_base + n_query, seed=seed)
    model = train_digits_cnn(X[:1797], y[:1797], epochs=2, seed=0)
    eng = make_engine(model, torch.nn.CrossEntropyLoss(), chunk_size=256)
    out, pr = [], None
    from tqdm import tqdm

    for _, blocks in tqdm(eng.iter_blocks(X, y), total=(len(X) + 255) // 256, desc="gradients", unit="chunk"):
        if pr is None:
            pr = Projector(ProjectionSpec("factored", dim, seed=1), layout_of(blocks, eng.offsets()))
        out.append(pr.project(blocks))
    V = np.concatenate(out)
    perm = np.random.default_rng(seed).permutation(len(V))
    return V[perm[:n_base]], V[perm[n_base:]]


def augment(base: np.ndarray, n: int, seed: int = 0, noise: float = 0.3) -> np.ndarray:
    """n vectors: random base rows, rescaled and perturbed (relative noise), L2-normalized; in blocks."""
    rng = np.random.default_rng(seed)
    d = base.shape[1]
    norms = np.linalg.norm(base, axis=1, keepdims=True) + 1e-12
    unit = (base / norms).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        src = rng.integers(0, len(base), m)
        blk = unit[src] + rng.standard_normal((m, d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
        out[s:s + m] = blk
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny version (seconds)")
    ap.add_argument("--n", type=int, default=None, help="number of database vectors (default 1,000,000)")
    ap.add_argument("--threads", type=int, default=1, help="threads for torch, BLAS and FAISS (default 1)")
    ap.add_argument("--hnsw-n", type=int, default=None, help="vectors in the HNSW index (its build is slow)")
    args = ap.parse_args(argv)
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    threadpool_limits(args.threads)
    quick = args.quick
    n = args.n or (20_000 if quick else 1_000_000)
    d = 512
    nq = 200 if quick else 1000
    hnsw_n = args.hnsw_n or (n if quick else 200_000)
    print(f"# bench_search: n={n:,} d={d} queries={nq} threads={args.threads} faiss {faiss.__version__}")

    from indexer.store import ExactSearcher, IndexSpec, VectorStore, recall_at_k

    t = time.perf_counter()
    base, qbase = base_vectors(600 if quick else 4000, 100 if quick else 400, d)
    X = augment(base, n, seed=1)
    Q = augment(qbase, nq, seed=2)
    ids = np.arange(n, dtype=np.int64)
    print(f"data: {len(base)} projected digits gradients -> {n:,} vectors ({X.nbytes / 2**30:.2f} GiB) "
          f"in {time.perf_counter() - t:.1f} s")

    # ---- machine peaks, same run ---------------------------------------------------------------
    Xt = torch.from_numpy(X)
    big = Xt[: max(1, min(n, (512 << 20) // (4 * d)))]  # >= 512 MB: out of cache when n is large
    dst = torch.empty_like(big)
    read_bw = big.numel() * 4 / median_time(lambda: torch.sum(big), 3) / 1e9
    copy_bw = 2 * big.numel() * 4 / median_time(lambda: dst.copy_(big), 3) / 1e9
    bandwidth = max(read_bw, copy_bw)
    del dst
    A = torch.randn(2048, 2048)
    gemm_t = median_time(lambda: A @ A, 3)
    gemm_peak = 2 * 2048**3 / gemm_t / 1e9
    print(f"machine: memory bandwidth {bandwidth:.1f} GB/s (max of sum-read {read_bw:.1f}, copy read+write "
          f"{copy_bw:.1f}), "
          f"fp32 GEMM {gemm_peak:.0f} GFLOP/s (2048^3), {args.threads} thread(s)")

    # ---- exact ground truth (GEMM searcher) ------------------------------------------------------
    ex = ExactSearcher(X, ids)
    t = time.perf_counter()
    _, I_true = ex.search(Q, 10)
    print(f"ground truth: exact top-10 of {nq} queries in {time.perf_counter() - t:.1f} s")

    rows = []

    def measure(name: str, search, build_s: float, mem_mb: float, recall_ids=None):
        res = {"index": name, "build_s": build_s, "mem_mb": mem_mb}
        qs = Q[:20] if not quick else Q[:5]
        res["b1_ms"] = 1000 * statistics.median([median_time(lambda q=q: search(q[None]), 1) for q in qs])
        reps64 = 3
        res["b64_qps"] = 64 / median_time(lambda: search(Q[:64]), reps64)
        t0 = time.perf_counter()
        _, I = search(Q)
        res["b1000_qps"] = len(Q) / (time.perf_counter() - t0)
        res["recall"] = recall_at_k(I, I_true, 10)
        rows.append(res)
        print(f"{name:<28} build {build_s:7.1f} s  mem {mem_mb:8.0f} MB  batch1 {res['b1_ms']:8.1f} ms  "
              f"batch64 {res['b64_qps']:8.1f} q/s  batch{len(Q)} {res['b1000_qps']:8.1f} q/s  "
              f"recall@10 {res['recall']:.3f}", flush=True)
        return res

    # flat
    gc.collect()
    m0 = rss_mb()
    t = time.perf_counter()
    flat = VectorStore.create(IndexSpec("flat"), d, "grad_cos", n)
    flat.add(X, ids)
    b_flat = time.perf_counter() - t
    mem_flat = rss_mb() - m0
    r_faiss = measure("flat IndexFlatIP (FAISS)", lambda q: flat.search(q, 10, use_faiss=True), b_flat, mem_flat)
    r_gemm = measure("flat GEMM+top-k (ours)", lambda q: flat.search(q, 10, use_faiss=False), b_flat, mem_flat)
    r_auto = measure("flat VectorStore.search", lambda q: flat.search(q, 10), b_flat, mem_flat)
    del flat
    gc.collect()

    # IVF
    nlist = 256 if quick else 2048
    m0 = rss_mb()
    t = time.perf_counter()
    ivf = VectorStore.create(IndexSpec("ivf", nlist=nlist, nprobe=32), d, "grad_cos", n)
    rng = np.random.default_rng(3)
    ivf.train(X[np.sort(rng.choice(n, size=min(n, nlist * 40), replace=False))])
    ivf.add(X, ids)
    b_ivf = time.perf_counter() - t
    mem_ivf = rss_mb() - m0
    for nprobe in (16, 64):
        measure(f"IVF{nlist},Flat nprobe={nprobe}", lambda q, p=nprobe: ivf.search(q, 10, nprobe=p), b_ivf, mem_ivf)
    del ivf
    gc.collect()

    # HNSW (on hnsw_n vectors: its build is the slow one; recall is against the exact top-10 of that subset)
    m0 = rss_mb()
    t = time.perf_counter()
    hn = VectorStore.create(IndexSpec("hnsw", hnsw_m=16, ef_construction=40), d, "grad_cos", hnsw_n)
    hn.add(X[:hnsw_n], ids[:hnsw_n])
    b_h = time.perf_counter() - t
    mem_h = rss_mb() - m0
    if hnsw_n != n:
        _, I_sub = ExactSearcher(X[:hnsw_n], ids[:hnsw_n]).search(Q, 10)
        I_true_saved = I_true
        I_true = I_sub
    for ef in (64, 256):
        measure(f"HNSW16 ef={ef} (n={hnsw_n:,})", lambda q, e=ef: hn.search(q, 10, ef_search=e), b_h, mem_h)
    if hnsw_n != n:
        I_true = I_true_saved
    del hn

    # ---- flat scan against the machine ---------------------------------------------------------
    print("\nflat scan vs machine peaks (same run):")
    for r in (r_faiss, r_gemm):
        b1_gbs = X.nbytes / (r["b1_ms"] / 1000) / 1e9
        f64 = 2 * n * d * r["b64_qps"] / 1e9
        f1000 = 2 * n * d * r["b1000_qps"] / 1e9
        print(f"  {r['index']:<26} batch1 {b1_gbs:6.1f} GB/s = {b1_gbs / bandwidth:5.2f} x bandwidth | "
              f"batch64 {f64:6.1f} GFLOP/s = {f64 / gemm_peak:5.2f} x GEMM peak | "
              f"batch{len(Q)} {f1000:6.1f} GFLOP/s = {f1000 / gemm_peak:5.2f} x GEMM peak")
    print(f"\nGEMM path vs IndexFlatIP: batch1 {r_faiss['b1_ms'] / r_gemm['b1_ms']:.2f}x, "
          f"batch64 {r_gemm['b64_qps'] / r_faiss['b64_qps']:.2f}x, batch{len(Q)} "
          f"{r_gemm['b1000_qps'] / r_faiss['b1000_qps']:.2f}x (speed ratios, >1 = GEMM faster)")
    print(f"VectorStore.search (auto): batch1 {r_auto['b1_ms']:.1f} ms, batch64 {r_auto['b64_qps']:.1f} q/s, "
          f"batch{len(Q)} {r_auto['b1000_qps']:.1f} q/s")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(__file__).resolve().parent / "out"
        out.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            ax.scatter(r["recall"], r["b64_qps"], label=r["index"])
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries/s at batch 64")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"search, n={n:,}, d={d}, {args.threads} thread(s)")
        fig.tight_layout()
        fig.savefig(out / "bench_search.png", dpi=100)
        print(f"plot: {out / 'bench_search.png'}")
    except Exception as exc:  # noqa: BLE001 - the plot is optional
        print(f"(no plot: {exc})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
