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
"""

from __future__ import annotations

import argparse
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
                 batch_window_ms: float = 2.0) -> tuple[subprocess.Popen, int]:
    cfg = workdir / f"server_b{batch_max_examples}.toml"
    cfg.write_text(f'workdir = "{workdir}"\nindexes = ["bench"]\nport = 0\nworkers = {workers}\n'
                   f'max_concurrent_rpcs = {workers * 2}\nlog_level = "WARNING"\n'
                   f'batch_max_examples = {batch_max_examples}\nbatch_window_ms = {batch_window_ms}\n')
    from _util import start_serve  # imported here: this function is the only user in this file

    proc, port, _ = start_serve(cfg, ROOT)
    return proc, port


def load_phase(port: int, X: np.ndarray, clients: int, seconds: float) -> dict:
    """``clients`` threads, one channel each, FindSimilar(one query, k=5) in a loop for ``seconds``."""
    from server.client import GradIndexClient

    lat: list[list[float]] = [[] for _ in range(clients)]
    batch: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop = threading.Event()
    go = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        with GradIndexClient(f"127.0.0.1:{port}", timeout=30) as c:
            c.find_similar("bench", X[i % len(X)][None], k=5)  # connect + warm
            go.wait()
            j = i
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = c.find_similar("bench", X[j % len(X)][None], k=5)
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
    return {"n": len(flat), "qps": len(flat) / wall, "p50": pct(flat, 50) * 1e3, "p99": pct(flat, 99) * 1e3,
            "errors": len(errors), "first_error": errors[0] if errors else "",
            "batch": float(np.mean(sizes)) if sizes else float("nan")}


def breakdown(workdir: Path, x: np.ndarray, reps: int) -> dict:
    """Median ms of each step of one query, in-process, with the index's own engine and projection."""
    from indexer.kernels import scale_query
    from indexer.query import open_index
    from server.protos import service_pb2 as pb
    from server.tensors import from_tensor, to_tensor

    idx = open_index(workdir, "bench")
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
        req = pb.FindSimilarRequest(index="bench", inputs=to_tensor(x), k=5)
        b = req.SerializeToString()
        from_tensor(pb.FindSimilarRequest.FromString(b).inputs, finite=True)
        t6 = time.perf_counter()
        resp = pb.FindSimilarResponse(index="bench")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 examples, 2 s per concurrency level")
    ap.add_argument("--n", type=int, help="index size (default 20,000; --quick 1,000)")
    ap.add_argument("--seconds", type=float, help="per concurrency level (default 30; --quick 2)")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--single", type=int, help="sequential single-query calls (default 300; --quick 40)")
    ap.add_argument("--proj-dim", type=int, default=512,
                    help="projection dimension of the benchmark index (the shipped config uses 2048; a flat scan "
                         "of 20,000 x 2048 float32 is 164 MB per query, memory-bound at ~15-25 ms here)")
    ap.add_argument("--batch-max", type=int, default=64, help="batch_max_examples of the batching-on server")
    ap.add_argument("--batch-window-ms", type=float, default=2.0, help="batch_window_ms of both servers")
    ap.add_argument("--no-baseline", action="store_true", help="skip the batching-off server")
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "bench_server"))
    args = ap.parse_args(argv)
    n = args.n or (1000 if args.quick else 20000)
    seconds = args.seconds or (2.0 if args.quick else 30.0)
    single = args.single or (40 if args.quick else 300)

    import psutil
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    from indexer.chunks import set_threads
    from indexer.demo import load_digits_28
    from server.client import GradIndexClient
    from server.demo import ensure_digits_index

    set_threads(1)
    workdir = Path(args.workdir) / f"n{n}_k{args.proj_dim}"
    t = time.perf_counter()
    ensure_digits_index(workdir, "bench", n=n, progress=True, overrides={"projection": {"dim": args.proj_dim}})
    from indexer.errors import ModelMismatch
    from indexer.query import open_index

    try:
        open_index(workdir, "bench").close()
    except ModelMismatch:  # the shipped weights were retrained since this index was built: rebuild it
        print(f"the digits weights changed since {workdir} was built: rebuilding it")
        shutil.rmtree(workdir)
        ensure_digits_index(workdir, "bench", n=n, progress=True, overrides={"projection": {"dim": args.proj_dim}})
    idx = open_index(workdir, "bench", load_model=False)
    info = idx.describe()
    idx.close()
    print(f"index: {n} examples of the digits CNN ({info.projection['kind']} projection to {info.dim} dims, "
          f"{info.kernel}, {info.faiss} search) ready in {time.perf_counter() - t:.1f} s at {workdir}")
    Xq = load_digits_28(n=n + 400, seed=1)[0][-400:]  # queries the index did not store

    bd = breakdown(workdir, Xq[:1], reps=max(10, single // 5))
    base = bd["in_process_total"]
    print(f"\nbaseline: in-process GradIndex.find_similar, 1 query, k=5: p50 {base:.2f} ms")

    modes = [("on", args.batch_max)] if args.no_baseline else [("off", 0), ("on", args.batch_max)]
    single_res: dict[str, dict] = {m: {"lat": [], "timing": []} for m, _ in modes}
    results = []
    rss0 = 0
    servers = {}
    try:
        for mode, bmax in modes:  # both servers up at once: the single-query phase alternates between them
            servers[mode] = start_server(workdir, workers=max(args.clients) + 4, batch_max_examples=bmax,
                                         batch_window_ms=args.batch_window_ms)
        clients_ = {m: GradIndexClient(f"127.0.0.1:{port}", timeout=30) for m, (_, port) in servers.items()}
        for i in tqdm(range(single), desc="single-query FindSimilar, batching off/on alternately", leave=False):
            for mode, c in clients_.items():
                t = time.perf_counter()
                r = c.find_similar("bench", Xq[i % len(Xq)][None], k=5)
                if i >= 5:
                    single_res[mode]["lat"].append((time.perf_counter() - t) * 1e3)
                    single_res[mode]["timing"].append(r.server_timing)
        for c in clients_.values():
            c.close()
        for mode, (proc, port) in servers.items():
            ps = psutil.Process(proc.pid)
            rss_start = ps.memory_info().rss
            if mode == "on":
                rss0 = rss_start
            for rnd in ((1, 2) if mode == "on" else (1,)):  # round 2: a warm server must not keep growing
                for clients in args.clients:
                    r = load_phase(port, Xq, clients, seconds)
                    rss = ps.memory_info().rss
                    r.update(mode=mode, clients=clients, round=rnd, rss_mb=rss / 2**20,
                             growth_mb=(rss - rss_start) / 2**20)
                    results.append(r)
            proc.terminate()
            proc.wait(30)
    finally:
        for proc, _ in servers.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)

    print("\nsingle-query FindSimilar over gRPC (k=5, sequential calls alternating between the two servers):")
    off_p50 = pct(single_res["off"]["lat"], 50) if "off" in single_res else float("nan")
    for mode, sr in single_res.items():
        p50 = pct(sr["lat"], 50)
        vs = f", {p50 / off_p50:.2f}x batching off" if mode == "on" and "off" in single_res else ""
        print(f"  batching {mode:>3}: p50 {p50:.2f} ms, p99 {pct(sr['lat'], 99):.2f} ms  ({p50 / base:.2f}x the "
              f"in-process baseline{vs})  target p50 <= 15 ms: {'MET' if p50 <= 15 else 'MISSED'}")
    print("\nlatency breakdown of one query (median ms):")
    print(f"  in-process:  predict {bd['predict']:.2f} | gradient {bd['gradient']:.2f} | projection "
          f"{bd['projection']:.2f} | search {bd['search']:.2f} | fetch records {bd['fetch']:.2f} | "
          f"(de)serialize request {bd['serialize_req']:.3f} | response {bd['serialize_resp']:.3f}")
    for mode, sr in single_res.items():
        keys = [k for k in sr["timing"][-1] if k != "batch"]  # 'batch' is a size, not milliseconds
        st = {k: statistics.median(t.get(k, 0.0) for t in sr["timing"]) for k in keys}
        handler = sum(st.values())
        print(f"  in server, batching {mode:>3}: " + " | ".join(f"{k} {v:.2f}" for k, v in st.items())
              + f"  (handler total {handler:.2f}); gRPC transport + client (de)serialization "
              f"{pct(sr['lat'], 50) - handler:.2f}")

    print(f"\nloopback load test, {seconds:.0f} s per level, FindSimilar(1 query, k=5):")
    print(f"{'batching':>8} {'round':>5} {'clients':>8} {'qps':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
          f"{'batch':>6} {'RSS MB':>8} {'growth MB':>10} {'qps vs off':>11}")
    off = {r["clients"]: r for r in results if r["mode"] == "off"}
    for r in results:
        ratio = f"{r['qps'] / off[r['clients']]['qps']:>10.2f}x" if r["clients"] in off else f"{'':>11}"
        print(f"{r['mode']:>8} {r['round']:>5} {r['clients']:>8} {r['qps']:>8.1f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
              f"{r['errors']:>7d} {r['batch']:>6.1f} {r['rss_mb']:>8.0f} {r['growth_mb']:>10.1f} {ratio}")
        if r["errors"]:
            print(f"   first error: {r['first_error']}")
    errors = sum(r["errors"] for r in results)
    on = [r for r in results if r["mode"] == "on"]
    half = len(on) // 2
    growth = on[-1]["rss_mb"] - on[half - 1]["rss_mb"]
    total = sum(r["n"] for r in on[half:])
    print(f"\nzero errors: {'MET' if errors == 0 else 'MISSED'} ({errors}); memory flat (batching-on server RSS "
          f"{rss0 / 2**20:.0f} MB after the single-query phase, change over round 2, {total} more requests: "
          f"{growth:+.1f} MB, limit 25 MB): {'MET' if abs(growth) <= 25 else 'MISSED'}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
