"""The ``gradindex`` command line: one entry point and the server package's subcommands.

    gradindex serve --config server.toml
    gradindex serve --demo --port 50051 [--workdir runs/digits]
    gradindex query --target 127.0.0.1:50051 --index digits --input queries.npy --k 5
    gradindex demo [--workdir runs/digits] [--out runs/digits/similar.png]

The indexer's subcommands (``build``, ``self-influence``, ``proponents``) live in ``indexer.cli``;
:func:`build_parser` registers both packages' subcommands, listed in the code, not discovered.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from indexer import cli as indexer_cli

DEFAULT_DEMO_WORKDIR = "runs/digits"


def _serve(args: argparse.Namespace) -> int:
    """``gradindex serve``; a config or startup error is one line on stderr and exit status 2."""
    from indexer.errors import FailedPrecondition, InvalidArgument, NotFound

    try:
        return _serve_inner(args)
    except (ValueError, OSError, InvalidArgument, NotFound, FailedPrecondition, RuntimeError) as exc:
        print(f"gradindex serve: error: {exc}", file=sys.stderr, flush=True)
        return 2


def _serve_inner(args: argparse.Namespace) -> int:
    from server.app import GradIndexServer
    from server.config import ServerConfig

    if args.config and args.demo:
        raise SystemExit("gradindex serve: use either --config or --demo, not both")
    if args.config:
        cfg = ServerConfig.from_toml(args.config)
    elif args.demo:
        from server.demo import DEMO_LIMIT, ensure_digits_index

        workdir = args.workdir or DEFAULT_DEMO_WORKDIR
        name = ensure_digits_index(workdir, limit=DEMO_LIMIT)
        cfg = ServerConfig(workdir=workdir, indexes=[name], max_k=5000)
    else:
        raise SystemExit("gradindex serve: pass --config server.toml, or --demo to serve the digits example")
    # Command-line flags override the file.
    if args.port is not None:
        cfg.port = args.port
    if args.host is not None:
        cfg.host = args.host
    token = args.token or os.environ.get("GRADINDEX_TOKEN")
    if token:
        cfg.token = token
    if args.metrics_port is not None:
        cfg.metrics_port = args.metrics_port
    if args.reflection:
        cfg.reflection = True
    server = GradIndexServer(cfg).start()
    print(f"gradindex: serving {[s.name for s in server.registry.all()]} on {cfg.host}:{server.port}"
          + (f", metrics on :{server.metrics_port}" if server.metrics_port else ""), flush=True)
    server.serve_forever()
    return 0


def _query(args: argparse.Namespace) -> int:
    import numpy as np

    from server.client import GradIndexClient

    token = args.token or os.environ.get("GRADINDEX_TOKEN")
    with GradIndexClient(args.target, token=token, tls=args.tls, tls_root_cert=args.ca, timeout=args.timeout) as c:
        if args.list or not args.index:
            for info in c.list_indexes():
                print(f"{info.name}\tmodel={info.model}\tkernel={info.kernel}\tcount={info.count}\tdim={info.dim}")
            return 0
        if args.completion and not args.text:
            print("--completion needs --text (the prompt)")
            return 2
        if args.text:
            res = c.find_similar(args.index, texts=args.text, completions=args.completion or None, k=args.k,
                                 direction=args.direction, include_data=True)
            n = len(args.text)
        else:
            if args.input:
                X = np.load(args.input)
            else:  # a few shipped digits, so the command works out of the box against the demo server
                from indexer.demo import load_digits_28

                X = load_digits_28()[0][-args.n:]
            res = c.find_similar(args.index, X, k=args.k, direction=args.direction)
            n = len(X)
        for q in range(n):
            tgt = "" if res.targets is None else f" (target {res.targets[q]})"
            head = f" {args.text[q]!r}" + (f" -> {args.completion[q]!r}" if args.completion else "") if args.text else ""
            print(f"query {q}{head}{tgt}:")
            for name, hits in (("most similar", res.most), ("least similar", res.least)):
                if hits is None:
                    continue
                print(f"  {name}:")
                texts = hits.texts[q] + [""] * len(hits.ids[q])
                for s, i, lab, ext, text in zip(hits.scores[q], hits.ids[q], hits.labels[q], hits.external_ids[q],
                                                texts):
                    if i >= 0:
                        print(f"    id={i:<6d} label={lab:<3d} score={s: .6g} {ext} {text!r}" if text else
                              f"    id={i:<6d} label={lab:<3d} score={s: .6g} {ext}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    run_demo(workdir=args.workdir, out=args.out, n_queries=args.n, k=args.k, port=args.port, seed=args.seed)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the server package's ``serve``, ``query`` and ``demo`` to the ``gradindex`` parser."""
    p = subparsers.add_parser("serve", help="run the gRPC similarity service")
    p.add_argument("--config", help="server config (TOML: workdir, indexes, port, auth, limits)")
    p.add_argument("--demo", action="store_true", help="serve the digits example, building its index if absent")
    p.add_argument("--workdir", help=f"with --demo: where the catalog and index live (default {DEFAULT_DEMO_WORKDIR})")
    p.add_argument("--host", help="bind address (default from config, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (0 = any free port)")
    p.add_argument("--token", help="bearer token clients must send (or env GRADINDEX_TOKEN); default: no auth")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    p.set_defaults(func=_serve)

    q = subparsers.add_parser("query", help="query a running server for the most similar training examples")
    q.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    q.add_argument("--index", help="index to query (omit, or --list, to list indexes)")
    q.add_argument("--list", action="store_true", help="list the served indexes")
    q.add_argument("--input", help=".npy file with a batch of query examples (default: shipped digits)")
    q.add_argument("--n", type=int, default=3, help="without --input: how many shipped digits to query")
    q.add_argument("--text", action="append", help="a raw text query (repeatable), tokenized by the server with the "
                                                   "model's own tokenizer")
    q.add_argument("--completion", action="append", help="causal LM: the completion of each --text prompt "
                                                         "(only its tokens count)")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--direction", choices=("most", "least", "both"), default="most")
    q.add_argument("--token", help="bearer token (or env GRADINDEX_TOKEN)")
    q.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca)")
    q.add_argument("--ca", help="PEM file of the CA that signed the server's certificate")
    q.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    q.set_defaults(func=_query)

    d = subparsers.add_parser("demo", help="build the digits index, serve it, query it and plot the answers")
    d.add_argument("--workdir", default=DEFAULT_DEMO_WORKDIR)
    d.add_argument("--out", help="PNG path (default <workdir>/similar.png)")
    d.add_argument("--n", type=int, default=5, help="number of query images")
    d.add_argument("--k", type=int, default=5, help="most similar training images per query")
    d.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    d.add_argument("--seed", type=int, default=0, help="which held-out digits to query")
    d.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="gradindex", description="Gradient-similarity indexes of training "
                                     "data: build them, rank by influence, serve them over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    indexer_cli.register(sub)
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
