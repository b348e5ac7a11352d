"""Benchmark: our Anchors explainers vs alibi 0.9.6 on the same models and data.

Tasks (all with alibi's default knobs: threshold 0.95, delta 0.1, tau 0.15, batch_size 100,
coverage_samples 10000, beam_size 1):

* ``breast_cancer`` and ``wine``: a fixed RandomForest (50 trees, random_state 0), AnchorTabular,
  ``disc_perc=(25, 50, 75)``, test rows explained;
* ``digits``: the 28x28 digits CNN of ``indexer/demo.py`` (2 epochs), AnchorImage with a 4x4 grid
  of 7x7 superpixels;
* ``text``: a bag-of-words logistic regression on a small generated sentiment corpus, AnchorText
  with ``sampling_strategy='unknown'`` and a blank English spaCy tokenizer.

For each: median time per explanation, predictor calls, mean precision, mean coverage, mean anchor
length, and the ratio alibi/ours. Both sides run in separate processes with one thread
(OMP/MKL/torch), one after the other, on the same pickled models and saved data. alibi must live in
its own virtual environment (it pins numpy < 2): pass its python with ``--alibi-python`` (default
``/tmp/alibi-venv/bin/python``; create it with ``python3 -m venv /tmp/alibi-venv &&
/tmp/alibi-venv/bin/pip install alibi==0.9.6 scikit-learn click torch==2.13.0``). Without it, the
script runs our side only and prints the reference alibi figures committed in
``benchmarks/results/anchors_alibi_reference.json`` (made by this script).

``--quick``: 2 instances per task and coverage_samples 1000: a smoke run in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
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
    model = train_digits_cnn(Xa[1797:], ya[1797:], epochs=1 if quick else 2, seed=0)
    torch.save(model.state_dict(), work / "digits_cnn.pt")
    np.savez(work / "digits.npz", X_explain=X[1500:1500 + n_inst].transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------------
# worker (runs in either venv)
# ----------------------------------------------------------------------------------------------------
class Counted:
    """Wrap a predictor to count calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x):
        self.calls += 1
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


def run_worker(side: str, work: Path, tasks: list[str], quick: bool) -> dict:
    import spacy

    cov = 1000 if quick else 10000
    out: dict = {}
    if side == "alibi":
        from alibi.explainers import AnchorImage, AnchorTabular, AnchorText
    else:
        sys.path.insert(0, str(REPO))
        from explainers.anchors import AnchorImage, AnchorTabular, AnchorText
    for task in tasks:
        pred = Counted(load_predictor(work, task))
        rows = []
        if task in ("breast_cancer", "wine"):
            d = np.load(work / f"{task}.npz")
            names = [str(n) for n in d["feature_names"]]
            if side == "alibi":
                ex = AnchorTabular(pred, names, seed=0)
            else:
                ex = AnchorTabular(pred, names, seed=0, predictor_type="class")
            ex.fit(d["X_train"], disc_perc=(25, 50, 75))
            inputs = list(d["X_explain"])
            call = lambda x, i: ex.explain(x, threshold=0.95, coverage_samples=cov, **({} if side == "alibi" else {"seed": i}))  # noqa: E731
        elif task == "digits":
            d = np.load(work / "digits.npz")
            ex = AnchorImage(pred, (28, 28, 1), segmentation_fn=grid_segments, seed=0)
            inputs = list(d["X_explain"])
            call = lambda x, i: ex.explain(x, threshold=0.95, coverage_samples=cov, **({} if side == "alibi" else {"seed": i}))  # noqa: E731
        else:
            nlp = spacy.blank("en")
            ex = AnchorText(pred, sampling_strategy="unknown", nlp=nlp, seed=0, sample_proba=0.5)
            inputs = json.loads((work / "text.json").read_text())
            call = lambda x, i: ex.explain(x, threshold=0.95, coverage_samples=cov, **({} if side == "alibi" else {"seed": i}))  # noqa: E731
        for i, x in enumerate(inputs):
            c0 = pred.calls
            t0 = time.perf_counter()
            exp = call(x, i)
            dt = time.perf_counter() - t0
            prec = float(np.asarray(exp.precision, dtype=float).reshape(-1)[0])
            cov_ = float(np.asarray(exp.coverage, dtype=float).reshape(-1)[0])
            rows.append({"time_s": dt, "calls": pred.calls - c0, "precision": prec, "coverage": cov_,
                         "length": len(exp.raw["feature"]), "success": bool(exp.raw["success"])})
            print(f"[{side}] {task} #{i}: {dt:.3f}s calls={pred.calls - c0} prec={prec:.3f} "
                  f"cov={cov_:.3f} len={len(exp.raw['feature'])}", file=sys.stderr, flush=True)
        out[task] = rows
    return out


def summarise(rows: list[dict]) -> dict:
    a = lambda k: np.array([r[k] for r in rows], dtype=float)  # noqa: E731
    return {"n": len(rows), "median_time_s": float(np.median(a("time_s"))), "mean_time_s": float(a("time_s").mean()),
            "median_calls": float(np.median(a("calls"))), "mean_precision": float(a("precision").mean()),
            "mean_coverage": float(a("coverage").mean()), "mean_length": float(a("length").mean()),
            "success_rate": float(a("success").mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 instances per task, coverage_samples 1000")
    ap.add_argument("--n", type=int, default=10, help="instances per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--alibi-python", default="/tmp/alibi-venv/bin/python")
    ap.add_argument("--no-alibi", action="store_true", help="run our side only; compare with the committed reference")
    ap.add_argument("--save-reference", action="store_true", help="write the alibi figures to the reference file")
    ap.add_argument("--out", default=None, help="write all figures as JSON here")
    ap.add_argument("--worker", choices=("ours", "alibi"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    if args.worker:
        res = run_worker(args.worker, Path(args.work), tasks, args.quick)
        print(json.dumps(res))
        return
    n = 2 if args.quick else args.n
    with tempfile.TemporaryDirectory(prefix="bench_anchors_") as tmp:
        work = Path(tmp)
        print(f"preparing models and data (n={n} per task) ...", flush=True)
        prepare(work, n, args.quick)
        sides = {"ours": sys.executable}
        have_alibi = not args.no_alibi and Path(args.alibi_python).exists()
        if have_alibi:
            sides["alibi"] = args.alibi_python
        results: dict = {}
        for side, py in sides.items():
            cmd = [py, str(Path(__file__).resolve()), "--worker", side, "--work", str(work), "--tasks", ",".join(tasks)]
            if args.quick:
                cmd.append("--quick")
            print(f"running {side} ...", flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
            if proc.returncode != 0:
                raise SystemExit(f"{side} worker failed")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = {side: {t: summarise(r) for t, r in res.items()} for side, res in results.items()}
    if "alibi" not in summary:
        if REFERENCE.exists():
            ref = json.loads(REFERENCE.read_text())
            summary["alibi"] = {t: ref["summary"][t] for t in tasks if t in ref["summary"]}
            print(f"alibi not run: using the reference figures in {REFERENCE.relative_to(REPO)} "
                  f"(made {ref.get('made', '?')}, quick={ref.get('quick')})")
    elif args.save_reference:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps({"made": time.strftime("%Y-%m-%d"), "quick": args.quick, "n": n,
                                         "summary": summary["alibi"], "rows": results["alibi"]}, indent=1))
    hdr = f"{'task':14s} {'side':6s} {'median s':>9s} {'calls':>7s} {'precision':>9s} {'coverage':>9s} {'length':>7s} {'success':>7s}"
    print(hdr)
    print("-" * len(hdr))
    verdicts = []
    for t in tasks:
        for side in ("ours", "alibi"):
            s = summary.get(side, {}).get(t)
            if s:
                print(f"{t:14s} {side:6s} {s['median_time_s']:9.4f} {s['median_calls']:7.0f} {s['mean_precision']:9.3f} "
                      f"{s['mean_coverage']:9.3f} {s['mean_length']:7.2f} {s['success_rate']:7.2f}")
        o, a = summary["ours"].get(t), summary.get("alibi", {}).get(t)
        if o and a:
            speed = a["median_time_s"] / o["median_time_s"]
            calls = a["median_calls"] / max(o["median_calls"], 1)
            ok = speed >= 3 and o["mean_precision"] >= a["mean_precision"] - 0.01 and \
                o["mean_coverage"] >= a["mean_coverage"] - 0.02
            verdicts.append((t, speed, ok))
            print(f"{t:14s} ratio  speed-up x{speed:.1f} (alibi/ours median time), predictor calls x{calls:.1f} fewer, "
                  f"precision {o['mean_precision'] - a['mean_precision']:+.3f}, coverage "
                  f"{o['mean_coverage'] - a['mean_coverage']:+.3f} -> target {'MET' if ok else 'MISSED'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
