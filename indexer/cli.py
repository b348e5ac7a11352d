"""The indexer's command-line subcommands: ``gradindex build``, ``self-influence`` and ``proponents``.

:func:`register` adds them to the ``gradindex`` parser that ``server.cli`` assembles. Errors the
user can fix (bad config, name taken, interrupted build, unknown index, unreadable queries) print
one line naming what to change and exit with status 2.

    gradindex build examples/digits/index.toml --workdir /tmp/gi
    gradindex self-influence digits --top 10 [--lowest] [--json]
    gradindex proponents digits --input q.npy [--labels y.npy] --top 5 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

DEFAULT_WORKDIR_ENV = "GRADINDEX_WORKDIR"
WORKDIR_HELP = f"folder of the catalog and index files (default: ${DEFAULT_WORKDIR_ENV} or ./gradindex-data)"


def _workdir(args: argparse.Namespace) -> str:
    return args.workdir or os.environ.get(DEFAULT_WORKDIR_ENV) or "gradindex-data"


CATALOG_ENV_HELP = ("environment variable holding the catalog's database URL when it is not the workdir's "
                    "catalog.db (what index.catalog_url_env names in the build config)")


def _catalog_url(args: argparse.Namespace) -> str | None:
    """The checked catalog URL from ``--catalog-url-env`` (None: the workdir's catalog.db); ConfigError if bad."""
    from indexer.catalog import catalog_url_setting

    env = getattr(args, "catalog_url_env", None)
    return catalog_url_setting({"catalog_url_env": env}, "--") if env else None


def _cmd_build(args: argparse.Namespace) -> int:
    from indexer.build import build_index
    from indexer.errors import GradIndexError

    try:
        r = build_index(args.config, _workdir(args), resume=args.resume, replace=args.replace,
                        new_version=args.new_version, engine=args.engine, progress=not args.quiet,
                        ray_address=args.ray_address)
    except GradIndexError as exc:
        print(f"gradindex build: error: {exc}", file=sys.stderr)
        return 2
    rec = "n/a" if r.recall_at_10 is None else f"{r.recall_at_10:.3f}"
    print(f"built index {r.name!r} version {r.version}: {r.count} examples, dim {r.dim}, recall@10 {rec}, "
          f"{r.seconds:.1f} s ({r.chunks_computed} chunks computed, {r.chunks_resumed} resumed) -> "
          f"{os.path.join(_workdir(args), r.path)}")
    return 0


def _cmd_self_influence(args: argparse.Namespace) -> int:
    from indexer.errors import GradIndexError
    from indexer.query import open_index

    try:
        idx = open_index(_workdir(args), args.index, load_model=False, catalog_url=_catalog_url(args))
        try:
            rows = idx.self_influence_top(args.top, payload=False, lowest=args.lowest)
        finally:
            idx.close()
    except GradIndexError as exc:
        print(f"gradindex self-influence: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "payload"} for r in rows], indent=1))
        return 0
    print(f"{'rank':>4} {'id':>8} {'external_id':<24} {'label':<10} {'self_influence':>16} {'grad_norm':>12}")
    for i, r in enumerate(rows, 1):
        print(f"{i:>4} {r['id']:>8} {str(r['external_id'])[:24]:<24} {str(r['label'])[:10]:<10} "
              f"{r['self_influence']:>16.6g} {r['grad_norm']:>12.6g}")
    return 0


def _load_queries(path: str, labels: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Queries from a ``.npy`` batch or a ``.npz`` with ``X`` (and optionally ``y``); ``labels``: a
    separate ``.npy`` of labels, which wins over the ``.npz``'s ``y``."""
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
    from indexer.errors import GradIndexError
    from indexer.influence import index_proponents
    from indexer.query import open_index

    try:
        X, Y = _load_queries(args.input, args.labels)
    except (OSError, ValueError) as exc:
        print(f"gradindex proponents: error: cannot read queries: {exc}", file=sys.stderr)
        return 2
    try:
        idx = open_index(_workdir(args), args.index, catalog_url=_catalog_url(args))
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

    def hits(ids: np.ndarray, scores: np.ndarray) -> list[dict]:
        return [{"id": int(i), "score": float(s), "external_id": meta[int(i)]["external_id"],
                 "label": meta[int(i)]["label"]} for i, s in zip(ids, scores) if i >= 0]

    out = [{"query": q, "proponents": hits(res.proponent_ids[q], res.proponent_scores[q]),
            "opponents": hits(res.opponent_ids[q], res.opponent_scores[q])} for q in range(len(res.proponent_ids))]
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
    """Add ``build``, ``self-influence`` and ``proponents`` to the ``gradindex`` parser."""
    p = subparsers.add_parser("build", help="build a gradient index from a TOML config",
                              description="Build (or resume) the gradient index a TOML config describes.")
    p.add_argument("config", help="build config (TOML); paths inside are relative to it")
    p.add_argument("--workdir", help=WORKDIR_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted build from its last committed chunk")
    g.add_argument("--replace", action="store_true", help="rebuild an existing index (old version removed when done)")
    g.add_argument("--new-version", action="store_true", help="build a new version next to the existing ones")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="where gradients are computed: this process, or Ray Data actors")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address for --engine ray (default: $RAY_ADDRESS or a local cluster)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_build)

    q = subparsers.add_parser("self-influence", help="list the most self-influential training examples",
                              description="List the training examples with the largest self-influence "
                                          "(sum over checkpoints of lr * squared gradient norm).")
    q.add_argument("index", help="index name")
    q.add_argument("--top", type=int, default=10, help="how many examples (default 10)")
    q.add_argument("--workdir", help=WORKDIR_HELP)
    q.add_argument("--catalog-url-env", metavar="NAME", help=CATALOG_ENV_HELP)
    q.add_argument("--lowest", action="store_true", help="the least self-influential (most typical) instead")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=_cmd_self_influence)

    r = subparsers.add_parser("proponents", help="TracIn proponents and opponents of query examples",
                              description="Top-k training examples that most lowered (proponents) and most "
                                          "raised (opponents) each query's loss: TracIn over the index's "
                                          "checkpoints (kernel grad_dot). Queries without labels are "
                                          "explained with the model's predicted class.")
    r.add_argument("index", help="index name (kernel grad_dot)")
    r.add_argument("--input", required=True, help=".npy batch of query examples, or .npz with X (and y)")
    r.add_argument("--labels", help=".npy of the queries' labels (default: the model's predicted class)")
    r.add_argument("--top", type=int, default=5, help="how many proponents and opponents per query (default 5)")
    r.add_argument("--workdir", help=WORKDIR_HELP)
    r.add_argument("--catalog-url-env", metavar="NAME", help=CATALOG_ENV_HELP)
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=_cmd_proponents)
