"""Per-example gradients on transformers: the engine against a per-example loop and one batched backward.

Prints, in one run, one thread, for a BERT-like encoder (Hugging Face BertForSequenceClassification,
4 layers, hidden 256, 4 heads, T = 128) and a GPT-2-like decoder (GPT2LMHeadModel, 4 layers, hidden
256, T = 128, tied embeddings, causal-LM loss), batch 32, random init, float32:
- examples/s of the engine (gradients kept per layer, and flattened into rows), of a plain
  per-example autograd loop, and of one batched backward of the summed loss (the ceiling: it gives
  no per-example gradients); the rule each parameter used;
- GradientSimilarity at T = 32 (BERT-like): bytes of the compact store vs the full per-example
  gradients, its scores vs scores from the full gradients, and fit's peak memory (fresh subprocess)
  as a multiple of what it stores.

Targets: engine ≥ 0.6x the batched backward (both models); fit peak memory ≤ 1.2x its store;
compact store at T = 32 ≥ 5x smaller than full gradients with scores equal to the full-gradient
ones (≤ 1e-5 relative to the largest score). ``--quick``: fewer repeats and examples.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _util import engine_rates, median_time, pin_threads, row  # noqa: E402

pin_threads(1)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from indexer.compat import ensure_torchvision_importable  # noqa: E402
from indexer.engine import make_engine  # noqa: E402
from indexer.engine.losses import causal_lm_loss, sequence_classification_loss  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, PAD = 1000, 256, 4, 4, 0


def _transformers():
    """Import transformers (torchvision kept importable beside the CPU-only torch)."""
    ensure_torchvision_importable()
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


class Wrap(nn.Module):
    """Token ids in, logits out; the attention mask hides padding (id 0)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        return self.hf(input_ids=ids, attention_mask=(ids != PAD).long()).logits


def bert_like(T: int) -> nn.Module:
    tr = _transformers()
    torch.manual_seed(0)
    cfg = tr.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=4 * HIDDEN, max_position_embeddings=max(T, 128), num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Wrap(tr.BertForSequenceClassification(cfg)).eval()


def gpt2_like(T: int) -> nn.Module:
    tr = _transformers()
    torch.manual_seed(1)
    cfg = tr.GPT2Config(vocab_size=VOCAB, n_positions=max(T, 128), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD)
    return Wrap(tr.GPT2LMHeadModel(cfg)).eval()


def token_data(n: int, T: int, seed: int = 0) -> np.ndarray:
    """Random token ids; a quarter of the sequences right-padded to 3/4 of T."""
    rng = np.random.default_rng(seed)
    X = rng.integers(1, VOCAB, size=(n, T))
    X[: n // 4, 3 * T // 4:] = PAD
    return X


def rates(model: nn.Module, loss, X: np.ndarray, Y: np.ndarray, repeat: int, loop_n: int) -> dict[str, float]:
    """Examples/s: engine per layer and flat, per-example loop, one batched backward (the ceiling)."""
    n = len(X)
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.as_tensor(X), torch.as_tensor(Y)
    eng = make_engine(model, loss, chunk_size=n)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        eng.grads(X[:4], Y[:4])  # the checks run once, on the first chunk
    generic = [str(w.message) for w in rec if "generic path" in str(w.message)]

    def batched():
        torch.autograd.grad(loss(model(x), y).sum(), params)

    buf = np.empty((loop_n, eng.dim), dtype=np.float32)

    def loop():
        for i in range(loop_n):
            gs = torch.autograd.grad(loss(model(x[i:i + 1]), y[i:i + 1]).sum(), params)
            torch.cat([g.reshape(-1) for g in gs], out=torch.from_numpy(buf[i]))

    counts: dict[str, int] = {}
    for r in eng.rules.values():
        counts[r] = counts.get(r, 0) + 1
    return {"batched backward (ceiling)": n / median_time(batched, repeat),
            **engine_rates(eng, X, Y, repeat),
            "per-example loop": loop_n / median_time(loop, repeat),
            "_rules": counts, "_generic": generic, "_dim": eng.dim}


def memory_child(n: int, T: int) -> None:
    """In a fresh process: fit GradientSimilarity (precompute) and print peak RSS growth and stored bytes."""
    from _util import PeakRSS

    from explainers.similarity import GradientSimilarity

    model = bert_like(T)
    X, Y = token_data(n, T, seed=5), np.random.default_rng(5).integers(0, 2, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gs = GradientSimilarity(model, sequence_classification_loss(), backend="pytorch", precompute_grads=True)
        gs.fit(X[:8], Y[:8])  # warm-up: allocator pools and lazy imports are not the store's cost
        gs = GradientSimilarity(model, sequence_classification_loss(), backend="pytorch", precompute_grads=True)
        with PeakRSS() as p:
            gs.fit(X, Y)
    print(json.dumps({"peak": p.peak, "stored": gs.grad_bytes}))


def compact_store(n: int, T: int, nq: int) -> dict[str, float]:
    """Compact store at T: its bytes vs full gradients; its scores vs full-gradient scores."""
    from explainers.similarity import GradientSimilarity

    model = bert_like(T)
    X, Y = token_data(n, T, seed=5), np.random.default_rng(5).integers(0, 2, n)
    Xq, Yq = token_data(nq, T, seed=6), np.random.default_rng(6).integers(0, 2, nq)
    gs = GradientSimilarity(model, sequence_classification_loss(), backend="pytorch", precompute_grads=True,
                            sim_fn="grad_dot").fit(X, Y)
    e = gs.explain(Xq, Yq)
    got = np.take_along_axis(e.data["scores"], np.argsort(e.data["ordered_indices"], axis=1), axis=1)
    eng = gs.engine
    Gq = eng.grads(Xq, Yq)
    ref = np.zeros((nq, n))
    for s, rows in eng.iter_grads(X, Y, chunk_size=8, reuse_buffer=True):  # full gradients, streamed
        ref[:, s:s + len(rows)] = Gq.astype(np.float64) @ rows.astype(np.float64).T
    return {"store": gs.grad_bytes, "full": n * eng.dim * 4, "err": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "kinds": {k: gs._store.layout.kinds.count(k) for k in set(gs._store.layout.kinds)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one timed repeat, fewer loop examples")
    ap.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    repeat, loop_n = (1, 8) if args.quick else (3, 32)
    B, T = 32, 128
    print(f"Per-example gradients, one thread, batch {B}, T = {T}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, "
          f"vocab {VOCAB}, float32 ({'quick' if args.quick else 'full'} run, median of {repeat})")
    X = token_data(B, T)
    cases = {
        "BERT-like encoder (sequence classification)": (bert_like(T), sequence_classification_loss(),
                                                        np.random.default_rng(1).integers(0, 2, B)),
        "GPT-2-like decoder (causal LM, tied embeddings)": (gpt2_like(T), causal_lm_loss("mean"),
                                                            np.where(X == PAD, -100, X)),
    }
    summary = {}
    for name, (model, loss, Y) in cases.items():
        r = rates(model, loss, X, Y, repeat, loop_n)
        ceil, lp = r["batched backward (ceiling)"], r["per-example loop"]
        print(f"\n{name}: {r['_dim']:,} parameters; rules {r['_rules']}; generic path: "
              f"{'none' if not r['_generic'] else r['_generic']}")
        for k in ("batched backward (ceiling)", "per-example loop"):
            print(row(k, r[k], "ex/s"))
        for k in ("engine, per layer", "engine, flat rows"):
            print(row(k, r[k], "ex/s", ceil, "batched backward"))
            print(row("", r[k], "ex/s", lp, "per-example loop"))
        summary[name] = r[ "engine, per layer"] / ceil
    n_mem = 64 if args.quick else 128
    Tm = 32
    n_cmp = 32 if args.quick else 64
    print(f"\nGradientSimilarity, BERT-like at T = {Tm}: store and scores over {n_cmp} training examples, "
          f"fit memory over {n_mem}")
    c = compact_store(n_cmp, Tm, 4)
    print(f"  compact store {c['store'] / 2**20:.1f} MiB vs full gradients {c['full'] / 2**20:.1f} MiB: "
          f"{c['full'] / c['store']:.2f}x smaller (target >= 5x); blocks stored as {c['kinds']}")
    print(f"  scores vs full-gradient scores: max error {c['err']:.2e} of the largest score (target <= 1e-5)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(n_mem), str(Tm)], capture_output=True,
                         text=True, env=env, timeout=900)
    m = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    print(f"  fit peak memory {m['peak'] / 2**20:.1f} MiB for a store of {m['stored'] / 2**20:.1f} MiB: "
          f"{m['peak'] / m['stored']:.2f}x (target <= 1.2x)")
    print("\nEngine per layer vs batched backward (target >= 0.6x): " +
          ", ".join(f"{k.split(' (')[0]} {v:.2f}x" for k, v in summary.items()))


if __name__ == "__main__":
    main()
