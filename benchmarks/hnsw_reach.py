"""Is HNSW's recall at 1M limited by search depth or by the graph's reachability?

Searches the HNSW candidate index that ``bench_scale.py`` built over the full dimensions with a
growing ``efSearch`` and counts, per query, how many of its exact top-10 are among the candidates.
A recall that stops rising while ``efSearch`` grows four-fold means those neighbours cannot be
reached through the graph from its entry point, whatever the search depth: the fix is then another
index (IVF), not a deeper search. One thread, as the rest of the scale benchmark.

    python benchmarks/bench_scale.py --queries 500 --hnsw-n 1000000 --only flat,hnsw   # builds the store
    python benchmarks/hnsw_reach.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.store import hits_at_k  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "out" / "scale")
    ap.add_argument("--queries", type=int, default=500, help="queries for the histogram at efSearch 500")
    ap.add_argument("--deep-queries", type=int, default=100, help="queries at the deep settings (slow)")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(1)
    store = args.data / "store_hnsw"
    meta = json.loads((store / "store.json").read_text())
    index = faiss.read_index(str(store / "candidates.faiss"))
    hnsw = faiss.downcast_index(index)
    if not hasattr(hnsw, "hnsw"):
        raise SystemExit(f"{store} holds a {meta.get('factory')} index, not HNSW over the full dimensions: build it "
                         "with bench_scale.py --hnsw HNSW32,SQ8")
    Q = np.load(args.data / "Q.npy")[:args.queries].astype(np.float32)
    truth = np.load(args.data / "truth.npy")[:args.queries]
    print(f"# hnsw_reach: {meta['factory']} over n={index.ntotal:,} (d={index.d}), {len(Q)} queries, 1 thread, "
          f"data {json.loads((args.data / 'meta.json').read_text())}")
    hnsw.hnsw.efSearch = 500
    _, I = index.search(Q, 500)
    h = hits_at_k(I, truth)
    print(f"efSearch 500, 500 candidates: recall {h.mean() / 10:.3f}; queries with 0..10 of their true top-10 found: "
          f"{np.bincount(h, minlength=11).tolist()}")
    nd = min(args.deep_queries, len(Q))
    for ef in (2000, 8000):
        hnsw.hnsw.efSearch = ef
        t = time.perf_counter()
        _, I = index.search(Q[:nd], 1000)
        dt = time.perf_counter() - t
        h = hits_at_k(I, truth[:nd])
        print(f"efSearch {ef}, 1000 candidates ({nd} queries): recall {h.mean() / 10:.3f} at {nd / dt:.0f} q/s; "
              f"hits histogram {np.bincount(h, minlength=11).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
