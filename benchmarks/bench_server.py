"""Loopback load test of the gRPC server on the seed CNN with a 20,000-example digits index.

Prints: the in-process query latency (the baseline, no gRPC), single-query FindSimilar p50/p99
through gRPC (target: p50 <= 15 ms) and its ratio to the baseline, a latency breakdown of one
query (gradient, projection, search, fetch, (de)serialization, transport), then for 8 and 32
concurrent clients (separate channels) for 30 s each: qps, p50, p99, errors (target 0), mean
micro-batch size and the server's RSS growth (target: flat). Each figure is measured twice in the
same run: with micro-batching off (``batch_max_examples = 0``, the baseline: one request at a time
through the engine) and on (the server's defaults), each in its own server subprocess
(`gradindex serve --config`), with torch/BLAS/OpenMP pinned to one thread on both sides. The
batching-on server runs every concurrency level twice (round 2 checks that memory stays flat).

    python benchmarks/bench_server.py            # full: 20,000 examples, 30 s per level
    python benchmarks/bench_server.py --quick    # 1,000 examples, 2 s per level
    python benchmarks/bench_server.py --k2048    # 20,000 digits at 2,048 dims: flat vs two-stage (target p50 <= 10 ms)
    python benchmarks/bench_server.py --scale    # the 1,000,000-example two-stage index (target p50 <= 20 ms)

``--k2048`` builds two indexes of the same 20,000 digits with the shipped projection (2,048 dims)
into one catalog, both served by the same servers: ``bench`` (flat, exact) and ``bench_ts`` (a
two-stage store: ``--ts-factory`` candidates, ``--ts-rerank`` re-scored exactly), and measures the
recall@10 of ``bench_ts`` against ``bench`` on held-out digits (same embeddings, so this is the
search's recall alone).

``--scale`` serves the million-vector store ``bench_scale.py`` built (``benchmarks/out/scale/store_pca``:
1,000,000 factored-projected, k = 2,048, digits CNN gradients, rescaled and perturbed). Those
vectors are gradients of a CNN trained exactly as ``bench_search.base_vectors`` trains it (seeded)
under that seeded factored projection, so an index directory made of that model's weights, that
projection, the store (linked, not copied) and a catalog of 1,000,000 entries (ids only: a
synthetic external id, no payload) is a real index that ``gradindex serve`` answers for real digits
images. The small real build that creates the catalog rows runs through ``indexer.build``; the
store and the million example rows are then put in its place (rows inserted in batches, bounded
memory). The served top-10 of held-out digits is checked against an exact scan of the store's
vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def pct(xs, p):
    return float(np.percentile(np.asarray(xs), p)) if xs else float("nan")


def start_server(workdir: Path, workers: int, batch_max_examples: int = 64,
                 batch_window_ms: float = 2.0, names: tuple[str, ...] = ("bench",)) -> tuple[subprocess.Popen, int]:
    cfg = workdir / f"server_b{batch_max_examples}.toml"
    cfg.write_text(f'workdir = "{workdir}"\nindexes = {json.dumps(list(names))}\nport = 0\nworkers = {workers}\n'
                   f'max_concurrent_rpcs = {workers * 2}\nlog_level = "WARNING"\n'
                   f'batch_max_examples = {batch_max_examples}\nbatch_window_ms = {batch_window_ms}\n')
    from _util import start_serve  # imported here: this function is the only user in this file

    proc, port, _ = start_serve(cfg, ROOT)
    return proc, port


def load_phase(port: int, X: np.ndarray, clients: int, seconds: float, name: str = "bench") -> dict:
    """``clients`` threads, one channel each, FindSimilar(one query, k=5) in a loop for ``seconds``."""
    from server.client import GradIndexClient

    lat: list[list[float]] = [[] for _ in range(clients)]
    batch: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop = threading.Event()
    go = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        with GradIndexClient(f"127.0.0.1:{port}", timeout=30) as c:
            c.find_similar(name, X[i % len(X)][None], k=5)  # connect + warm
            go.wait()
            j = i
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = c.find_similar(name, X[j % len(X)][None], k=5)
                    lat[i].append(time.perf_counter() - t)
                    batch[i].append(r.server_timing.get("batch", 1.0))
                except Exception as exc:  # noqa: BLE001 - counted as errors
                    errors.append(repr(exc)[:200])
                j += clients

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = [x for xs in lat for x in xs]
    sizes = [x for xs in batch for x in xs]
    return {"n": len(flat), "qps": len(flat) / wall, "p50": pct(flat, 50) * 1e3, "p90": pct(flat, 90) * 1e3,
            "p99": pct(flat, 99) * 1e3,
            "errors": len(errors), "first_error": errors[0] if errors else "",
            "batch": float(np.mean(sizes)) if sizes else float("nan")}


def breakdown(workdir: Path, x: np.ndarray, reps: int, name: str = "bench") -> dict:
    """Median ms of each step of one query, in-process, with the index's own engine and projection."""
    from indexer.kernels import scale_query
    from indexer.query import open_index
    from server.protos import service_pb2 as pb
    from server.tensors import from_tensor, to_tensor

    idx = open_index(workdir, name)
    emb = idx.embedder()
    eng, proj = emb.engines[0], emb.projector
    y = eng.resolve_targets(x)
    steps: dict[str, list[float]] = {k: [] for k in ("predict", "gradient", "projection", "search", "fetch",
                                                     "serialize_req", "serialize_resp", "in_process_total")}
    for _ in range(reps):
        t = time.perf_counter()
        eng.resolve_targets(x)
        t1 = time.perf_counter()
        _, blocks = next(eng.iter_blocks(x, y))
        t2 = time.perf_counter()
        V = scale_query(proj.project(blocks), idx.kernel)
        t3 = time.perf_counter()
        res = idx.search(V, 5)
        t4 = time.perf_counter()
        recs = idx.get_examples(res.ids[0], payload=False)
        t5 = time.perf_counter()
        req = pb.FindSimilarRequest(index=name, inputs=to_tensor(x), k=5)
        b = req.SerializeToString()
        from_tensor(pb.FindSimilarRequest.FromString(b).inputs, finite=True)
        t6 = time.perf_counter()
        resp = pb.FindSimilarResponse(index=name)
        r = resp.results.add()
        for s, rec in zip(res.scores[0], recs):
            e = r.most_similar.add(score=float(s)).example
            e.id, e.external_id, e.label_name, e.split = rec["id"], rec["external_id"] or "", rec["label"] or "", "train"
        pb.FindSimilarResponse.FromString(resp.SerializeToString())
        t7 = time.perf_counter()
        idx.find_similar(x, k=5)
        t8 = time.perf_counter()
        for k, dt in zip(steps, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7)):
            steps[k].append(dt * 1e3)
    idx.close()
    return {k: statistics.median(v) for k, v in steps.items()}


def _ensure(workdir: Path, name: str, n: int, overrides: dict) -> None:
    """The digits index ``name`` in ``workdir`` (built unless present; rebuilt when the weights changed)."""
    from indexer.errors import ModelMismatch
    from indexer.query import open_index
    from server.demo import ensure_digits_index

    ensure_digits_index(workdir, name, n=n, progress=True, overrides=overrides)
    try:
        open_index(workdir, name).close()
    except ModelMismatch:  # the shipped weights were retrained since this index was built: rebuild it
        print(f"the digits weights changed since {workdir} was built: rebuilding it")
        shutil.rmtree(workdir)
        ensure_digits_index(workdir, name, n=n, progress=True, overrides=overrides)


def prepare_digits(args: argparse.Namespace, n: int) -> tuple[Path, list[str]]:
    """The 20,000-example digits index (flat), plus its two-stage twin with ``--k2048``."""
    workdir = Path(args.workdir) / f"n{n}_k{args.proj_dim}"
    proj = {"projection": {"dim": args.proj_dim}}
    _ensure(workdir, "bench", n, proj)
    names = ["bench"]
    if args.k2048:
        ts = {"factory": args.ts_factory, "rerank": args.ts_rerank, "nprobe": args.ts_nprobe}
        from indexer.query import open_index

        try:
            idx = open_index(workdir, "bench_ts", load_model=False)
            same = {k: idx.describe().faiss_params.get(k) for k in ts} == ts
            idx.close()
        except Exception:  # noqa: BLE001 - absent: built below
            same = None
        if same is False:  # another factory/rerank asked for: drop the old two-stage index
            from indexer.build import _drop_index
            from indexer.catalog import Catalog, IndexRow
            from sqlalchemy import select

            cat = Catalog(workdir)
            with cat.session() as s, s.begin():
                for row in s.scalars(select(IndexRow).where(IndexRow.name == "bench_ts")):
                    _drop_index(cat, s, row)
            cat.close()
        _ensure(workdir, "bench_ts", n, {**proj, "index": ts})
        names.append("bench_ts")
    return workdir, names


def scale_weights(path: Path, n_base: int, nq: int) -> None:
    """The digits CNN exactly as ``bench_search.base_vectors`` trained it for the 1M vectors (seeded, 1 thread)."""
    import torch

    from indexer.demo import load_digits_28, train_digits_cnn

    X, y = load_digits_28(n_base + max(nq // 2, 50), seed=0)
    torch.set_num_threads(1)
    model = train_digits_cnn(X[:1797], y[:1797], epochs=2, seed=0)
    torch.save(model.state_dict(), path)


def prepare_scale(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """An index directory serving the million-vector two-stage store (see the module docstring)."""
    import tomllib

    from sqlalchemy import delete, insert

    from indexer.build import build_index
    from indexer.catalog import Catalog, Example
    from indexer.query import list_indexes
    from indexer.store import IndexSpec
    from server.demo import CONFIG

    data = Path(args.scale_data)
    store = data / "store_pca"
    meta = json.loads((store / "store.json").read_text())
    dmeta = json.loads((data / "meta.json").read_text())
    n, dim = int(meta["count"]), int(meta["dim"])
    workdir = Path(args.workdir) / f"scale_{n}"
    spec = IndexSpec(factory=meta["factory"], nprobe=args.scale_nprobe, rerank=args.scale_rerank)
    found = list_indexes(workdir) if workdir.exists() else []
    ready = [d for d in found if d.name == "scale"]
    if ready and ready[0].count == n and all(ready[0].faiss_params.get(k) == v for k, v in
                                               (("factory", spec.factory), ("nprobe", spec.nprobe),
                                                ("rerank", spec.rerank))):
        print(f"scale index: reusing {workdir} ({n:,} examples, {spec.factory}, nprobe {spec.nprobe}, rerank "
              f"{spec.rerank})")
        return workdir, ["scale"]
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t = time.perf_counter()
    weights = workdir / "weights_scale.pt"
    scale_weights(weights, int(dmeta["n_base"]), int(dmeta["nq"]))
    from indexer.demo import load_digits_28

    X, y = load_digits_28(256, seed=0)
    np.savez(workdir / "seed_digits.npz", X=X, y=y, ids=np.asarray([f"seed-{i}" for i in range(len(X))]))
    raw = tomllib.loads(CONFIG.read_text())
    raw["model"]["weights"] = str(weights)
    raw["data"]["path"] = str(workdir / "seed_digits.npz")
    raw["index"].update(name="scale", faiss="flat")
    raw["projection"] = {"kind": "factored", "dim": dim, "seed": 1}  # bench_search.base_vectors' projection
    raw.pop("setup", None)
    build_index(raw, workdir, base_dir=CONFIG.parent, progress=False)
    cat = Catalog(workdir)
    try:
        with cat.session() as s, s.begin():
            row = cat.index(s, "scale")
            vdir = cat.workdir / Path(row.path).parent
            for f in vdir.iterdir():
                f.unlink()
            for f in ("store.json", "candidates.faiss", "vectors.f32", "ids.npy"):
                (vdir / f).symlink_to((store / f).resolve())
            row.path = str(Path(row.path).parent / "store.json")
            row.faiss_kind, row.faiss_params = "factory", spec.to_dict()
            row.count, row.recall_at_10, index_id = n, None, row.id
            s.execute(delete(Example).where(Example.index_id == index_id))
        ids = np.load(store / "ids.npy", mmap_mode="r")
        step = 50_000
        for a in range(0, n, step):  # one transaction per batch: bounded memory
            with cat.session() as s, s.begin():
                s.execute(insert(Example), [{"index_id": index_id, "row_id": int(i), "external_id": f"vec-{int(i):07d}",
                                             "label": None, "split": "train", "source": None, "payload_ref": None,
                                             "grad_norm": 1.0, "self_influence": 1.0} for i in ids[a:a + step]])
    finally:
        cat.close()
    print(f"scale index: {workdir}: catalog of {n:,} examples (synthetic ids), store {store} linked, weights "
          f"retrained as the vectors' model, factored projection k={dim} seed 1; made in "
          f"{time.perf_counter() - t:.0f} s")
    return workdir, ["scale"]


def check_scale(workdir: Path, port: int, Xq: np.ndarray, nq: int) -> None:
    """Served top-10 of held-out digits vs an exact scan of the store's vectors (same query embedding)."""
    from indexer.query import open_index
    from indexer.store import ExactSearcher, recall_at_k
    from server.client import GradIndexClient

    idx = open_index(workdir, "scale")
    V = idx.embed(Xq[:nq])
    vec = Path(idx.store.dir) / "vectors.f32"
    n, d = idx.count, idx.dim
    idx.close()
    M = np.memmap(vec, dtype=np.float32, mode="r", shape=(n, d))
    t = time.perf_counter()
    S_true, I_true = ExactSearcher(M, np.arange(n, dtype=np.int64)).search(V, 10)
    t_exact = time.perf_counter() - t
    with GradIndexClient(f"127.0.0.1:{port}", timeout=60) as c:
        got = [c.find_similar("scale", Xq[i][None], k=10) for i in range(nq)]
    I = np.stack([g.ids[0] for g in got]).astype(np.int64)
    S = np.stack([g.scores[0] for g in got])
    print(f"served top-10 vs exact scan of the 1,000,000 stored vectors ({nq} held-out digits, exact scan "
          f"{t_exact:.1f} s): recall@10 {recall_at_k(I, I_true, 10):.4f}; top-1 score served median "
          f"{np.median(S[:, 0]):.4f} vs exact {np.median(S_true[:, 0]):.4f}; max |score - exact score| of shared "
          f"ids {max_shared_diff(I, S, I_true, S_true):.2e}")


def max_shared_diff(I: np.ndarray, S: np.ndarray, I_true: np.ndarray, S_true: np.ndarray) -> float:
    worst = 0.0
    for a, b, c, d in zip(I, S, I_true, S_true):
        ref = dict(zip(c.tolist(), d.tolist()))
        for i, sc in zip(a.tolist(), b.tolist()):
            if i in ref:
                worst = max(worst, abs(sc - ref[i]))
    return worst


def warm_store(workdir: Path, name: str) -> None:
    """Read a two-stage store's vectors.f32 once (the OS page cache of a server that has been running)."""
    from indexer.query import open_index

    idx = open_index(workdir, name, load_model=False)
    d = getattr(idx.store, "dir", None)
    idx.close()
    if d is None:
        return
    vec = Path(d) / "vectors.f32"
    t = time.perf_counter()
    with open(vec, "rb") as fh:
        while fh.read(64 << 20):
            pass
    print(f"page cache warmed with {vec.stat().st_size / 2**30:.2f} GiB of {vec} in {time.perf_counter() - t:.0f} s "
          "(OS cache, outside the server's resident set)")


def recall_vs_flat(workdir: Path, Xq: np.ndarray) -> None:
    """recall@10 of the two-stage index against the flat one on the same query embeddings."""
    from indexer.query import open_index
    from indexer.store import recall_at_k

    a, b = open_index(workdir, "bench"), open_index(workdir, "bench_ts")
    V = a.embed(Xq)
    r0, r1 = a.search(V, 10), b.search(V, 10)
    S0, I0, S1, I1 = r0.scores, r0.ids, r1.scores, r1.ids
    spec = b.describe().faiss_params
    print(f"bench_ts ({spec.get('factory')}, nprobe {spec.get('nprobe')}, rerank {spec.get('rerank')}): recall@10 "
          f"against the flat index on {len(Xq)} held-out digits {recall_at_k(I1, I0, 10):.4f} (build-time recall "
          f"{b.recall_at_10}); max |score diff| on equal ids {max_shared_diff(I1, S1, I0, S0):.2e}")
    a.close()
    b.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 examples, 2 s per concurrency level")
    ap.add_argument("--n", type=int, help="index size (default 20,000; --quick 1,000)")
    ap.add_argument("--seconds", type=float, help="per concurrency level (default 30; --quick 2)")
    ap.add_argument("--clients", type=int, nargs="+", default=None, help="concurrency levels (default 8 32; "
                    "--k2048/--scale: 32)")
    ap.add_argument("--single", type=int, help="sequential single-query calls (default 300; --quick 40)")
    ap.add_argument("--proj-dim", type=int, default=512,
                    help="projection dimension of the benchmark index (the shipped config uses 2048; a flat scan "
                         "of 20,000 x 2048 float32 is 164 MB per query, memory-bound at ~15-25 ms here)")
    ap.add_argument("--k2048", action="store_true", help="2,048 dims: the flat index and a two-stage twin")
    ap.add_argument("--ts-factory", default="IVF128,SQ8", help="--k2048: FAISS factory of the two-stage candidates")
    ap.add_argument("--ts-nprobe", type=int, default=16, help="--k2048: IVF lists probed")
    ap.add_argument("--ts-rerank", type=int, default=100, help="--k2048: candidates re-scored exactly")
    ap.add_argument("--scale", action="store_true", help="serve the 1,000,000-example two-stage store of bench_scale")
    ap.add_argument("--scale-data", default=str(ROOT / "benchmarks" / "out" / "scale"),
                    help="--scale: bench_scale's data directory (meta.json, store_pca/)")
    ap.add_argument("--scale-nprobe", type=int, default=16, help="--scale: IVF lists probed")
    ap.add_argument("--scale-rerank", type=int, default=300, help="--scale: candidates re-scored exactly")
    ap.add_argument("--check", type=int, default=20, help="--scale: held-out digits checked against an exact scan")
    ap.add_argument("--batch-max", type=int, default=64, help="batch_max_examples of the batching-on server")
    ap.add_argument("--batch-window-ms", type=float, default=2.0, help="batch_window_ms of both servers")
    ap.add_argument("--no-baseline", action="store_true", help="skip the batching-off server")
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "bench_server"))
    args = ap.parse_args(argv)
    if args.k2048:
        args.proj_dim = 2048
    n = args.n or (1000 if args.quick else 20000)
    seconds = args.seconds or (2.0 if args.quick else 30.0)
    single = args.single or (40 if args.quick else 300)
    clients_levels = args.clients or ([32] if (args.k2048 or args.scale) else [8, 32])
    target = 20.0 if args.scale else 10.0 if args.k2048 else 15.0

    import psutil
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    from indexer.chunks import set_threads
    from indexer.demo import load_digits_28
    from server.client import GradIndexClient

    set_threads(1)
    t = time.perf_counter()
    workdir, names = prepare_scale(args) if args.scale else prepare_digits(args, n)
    from indexer.query import open_index

    for name in names:
        idx = open_index(workdir, name, load_model=False)
        info = idx.describe()
        idx.close()
        print(f"index {name}: {info.count:,} examples of the digits CNN ({info.projection['kind']} projection to "
              f"{info.dim} dims, {info.kernel}, {info.faiss} search"
              + (f" {info.faiss_params.get('factory')} nprobe {info.faiss_params.get('nprobe')} rerank "
                 f"{info.faiss_params.get('rerank')}" if info.faiss == "factory" else "")
              + f") ready at {workdir}")
    print(f"indexes ready in {time.perf_counter() - t:.1f} s; load average {os.getloadavg()[0]:.2f}")
    nq_base = 10_250 if args.scale else n
    Xq = load_digits_28(n=nq_base + 400, seed=1)[0][-400:]  # shifted digits the index did not store
    if args.k2048:
        recall_vs_flat(workdir, Xq[:200])
    for name in names:
        warm_store(workdir, name)

    bds = {name: breakdown(workdir, Xq[:1], reps=max(10, single // 5), name=name) for name in names}
    for name, bd in bds.items():
        print(f"\nbaseline: in-process GradIndex.find_similar on {name}, 1 query, k=5: p50 "
              f"{bd['in_process_total']:.2f} ms")

    modes = [("on", args.batch_max)] if args.no_baseline else [("off", 0), ("on", args.batch_max)]
    combos = [(m, name) for m, _ in modes for name in names]
    single_res: dict[tuple[str, str], dict] = {c: {"lat": [], "timing": []} for c in combos}
    results = []
    rss0 = 0
    servers = {}
    rounds = (1, 2) if not (args.k2048 or args.scale) else (1,)
    try:
        for mode, bmax in modes:  # both servers up at once: the single-query phase alternates between them
            servers[mode] = start_server(workdir, workers=max(clients_levels) + 4, batch_max_examples=bmax,
                                         batch_window_ms=args.batch_window_ms, names=tuple(names))
        if args.scale:
            check_scale(workdir, servers[modes[-1][0]][1], Xq, args.check)
        clients_ = {m: GradIndexClient(f"127.0.0.1:{port}", timeout=30) for m, (_, port) in servers.items()}
        for i in tqdm(range(single), desc="single-query FindSimilar, alternating servers/indexes", leave=False):
            for mode, name in combos:
                t = time.perf_counter()
                r = clients_[mode].find_similar(name, Xq[i % len(Xq)][None], k=5)
                if i >= 5:
                    single_res[(mode, name)]["lat"].append((time.perf_counter() - t) * 1e3)
                    single_res[(mode, name)]["timing"].append(r.server_timing)
        for c in clients_.values():
            c.close()
        for mode, (proc, port) in servers.items():
            ps = psutil.Process(proc.pid)
            rss_start = ps.memory_info().rss
            if mode == "on":
                rss0 = rss_start
            for rnd in (rounds if mode == "on" else (1,)):  # round 2: a warm server must not keep growing
                for name in names:
                    for clients in clients_levels:
                        r = load_phase(port, Xq, clients, seconds, name)
                        rss = ps.memory_info().rss
                        r.update(mode=mode, name=name, clients=clients, round=rnd, rss_mb=rss / 2**20,
                                 growth_mb=(rss - rss_start) / 2**20)
                        results.append(r)
            proc.terminate()
            proc.wait(30)
    finally:
        for proc, _ in servers.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)

    print(f"\nsingle-query FindSimilar over gRPC (k=5, sequential calls alternating between the servers"
          f"{' and indexes' if len(names) > 1 else ''}; load average {os.getloadavg()[0]:.2f}):")
    for (mode, name), sr in single_res.items():
        p50 = pct(sr["lat"], 50)
        base = bds[name]["in_process_total"]
        ref = single_res.get(("off", name))
        vs = f", {p50 / pct(ref['lat'], 50):.2f}x batching off" if mode == "on" and ref else ""
        flat_ref = single_res.get((mode, "bench")) if name != "bench" else None
        vs += f", {p50 / pct(flat_ref['lat'], 50):.2f}x the flat index" if flat_ref else ""
        print(f"  {name:<8} batching {mode:>3}: p50 {p50:.2f} ms, p90 {pct(sr['lat'], 90):.2f} ms, p99 "
              f"{pct(sr['lat'], 99):.2f} ms  ({p50 / base:.2f}x the in-process baseline{vs})  target p50 <= "
              f"{target:.0f} ms: {'MET' if p50 <= target else 'MISSED'}")
    print("\nlatency breakdown of one query (median ms):")
    for name, bd in bds.items():
        print(f"  {name} in-process:  predict {bd['predict']:.2f} | gradient {bd['gradient']:.2f} | projection "
              f"{bd['projection']:.2f} | search {bd['search']:.2f} | fetch records {bd['fetch']:.2f} | "
              f"(de)serialize request {bd['serialize_req']:.3f} | response {bd['serialize_resp']:.3f}")
    for (mode, name), sr in single_res.items():
        keys = [k for k in sr["timing"][-1] if k != "batch"]  # 'batch' is a size, not milliseconds
        st = {k: statistics.median(t.get(k, 0.0) for t in sr["timing"]) for k in keys}
        handler = sum(st.values())
        print(f"  {name} in server, batching {mode:>3}: " + " | ".join(f"{k} {v:.2f}" for k, v in st.items())
              + f"  (handler total {handler:.2f}); gRPC transport + client (de)serialization "
              f"{pct(sr['lat'], 50) - handler:.2f}")

    print(f"\nloopback load test, {seconds:.0f} s per level, FindSimilar(1 query, k=5):")
    print(f"{'index':>8} {'batching':>8} {'round':>5} {'clients':>8} {'qps':>8} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'p99 ms':>8} {'errors':>7} {'batch':>6} {'RSS MB':>8} {'growth MB':>10} {'qps vs off':>11}")
    off = {(r["name"], r["clients"]): r for r in results if r["mode"] == "off"}
    for r in results:
        o = off.get((r["name"], r["clients"]))
        ratio = f"{r['qps'] / o['qps']:>10.2f}x" if o else f"{'':>11}"
        print(f"{r['name']:>8} {r['mode']:>8} {r['round']:>5} {r['clients']:>8} {r['qps']:>8.1f} {r['p50']:>8.2f} "
              f"{r['p90']:>8.2f} {r['p99']:>8.2f} {r['errors']:>7d} {r['batch']:>6.1f} {r['rss_mb']:>8.0f} "
              f"{r['growth_mb']:>10.1f} {ratio}")
        if r["errors"]:
            print(f"   first error: {r['first_error']}")
    errors = sum(r["errors"] for r in results)
    print(f"\nzero errors ({', '.join(str(c) for c in clients_levels)} clients x {seconds:.0f} s): "
          f"{'MET' if errors == 0 else 'MISSED'} ({errors}); load average {os.getloadavg()[0]:.2f}")
    if len(rounds) == 2:
        on = [r for r in results if r["mode"] == "on"]
        half = len(on) // 2
        growth = on[-1]["rss_mb"] - on[half - 1]["rss_mb"]
        total = sum(r["n"] for r in on[half:])
        print(f"memory flat (batching-on server RSS {rss0 / 2**20:.0f} MB after the single-query phase, change over "
              f"round 2, {total} more requests: {growth:+.1f} MB, limit 25 MB): "
              f"{'MET' if abs(growth) <= 25 else 'MISSED'}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
