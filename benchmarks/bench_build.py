"""Build benchmark: throughput, peak RSS and fidelity of exact vs projected index builds (digits CNN).

On the seed CNN (~413k parameters, trained on the spot) with 20,000 digits examples, in one run:

* baselines measured in the same run: one ordinary batched backward pass (mean loss, batch 256;
  the ceiling, not per-example), alibi's approach (a per-example loop copying each flattened
  gradient into one in-memory matrix) and the raw gradient engine;
* full ``build_index`` runs (config → gradients → projection → shards → FAISS + SQLite), each in
  its own process so its peak RSS is its own: exact (no projection), dense-blockwise projection,
  the factored (Kronecker) projection and the TensorSketch at k = 512, 2048, 8192;
* fidelity of projected to exact grad_dot (and grad_cos) scores: mean Spearman over queries and
  recall@10 of the exact top-10, for held-out queries.

Exact and dense builds cost n·D (·k) per example whatever we do, so they run on a subset (printed);
factored and sketch builds run on all examples. Threads are pinned (``--threads``, default 1).

    python benchmarks/bench_build.py            # full run (several minutes)
    python benchmarks/bench_build.py --quick    # a tiny version (under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out" / "build"


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin(threads: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def backward_rate(model, X: np.ndarray, y: np.ndarray) -> float:
    """Examples/s of one ordinary batched backward pass (mean loss, batch 256): the ceiling."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    model.zero_grad()
    loss_fn(model(Xt[:256]), yt[:256]).backward()  # warm-up
    t = time.perf_counter()
    for s in range(0, len(Xt), 256):
        model.zero_grad()
        loss_fn(model(Xt[s:s + 256]), yt[s:s + 256]).backward()
    return len(Xt) / (time.perf_counter() - t)


def child(cfg: str, wd: str) -> None:
    """Run one build in this process and print its figures as JSON (peak RSS is this process's).

    The batched-backward baseline is measured in the same process just before and after the build
    (median of the two), so that the ratio is taken under the same machine load.
    """
    import tomllib

    import torch

    from indexer.build import build_index

    c = tomllib.loads(Path(cfg).read_text())
    z = np.load(c["data"]["path"])
    X, y = z["X"][:2048], z["y"][:2048]
    from indexer.demo import digits_cnn_torch

    m = digits_cnn_torch()
    m.load_state_dict(torch.load(c["model"]["weights"], weights_only=True))
    m.eval()
    b0 = backward_rate(m, X, y)
    r = build_index(cfg, wd, progress=False, replace=True)
    b1 = backward_rate(m, X, y)
    print("RESULT " + json.dumps({"count": r.count, "seconds": r.seconds, "compute_seconds": r.compute_seconds,
                                  "dim": r.dim, "rss_mb": peak_rss_mb(), "backward_eps": (b0 + b1) / 2}))


def write_config(path: Path, name: str, data: Path, weights: Path, limit: int, proj: str, chunk: int,
                 threads: int) -> Path:
    path.write_text(textwrap.dedent(f'''
        [model]
        name = "digits-cnn"
        entry = "{ROOT / 'examples' / 'digits' / 'model.py'}:build_model"
        weights = "{weights}"
        loss = "cross_entropy"
        [data]
        format = "npz"
        path = "{data}"
        limit = {limit}
        [index]
        name = "{name}"
        kernel = "grad_dot"
        faiss = "flat"
        [projection]
        {proj}
        [build]
        chunk_size = {chunk}
        threads = {threads}
        recall_sample = 0
        '''))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny version")
    ap.add_argument("--n", type=int, default=None, help="training examples (default 20,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    pin(args.threads)
    if args.child:
        child(*args.child)
        return 0
    import torch
    from scipy.stats import spearmanr

    from indexer.demo import digits_cnn_torch, load_digits_28, train_digits_cnn
    from indexer.engine import make_engine

    quick = args.quick
    n = args.n or (600 if quick else 20_000)
    n_exact = 32 if quick else 1000
    n_dense = {512: 32, 2048: 16, 8192: 16} if quick else {512: 1024, 2048: 512, 8192: 256}
    n_loop = 32 if quick else 400
    n_q = 10 if quick else 50
    ks = (2048,) if quick else (512, 2048, 8192)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"# bench_build: n={n:,} threads={args.threads} quick={quick}")

    X, y = load_digits_28(n + n_q, seed=0)
    Xq, yq = X[n:], y[n:]
    X, y = X[:n], y[:n]
    data = OUT / f"digits{n}.npz"
    np.savez(data, X=X, y=y)
    weights = OUT / "weights.pt"
    torch.manual_seed(0)
    model = train_digits_cnn(X[:1797], y[:1797], epochs=3, seed=0)
    torch.save(model.state_dict(), weights)
    D = sum(p.numel() for p in model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()

    # ---- baselines, same run -------------------------------------------------------------------
    nb = min(n, 256 if quick else 4096)
    Xt, yt = torch.as_tensor(X[:nb]), torch.as_tensor(y[:nb])
    t = time.perf_counter()
    for s in range(0, nb, 256):
        model.zero_grad()
        loss_fn(model(Xt[s:s + 256]), yt[s:s + 256]).backward()
    backward_eps = nb / (time.perf_counter() - t)
    print(f"baseline batched backward (mean loss, batch 256, not per-example): {backward_eps:8.0f} ex/s")

    t = time.perf_counter()
    M = np.empty((n_loop, D), np.float32)  # alibi: one in-memory matrix of flattened gradients
    params = list(model.parameters())
    for i in range(n_loop):
        model.zero_grad()
        loss_fn(model(Xt[i:i + 1]), yt[i:i + 1]).backward()
        M[i] = torch.cat([p.grad.reshape(-1) for p in params]).numpy()
    loop_eps = n_loop / (time.perf_counter() - t)
    del M
    print(f"baseline alibi per-example loop into an in-memory matrix: {loop_eps:8.0f} ex/s "
          f"({loop_eps / backward_eps:.2f}x backward); its matrix for n={n:,}: {n * D * 4 / 2**30:.1f} GiB "
          f"(D={D:,} parameters)")
    eng = make_engine(model, loss_fn, chunk_size=256)
    t = time.perf_counter()
    for _ in eng.iter_blocks(X[:nb], y[:nb]):
        pass
    eng_eps = nb / (time.perf_counter() - t)
    print(f"gradient engine alone (per-layer factors, no projection): {eng_eps:8.0f} ex/s "
          f"({eng_eps / backward_eps:.2f}x backward)")

    # ---- builds, each in its own process ---------------------------------------------------------
    runs = [("exact", "kind = \"none\"", n_exact, 256)]
    runs += [(f"dense{k}", f'kind = "dense"\ndim = {k}\nseed = 0', n_dense[k], n_dense[k]) for k in ks]
    runs += [(f"factored{k}", f'kind = "factored"\ndim = {k}\nseed = 0', n, 256) for k in ks]
    runs += [(f"sketch{k}", f'kind = "sketch"\ndim = {k}\nseed = 0', n, 256) for k in ks]
    results = {}
    from tqdm import tqdm

    for name, proj, limit, chunk in tqdm(runs, desc="builds", unit="build"):
        cfg = write_config(OUT / f"{name}.toml", name, data, weights, limit, proj, chunk, args.threads)
        p = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", str(cfg),
                            str(OUT / "wd")], capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{name}: failed\n{p.stderr[-2000:]}")
            continue
        results[name] = json.loads(line[0][7:])
    print("\nex/s: end to end (config, model load, data checks, gradients, shards, catalog, FAISS) and in the chunk "
          "loop; 'x backward': chunk-loop rate over a batched backward measured in the same process")
    print(f"{'build':<12} {'examples':>9} {'dim':>8} {'e2e ex/s':>9} {'loop ex/s':>10} {'backward':>9} "
          f"{'x backward':>11} {'x alibi loop':>13} {'peak RSS MB':>12}")
    for name, r in results.items():
        r["eps"] = r["count"] / r["compute_seconds"]
        r["ratio"] = r["eps"] / r["backward_eps"]
        print(f"{name:<12} {r['count']:>9,} {r['dim']:>8,} {r['count'] / r['seconds']:>9.0f} {r['eps']:>10.0f} "
              f"{r['backward_eps']:>9.0f} {r['ratio']:>11.2f} {r['eps'] / loop_eps:>13.2f} {r['rss_mb']:>12.0f}")

    # ---- fidelity: projected vs exact scores on held-out queries ---------------------------------
    from indexer.query import open_index

    Gq = eng.grads(Xq, yq).astype(np.float64)
    n_ref = n
    S_exact = np.empty((n_q, n_ref))
    norms = np.empty(n_ref)
    for s, G in tqdm(eng.iter_grads(X[:n_ref], y[:n_ref]), total=(n_ref + 255) // 256, desc="exact scores",
                     unit="chunk"):
        S_exact[:, s:s + len(G)] = Gq @ G.T.astype(np.float64)
        norms[s:s + len(G)] = np.linalg.norm(G.astype(np.float64), axis=1)
    qn = np.linalg.norm(Gq, axis=1)
    print(f"\nfidelity vs exact scores ({n_q} held-out queries; grad_dot and grad_cos):")
    print(f"{'projection':<12} {'train n':>8} {'Spearman dot':>13} {'recall@10 dot':>14} {'Spearman cos':>13} "
          f"{'recall@10 cos':>14}")
    fid = {}
    for name in results:
        if name == "exact":
            continue
        idx = open_index(OUT / "wd", name)
        V, ids = idx.vectors()
        m = len(V)
        Qv = idx.embed(Xq, yq).astype(np.float64)
        Sp = Qv @ V.astype(np.float64).T
        Se = S_exact[:, :m]
        vn = np.linalg.norm(V.astype(np.float64), axis=1)
        out = []
        for Sa, Sb in ((Se, Sp), (Se / (qn[:, None] * norms[None, :m] + 1e-7),
                                  Sp / (np.linalg.norm(Qv, axis=1)[:, None] * vn[None, :] + 1e-7))):
            sp = np.mean([spearmanr(a, b).statistic for a, b in zip(Sa, Sb)])
            ta = np.argsort(-Sa, 1)[:, :10]
            tb = np.argsort(-Sb, 1)[:, :10]
            rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ta, tb)])
            out += [sp, rec]
        fid[name] = out
        print(f"{name:<12} {m:>8,} {out[0]:>13.4f} {out[1]:>14.3f} {out[2]:>13.4f} {out[3]:>14.3f}")
        idx.close()

    # ---- targets -------------------------------------------------------------------------------
    print("\ntargets (k = 2048):")
    for name in ("sketch2048", "factored2048", "dense2048"):
        if name in results:
            r = results[name]
            ok_speed = r["ratio"] >= 0.5
            f = fid.get(name, [float("nan")] * 4)
            print(f"  {name}: speed {r['eps']:.0f} ex/s = {r['ratio']:.2f}x backward (target >= 0.5: "
                  f"{'met' if ok_speed else 'MISSED'}); peak RSS {r['rss_mb']:.0f} MB on {r['count']:,} examples "
                  f"(target <= 2048 MB for {n:,}: {'met' if r['rss_mb'] <= 2048 else 'MISSED'}); "
                  f"grad_dot Spearman {f[0]:.3f} (>= 0.95: {'met' if f[0] >= 0.95 else 'MISSED'}), "
                  f"recall@10 {f[1]:.3f} (>= 0.9: {'met' if f[1] >= 0.9 else 'MISSED'})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in results.items():
            ax.scatter(r["eps"], fid.get(name, [1, 1])[1], label=name)
        ax.axvline(backward_eps, ls="--", c="k", lw=0.8, label="batched backward")
        ax.axvline(loop_eps, ls=":", c="r", lw=0.8, label="alibi loop")
        ax.set_xscale("log")
        ax.set_xlabel("build throughput (examples/s)")
        ax.set_ylabel("recall@10 vs exact (grad_dot)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT.parent / "bench_build.png", dpi=100)
        print(f"plot: {OUT.parent / 'bench_build.png'}")
    except Exception as exc:  # noqa: BLE001
        print(f"(no plot: {exc})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
