"""Gradient engine and GradientSimilarity on the seed notebook's MNIST CNN (digits upsampled to 28x28).

Prints, in one run, one thread:
- per-example gradient throughput (examples/s): the engine (kept per layer, and flattened into
  rows), a plain per-example autograd loop, and one ordinary batched backward (the ceiling, which
  yields no per-example gradients); PyTorch and TensorFlow;
- GradientSimilarity fit and explain (1, 10, 100 queries over 1,000 precomputed training examples)
  against alibi's approach (one backward per example, an in-memory matrix of full gradients, then
  its kernel), and alibi 0.9.6 itself when a separate environment with it is given (--alibi-python);
- peak memory of fit as a multiple of what it stores (measured in fresh subprocesses).

Targets: engine >= 2.5x the loop and >= 0.6x the ceiling (PyTorch, one thread);
explain of one query over 1,000 precomputed <= 10 ms and >= 7x alibi's approach; fit peak memory
<= 1.2x its store (alibi: ~2.2x its full matrix).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import engine_rates, median_time, pin_threads, pin_tf_threads, row  # noqa: E402

pin_threads(1)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from explainers.similarity import GradientSimilarity  # noqa: E402
from indexer.demo import digits_cnn_torch, load_digits_28, train_digits_cnn  # noqa: E402
from indexer.engine import make_engine  # noqa: E402
from indexer.kernels import scores as kernel_scores  # noqa: E402


def torch_throughput(model: nn.Module, X: np.ndarray, y: np.ndarray, repeat: int) -> dict[str, float]:
    loss = nn.CrossEntropyLoss()
    eng = make_engine(model, loss, chunk_size=128)
    n = len(X)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def loop():
        for i in range(min(n, 256)):
            model.zero_grad()
            loss(model(Xt[i:i + 1]), yt[i:i + 1]).backward()
            torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    def ceiling():
        for s in range(0, n, 128):
            model.zero_grad()
            loss(model(Xt[s:s + 128]), yt[s:s + 128]).backward()

    return {
        **engine_rates(eng, X, y, repeat),
        "per-example loop": min(n, 256) / median_time(loop, repeat),
        "batched backward (ceiling)": n / median_time(ceiling, repeat),
    }


def tf_throughput(X: np.ndarray, y: np.ndarray, repeat: int) -> dict[str, float]:
    pin_tf_threads(1)
    import tensorflow as tf

    from indexer.demo import digits_cnn_keras

    Xh = np.ascontiguousarray(X.transpose(0, 2, 3, 1))
    m = digits_cnn_keras()
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    eng = make_engine(m, loss, chunk_size=128)
    n = len(Xh)

    @tf.function(reduce_retracing=True)
    def summed_grad(x, t):  # one trace for batches of 1 (the loop), one for 128 (the ceiling)
        with tf.GradientTape() as tape:
            lv = loss(t, m(x, training=False))
        return tape.gradient(lv, m.trainable_weights)

    def loop():
        for i in range(min(n, 256)):
            summed_grad(Xh[i:i + 1], y[i:i + 1])

    def ceiling():
        for s in range(0, n, 128):
            summed_grad(Xh[s:s + 128], y[s:s + 128])

    return {
        **engine_rates(eng, Xh, y, repeat),
        "per-example loop (tf.function)": min(n, 256) / median_time(loop, repeat),
        "batched backward (ceiling)": n / median_time(ceiling, repeat),
    }


class AlibiApproach:
    """alibi 0.9.6's algorithm, in this process: one backward per example, a full in-memory matrix."""

    def __init__(self, model: nn.Module, kernel: str) -> None:
        self.model, self.kernel, self.loss = model, kernel, nn.CrossEntropyLoss()

    def _grad(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.model.zero_grad()
        self.loss(self.model(torch.as_tensor(x[None])), torch.as_tensor(y[None])).backward()
        return np.concatenate([p.grad.detach().numpy().reshape(-1) for p in self.model.parameters()])

    def fit(self, X: np.ndarray, Y: np.ndarray) -> "AlibiApproach":
        self.G = np.array([self._grad(x, t) for x, t in zip(X, Y)])
        return self

    def explain(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        Q = np.array([self._grad(x, t) for x, t in zip(X, Y)])
        s = kernel_scores(Q, self.G, self.kernel)
        return np.argsort(s, axis=1)[:, ::-1]


def fit_memory(kind: str, n_train: int) -> dict[str, float]:
    """Run one fit in a fresh subprocess; return its peak RSS growth and the bytes it stores."""
    code = f"""
import json, sys, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from _util import pin_threads, PeakRSS
pin_threads(1)
import torch
from torch import nn
from indexer.demo import digits_cnn_torch, load_digits_28
from explainers.similarity import GradientSimilarity
from bench_gradients import AlibiApproach
torch.manual_seed(0)
X, y = load_digits_28({n_train})
m = digits_cnn_torch().eval()
if {kind!r} == "gradindex":
    make = lambda: GradientSimilarity(m, nn.CrossEntropyLoss(), sim_fn="grad_cos", precompute_grads=True,
                                      backend="pytorch")
    make().fit(X[:64], y[:64])  # warm-up: code paths and allocator pools
    with PeakRSS() as p:
        gs = make().fit(X, y)
    stored = gs.grad_bytes
else:
    AlibiApproach(m, "grad_cos").fit(X[:4], y[:4])
    with PeakRSS() as p:
        a = AlibiApproach(m, "grad_cos").fit(X, y)
    stored = a.G.nbytes
print(json.dumps({{"peak_growth": p.peak, "stored": stored}}))
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(Path(__file__).resolve().parent))
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def alibi_itself(python: str, n_train: int, n_query: int, kernel: str) -> float | None:
    """Median seconds of alibi 0.9.6's explain of one query over n_train precomputed examples."""
    code = f"""
import sys, time, statistics, json, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from torch import nn
from indexer.demo import digits_cnn_torch, load_digits_28
from alibi.explainers import GradientSimilarity
torch.manual_seed(0)
X, y = load_digits_28({n_train + n_query})
m = digits_cnn_torch().eval()
gs = GradientSimilarity(m, nn.CrossEntropyLoss(), sim_fn={kernel!r}, precompute_grads=True, backend="pytorch")
gs.fit(X[:{n_train}], y[:{n_train}])
ts = []
for i in range(4):
    t = time.perf_counter(); gs.explain(X[{n_train}:{n_train}+{n_query}], y[{n_train}:{n_train}+{n_query}]); ts.append(time.perf_counter() - t)
print(json.dumps(statistics.median(ts[1:])))
"""
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=900)
        return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except Exception:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds, for a smoke test")
    ap.add_argument("--alibi-python", default="/tmp/alibi-venv/bin/python",
                    help="python of a separate environment with alibi 0.9.6 (skipped if absent)")
    args = ap.parse_args()
    quick = args.quick
    n_grad, n_train, repeat = (64, 64, 1) if quick else (1024, 1000, 3)
    X, y = load_digits_28(max(n_grad, n_train) + 100)
    model = train_digits_cnn(X[:1500], y[:1500], epochs=1) if not quick else digits_cnn_torch().eval()
    print(f"digits CNN, {sum(p.numel() for p in model.parameters()):,} parameters, one thread, median of {repeat}")

    print("\nPer-example gradient throughput, PyTorch (examples/s)")
    tp = torch_throughput(model, X[:n_grad], y[:n_grad], repeat)
    ceil, loop = tp["batched backward (ceiling)"], tp["per-example loop"]
    for k, v in tp.items():
        print(row(k, v, "ex/s", ceil, "ceiling"), f"  ({v / loop:.2f}x loop)")
    print(f"  TARGET engine >= 2.5x loop: {tp['engine, per layer'] / loop:.2f}x "
          f"({'met' if tp['engine, per layer'] / loop >= 2.5 else 'MISSED'}); "
          f">= 0.6x ceiling: {tp['engine, per layer'] / ceil:.2f}x "
          f"({'met' if tp['engine, per layer'] / ceil >= 0.6 else 'MISSED'})")

    print("\nPer-example gradient throughput, TensorFlow (examples/s)")
    tt = tf_throughput(X[:n_grad], y[:n_grad], repeat)
    for k, v in tt.items():
        print(row(k, v, "ex/s", tt["batched backward (ceiling)"], "ceiling"),
              f"  ({v / tt['per-example loop (tf.function)']:.2f}x loop)")

    print(f"\nGradientSimilarity over {n_train} precomputed training examples (ms)")
    Xt, yt, Xq, yq = X[:n_train], y[:n_train], X[n_train:n_train + 100], y[n_train:n_train + 100]
    for kernel in ("grad_dot", "grad_cos"):
        gs = GradientSimilarity(model, nn.CrossEntropyLoss(), sim_fn=kernel, precompute_grads=True, backend="pytorch")
        t = time.perf_counter()
        gs.fit(Xt, yt)
        fit_s = time.perf_counter() - t
        ref = AlibiApproach(model, kernel)
        t = time.perf_counter()
        ref.fit(Xt, yt)
        ref_fit_s = time.perf_counter() - t
        print(f" {kernel}: store {gs.grad_bytes / 1e6:.1f} MB vs full matrix {ref.G.nbytes / 1e6:.1f} MB")
        print(row("fit, gradindex", fit_s * 1e3, "ms", ref_fit_s * 1e3, "alibi's approach"))
        print(row("fit, alibi's approach", ref_fit_s * 1e3, "ms"))
        for nq in (1, 10, 100):
            ours = median_time(lambda: gs.explain(Xq[:nq], yq[:nq]), max(repeat, 3) if nq < 100 else repeat)
            theirs = median_time(lambda: ref.explain(Xq[:nq], yq[:nq]), repeat if nq < 100 else 1)
            print(row(f"explain {nq:>3d} queries, gradindex", ours * 1e3, "ms", theirs * 1e3, "alibi's approach"),
                  f"  -> {theirs / ours:.1f}x faster")
            print(row(f"explain {nq:>3d} queries, alibi's approach", theirs * 1e3, "ms"))
            if nq == 1:
                print(f"  TARGET explain(1) <= 10 ms: {ours * 1e3:.2f} ms ({'met' if ours <= 0.010 else 'MISSED'}); "
                      f">= 7x alibi's approach: {theirs / ours:.1f}x ({'met' if theirs / ours >= 7 else 'MISSED'})")
                if not quick and os.path.exists(args.alibi_python):
                    a = alibi_itself(args.alibi_python, n_train, 1, kernel)
                    if a is not None:
                        print(row("explain   1 query, alibi 0.9.6 itself", a * 1e3, "ms"),
                              f"  -> {a / ours:.1f}x faster")
        ref = None  # free the full matrix before the next kernel's fit

    print(f"\nPeak memory of fit over {n_train} examples (fresh subprocesses, median of 3 for gradindex)")
    runs = [fit_memory("gradindex", n_train) for _ in range(3)]  # RSS sampling is noisy: median of 3
    ours = sorted(runs, key=lambda r: r["peak_growth"])[1]
    theirs = fit_memory("alibi", n_train)
    r_ours = ours["peak_growth"] / ours["stored"]
    r_theirs = theirs["peak_growth"] / theirs["stored"]
    print(f"  gradindex: peak growth {ours['peak_growth'] / 1e6:.1f} MB for {ours['stored'] / 1e6:.1f} MB stored "
          f"= {r_ours:.2f}x  (TARGET <= 1.2x: {'met' if r_ours <= 1.2 else 'MISSED'})")
    print(f"  alibi's approach: peak growth {theirs['peak_growth'] / 1e6:.1f} MB for {theirs['stored'] / 1e6:.1f} MB "
          f"stored = {r_theirs:.2f}x;  gradindex peak is {theirs['peak_growth'] / max(ours['peak_growth'], 1):.0f}x smaller")


if __name__ == "__main__":
    main()
