"""The `gradindex` command line: one entry point, subcommands contributed by each package.

Each package owns its subcommands (``indexer.cli`` for ``build`` and ``self-influence``,
``server.commands`` for ``serve``, ``query`` and ``demo``); this module only assembles them, so
that adding a command never means editing another package's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that expose ``register(subparsers) -> None``; each sets ``func`` on its parsers.
COMMAND_MODULES = ("indexer.cli", "indexer.diagnostics_cli", "server.commands")


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(prog="gradindex", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
