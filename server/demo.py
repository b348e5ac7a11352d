"""The demo: build the digits index (if absent), serve it, query it through the client, plot.

``gradindex demo`` runs it end to end: the shipped digits with the seed notebook's CNN (trained on
the spot when no weights exist), an index built by the indexer, a server on a free loopback port,
a handful of held-out digits sent through :class:`server.client.GradIndexClient`, the most similar
training examples printed, and a PNG like the seed notebook's figures: each query beside its 5
most similar training images (labels and predictions), and the mean score per class.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

DEMO_INDEX = "digits"
DEMO_LIMIT = 1597  # the demo indexes the first 1,597 digits and queries the 200 held out
CONFIG = Path(__file__).resolve().parent.parent / "examples" / "digits" / "index.toml"


def ensure_digits_index(workdir: str | Path, name: str = DEMO_INDEX, n: int | None = None, limit: int | None = None,
                        overrides: dict[str, dict] | None = None, progress: bool = True) -> str:
    """Build the digits index into ``workdir`` from ``examples/digits/index.toml`` unless it is there.

    ``n``: index that many examples of :func:`indexer.demo.load_digits_28` (more than the 1,797
    shipped digits = seeded shifted copies; benchmarks use 20,000), written to ``workdir`` as npz so
    stored examples can be returned. ``limit``: only the first ``limit`` rows (the demo holds the
    tail out as queries). ``overrides`` are merged into the config's tables, e.g.
    ``{"index": {"kernel": "grad_cos"}, "projection": {"kind": "none"}, "model": {"params": ["^14\\."]}}``.
    Returns the name.
    """
    import tomllib

    from indexer.build import build_index

    from indexer.query import list_indexes

    workdir = Path(workdir)
    if any(d.name == name for d in list_indexes(workdir, (overrides or {}).get("index", {}).get("catalog_url"))):
        return name
    raw = tomllib.loads(CONFIG.read_text())
    raw["index"]["name"] = name
    for table, values in (overrides or {}).items():
        raw.setdefault(table, {}).update(values)
    if limit:
        raw["data"]["limit"] = int(limit)
    if n is not None:
        from indexer.demo import load_digits_28

        workdir.mkdir(parents=True, exist_ok=True)
        data = workdir / f"digits_{n}.npz"
        if not data.exists():
            X, y = load_digits_28(n)
            np.savez(data, X=X, y=y, ids=np.asarray([f"digit-{i:05d}" for i in range(len(X))]))
        raw["data"]["path"] = str(data)
    build_index(raw, workdir, base_dir=CONFIG.parent, progress=progress)
    return name


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def plot_similar(path: str | Path, X: np.ndarray, y: np.ndarray, preds: np.ndarray, sim_images: np.ndarray,
                 sim_labels: np.ndarray, sim_preds: np.ndarray, all_scores: np.ndarray, all_labels: np.ndarray,
                 all_preds: np.ndarray) -> Path:
    """One figure: per query row, the query, its most similar training images, and the mean score
    per true class and per predicted class over the whole reference set (as in the seed notebook)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = sim_images.shape[:2]
    fig, axes = plt.subplots(n, k + 4, figsize=(2.3 * (k + 1) + 7, 2.6 * n),
                             gridspec_kw={"width_ratios": [1] * (k + 1) + [0.2, 1.8, 1.8]}, squeeze=False)
    for j in range(n):
        ax = axes[j, 0]
        ax.imshow(np.squeeze(X[j]), cmap="gray")
        ax.set_title(("Original instance\n" if j == 0 else "") + f"Label: {y[j]} - Prediction: {preds[j]}",
                     fontsize=8)
        ax.axis("off")
        for i in range(k):
            ax = axes[j, i + 1]
            ax.imshow(np.squeeze(sim_images[j, i]), cmap="gray")
            ax.set_title((f"{_ordinal(i + 1)} most similar\n" if j == 0 else "")
                         + f"Label: {sim_labels[j, i]} - Prediction: {sim_preds[j, i]}", fontsize=8)
            ax.axis("off")
        axes[j, k + 1].axis("off")
        for col, (groups, what) in enumerate(((all_labels[j], "true class"), (all_preds[j], "predicted class"))):
            ax = axes[j, k + 2 + col]
            classes = np.unique(groups[groups >= 0])
            means = np.array([all_scores[j][groups == c].mean() for c in classes])
            order = np.argsort(-means)
            ax.bar([str(c) for c in classes[order]], means[order],
                   color=["tab:green" if c == preds[j] else "tab:blue" for c in classes[order]])
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_title(f"Averaged scores for each\n{what} in reference set", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_demo(workdir: str | Path = "runs/digits", out: str | Path | None = None, n_queries: int = 5, k: int = 5,
             port: int = 0, seed: int = 0, build: dict | None = None, verbose: bool = True) -> dict:
    """Build if needed, serve on 127.0.0.1:``port``, query ``n_queries`` held-out digits, print, plot.

    ``build``: extra arguments of :func:`ensure_digits_index` (tests index fewer digits).
    Returns a summary dict (index name, port, ids/scores/labels of the hits, PNG path).
    """
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig

    say = print if verbose else (lambda *a, **kw: None)
    t0 = time.perf_counter()
    workdir = Path(workdir)
    name = ensure_digits_index(workdir, limit=DEMO_LIMIT, **(build or {}))
    t_build = time.perf_counter() - t0
    server = GradIndexServer(ServerConfig(workdir=str(workdir), indexes=[name], port=port, max_k=100_000,
                                          log_level="WARNING")).start()
    try:
        with GradIndexClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            info = client.describe_index(name)
            say(f"index {name!r}: {info.count} training examples, model {info.model}, kernel {info.kernel}, "
                f"dim {info.dim}; served on 127.0.0.1:{server.port}")
            Xq, yq = _held_out_digits(info, n_queries, seed)
            t1 = time.perf_counter()
            res = client.find_similar(name, Xq, k=int(info.count), include_data=False)
            t_query = time.perf_counter() - t1
            top_ids = res.ids[:, :k]
            # Every stored example (ids 0..count-1), to plot the neighbours and to predict their class
            # with the operator's model files, as the notebook does for its reference set.
            stored = client.get_examples(name, np.arange(info.count), include_data=True)
            all_pred_by_id = _predict(stored["data"])
            sim_images = stored["data"][top_ids]
            meta_preds = all_pred_by_id[top_ids]
            all_preds = all_pred_by_id[np.maximum(res.ids, 0)]
            preds = res.targets
            for q in range(n_queries):
                say(f"query {q}: label {yq[q]}, prediction {preds[q]}; most similar training examples:")
                for j in range(k):
                    say(f"    id={res.ids[q, j]:<5d} label={res.labels[q, j]} "
                        f"prediction={meta_preds[q, j]} score={res.scores[q, j]:.4g}")
            png = plot_similar(out or workdir / "similar.png", Xq, yq, preds, sim_images, res.labels[:, :k],
                               meta_preds, res.scores, res.labels, all_preds)
            say(f"wrote {png}  (build {t_build:.1f} s, query {t_query * 1e3:.0f} ms for {n_queries} queries "
                f"against all {info.count} examples)")
            return {"index": name, "port": server.port, "ids": top_ids, "scores": res.scores[:, :k],
                    "labels": res.labels[:, :k], "png": str(png), "targets": preds, "query_labels": yq}
    finally:
        server.stop(1.0)


def _predict(X: np.ndarray) -> np.ndarray:
    """Predicted classes of the demo model, loaded from the example's files (model.py + weights.pt)."""
    import torch

    from indexer.config import load_model, parse_config

    model = load_model(parse_config(CONFIG).model).eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(X, dtype=np.float32))).argmax(1).numpy()


def _held_out_digits(info, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` shipped digits the index did not store (the tail of the 1,797), chosen by ``seed``."""
    from indexer.demo import load_digits_28

    X, y = load_digits_28()
    start = int(info.count) if info.count < len(X) else len(X) - 200
    pool = np.arange(min(start, len(X) - n), len(X))
    pick = np.random.default_rng(seed).choice(pool, size=n, replace=False)
    return X[pick], y[pick]
