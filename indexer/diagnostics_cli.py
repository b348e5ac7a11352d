"""``gradindex proponents``: TracIn proponents and opponents of query examples, offline, from a built
index (no server needed). ``server/cli.py`` assembles it through :func:`register`.

The index must use ``kernel = "grad_dot"``; built with ``[[model.checkpoints]]`` (their learning
rates) its scores are TracIn's Σ_c lr_c g_c(query)·g_c(train). Queries come from a ``.npy`` file
(one batch, the model's input shape) or a ``.npz`` (arrays ``X`` and, optionally, ``y``); labels may
also be a separate ``.npy`` (``--labels``). Without labels a classifier's query is explained with
the model's predicted class; unsupervised models need none.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _load_queries(path: str, labels: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    if path.endswith(".npz"):
        with np.load(path) as z:
            if "X" not in z:
                raise ValueError(f"{path} has no array 'X' (arrays: {', '.join(z.files)})")
            X = z["X"]
            Y = z["y"] if "y" in z else None
    else:
        X, Y = np.load(path, allow_pickle=False), None
    if labels:
        Y = np.load(labels, allow_pickle=False)
    return X, Y


def _cmd_proponents(args: argparse.Namespace) -> int:
    from indexer.cli import _workdir
    from indexer.diagnostics import index_proponents
    from indexer.errors import GradIndexError
    from indexer.query import open_index

    try:
        X, Y = _load_queries(args.input, args.labels)
    except (OSError, ValueError) as exc:
        print(f"gradindex proponents: error: cannot read queries: {exc}", file=sys.stderr)
        return 2
    try:
        idx = open_index(_workdir(args), args.index)
        try:
            res = index_proponents(idx, X, Y, k=args.top)
            rows = idx.get_examples(np.unique(np.concatenate([res.proponent_ids.ravel(),
                                                              res.opponent_ids.ravel()])), payload=False)
        finally:
            idx.close()
    except (GradIndexError, ValueError, TypeError) as exc:
        print(f"gradindex proponents: error: {exc}", file=sys.stderr)
        return 2
    meta = {r["id"]: r for r in rows}
    out = []
    for q in range(len(res.proponent_ids)):
        def hits(ids, scores):
            return [{"id": int(i), "score": float(s), "external_id": meta[int(i)]["external_id"],
                     "label": meta[int(i)]["label"]} for i, s in zip(ids, scores) if i >= 0]
        out.append({"query": q, "proponents": hits(res.proponent_ids[q], res.proponent_scores[q]),
                    "opponents": hits(res.opponent_ids[q], res.opponent_scores[q])})
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for o in out:
        print(f"query {o['query']}")
        for kind in ("proponents", "opponents"):
            for rank, h in enumerate(o[kind], 1):
                print(f"  {kind[:-1]:<9} {rank:>3} id {h['id']:>8} {str(h['external_id'])[:24]:<24} "
                      f"label {str(h['label'])[:10]:<10} score {h['score']:.6g}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``proponents`` to the ``gradindex`` parser."""
    from indexer.cli import DEFAULT_WORKDIR_ENV

    p = subparsers.add_parser("proponents", help="TracIn proponents and opponents of query examples",
                              description="Top-k training examples that most lowered (proponents) and most "
                                          "raised (opponents) each query's loss: TracIn over the index's "
                                          "checkpoints (kernel grad_dot).")
    p.add_argument("index", help="index name (kernel grad_dot)")
    p.add_argument("--input", required=True, help=".npy batch of query examples, or .npz with X (and y)")
    p.add_argument("--labels", help=".npy of the queries' labels (default: the model's predicted class)")
    p.add_argument("--top", type=int, default=5, help="how many proponents and opponents per query (default 5)")
    p.add_argument("--workdir", help=f"folder of the catalog and index files (default: ${DEFAULT_WORKDIR_ENV} "
                                     "or ./gradindex-data)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_proponents)
