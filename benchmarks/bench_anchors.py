"""Benchmark: our Anchors explainers vs alibi 0.9.6 on the same models and data.

Tasks (all with alibi's default knobs: threshold 0.95, delta 0.1, tau 0.15, batch_size 100,
coverage_samples 10000, beam_size 1):

* ``breast_cancer`` and ``wine``: a fixed RandomForest (50 trees, random_state 0), AnchorTabular,
  ``disc_perc=(25, 50, 75)``, test rows explained;
* ``digits``: the 28x28 digits CNN of ``indexer/demo.py`` (``train_digits_cnn(..., epochs=10)`` on
  the seeded augmented copies), AnchorImage with a 4x4 grid of 7x7 superpixels and ONE black
  background image (``images_background = zeros``, the same for both sides): a perturbed cell is
  blanked. Replacing a cell by its own mean (alibi's default "fudged" image) leaves this CNN's
  prediction unchanged for most digits, so both sides returned the empty anchor after two calls;
  with blanking the prediction depends on the cells. Explained digits: the first held-out digits
  (index >= 1500) that the CNN classifies correctly and whose prediction survives a random half of
  the cells blanked 20-90% of the time (so the empty anchor is not valid but an anchor exists);
* ``text``: a bag-of-words logistic regression on a small generated sentiment corpus, AnchorText
  with ``sampling_strategy='unknown'`` and a blank English spaCy tokenizer.

For each: median time per explanation, predictor calls, predictor rows (samples labelled), each
side's own precision and coverage estimates, and the same figures RE-MEASURED by one common
procedure for both sides' anchors (below), mean anchor length, and the ratio alibi/ours. Both
sides run in separate processes with one thread (OMP/MKL/torch), one after the other, on the same
pickled models and saved data.

Common re-measurement (in this script, independent of both implementations; same model, same
sampler, fresh seeded samples, ``--verify-samples`` per anchor):

* tabular: the anchor's names (``a < f <= b``, ``f <= b``, ``f > a``; alibi and ours print the same
  form) are parsed into value intervals, each border snapped to the nearest training quantile of
  that column (the names are rounded to 2 decimals). Fresh rows: random training rows whose
  anchored columns are replaced jointly by those of a random training row satisfying all the
  anchor's intervals (per column when no training row satisfies all). Precision: the fraction
  predicted as the instance; coverage: the exact fraction of training rows satisfying the anchor.
* image: every cell outside the anchor blanked with probability 0.5 (the same background), the
  anchor's cells kept; coverage 0.5 ** len(anchor) (the probability that a random perturbation
  keeps the anchor).
* text: every word outside the anchor replaced by ``UNK`` with probability 0.5; coverage
  0.5 ** len(anchor).

Target per task: ours >= 3x faster (median time) with common precision and common coverage equal
or better than alibi's (tolerances 0.01 and 0.02: sampling noise of the re-measurement).

alibi must live in its own virtual environment (it pins numpy < 2): pass its python with
``--alibi-python`` (default ``/tmp/alibi-venv/bin/python``; create it with ``python3 -m venv
/tmp/alibi-venv && /tmp/alibi-venv/bin/pip install alibi==0.9.6 scikit-learn click torch==2.13.0``).
Without it, the script runs our side only and prints the reference alibi figures committed in
``benchmarks/results/anchors_alibi_reference.json`` (made by this script; no re-measurement).

``--lucb-arms`` sets our ``lucb_arms`` (default ``auto``: all blocking arms for tabular, 2 for text and
images; ``all`` = None, or an integer) to compare the choices.

``--quick``: 2 instances per task, coverage_samples 1000, a 1-epoch CNN: a smoke run in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "benchmarks" / "results" / "anchors_alibi_reference.json"
TASKS = ("breast_cancer", "wine", "digits", "text")

POS = ["good", "great", "excellent", "wonderful", "fine", "nice", "superb", "brilliant"]
NEG = ["bad", "awful", "terrible", "poor", "boring", "dull", "weak", "horrible"]
FILL = ["the", "movie", "film", "plot", "actor", "story", "was", "is", "really", "quite", "a", "very", "and",
        "this", "that", "cast", "ending", "script", "it", "overall"]


def make_corpus(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Sentences of filler words with sentiment words, some negated by 'not'."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        words = list(rng.choice(FILL, size=rng.integers(5, 10)))
        positive = rng.random() < 0.5
        word = str(rng.choice(POS if positive else NEG))
        negated = rng.random() < 0.3
        ins = ["not", word] if negated else [word]
        at = int(rng.integers(0, len(words) + 1))
        words[at:at] = ins
        texts.append(" ".join(words))
        labels.append(int(positive != negated))
    return texts, np.array(labels)


def grid_segments(image: np.ndarray) -> np.ndarray:
    """4x4 grid of 7x7 superpixels for a 28x28 image."""
    r, c = np.indices(image.shape[:2])
    return (r // 7) * 4 + c // 7


# ----------------------------------------------------------------------------------------------------
# preparation (project venv)
# ----------------------------------------------------------------------------------------------------
def prepare(work: Path, n_inst: int, quick: bool) -> None:
    import joblib
    import torch
    from sklearn.datasets import load_breast_cancer, load_wine
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline

    sys.path.insert(0, str(REPO))
    from indexer.demo import load_digits_28, train_digits_cnn

    torch.set_num_threads(1)
    for name, loader in (("breast_cancer", load_breast_cancer), ("wine", load_wine)):
        d = loader()
        Xtr, Xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.2, random_state=0, stratify=d.target)
        rf = RandomForestClassifier(n_estimators=50, random_state=0, n_jobs=1).fit(Xtr, ytr)
        joblib.dump(rf, work / f"{name}.joblib")
        np.savez(work / f"{name}.npz", X_train=Xtr, X_explain=Xte[:n_inst],
                 feature_names=np.array(d.feature_names))
    texts, labels = make_corpus(600, seed=0)
    clf = make_pipeline(CountVectorizer(token_pattern=r"[^ ]+"), LogisticRegression(C=10, max_iter=2000))
    clf.fit(texts, labels)
    joblib.dump(clf, work / "text.joblib")
    explain_texts, _ = make_corpus(n_inst, seed=1)
    (work / "text.json").write_text(json.dumps(explain_texts))
    X, y = load_digits_28()
    Xa, ya = load_digits_28(n=6000, seed=0)  # seeded shifted/noisy copies beyond the 1,797 originals
    model = train_digits_cnn(Xa[1797:], ya[1797:], epochs=1 if quick else 10, seed=0)
    torch.save(model.state_dict(), work / "digits_cnn.pt")
    np.save(work / "digits_background.npy", np.zeros((1, 28, 28, 1), dtype=np.float32))
    predict = load_predictor(work, "digits")
    held = X[1500:].transpose(0, 2, 3, 1)
    seg = grid_segments(held[0])
    rng = np.random.default_rng(0)
    chosen = []
    for i, img in enumerate(held):
        label = predict(img[None])[0]
        if label != y[1500 + i]:
            continue
        keep = rng.random((200, 16)) >= 0.5
        blanked = np.where(keep[:, seg][..., None], img[None], np.float32(0.0)).astype(np.float32)
        if 0.2 <= float((predict(blanked) == label).mean()) <= 0.9:
            chosen.append(i)
        if len(chosen) == n_inst:
            break
    np.savez(work / "digits.npz", X_explain=held[chosen], index=1500 + np.array(chosen))


# ----------------------------------------------------------------------------------------------------
# worker (runs in either venv)
# ----------------------------------------------------------------------------------------------------
class Counted:
    """Wrap a predictor to count calls and rows."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, x):
        self.calls += 1
        self.rows += len(x)
        return self.fn(x)


def load_predictor(work: Path, task: str):
    import joblib

    if task in ("breast_cancer", "wine", "text"):
        model = joblib.load(work / f"{task}.joblib")
        if task == "text":
            return lambda texts: model.predict(list(texts))
        return model.predict
    import torch

    sys.path.insert(0, str(REPO))
    from indexer.demo import digits_cnn_torch

    torch.set_num_threads(1)
    net = digits_cnn_torch()
    net.load_state_dict(torch.load(work / "digits_cnn.pt", weights_only=True))
    net.eval()

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(np.ascontiguousarray(np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2)))
            return net(x).argmax(1).numpy()

    return predict


def make_explainer(side: str, task: str, work: Path, pred, rep: int, cov: int, ours_opts: dict):
    """The side's inputs for ``task`` and its explain call ``(x, seed) -> Explanation``, on an explainer
    made with constructor seed ``rep`` (alibi seeds its global generator there)."""
    if side == "alibi":
        from alibi.explainers import AnchorImage, AnchorTabular, AnchorText
    else:
        sys.path.insert(0, str(REPO))
        from explainers.anchors import AnchorImage, AnchorTabular, AnchorText
    if task in ("breast_cancer", "wine"):
        d = np.load(work / f"{task}.npz")
        names = [str(n) for n in d["feature_names"]]
        ex = AnchorTabular(pred, names, seed=rep, **({} if side == "alibi" else {"predictor_type": "class"}))
        ex.fit(d["X_train"], disc_perc=(25, 50, 75))
        inputs = list(d["X_explain"])
    elif task == "digits":
        d = np.load(work / "digits.npz")
        ex = AnchorImage(pred, (28, 28, 1), segmentation_fn=grid_segments, seed=rep,
                         images_background=np.load(work / "digits_background.npy"))
        inputs = list(d["X_explain"])
    else:
        import spacy

        ex = AnchorText(pred, sampling_strategy="unknown", nlp=spacy.blank("en"), seed=rep, sample_proba=0.5)
        inputs = json.loads((work / "text.json").read_text())
    if side == "alibi":  # alibi's explain takes no seed: its generator runs on from the constructor's
        return inputs, lambda x, i: ex.explain(x, threshold=0.95, coverage_samples=cov)
    return inputs, lambda x, i: ex.explain(x, threshold=0.95, coverage_samples=cov, seed=i, **ours_opts)


def run_worker(side: str, work: Path, tasks: list[str], quick: bool, lucb_arms: str = "auto", seeds: int = 1) -> dict:
    """Explain every input of every task ``seeds`` times (explain seeds ``i + 1000 * rep``); one row of
    figures per explanation."""
    cov = 1000 if quick else 10000
    ours_opts = {} if lucb_arms == "auto" else {"lucb_arms": None if lucb_arms == "all" else int(lucb_arms)}
    out: dict = {}
    for task in tasks:
        pred = Counted(load_predictor(work, task))
        rows = []
        for rep in range(seeds):
            inputs, call = make_explainer(side, task, work, pred, rep, cov, ours_opts)
            for i, x in enumerate(inputs):
                c0, r0 = pred.calls, pred.rows
                t0 = time.perf_counter()
                exp = call(x, i + 1000 * rep)
                dt = time.perf_counter() - t0
                prec = float(np.asarray(exp.precision, dtype=float).reshape(-1)[0])
                cov_ = float(np.asarray(exp.coverage, dtype=float).reshape(-1)[0])
                rows.append({"instance": i, "rep": rep, "time_s": dt, "calls": pred.calls - c0, "rows": pred.rows - r0,
                             "precision": prec, "coverage": cov_, "length": len(exp.raw["feature"]),
                             "success": bool(exp.raw["success"]),
                             "names": [str(n) for n in exp.raw["names"]] if task in ("breast_cancer", "wine") else [],
                             "feature": [int(f) for f in exp.raw["feature"]]})
                print(f"[{side}] {task} #{i}{f' rep {rep}' if seeds > 1 else ''}: {dt:.3f}s calls={pred.calls - c0} "
                      f"prec={prec:.3f} cov={cov_:.3f} len={len(exp.raw['feature'])}", file=sys.stderr, flush=True)
            if "call_sizes" in exp.raw:  # AnchorImage's timed call sizes, as this explainer measured them
                per_row = exp.raw["call_sizes"]["seconds_per_row"]
                print(f"[{side}] {task} rep {rep}: rows per call {exp.raw['call_sizes']['rows_per_call']}; ms per image "
                      "by call size " + ", ".join(f"{k}: {v * 1e3:.3f}" for k, v in per_row.items() if v is not None),
                      file=sys.stderr, flush=True)
        out[task] = rows
    return out


# ----------------------------------------------------------------------------------------------------
# common re-measurement of every anchor (project venv): same model, same sampler, fresh samples
# ----------------------------------------------------------------------------------------------------
_RANGE = re.compile(r"(?P<lo>-?[0-9.]+(?:e[-+]?[0-9]+)?) < (?P<name>.+) <= (?P<hi>-?[0-9.]+(?:e[-+]?[0-9]+)?)")
_LEQ = re.compile(r"(?P<name>.+) <= (?P<hi>-?[0-9.]+(?:e[-+]?[0-9]+)?)")
_GT = re.compile(r"(?P<name>.+) > (?P<lo>-?[0-9.]+(?:e[-+]?[0-9]+)?)")


def parse_tabular_anchor(names: list[str], feature_names: list[str], quantiles: np.ndarray) -> dict[int, tuple]:
    """``{column: (lo, hi)}`` meaning ``lo < x <= hi``, from predicate names; borders snapped to the
    column's nearest training quantile (names print them rounded to 2 decimals)."""
    out: dict[int, tuple] = {}
    for name in names:
        m = _RANGE.fullmatch(name) or _LEQ.fullmatch(name) or _GT.fullmatch(name)
        if m is None:
            raise ValueError(f"cannot parse anchor predicate {name!r}")
        col = feature_names.index(m.group("name"))
        q = quantiles[:, col]
        snap = lambda v: float(q[np.argmin(np.abs(q - float(v)))])  # noqa: E731
        lo = snap(m.group("lo")) if "lo" in m.groupdict() and m.group("lo") else -np.inf
        hi = snap(m.group("hi")) if "hi" in m.groupdict() and m.group("hi") else np.inf
        plo, phi = out.get(col, (-np.inf, np.inf))
        out[col] = (max(lo, plo), min(hi, phi))
    return out


def remeasure(work: Path, task: str, rows: list[dict], n_samples: int, seed: int = 1234) -> list[tuple[float, float]]:
    """(precision, coverage) of each explanation's anchor by the common procedure (module docstring)."""
    predict = load_predictor(work, task)
    rng = np.random.default_rng(seed)
    out = []
    if task in ("breast_cancer", "wine"):
        d = np.load(work / f"{task}.npz")
        Xtr, feature_names = d["X_train"], [str(n) for n in d["feature_names"]]
        quantiles = np.percentile(Xtr, (25, 50, 75), axis=0)
        for r in rows:
            x = d["X_explain"][r["instance"]]
            label = predict(x[None])[0]
            conds = parse_tabular_anchor(r["names"], feature_names, quantiles)
            sat = np.ones(len(Xtr), dtype=bool)
            for col, (lo, hi) in conds.items():
                sat &= (Xtr[:, col] > lo) & (Xtr[:, col] <= hi)
            fresh = Xtr[rng.integers(0, len(Xtr), n_samples)].copy()
            cols = list(conds)
            if cols and sat.any():
                fresh[:, cols] = Xtr[rng.choice(np.nonzero(sat)[0], n_samples)][:, cols]
            else:
                for col, (lo, hi) in conds.items():
                    ok = np.nonzero((Xtr[:, col] > lo) & (Xtr[:, col] <= hi))[0]
                    fresh[:, col] = Xtr[rng.choice(ok, n_samples), col]
            out.append((float((predict(fresh) == label).mean()), float(sat.mean())))
    elif task == "digits":
        d = np.load(work / "digits.npz")
        bg = np.load(work / "digits_background.npy")[0]
        for r in rows:
            img = d["X_explain"][r["instance"]]
            seg = grid_segments(img)
            label = predict(img[None])[0]
            keep = rng.random((n_samples, int(seg.max()) + 1)) >= 0.5
            keep[:, r["feature"]] = True
            fresh = np.where(keep[:, seg][..., None], img[None], bg[None]).astype(np.float32)
            out.append((float((predict(fresh) == label).mean()), 0.5 ** len(r["feature"])))
    else:
        import spacy

        nlp = spacy.blank("en")
        texts = json.loads((work / "text.json").read_text())
        for r in rows:
            text = texts[r["instance"]]
            words = [t.text for t in nlp(text)]
            label = predict([text])[0]
            changed = rng.random((n_samples, len(words))) < 0.5
            changed[:, r["feature"]] = False
            toks = np.where(changed, "UNK", np.array(words, dtype=object))
            fresh = [" ".join(t) for t in toks]
            out.append((float((np.asarray(predict(fresh)) == label).mean()), 0.5 ** len(r["feature"])))
    return out


def cnn_cost_by_call_size(work: Path, sizes: tuple[int, ...] = (25, 50, 83, 100, 128), reps: int = 15) -> dict:
    """The digits CNN's time per image (ms, median of ``reps`` calls, one thread) by rows per call, on
    perturbed explained digits. Why: the speed-up depends on it. alibi sends every call at batch_size
    = 100 rows; ours times its calls and keeps the cheapest size (AnchorImage predict_batch_size='auto').
    Measured in this process, under the same allocator settings the workers inherit."""
    predict = load_predictor(work, "digits")
    imgs = np.load(work / "digits.npz")["X_explain"]
    seg = grid_segments(imgs[0])
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        keep = rng.random((n, int(seg.max()) + 1)) >= 0.5
        batch = np.where(keep[:, seg][..., None], imgs[rng.integers(0, len(imgs), n)], np.float32(0.0))
        batch = batch.astype(np.float32)
        predict(batch)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            predict(batch)
            ts.append(time.perf_counter() - t0)
        out[n] = float(np.median(ts)) / n * 1e3
    return out


def summarise(rows: list[dict]) -> dict:
    a = lambda k: np.array([r.get(k, np.nan) for r in rows], dtype=float)  # noqa: E731
    return {"n": len(rows), "median_time_s": float(np.median(a("time_s"))), "mean_time_s": float(a("time_s").mean()),
            "median_calls": float(np.median(a("calls"))), "median_rows": float(np.median(a("rows"))),
            "mean_precision": float(a("precision").mean()), "mean_coverage": float(a("coverage").mean()),
            "common_precision": float(a("common_precision").mean()),
            "min_common_precision": float(a("common_precision").min()),
            "common_coverage": float(a("common_coverage").mean()),
            "mean_length": float(a("length").mean()), "success_rate": float(a("success").mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 instances per task, coverage_samples 1000, 1-epoch CNN")
    ap.add_argument("--n", type=int, default=10, help="instances per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", type=int, default=1,
                    help="explain every input this many times with different seeds (figures over all of them): "
                         "fewer ties decided by one anchor's luck in the precision/coverage comparison")
    ap.add_argument("--lucb-arms", default="auto", help="our lucb_arms: auto (default), all, or an integer >= 2")
    ap.add_argument("--verify-samples", type=int, default=2000, help="fresh samples per anchor (common re-measure)")
    ap.add_argument("--alibi-python", default="/tmp/alibi-venv/bin/python")
    ap.add_argument("--no-alibi", action="store_true", help="run our side only; compare with the committed reference")
    ap.add_argument("--save-reference", action="store_true", help="write the alibi figures to the reference file")
    ap.add_argument("--out", default=None, help="write all figures as JSON here")
    ap.add_argument("--prepared", default=None,
                    help="keep the prepared models and data in this directory and reuse them when present "
                         "(skips retraining the CNN between runs)")
    ap.add_argument("--worker", choices=("ours", "alibi"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    if args.worker:
        res = run_worker(args.worker, Path(args.work), tasks, args.quick, args.lucb_arms, args.seeds)
        print(json.dumps(res))
        return
    n = 2 if args.quick else args.n
    n_verify = 300 if args.quick else args.verify_samples
    with tempfile.TemporaryDirectory(prefix="bench_anchors_") as tmp:
        work = Path(args.prepared) if args.prepared else Path(tmp)
        marker = work / f"prepared_n{n}_quick{int(args.quick)}"
        if marker.exists():
            print(f"reusing the models and data prepared in {work} (n={n} per task)", flush=True)
        else:
            print(f"preparing models and data (n={n} per task) ...", flush=True)
            work.mkdir(parents=True, exist_ok=True)
            prepare(work, n, args.quick)
            marker.write_text("ok\n")
        sides = {"ours": sys.executable}
        have_alibi = not args.no_alibi and Path(args.alibi_python).exists()
        if have_alibi:
            sides["alibi"] = args.alibi_python
        results: dict = {}
        for side, py in sides.items():
            cmd = [py, str(Path(__file__).resolve()), "--worker", side, "--work", str(work), "--tasks", ",".join(tasks),
                   "--lucb-arms", args.lucb_arms, "--seeds", str(args.seeds)]
            if args.quick:
                cmd.append("--quick")
            print(f"running {side} ...", flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
            if proc.returncode != 0:
                raise SystemExit(f"{side} worker failed")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"re-measuring every anchor: {n_verify} fresh samples each, one procedure for both sides ...", flush=True)
        for side, res in results.items():
            for t, rows in res.items():
                for r, (p, c) in zip(rows, remeasure(work, t, rows, n_verify)):
                    r["common_precision"], r["common_coverage"] = p, c
        if "digits" in tasks:
            cost = cnn_cost_by_call_size(work)
            print("digits CNN, ms per image by rows per call (one thread, this process's allocator settings): "
                  + ", ".join(f"{n}: {ms:.3f}" for n, ms in cost.items()), flush=True)
    summary = {side: {t: summarise(r) for t, r in res.items()} for side, res in results.items()}
    if "alibi" not in summary:
        if REFERENCE.exists():
            ref = json.loads(REFERENCE.read_text())
            summary["alibi"] = {t: ref["summary"][t] for t in tasks if t in ref["summary"]}
            print(f"alibi not run: using the reference figures in {REFERENCE.relative_to(REPO)} "
                  f"(made {ref.get('made', '?')}, quick={ref.get('quick')}; its common figures are from that run)")
    elif args.save_reference:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps({"made": time.strftime("%Y-%m-%d"), "quick": args.quick, "n": n,
                                         "summary": summary["alibi"], "rows": results["alibi"]}, indent=1))
    print(f"{n} inputs x {args.seeds} seed(s) per task; lucb_arms (ours) = {args.lucb_arms}; precision/coverage: 'own' = the side's estimate, "
          f"'common' = re-measured ({n_verify} fresh samples per anchor, same procedure for both)")
    hdr = (f"{'task':14s} {'side':6s} {'median s':>9s} {'calls':>6s} {'rows':>7s} {'prec own':>9s} {'prec com':>9s} "
           f"{'min com':>8s} {'cov own':>8s} {'cov com':>8s} {'length':>6s} {'success':>7s}")
    print(hdr)
    print("-" * len(hdr))
    verdicts = []
    for t in tasks:
        for side in ("ours", "alibi"):
            s = summary.get(side, {}).get(t)
            if s:
                g = lambda k: s.get(k, float("nan"))  # noqa: E731  (old reference files lack some keys)
                print(f"{t:14s} {side:6s} {g('median_time_s'):9.4f} {g('median_calls'):6.0f} {g('median_rows'):7.0f} "
                      f"{g('mean_precision'):9.3f} {g('common_precision'):9.3f} {g('min_common_precision'):8.3f} "
                      f"{g('mean_coverage'):8.3f} {g('common_coverage'):8.3f} {g('mean_length'):6.2f} "
                      f"{g('success_rate'):7.2f}")
        o, a = summary["ours"].get(t), summary.get("alibi", {}).get(t)
        if o and a:
            speed = a["median_time_s"] / o["median_time_s"]
            calls = a["median_calls"] / max(o["median_calls"], 1)
            common = not np.isnan(a.get("common_precision", np.nan))
            pk, ck = ("common_precision", "common_coverage") if common else ("mean_precision", "mean_coverage")
            dp, dc = o[pk] - a[pk], o[ck] - a[ck]
            ok = speed >= 3 and dp >= -0.01 and dc >= -0.02
            why = [w for w, bad in (("speed < 3x", speed < 3), ("precision lower", dp < -0.01),
                                    ("coverage lower", dc < -0.02)) if bad]
            verdicts.append((t, speed, ok, why))
            print(f"{t:14s} ratio  speed-up x{speed:.1f} (alibi/ours median time), predictor calls x{calls:.1f} fewer, "
                  f"{'common' if common else 'own'} precision {dp:+.3f}, coverage {dc:+.3f}")
    for side in ("ours", "alibi"):
        low = [t for t in tasks if summary.get(side, {}).get(t, {}).get("common_precision", 1.0) < 0.90]
        if low:
            print(f"NOTE {side}: re-measured precision < 0.90 (threshold 0.95 - 0.05) on {', '.join(low)}: its own "
                  "estimate is biased (see docs/anchors.md, 'Precision of the search's estimate').")
    for t, speed, ok, why in verdicts:
        print(f"{t:14s} x{speed:5.1f}  {'met' if ok else 'MISSED (' + ', '.join(why) + ')'}  "
              f"(target: >= 3x faster, precision and coverage equal or better)")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
