"""Text-model benchmark (one thread, every ratio against a baseline measured in the same run).

1. Index build of the text classifier example (T = ``--T``) in examples/s against one batched
   backward of the same examples (target >= 0.5x).
2. Peak RSS of a build as the number of examples doubles (fresh subprocess each; target: flat).
3. LoGra-style factored projection vs TensorSketch vs the exact scores at k = 2,048 on the text
   model: Spearman of each query's scores over the training set and recall@10 (targets >= 0.95 / >= 0.9).
4. Served text-query p50 over gRPC (tokenization + the query's gradient + search) on an index of
   ``--serve-n`` examples (target <= 25 ms at 20,000).

    python benchmarks/bench_text.py [--quick]   # output also in benchmarks/results/bench_text.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._util import median_time, pin_threads  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "bench_text.txt"
LINES: list[str] = []


def say(s: str) -> None:
    print(s, flush=True)
    LINES.append(s)


def cfg_for(model_dir: str, data: str, name: str, T: int, proj: dict, chunk: int = 32, kernel: str = "grad_dot") -> dict:
    return {"model": {"name": name, "hf_dir": model_dir, "hf_kind": "sequence_classification",
                      "class_names": ["negative", "positive"], "text": {"max_length": T}},
            "data": {"format": "jsonl", "path": data, "id_field": "id"},
            "index": {"name": name, "kernel": kernel, "faiss": "flat"}, "projection": proj,
            "build": {"chunk_size": chunk, "threads": 1, "recall_sample": 0}}


def write_jsonl(path: Path, n: int, seed: int) -> None:
    from indexer.text_demo import sentiment_sentences

    texts, labels = sentiment_sentences(n, seed)
    with open(path, "w") as fh:
        for i, (t, l) in enumerate(zip(texts, labels)):
            fh.write(json.dumps({"id": f"s{i}", "text": t, "label": int(l)}) + "\n")


def build_child(args: argparse.Namespace) -> None:
    """Subprocess: build one index and print its peak RSS (so builds of different sizes do not share a heap)."""
    import resource

    from indexer.build import build_index

    pin_threads(1)
    cfg = json.loads(args.child)
    t = time.perf_counter()
    r = build_index(cfg, args.workdir, progress=False)
    print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "n": r.count,
                      "s": time.perf_counter() - t}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--serve-n", type=int, default=20000)
    ap.add_argument("--serve-only", action="store_true", help="only section 4 (development)")
    ap.add_argument("--child")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if args.child:
        return build_child(args)
    pin_threads(1)
    import torch

    from indexer.build import build_index
    from indexer.query import open_index
    from indexer.text_demo import make_classifier_dir

    quick = args.quick
    T = 32 if quick else args.T
    n_build = 64 if quick else 256
    serve_n = 1000 if quick else args.serve_n
    tmp = Path(tempfile.mkdtemp(prefix="bench_text_"))
    say(f"bench_text: one thread, T={T}, {'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')} UTC")
    info = make_classifier_dir(tmp / "model", n_train=400, epochs=4, hidden=64, layers=2, max_length=T)
    say(f"model: BERT 2 layers, hidden 64, vocabulary {json.load(open(tmp / 'model' / 'config.json'))['vocab_size']}, "
        f"trained on 400 generated sentences (train accuracy {info['accuracy']:.2f})")
    data = tmp / "train.jsonl"
    write_jsonl(data, n_build, 1)

    from indexer.defaults import TEXT_PROJECTION

    best = TEXT_PROJECTION["kind"]
    if not args.serve_only:  # sections 1-3 (skipped with --serve-only, a development aid)
        # 1. build throughput vs one batched backward
        proj = {"kind": "sketch", "dim": 2048}
        def build_once(kind: str) -> float:
            wd = tmp / "wd_speed"
            shutil.rmtree(wd, ignore_errors=True)
            return build_index(cfg_for(info["dir"], str(data), "speed", T, {"kind": kind, "dim": 2048}), wd,
                               progress=False).compute_seconds
        t_builds = {kind: statistics.median([build_once(kind) for _ in range(1 if quick else 3)])
                    for kind in ("factored", "sketch")}
        idx = open_index(tmp / "wd_speed", "speed")
        X, _ = idx.text_inputs([json.loads(l)["text"] for l in open(data)])
        Y = np.asarray([json.loads(l)["label"] for l in open(data)])
        model = idx.model()
        def backward() -> None:
            for s in range(0, len(X), 32):
                model.zero_grad()
                out = model(torch.as_tensor(X[s:s + 32]))
                torch.nn.functional.cross_entropy(out, torch.as_tensor(Y[s:s + 32])).backward()
        t_bw = median_time(backward, repeat=1 if quick else 3)
        for kind, t_build in t_builds.items():
            say(f"1. build ({kind} k=2048, grad_dot, flat, {n_build} texts) {n_build / t_build:.1f} ex/s vs one batched "
                f"backward {n_build / t_bw:.1f} ex/s = {t_bw / t_build:.2f}x (target >= 0.5x)")

        # 2. peak RSS as examples double (fresh subprocess each)
        rss = []
        for n in ((64, 128) if quick else (256, 512)):
            d = tmp / f"rss_{n}.jsonl"
            write_jsonl(d, n, 2)
            wd = tmp / f"wd_rss_{n}"
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg_for(info["dir"], str(d), "rss", T, proj)),
                                  "--workdir", str(wd)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rss.append((n, r["rss"]))
        say(f"2. build peak RSS: {rss[0][0]} examples {rss[0][1] / 2**20:.0f} MiB, {rss[1][0]} examples "
            f"{rss[1][1] / 2**20:.0f} MiB = {rss[1][1] / rss[0][1]:.2f}x as the examples double (target: flat, ~1.0x)")

        # 3. LoGra-style vs TensorSketch vs exact at k=2048
        from scipy.stats import spearmanr

        from indexer.projection import Projector, ProjectionSpec, layout_of

        eng = idx.embedder().engines[0]
        n_tr, n_q = (64, 8) if quick else (256, 16)
        Xtr, Ytr = X[:n_tr], Y[:n_tr]
        Xq, _ = idx.text_inputs(["the film was really wonderful", "the plot was dull", "the cast was superb overall",
                                 "this movie was tedious", "the ending was clever", "the script was messy",
                                 "the soundtrack was beautiful", "the acting was weak"] * (n_q // 8))
        Yq = idx.predict_targets(Xq)
        G = eng.grads(Xtr, Ytr)
        Gq = eng.grads(Xq, Yq)
        exact = Gq.astype(np.float64) @ G.T.astype(np.float64)
        say(f"3. exact gradients: {G.shape[1]:,} parameters; {n_tr} training texts, {n_q} queries")
        _, probe_blocks = next(eng.iter_blocks(Xtr[:2], Ytr[:2]))
        lay = layout_of(probe_blocks, eng.offsets())
        res = {}
        for kind in ("factored", "sketch"):
            P = Projector(ProjectionSpec(kind=kind, dim=2048), lay)
            def proj_rows(Xs, Ys):
                return np.concatenate([P.project(b) for _, b in eng.iter_blocks(Xs, Ys)])
            t0 = time.perf_counter()
            V = proj_rows(Xtr, Ytr)
            t_proj = time.perf_counter() - t0
            S = proj_rows(Xq, Yq).astype(np.float64) @ V.T.astype(np.float64)
            rho = [spearmanr(S[q], exact[q]).statistic for q in range(n_q)]
            rec = [len(set(np.argsort(-S[q])[:10]) & set(np.argsort(-exact[q])[:10])) / 10 for q in range(n_q)]
            res[kind] = (float(np.median(rho)), float(np.mean(rec)), n_tr / t_proj)
            say(f"   {kind:9s} k=2048: Spearman median {res[kind][0]:.3f} (target >= 0.95), recall@10 {res[kind][1]:.2f} "
                f"(target >= 0.9), {res[kind][2]:.1f} ex/s gradients+projection")
        speed = {kind: t_bw / t for kind, t in t_builds.items()}
        meets = {k: res[k][0] >= 0.95 and res[k][1] >= 0.9 and speed[k] >= 0.5 for k in res}
        best = max(res, key=lambda k: (meets[k], res[k][0] + res[k][1]))
        from indexer.defaults import TEXT_PROJECTION

        say(f"   meets every target in this run (Spearman, recall@10, build >= 0.5x): "
            f"{', '.join(f'{k} {meets[k]}' for k in res)}; this run's pick: {best}; the default "
            f"(indexer/defaults.py, from repeated runs): {TEXT_PROJECTION['kind']}")
        best = TEXT_PROJECTION["kind"]  # the served figure is for the default

    # 4. served text-query p50: the flat index (baseline), candidate factories measured on its vectors,
    #    then the two-stage index with the fastest factory whose top-10 equals the flat one's
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig

    big = tmp / "serve.jsonl"
    write_jsonl(big, serve_n, 3)
    queries = ["the film was really wonderful", "the plot was dull in every scene", "the cast was superb",
               "this movie was tedious", "the ending was clever", "the script was messy"]
    n_lat = 30 if quick else 100

    def served(wd: Path, name: str) -> tuple[list[float], dict[str, float], list]:
        """(latencies ms, median server stage ms, per-query (ids, scores)) of one-text queries over gRPC."""
        srv = GradIndexServer(ServerConfig(workdir=str(wd), indexes=[name], port=0)).start()
        try:
            c = GradIndexClient(f"127.0.0.1:{srv.port}")
            answers = [c.find_similar(name, texts=[t], k=10) for t in queries]  # also warms the path
            lat, stages = [], {}
            for i in range(n_lat):
                t0 = time.perf_counter()
                r = c.find_similar(name, texts=[queries[i % 3]], k=10)
                lat.append((time.perf_counter() - t0) * 1e3)
                for st, ms in r.server_timing.items():
                    stages.setdefault(st, []).append(ms)
            return lat, {st: statistics.median(v) for st, v in stages.items()}, \
                [(a.most.ids[0], a.most.scores[0]) for a in answers]
        finally:
            srv.stop(0)

    def stage_str(st: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in st.items() if k not in ("queue", "batch"))

    wd = tmp / "wd_serve"
    t0 = time.perf_counter()
    # grad_cos, the kernel of the text example: under grad_dot these gradients (one training text's norm
    # 3e4x the median) defeat the MIPS-to-L2 augmentation of approximate candidate indexes in float32
    build_index(cfg_for(info["dir"], str(big), "serve", T, {"kind": best, "dim": 2048}, chunk=64, kernel="grad_cos"),
                wd, progress=True)
    say(f"4. served index: {serve_n:,} examples built in {time.perf_counter() - t0:.0f} s (flat, grad_cos, {best} k=2048)")
    lat_flat, st_flat, ans_flat = served(wd, "serve")
    p50_flat = statistics.median(lat_flat)
    say(f"   flat:      text query p50 {p50_flat:.1f} ms, p90 {np.percentile(lat_flat, 90):.1f} ms over {n_lat} queries "
        f"(k=10); server stages (median ms): {stage_str(st_flat)}")

    # candidate factories on the flat index's own vectors (no second gradient pass to compare them)
    from indexer.store import ExactSearcher, IndexSpec
    from indexer.vectorstore import build_store, open_store

    fidx = open_index(wd, "serve")
    Vs, ids = fidx.vectors()
    Vs = np.asarray(Vs)
    Q = np.concatenate([fidx.embed(*fidx.text_inputs([q])) for q in queries])
    S_truth, truth = ExactSearcher(Vs, ids).search(Q, 10)
    pos_of = {int(i): p for p, i in enumerate(ids.tolist())}

    def tie_recall(got: np.ndarray, Qs: np.ndarray, S_true: np.ndarray) -> float:
        """recall@10 counting ties: a returned row counts when its exact score reaches the true 10th
        score less 4 float32 ulps of the top score (the generated sentences repeat, and scores equal to
        float32 rounding cannot be ranked by any float32 index, flat included)."""
        hits = 0
        for q in range(len(Qs)):
            sc = Vs[[pos_of[int(i)] for i in got[q] if i >= 0]] @ Qs[q]
            hits += int(np.sum(sc >= S_true[q, -1] - 4 * np.finfo(np.float32).eps * abs(S_true[q, 0])))
        return hits / (10 * len(Qs))

    rel = max(float(np.max(np.abs(np.asarray(ans_flat[i][1]) - S_truth[i]) / np.abs(S_truth[i]).max()))
              for i in range(len(Q)))
    say(f"   served (padding trimmed) vs in-process at full padding (T={T}), flat: recall@10 (ties counted) "
        f"{tie_recall(np.asarray([a[0] for a in ans_flat]), Q, S_truth):.2f}, max relative score difference {rel:.1e}")
    Qr = Vs[np.random.default_rng(0).choice(len(Vs), 200, replace=False)]
    S_r = ExactSearcher(Vs, ids).search(Qr, 10)[0]
    # the yardstick: the flat FAISS index's own recall against this numpy reference (near-ties beyond
    # 4 ulps still flip between two float32 summation orders)
    floor_q = tie_recall(fidx.search(Q, 10).ids, Q, S_truth)
    floor_r = tie_recall(fidx.search(Qr, 10).ids, Qr, S_r)
    top = np.sort(S_truth, axis=1)
    say(f"   scores on this data: the top-10 of a query span {np.median((top[:, -1] - top[:, 0]) / top[:, -1]):.1e} "
        f"(median relative spread); flat FAISS vs the numpy reference: recall@10 (ties counted) {floor_q:.2f} on the "
        f"query texts, {floor_r:.3f} on 200 stored rows as queries")
    # what trimming the padding buys, in process (one text, model + gradient + projection)
    widx = open_index(wd, "serve")
    widx.warm_up()
    Xq1, _ = widx.text_inputs([queries[0]])
    t_emb = {}
    for on in (False, True):
        widx._trim_ok = on
        t_emb[on] = median_time(lambda: widx.embed(Xq1, widx.predict_targets(Xq1)), repeat=30)
    say(f"   one text's targets + query vector in process: padded to T={T} {t_emb[False] * 1e3:.1f} ms, padding trimmed "
        f"({Xq1[0, 1].sum()} tokens) {t_emb[True] * 1e3:.1f} ms = {t_emb[False] / t_emb[True]:.1f}x faster")
    t_exact = median_time(lambda: ExactSearcher(Vs, ids).search(Q[:1], 10), repeat=20)
    def shards():
        for s0 in range(0, len(Vs), 4096):
            yield Vs[s0:s0 + 4096], ids[s0:s0 + 4096]
    factories = [("IVF128,Flat", 100, 16), ("IVF128,Flat", 100, 32), ("IVF64,Flat", 100, 16), ("IVF128,SQ8", 100, 32)] \
        if not quick else [("IVF16,Flat", 50, 8), ("IVF16,SQ8", 50, 8)]
    say(f"   candidate stores on these {len(Vs):,} vectors (one query, k=10; exact flat scan {t_exact * 1e3:.2f} ms):")
    fits = []
    for fi, (fac, rr, npb) in enumerate(factories):
        spec = IndexSpec.from_dict({"factory": fac, "rerank": rr, "nprobe": npb})
        tb = time.perf_counter()
        path, _, spec = build_store(spec, "grad_cos", Vs.shape[1], len(Vs), shards, tmp / "fac", f"f{fi}", 1,
                                    recall_sample=0)
        tb = time.perf_counter() - tb
        st = open_store(tmp / "fac" / path, spec, "grad_cos", Vs.shape[1])
        rec_q = tie_recall(st.search(Q, 10)[1], Q, S_truth)
        rec_sample = tie_recall(st.search(Qr, 10)[1], Qr, S_r)
        t_s = median_time(lambda: st.search(Q[:1], 10), repeat=20)
        st.close()
        # as good as the flat index on the 200 stored rows (to half a percent), within one hit in 20 on the texts
        ok = rec_sample >= floor_r - 0.005 and rec_q >= floor_q - 0.05
        fits.append((ok, t_s, fac, rr, npb))
        say(f"     {fac:12s} nprobe {npb:2d} rerank {rr}: search {t_s * 1e3:.2f} ms ({t_exact / t_s:.1f}x faster than flat), recall@10 "
            f"(ties counted) {rec_q:.2f} on the query texts, {rec_sample:.3f} on 200 stored rows as queries, built in {tb:.1f} s")
    ok_f = [f for f in fits if f[0]]
    if not ok_f:
        say("   no candidate store reached the flat index's recall: the served figure stays the flat one")
    else:
        _, _, fac, rr, npb = min(ok_f, key=lambda f: f[1])
        wd2 = tmp / "wd_serve2"
        cfg = cfg_for(info["dir"], str(big), "serve2", T, {"kind": best, "dim": 2048}, chunk=64, kernel="grad_cos")
        cfg["index"] = {"name": "serve2", "kernel": "grad_cos", "factory": fac, "rerank": rr, "nprobe": npb}
        t0 = time.perf_counter()
        build_index(cfg, wd2, progress=True)
        say(f"   two-stage: {fac}, nprobe {npb}, rerank {rr} (the fastest with the flat index's recall, see above): built in {time.perf_counter() - t0:.0f} s")
        lat, st2, ans2 = served(wd2, "serve2")
        p50 = statistics.median(lat)
        same_ids = tie_recall(np.asarray([a[0] for a in ans2]), Q, S_truth)
        dscore = max(float(np.max(np.abs(np.asarray(a[1]) - np.asarray(b[1])) / np.abs(np.asarray(a[1])).max()))
                     for a, b in zip(ans_flat, ans2))
        say(f"   two-stage: text query p50 {p50:.1f} ms, p90 {np.percentile(lat, 90):.1f} ms over {n_lat} queries "
            f"(k=10; target <= 25 ms at 20,000 examples; index here {serve_n:,}) = {p50 / p50_flat:.2f}x the flat p50; "
            f"server stages (median ms): {stage_str(st2)}")
        say(f"   two-stage vs flat on the {len(queries)} query texts: recall@10 (ties counted) {same_ids:.2f}, "
            f"top-10 scores max relative difference {dscore:.1e}")
    shutil.rmtree(tmp, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out = OUT if not (quick or args.serve_only) else OUT.with_name("bench_text_quick.txt")
    out.write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
