"""``gradindex build`` and ``gradindex self-influence``: the indexer's command-line subcommands.

``server/cli.py`` assembles them through :func:`register`. Errors the user can fix (bad config,
name taken, interrupted build) print one line naming what to change and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_WORKDIR_ENV = "GRADINDEX_WORKDIR"


def _workdir(args: argparse.Namespace) -> str:
    return args.workdir or os.environ.get(DEFAULT_WORKDIR_ENV) or "gradindex-data"


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
    from indexer.influence import self_influence_top

    try:
        rows = self_influence_top(_workdir(args), args.index, args.top, lowest=args.lowest)
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``build`` and ``self-influence`` to the ``gradindex`` parser."""
    wd_help = f"folder of the catalog and index files (default: ${DEFAULT_WORKDIR_ENV} or ./gradindex-data)"
    p = subparsers.add_parser("build", help="build a gradient index from a TOML config",
                              description="Build (or resume) the gradient index a TOML config describes.")
    p.add_argument("config", help="build config (TOML); paths inside are relative to it")
    p.add_argument("--workdir", help=wd_help)
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
    q.add_argument("--workdir", help=wd_help)
    q.add_argument("--lowest", action="store_true", help="the least self-influential (most typical) instead")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=_cmd_self_influence)
