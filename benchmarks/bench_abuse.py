"""Abuse benchmark: the worst request of each kind against a real ``gradindex serve`` process.

For each kind of hostile or careless request (reply too large, anchors knobs at and over the
memory budget, client-chosen files, label filter of 10^6 labels, a 1 MB index name, ReloadIndex
under many new names, unauthenticated calls with random method names), it prints the status the
server answered with, how long it took, and the server's RSS before, at peak during and after
(target: peak growth <= the configured ``request_memory_mb``). Then FindSimilar p50 latency idle
and while ExplainAnchors calls with a 0.5 s deadline are being sent and cancelled back to back
(target: within 2x of the idle p50).

    python benchmarks/bench_abuse.py [--quick]

The server runs in its own process with one thread per framework (OMP_NUM_THREADS=1); figures
are medians over repeats where repeated. Output is saved under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import random
import string
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from _util import start_serve  # noqa: E402

TOKEN, ADMIN = "bench-token", "bench-admin"
BUDGET_MB = 256.0


def start_server(workdir: Path, name: str) -> tuple[subprocess.Popen, int, int]:
    cfg = workdir / "abuse.toml"
    cfg.write_text(f'workdir = "{workdir}"\nindexes = ["{name}"]\nport = 0\nmetrics_port = 0\ntoken = "{TOKEN}"\n'
                   f'admin_token = "{ADMIN}"\nrequest_memory_mb = {BUDGET_MB}\nmax_served = 4\nlog_level = "ERROR"\n'
                   'explain_concurrency = 1\n')
    return start_serve(cfg, ROOT)


class Peak:
    """Peak RSS of another process, sampled every 10 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.p = psutil.Process(pid)

    def __enter__(self) -> "Peak":
        self.before = self.peak = self.p.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.p.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.after = self.p.memory_info().rss
        self.peak = max(self.peak, self.after)


def attack(pid: int, label: str, fn) -> dict:
    import grpc

    with Peak(pid) as pk:
        t = time.perf_counter()
        try:
            fn()
            code, msg = "OK", ""
        except grpc.RpcError as e:
            code, msg = e.code().name, (e.details() or "")[:90]
        dt = time.perf_counter() - t
    grow = (pk.peak - pk.before) / 2**20
    verdict = "ok" if grow <= BUDGET_MB else "MISS"
    print(f"  {label:<44s} {code:<19s} {dt * 1e3:9.1f} ms  RSS {pk.before / 2**20:7.1f} -> peak "
          f"{pk.peak / 2**20:7.1f} -> {pk.after / 2**20:7.1f} MiB  growth {grow:7.1f} MiB "
          f"({grow / BUDGET_MB:.3f}x budget {BUDGET_MB:g} MiB: {verdict})", flush=True)
    if msg:
        print(f"      {msg}", flush=True)
    return {"label": label, "code": code, "growth_mb": grow}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small index, fewer repeats")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import grpc
    import torch
    from google.protobuf import struct_pb2

    from indexer.demo import load_digits_28
    from server.demo import ensure_digits_index
    from server.protos import service_pb2 as pb
    from server.protos import service_pb2_grpc as pb_grpc
    from server.tensors import to_tensor

    torch.set_num_threads(1)
    n = 300 if args.quick else 1200
    wd = Path(args.workdir or ROOT / "runs" / f"bench_abuse_{n}")
    name = ensure_digits_index(wd, n=n, progress=True)
    X = load_digits_28()[0][-256:].astype(np.float32)
    proc, port, mport = start_server(wd, name)
    md = (("authorization", f"Bearer {TOKEN}"),)
    admin = (("authorization", f"Bearer {ADMIN}"),)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        stub = pb_grpc.GradIndexStub(ch)
        info = stub.DescribeIndex(pb.DescribeIndexRequest(name=name), metadata=md, timeout=30)
        k = min(1000, info.count)
        stub.FindSimilar(pb.FindSimilarRequest(index=name, inputs=to_tensor(X[:4]), k=5), metadata=md, timeout=60)
        print(f"bench_abuse: index {name!r} ({info.count} examples), server pid {proc.pid}, "
              f"request_memory_mb={BUDGET_MB:g}, max_message_mb=16", flush=True)
        print("worst request of each kind: status, time, server RSS before -> peak -> after", flush=True)

        def params(**kw) -> struct_pb2.Struct:
            s = struct_pb2.Struct()
            s.update(kw)
            return s

        img = np.moveaxis(X[0], 0, -1)
        results = []
        results.append(attack(proc.pid, f"FindSimilar 256 q x k={k} x both x data", lambda: stub.FindSimilar(
            pb.FindSimilarRequest(index=name, inputs=to_tensor(X), k=k, direction=pb.BOTH, include_data=True),
            metadata=md, timeout=120)))
        results.append(attack(proc.pid, f"SearchByGradient 256 q x k={k} x both x data",
                              lambda: stub.SearchByGradient(pb.SearchByGradientRequest(
                                  index=name, gradients=to_tensor(np.ones((256, info.dim), np.float32)), k=k,
                                  direction=pb.BOTH, include_data=True, projected=True), metadata=md, timeout=120)))
        results.append(attack(proc.pid, "FindSimilar filter of 10^6 labels", lambda: stub.FindSimilar(
            pb.FindSimilarRequest(index=name, inputs=to_tensor(X[:1]), k=5,
                                  filter=pb.Filter(labels=list(range(10**6)))), metadata=md, timeout=120)))
        results.append(attack(proc.pid, "FindSimilar 1 MB index name", lambda: stub.FindSimilar(
            pb.FindSimilarRequest(index="x" * 10**6, inputs=to_tensor(X[:1]), k=5), metadata=md, timeout=60)))
        results.append(attack(proc.pid, "ExplainAnchors image batch_size=100000", lambda: stub.ExplainAnchors(
            pb.ExplainAnchorsRequest(model=info.model, image=to_tensor(img), params=params(batch_size=100000)),
            metadata=md, timeout=120)))
        cap = int(BUDGET_MB * 2**20 // (4 * 4 * img.size))
        results.append(attack(proc.pid, f"ExplainAnchors image batch_size={cap} (the cap)",
                              lambda: stub.ExplainAnchors(pb.ExplainAnchorsRequest(
                                  model=info.model, image=to_tensor(img),
                                  params=params(batch_size=cap, coverage_samples=cap, seed=0)),
                                  metadata=md, timeout=20 if args.quick else 60)))
        results.append(attack(proc.pid, "ExplainAnchors text nlp='pytest'", lambda: stub.ExplainAnchors(
            pb.ExplainAnchorsRequest(model=info.model, text="a b c", params=params(nlp="pytest")),
            metadata=md, timeout=30)))

        def reload_spam() -> None:
            codes = []
            for i in range(20):
                try:
                    stub.ReloadIndex(pb.ReloadIndexRequest(index=f"alias{i}", from_index=name), metadata=admin,
                                     timeout=120)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
            print(f"      ReloadIndex x20: {codes.count('OK')} OK, {len(codes) - codes.count('OK')} refused "
                  f"({sorted(set(codes) - {'OK'})})", flush=True)

        results.append(attack(proc.pid, "ReloadIndex 20 new names (admin token)", reload_spam))
        m0 = len(urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read())
        n_spam = 500 if args.quick else 5000

        def spam() -> None:
            rng = random.Random(0)
            for _ in range(n_spam):
                call = ch.unary_unary("/gradindex.v1.GradIndex/" + "".join(rng.choices(string.ascii_letters, k=24)))
                try:
                    call(b"", timeout=10)
                except grpc.RpcError:
                    pass

        results.append(attack(proc.pid, f"{n_spam} unauthenticated random method names", spam))
        m1 = len(urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read())
        print(f"      /metrics {m0 / 1024:.1f} KB -> {m1 / 1024:.1f} KB ({m1 / m0:.2f}x before)", flush=True)

        # ---- FindSimilar latency idle vs while explanations are cancelled at 0.5 s --------------
        reps = 3 if args.quick else 5
        calls = 60 if args.quick else 200

        def p50() -> float:
            lat = []
            for i in range(calls):
                t = time.perf_counter()
                stub.FindSimilar(pb.FindSimilarRequest(index=name, inputs=to_tensor(X[i % 64][None]), k=5),
                                 metadata=md, timeout=30)
                lat.append(time.perf_counter() - t)
            return float(np.median(lat)) * 1e3

        slow = pb.ExplainAnchorsRequest(model=info.model, image=to_tensor(img), params=params(
            batch_size=400, threshold=0.99999, delta=0.001, tau=0.001, beam_size=4, coverage_samples=400,
            segmentation_kwargs={"n_segments": 100, "compactness": 1}, p_sample=0.9, seed=0))
        idle, busy, codes = [], [], []
        for _ in range(reps):
            idle.append(p50())
            stop = threading.Event()

            def explainer() -> None:
                while not stop.is_set():
                    try:
                        stub.ExplainAnchors(slow, metadata=md, timeout=0.5)
                        codes.append("OK")
                    except grpc.RpcError as e:
                        codes.append(e.code().name)

            t = threading.Thread(target=explainer)
            t.start()
            time.sleep(0.3)
            busy.append(p50())
            stop.set()
            t.join()
        i50, b50 = float(np.median(idle)), float(np.median(busy))
        print(f"FindSimilar p50 (1 query, k=5; median of {reps} x {calls} calls):", flush=True)
        print(f"  idle                                         {i50:9.2f} ms", flush=True)
        print(f"  while ExplainAnchors (0.5 s deadline) cancel {b50:9.2f} ms   ({b50 / i50:.2f}x idle; target "
              f"<= 2x: {'met' if b50 <= 2 * i50 else 'MISS'})", flush=True)
        print(f"  ExplainAnchors calls meanwhile: {len(codes)}, codes {sorted(set(codes))}", flush=True)
        worst = max(r["growth_mb"] for r in results)
        print(f"largest RSS growth of one request: {worst:.1f} MiB ({worst / BUDGET_MB:.3f}x the "
              f"{BUDGET_MB:g} MiB budget; target <= 1x: {'met' if worst <= BUDGET_MB else 'MISS'})", flush=True)
        ch.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
