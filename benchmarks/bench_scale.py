"""Scale benchmark: 1M x 2,048 gradient-like vectors; flat exact vs two-stage IVF+SQ8, PCA+IVF+SQ8, HNSW vs Milvus Lite.

Vectors with the structure of real gradient embeddings: factored-projected (k = 2,048) per-example
gradients of the trained digits CNN on shifted digits (real gradients, their low-rank structure),
turned into n vectors by random rescaling plus relative noise and L2-normalized (grad_cos), as
``bench_search.py`` does. They are generated in chunks into a memory-mapped file under
``benchmarks/out/scale/`` (8 GiB at full scale, reused by later runs), never held in memory.

Each index is built and then searched in its own fresh subprocess, so each resident-memory figure
is that index's alone (VmRSS, split into anonymous and file-backed pages; peak VmHWM for builds).
Before a store is searched its ``vectors.f32`` is read once sequentially, so the OS page cache holds
it as it would for a server that has been running (the page cache is not in the process's resident
set; the major page faults per query are printed: with a cold cache re-scoring is disk-bound).
The two-stage stores are the ones the indexer serves (``indexer.vectorstore``): a compressed
FAISS candidate index, then the top ``rerank`` candidates re-scored exactly against the
full-precision vectors memory-mapped from disk. Milvus Lite runs the Milvus backend's own build and
search code on a subset (Milvus Lite inserts ~1.5 ms per 2,048-dim row and scans ~0.3 s per query
at 20,000 rows on this machine: it is the local/test mode, not a scale engine; a cluster is).

Figures per index: build time, resident memory, queries/s at batch 1 and 64 (medians), recall@10
against exact flat search of the same vectors; each with its ratio against flat exact search
measured in the same run; and the machine's memory bandwidth and fp32 GEMM peak (same run), which
bound the flat scan. Targets: recall@10 >= 0.99 with re-ranking at >= 200 queries/s at batch 1 on
one thread, resident memory <= 3 GiB.

    python benchmarks/bench_scale.py            # full run (1M x 2,048; ~17 GB disk; tens of minutes)
    python benchmarks/bench_scale.py --quick    # 20,000 x 2,048 (about a minute)
    python benchmarks/bench_scale.py --only flat,pca   # measure some phases now (e.g. one per bench-lock hold)
    python benchmarks/bench_scale.py --only report     # the table of every phase recorded for this data

Data, exact top-10 and stores are reused when they match (``meta.json``; ``truth*.npy`` newer than the
queries; a store whose ``store.json`` names the same factory, count, dimension and kernel), and
the output says so; ``--rebuild`` rebuilds. Each phase's figures are recorded in ``results.json``
with the time and the load average when measured; the table shows all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 2**30
CHUNK = 65536
IVF_SETTINGS = [(8, 0), (8, 200), (16, 200), (32, 500)]  # (nprobe, rerank)
# PCA256 codes: stage 1 is cheap, stage-1 recall is what needs the candidates; nprobe 12-16 with rerank 300
# is the setting that reaches recall@10 >= 0.99 at >= 200 q/s (measured alone before this grid)
PCA_SETTINGS = [(8, 0), (8, 200), (12, 300), (16, 300), (16, 500), (32, 500)]
HNSW_SETTINGS = [(64, 0), (64, 200), (128, 500)]  # (efSearch, rerank); efSearch is raised to rerank
SETTINGS = {"ivf": IVF_SETTINGS, "pca": PCA_SETTINGS, "hnsw": HNSW_SETTINGS}
PHASE_NAMES = ("flat", "ivf", "pca", "hnsw", "milvus")  # what --only selects (the machine figures run every time)


def pin(threads: int) -> None:
    """One thread for BLAS, OpenMP (FAISS) and torch, so the figures are per core."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    threadpool_limits(threads)


def mem() -> dict[str, float]:
    """This process's memory from /proc/self/status, in GiB: VmRSS, RssAnon, RssFile, VmHWM (peak)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024 / GiB
    return out


# ---- data ------------------------------------------------------------------------------------------
def make_data(d: Path, n: int, dim: int, nq: int, n_base: int, regenerate: bool = False) -> None:
    """X.npy (n, dim) memory-mapped, Q.npy (nq, dim): real digits gradients -> rescaled + noise, normalized."""
    from bench_search import base_vectors
    from tqdm import tqdm

    meta = {"n": n, "dim": dim, "nq": nq, "n_base": n_base, "version": 1}
    if (d / "meta.json").exists():
        have = json.loads((d / "meta.json").read_text())
        if have == meta:
            print(f"data: reusing {d / 'X.npy'}", flush=True)
            return
        if not regenerate:  # never delete gigabytes of generated data by accident
            raise SystemExit(f"{d} holds other data ({have}, this run asks for {meta}): pass matching --n/--queries, "
                             "another --data, or --rebuild to regenerate it.")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t = time.perf_counter()
    base, qbase = base_vectors(n_base, max(nq // 2, 50), dim)
    rng = np.random.default_rng(1)
    unit = (base / (np.linalg.norm(base, axis=1, keepdims=True) + 1e-12)).astype(np.float32)
    qunit = (qbase / (np.linalg.norm(qbase, axis=1, keepdims=True) + 1e-12)).astype(np.float32)
    noise = np.float32(0.3 / np.sqrt(dim))
    X = np.lib.format.open_memmap(d / "X.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for s in tqdm(range(0, n, CHUNK), desc="vectors", unit="chunk"):
        m = min(CHUNK, n - s)
        blk = unit[rng.integers(0, len(unit), m)] * rng.uniform(0.5, 2.0, (m, 1)).astype(np.float32)
        blk += rng.standard_normal((m, dim), dtype=np.float32) * noise
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
        X[s:s + m] = blk
    X.flush()
    del X
    Q = qunit[rng.integers(0, len(qunit), nq)] + rng.standard_normal((nq, dim), dtype=np.float32) * noise
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    np.save(d / "Q.npy", Q.astype(np.float32))
    (d / "meta.json").write_text(json.dumps(meta))
    print(f"data: {n_base} projected digits gradients (k={dim}) -> {n:,} vectors ({n * dim * 4 / GiB:.2f} GiB on disk) "
          f"+ {nq} queries in {time.perf_counter() - t:.0f} s", flush=True)


def load(d: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(d / "X.npy", mmap_mode="r"), np.load(d / "Q.npy")


# ---- phases (each in its own process) --------------------------------------------------------------
def phase_machine(d: Path, args: argparse.Namespace) -> dict:
    """Memory bandwidth (1 GiB in memory: sum-read and copy) and fp32 GEMM peak (2048^3), this thread count."""
    import torch
    from _util import median_time

    a = torch.rand(GiB // 4)
    dst = torch.empty_like(a)
    read = a.numel() * 4 / median_time(lambda: torch.sum(a), 5) / 1e9
    copy = 2 * a.numel() * 4 / median_time(lambda: dst.copy_(a), 5) / 1e9
    A = torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / median_time(lambda: A @ A, 5) / 1e9
    return {"bandwidth_gbs": max(read, copy), "read_gbs": read, "copy_gbs": copy, "gemm_gflops": gemm}


def phase_truth(d: Path, args: argparse.Namespace) -> dict:
    """Exact top-10 of every query (chunked GEMM over the map) and flat exact search speed at batch 1 / 64."""
    from _util import median_time

    from indexer.store import ExactSearcher

    X, Q = load(d)
    n = len(X)
    ex = ExactSearcher(X, np.arange(n, dtype=np.int64))
    subs = [sub for sub in sorted({args.hnsw_n, args.milvus_n}) if sub < n]
    have = [d / "truth.npy"] + [d / f"truth_{sub}.npy" for sub in subs]
    if not args.rebuild and all(p.exists() and p.stat().st_mtime >= (d / "Q.npy").stat().st_mtime
                                and np.load(p).shape == (len(Q), 10) for p in have):
        t_all = None  # exact top-10 of these queries over these vectors, computed by an earlier run
        print(f"  reusing the exact top-10 of {len(Q)} queries ({', '.join(p.name for p in have)}, newer than "
              "Q.npy); --rebuild recomputes", flush=True)
    else:
        t = time.perf_counter()
        S, I = ex.search(Q, 10)
        t_all = time.perf_counter() - t
        np.save(d / "truth.npy", I)
        for sub in subs:
            np.save(d / f"truth_{sub}.npy", ExactSearcher(X[:sub], np.arange(sub, dtype=np.int64)).search(Q, 10)[1])
    t = time.perf_counter()
    with open(d / "X.npy", "rb") as fh:  # the timed scans read the page cache, as the stores' phases do
        while fh.read(64 << 20):
            pass
    print(f"  page cache warmed with X.npy ({(d / 'X.npy').stat().st_size / GiB:.2f} GiB) in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    b1 = [median_time(lambda q=q: ex.search(q[None], 10), 1, warmup=0) for q in Q[:args.flat_b1]]
    b64 = median_time(lambda: ex.search(Q[:64], 10), 3, warmup=0)
    return {"truth_s": t_all, "b1_qps": 1 / statistics.median(b1), "b64_qps": 64 / b64, "recall": 1.0, "build_s": 0.0,
            "mem": mem(), "n": n}


def _shards(X: np.ndarray, n: int):
    """A shard source over the first n rows, read chunk by chunk into ordinary memory (as a build reads
    its shard files), so a build's peak resident memory is its own, not the page cache of X.npy."""
    path = Path(X.filename)
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        offset = fh.tell()
    d = X.shape[1]

    def gen():
        with open(path, "rb") as fh:
            for s in range(0, n, CHUNK):
                m = min(CHUNK, n - s)
                fh.seek(offset + s * d * 4)
                yield np.fromfile(fh, dtype=np.float32, count=m * d).reshape(m, d), np.arange(s, s + m, dtype=np.int64)

    return gen


def phase_build(d: Path, args: argparse.Namespace) -> dict:
    """Stream a two-stage store from the map: train on a sample, write codes + full vectors in chunks."""
    from indexer.store import IndexSpec
    from indexer.vectorstore.base import sample_rows
    from indexer.vectorstore.twostage import TwoStageWriter

    X, _ = load(d)
    n = min(len(X), args.hnsw_n) if args.which == "hnsw" else len(X)
    factory = {"ivf": args.ivf, "pca": args.pca, "hnsw": args.hnsw}[args.which]
    spec = IndexSpec(factory=factory, rerank=200, train_sample=args.train_sample)
    out = d / f"store_{args.which}"
    want = {"backend": "twostage", "count": n, "dim": X.shape[1], "factory": factory, "kernel": "grad_cos"}
    if (out / "store.json").exists() and not args.rebuild:
        have = json.loads((out / "store.json").read_text())
        if {k: have.get(k) for k in want} == want and all((out / f).exists() for f in ("candidates.faiss",
                                                                                        "vectors.f32", "ids.npy")):
            rec = json.loads((out / "bench_build.json").read_text()) if (out / "bench_build.json").exists() else {}
            disk = sum(p.stat().st_size for p in out.iterdir())
            print(f"  reusing the existing store {out} (store.json matches: {factory}, n={n:,}, d={X.shape[1]}, "
                  f"grad_cos); not rebuilt (--rebuild to rebuild); build figures are "
                  + (f"those recorded at its build ({rec.get('when', '?')})" if rec else "not recorded"), flush=True)
            if rec:
                print(f"  recorded build: {rec['build_s']:.0f} s, peak RSS {rec['build_peak_gib']:.2f} GiB, load "
                      f"{rec.get('load', 'not recorded')}, nice {rec.get('nice', 'not recorded')}", flush=True)
            return {"build_s": rec.get("build_s"), "n": n, "factory": factory, "build_record": rec,
                    "build_peak_gib": rec.get("build_peak_gib"), "disk_gib": disk / GiB, "reused": True,
                    "codes_gib": (out / "candidates.faiss").stat().st_size / GiB}
        print(f"  the existing {out / 'store.json'} does not match ({have}): rebuilding", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    w = TwoStageWriter(out, spec, "grad_cos", X.shape[1], n)
    if w.needs_training:
        sample, _ = sample_rows(_shards(X, n), n, w.train_size(), seed=1)
        t_s = time.perf_counter()
        w.train(sample)
        print(f"  trained {factory} on {len(sample):,} sampled rows in {time.perf_counter() - t_s:.0f} s", flush=True)
        del sample
    from tqdm import tqdm

    for V, ids in tqdm(_shards(X, n)(), total=(n + CHUNK - 1) // CHUNK, desc=f"build {factory}", unit="chunk"):
        w.add(V, ids)
    w.finish()
    build_s = time.perf_counter() - t
    peak = mem()["VmHWM"]
    (out / "bench_build.json").write_text(json.dumps({"build_s": build_s, "build_peak_gib": peak,
                                                      "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                      "load": os.getloadavg()[0], "nice": os.nice(0)}))
    disk = sum(p.stat().st_size for p in out.iterdir())
    return {"build_s": build_s, "n": n, "factory": factory, "build_peak_gib": peak, "disk_gib": disk / GiB,
            "codes_gib": (out / "candidates.faiss").stat().st_size / GiB, "reused": False}


def _measure(search, Q: np.ndarray, I_true: np.ndarray, nb1: int) -> dict:
    from _util import median_time

    from indexer.store import recall_at_k

    for q in Q[:5]:
        search(q[None])  # warm the code paths
    b1 = [median_time(lambda q=q: search(q[None]), 1, warmup=0) for q in Q[:nb1]]
    b64 = [median_time(lambda s=s: search(Q[s:s + 64]), 1, warmup=0) for s in range(0, min(len(Q), 192), 64)]
    I = np.concatenate([search(Q[s:s + 64])[1] for s in range(0, len(Q), 64)])
    return {"b1_qps": 1 / statistics.median(b1), "b64_qps": 64 / statistics.median(b64),
            "recall": recall_at_k(I, I_true, 10)}


def phase_serve(d: Path, args: argparse.Namespace) -> dict:
    """Open a built two-stage store as the server does and measure each (nprobe|ef, rerank) setting."""
    from indexer.store import IndexSpec
    from indexer.vectorstore.twostage import TwoStageStore

    _, Q = load(d)
    n = json.loads((d / f"store_{args.which}" / "store.json").read_text())["count"]
    I_true = np.load(d / ("truth.npy" if not (d / f"truth_{n}.npy").exists() else f"truth_{n}.npy"))
    vec = d / f"store_{args.which}" / "vectors.f32"
    t = time.perf_counter()
    with open(vec, "rb") as fh:  # warm the OS page cache (not this process's memory), as a running server has it
        while fh.read(64 << 20):
            pass
    print(f"  page cache warmed with {vec.stat().st_size / GiB:.2f} GiB of vectors.f32 in "
          f"{time.perf_counter() - t:.0f} s "
          "(OS cache, outside this process's resident set)", flush=True)
    st = TwoStageStore(d / f"store_{args.which}", IndexSpec(factory="x", rerank=200), "grad_cos", Q.shape[1])
    rows = []
    settings = SETTINGS[args.which]
    if args.settings:  # "nprobe_or_ef:rerank,..." (a re-measurement of one store)
        settings = [tuple(int(v) for v in x.split(":")) for x in args.settings.split(",")]
    for p, r in settings:
        kw = {"ef_search": p} if args.which == "hnsw" else {"nprobe": p}
        import resource

        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        res = _measure(lambda q: st.search(q, 10, rerank=r, **kw), Q, I_true, args.b1_queries)
        nsearch = 5 + args.b1_queries + 3 * 64 + len(Q)
        res.update({"param": p, "rerank": r, "mem": mem(),
                    "majflt_per_query": (resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0) / nsearch})
        rows.append(res)
        print(f"  {args.which} {p} rerank {r}: {res['b1_qps']:.0f} q/s b1, {res['b64_qps']:.0f} q/s b64, "
              f"recall {res['recall']:.4f}, RSS {res['mem']['VmRSS']:.2f} GiB, "
              f"{res['majflt_per_query']:.0f} major page faults (disk reads) per query", flush=True)
    return {"rows": rows, "n": n}


def phase_milvus(d: Path, args: argparse.Namespace) -> dict:
    """The Milvus backend's own build (batched upserts) and search, on Milvus Lite, on the first milvus_n rows."""
    from indexer.store import IndexSpec
    from indexer.vectorstore.milvus import MilvusStore, write_collection

    X, Q = load(d)
    n = min(len(X), args.milvus_n)
    I_true = np.load(d / (f"truth_{n}.npy" if n < len(X) else "truth.npy"))
    wd = d / "milvus"
    shutil.rmtree(wd, ignore_errors=True)
    spec = IndexSpec(backend="milvus", milvus_batch=1000)
    t = time.perf_counter()
    write_collection(spec, "grad_cos", X.shape[1], n, _shards(X, n), wd, wd / "store", "bench", 1, progress=True)
    build_s = time.perf_counter() - t
    st = MilvusStore(wd / "store", spec, "grad_cos", X.shape[1], wd)
    nq = min(len(Q), args.milvus_queries)
    res = _measure(lambda q: st.search(q, 10), Q[:nq], I_true[:nq], min(args.b1_queries, 20))
    st.close()
    res.update({"build_s": build_s, "n": n, "mem": mem(), "queries": nq})
    return res


PHASES = {"machine": phase_machine, "truth": phase_truth, "build": phase_build, "serve": phase_serve,
          "milvus": phase_milvus}


def run_phase(name: str, args: argparse.Namespace, which: str = "") -> dict:
    """Run one phase in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--phase", name, "--which", which, "--data", str(args.data)]
    for k in ("n", "dim", "queries", "threads", "hnsw_n", "milvus_n", "ivf", "pca", "hnsw", "train_sample",
              "b1_queries",
              "flat_b1", "milvus_queries"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.rebuild:
        cmd.append("--rebuild")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = p.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line, flush=True)
    if p.returncode != 0 or not lines:
        raise SystemExit(f"phase {name} {which} failed (exit {p.returncode})")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 vectors (about a minute)")
    ap.add_argument("--n", type=int, default=None, help="database vectors (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=None, help="queries for recall (default 1,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hnsw-n", type=int, default=None, help="vectors in the HNSW store (its build is the slow one)")
    ap.add_argument("--milvus-n", type=int, default=None, help="vectors in the Milvus Lite collection")
    ap.add_argument("--ivf", default=None, help="FAISS factory of the IVF candidate index")
    ap.add_argument("--pca", default=None, help="FAISS factory of the PCA + IVF candidate index")
    ap.add_argument("--hnsw", default="HNSW32,SQ8", help="FAISS factory of the HNSW candidate index")
    ap.add_argument("--train-sample", type=int, default=0, help="IVF training rows (0 = 50 per list)")
    ap.add_argument("--b1-queries", type=int, default=200, help="queries timed one by one")
    ap.add_argument("--flat-b1", type=int, default=5, help="queries timed one by one on the flat scan")
    ap.add_argument("--milvus-queries", type=int, default=200)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--settings", default="", help="serve phase only: 'param:rerank,...' instead of the defaults")
    ap.add_argument("--only", default="", help="comma-separated phases to measure now: flat, ivf, pca, hnsw, milvus "
                    "(default all) or 'report'; the table shows every phase recorded in results.json for this data, "
                    "so a full run can be measured phase by phase (each under the bench lock)")
    ap.add_argument("--build-only", action="store_true", help="build (or check) the stores of the --only phases "
                    "without measuring them (a niced build outside the bench lock; measure later under it)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild stores and recompute the exact top-10 even when "
                    "matching ones exist")
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)
    ap.add_argument("--which", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.n = args.n or (20_000 if q else 1_000_000)
    data = args.data or (ROOT / "benchmarks" / "out" / ("scale_quick" if q else "scale"))
    if args.queries is None and (data / "meta.json").exists():  # the existing data's queries (no regeneration)
        have = json.loads((data / "meta.json").read_text())
        args.queries = have["nq"] if have.get("n") == (args.n or (20_000 if q else 1_000_000)) else None
    args.queries = args.queries or (200 if q else 1000)
    args.hnsw_n = min(args.n, args.hnsw_n or (args.n if q else 100_000))
    args.milvus_n = min(args.n, args.milvus_n or (5_000 if q else 20_000))
    args.ivf = args.ivf or ("IVF64,SQ8" if q or args.n <= 50_000 else "IVF1024,SQ8")
    args.pca = args.pca or ("PCA256,IVF64,SQ8" if q or args.n <= 50_000 else "PCA256,IVF1024,SQ8")
    args.data = args.data or (ROOT / "benchmarks" / "out" / ("scale_quick" if q else "scale"))
    if q:
        args.b1_queries, args.milvus_queries = min(args.b1_queries, 100), min(args.milvus_queries, 50)
    pin(args.threads)
    if args.phase:
        args.which = args.which
        res = PHASES[args.phase](args.data, args)
        print(json.dumps(res), flush=True)
        return 0

    import faiss

    need = 2.2 * args.n * args.dim * 4  # X + vectors.f32 + codes
    free = shutil.disk_usage(args.data.parent if args.data.parent.exists() else ROOT).free
    print(f"# bench_scale: n={args.n:,} d={args.dim} queries={args.queries} threads={args.threads} "
          f"faiss {faiss.__version__}; disk free {free / GiB:.0f} GiB, needs ~{need / GiB:.0f} GiB", flush=True)
    if free < need and not (args.data / "X.npy").exists():
        raise SystemExit(f"not enough disk under {args.data}: {free / GiB:.0f} GiB free, ~{need / GiB:.0f} GiB needed; "
                         "pass a smaller --n.")
    args.data.mkdir(parents=True, exist_ok=True)
    make_data(args.data, args.n, args.dim, args.queries, 600 if q else 10_000, args.rebuild)
    only = PHASE_NAMES if not args.only or args.only == "all" else tuple(x.strip() for x in args.only.split(","))
    bad = sorted(set(only) - set(PHASE_NAMES) - {"report"})
    if bad:
        raise SystemExit(f"--only: unknown phase(s) {', '.join(bad)}; choose from {', '.join(PHASE_NAMES)}, report")
    out = args.data / "results.json"
    key = {"n": args.n, "dim": args.dim, "queries": args.queries, "threads": args.threads,
           "hnsw_n": args.hnsw_n, "milvus_n": args.milvus_n}
    results: dict = {}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("key") == key:  # the phases of this benchmark measured by earlier invocations (same data, sizes)
            results = old
    results["key"] = key

    def stamp() -> dict:
        return {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load": list(os.getloadavg())}

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    def machine(label: str) -> dict:
        m = {**run_phase("machine", args), **stamp(), "label": label, "phases": [p for p in only if p != "report"]}
        print(f"machine ({label} of this invocation, load {m['load'][0]:.2f}): memory bandwidth "
              f"{m['bandwidth_gbs']:.1f} GB/s (sum-read {m['read_gbs']:.1f}, copy {m['copy_gbs']:.1f}), fp32 GEMM "
              f"{m['gemm_gflops']:.0f} GFLOP/s (2048^3), {args.threads} thread(s)", flush=True)
        if m["phases"]:
            results.setdefault("machine_runs", []).append(m)
        return m

    measured = [] if args.build_only else [p for p in only if p != "report"]
    if measured:
        print(f"phases measured in this invocation: {', '.join(measured)} (load at start {os.getloadavg()[0]:.2f})",
              flush=True)
        machine("start")
    if "flat" in only:
        flat = {**run_phase("truth", args), **stamp()}
        results["flat"] = flat
        save()
        print("flat exact (GEMM + top-k over the memory-mapped vectors): "
              + (f"truth for {args.queries} queries in {flat['truth_s']:.0f} s; " if flat["truth_s"] else "")
              + f"batch1 {flat['b1_qps']:.2f} q/s, batch64 {flat['b64_qps']:.1f} q/s; RSS {flat['mem']['VmRSS']:.2f} "
              f"GiB (file-backed {flat['mem']['RssFile']:.2f})", flush=True)
    for which in ("ivf", "pca", "hnsw"):
        if which not in only:
            continue
        b = run_phase("build", args, which)
        if not b.get("reused"):
            print(f"{b['factory']} (n={b['n']:,}): build {b['build_s']:.0f} s, peak RSS {b['build_peak_gib']:.2f} GiB, "
                  f"codes {b['codes_gib']:.2f} GiB, on disk {b['disk_gib']:.2f} GiB", flush=True)
        if args.build_only:
            continue
        s = run_phase("serve", args, which)
        results[which] = {"build": b, "serve": s, **stamp()}
        save()
    if "milvus" in only:
        results["milvus"] = {**run_phase("milvus", args), **stamp()}
        save()
    if measured:
        machine("end")
        save()
    report(results, args)
    return 0


def report(results: dict, args: argparse.Namespace) -> None:
    """The table of every phase recorded in results.json for this data (this invocation's and earlier ones')."""
    runs = results.get("machine_runs", [])
    if not runs or "flat" not in results:
        print("\n(no table yet: run the flat phase and at least one machine measurement first)")
        return
    print("\nmachine measurements (each invocation measures at its start and end; the machine is shared, "
          "so the peak is the machine's figure):")
    for m in runs:
        print(f"  {m['when']} ({m['label']}, phases {','.join(m['phases'])}, load {m['load'][0]:.2f}): "
              f"{m['bandwidth_gbs']:.1f} GB/s, {m['gemm_gflops']:.0f} GFLOP/s")
    bw, gemm = max(m["bandwidth_gbs"] for m in runs), max(m["gemm_gflops"] for m in runs)
    flat = results["flat"]
    nbytes = args.n * args.dim * 4
    b1_gbs, b64_gflops = nbytes * flat["b1_qps"] / 1e9, 2 * nbytes / 4 * flat["b64_qps"] / 1e9
    print(f"peaks: memory bandwidth {bw:.1f} GB/s, fp32 GEMM {gemm:.0f} GFLOP/s (1 thread)")
    print(f"flat exact vs the machine: batch1 {flat['b1_qps']:.2f} q/s = {b1_gbs:.1f} GB/s streamed = "
          f"{b1_gbs / bw:.2f}x measured bandwidth; batch64 {flat['b64_qps']:.1f} q/s = {b64_gflops:.0f} GFLOP/s = "
          f"{b64_gflops / gemm:.2f}x GEMM peak")
    table = [("flat exact (GEMM, memory-mapped)", args.n, 0.0, flat, flat)]
    for which in ("ivf", "pca", "hnsw"):
        if which not in results:
            continue
        b, s = results[which]["build"], results[which]["serve"]
        for r in s["rows"]:
            table.append((f"{b['factory']} {'ef' if which == 'hnsw' else 'nprobe'}={r['param']} rerank={r['rerank']}",
                          b["n"], b["build_s"], r, results[which]))
    if "milvus" in results:
        mil = results["milvus"]
        table.append((f"Milvus Lite FLAT ({mil['queries']} queries)", mil["n"], mil["build_s"], mil, mil))
    print(f"\n{'index':<44} {'n':>9} {'build s':>8} {'b1 q/s':>9} {'x flat':>8} {'b64 q/s':>9} {'x flat':>7} "
          f"{'recall@10':>9} {'RSS GiB':>8} {'anon':>6} {'file':>6} {'measured (UTC), load':>22}")
    for name, n, bs, r, src in table:
        m = r["mem"]
        bstr = f"{bs:>8.0f}" if bs is not None else f"{'n/r':>8}"
        print(f"{name:<44} {n:>9,} {bstr} {r['b1_qps']:>9.1f} {r['b1_qps'] / flat['b1_qps']:>8.0f} "
              f"{r['b64_qps']:>9.1f} {r['b64_qps'] / flat['b64_qps']:>7.1f} {r['recall']:>9.4f} {m['VmRSS']:>8.2f} "
              f"{m['RssAnon']:>6.2f} {m['RssFile']:>6.2f} {src['when'][11:16]:>16} {src['load'][0]:>5.2f}")
    for which in ("ivf", "pca", "hnsw"):
        rec = results.get(which, {}).get("build", {})
        if rec.get("reused"):
            br = rec.get("build_record") or {}
            print(f"{rec['factory']}: store reused; build " + (f"{br['build_s']:.0f} s (peak RSS "
                  f"{br['build_peak_gib']:.2f} GiB) recorded {br.get('when')} at load {br.get('load', 'not recorded')}"
                  f", nice {br.get('nice', 'not recorded')}" if br else "time not recorded (built before the record existed)"))
    if any(bs is None for _, _, bs, _, _ in table):
        print("(n/r: build time not recorded: the store was reused from a build that predates the record)")
    ok = [name for name, n, _, r, _ in table if "rerank" in name and n == args.n and "rerank=0" not in name
          and r["recall"] >= 0.99 and r["b1_qps"] >= 200 and r["mem"]["VmRSS"] <= 3]
    print(f"\ntargets at n={args.n:,} (recall@10 >= 0.99 with re-ranking, >= 200 q/s batch 1 on {args.threads} "
          "thread, RSS <= 3 GiB): " + ("MET by " + "; ".join(ok) if ok else "MISSED by every setting"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, n, _, r, _ in table:
            ax.scatter(r["recall"], r["b1_qps"], label=f"{name} (n={n:,})")
        ax.axhline(200, ls=":", c="grey")
        ax.axvline(0.99, ls=":", c="grey")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("queries/s, batch 1, 1 thread")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
        ax.set_title(f"bench_scale: n={args.n:,} x {args.dim}")
        fig.tight_layout()
        fig.savefig(args.data / "bench_scale.png", dpi=100)
        print(f"plot: {args.data / 'bench_scale.png'}; results: {args.data / 'results.json'}")
    except Exception as exc:  # noqa: BLE001 - the plot is optional
        print(f"(no plot: {exc})")


if __name__ == "__main__":
    sys.exit(main())
