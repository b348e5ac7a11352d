"""Causal-LM example, one command: train a tiny GPT-2 (and its WordLevel tokenizer) on the docstrings of
standard-library modules (they install with Python: nothing is downloaded), index the corpus as
fixed-length token blocks, serve it on 127.0.0.1, and ask "which training blocks support (and which
oppose) this completion?" — the loss of a query is its completion's tokens only, given the prompt.

    python examples/text_lm/run.py [--workdir /tmp/gradindex-lm] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

QUERIES = [("pop and return the smallest item from the", " heap"),
           ("return a new", " dictionary"),
           ("split the string into a list of", " words")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/gradindex-lm")
    ap.add_argument("--quick", action="store_true", help="a smaller corpus and fewer training steps")
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from indexer.build import build_index
    from indexer.text_demo import STDLIB_DOCS, make_lm_dir, python_doc_corpus
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig

    wd = Path(args.workdir)
    mods = STDLIB_DOCS[:8] if args.quick else STDLIB_DOCS
    docs = python_doc_corpus(mods, max_chars=4000 if args.quick else 12000)
    info = make_lm_dir(wd / "model", docs=docs, block_size=32, steps=150 if args.quick else 400, hidden=48, layers=2)
    print(f"trained a GPT-2 (2 layers, hidden 48) on {len(docs)} stdlib docstring documents: {info['blocks']} "
          f"blocks of 32 tokens, final loss {info['loss']:.2f}")
    cfg = {"model": {"name": "pydoc-lm", "hf_dir": info["dir"], "hf_kind": "causal_lm", "text": {"max_length": 32}},
           "data": {"format": "text", "path": info["dir"] + "/corpus", "block_size": 32},
           "index": {"name": "pydoc", "kernel": "grad_cos", "faiss": "flat"},
           "projection": {"kind": "sketch", "dim": 2048}}
    shutil.rmtree(wd / "index", ignore_errors=True)
    r = build_index(cfg, wd / "index")
    print(f"built index {r.name!r}: {r.count} blocks, {r.dim} dims, {r.seconds:.1f} s")
    srv = GradIndexServer(ServerConfig(workdir=str(wd / "index"), indexes=["pydoc"], port=0)).start()
    try:
        c = GradIndexClient(f"127.0.0.1:{srv.port}")
        prompts, comps = [p for p, _ in QUERIES], [q for _, q in QUERIES]
        res = c.find_similar("pydoc", texts=prompts, completions=comps, k=args.k, direction="both",
                             include_data=True)
        for q, (p, comp) in enumerate(QUERIES):
            print(f"\n{p!r} + {comp!r}: which training blocks support this completion?")
            for title, hits in (("support (proponents)", res.most), ("oppose (opponents)", res.least)):
                print(f"  {title}:")
                for s, i, t in zip(hits.scores[q], hits.ids[q], hits.texts[q]):
                    print(f"    {s:+.4f}  block {i:<4d} {t[:110]!r}")
    finally:
        srv.stop(0)


if __name__ == "__main__":
    main()
