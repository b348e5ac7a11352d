"""The defaults and limits of the indexer, each defined here once and read everywhere else.

Why one module: a default written in two places drifts (a config default of 256 and an engine
default of 128 silently disagree), and a limit checked in three layers with three values refuses
requests the outer layer allowed. Kernels are owned by :mod:`indexer.kernels` (``KERNELS``),
projection kinds by :mod:`indexer.projection`, the server's own limits by ``server.config``.
"""

from __future__ import annotations

#: What a model predicts; decides how a query's missing targets are filled in (classification:
#: the model's predicted class; regression needs targets; unsupervised has none).
TASKS: tuple[str, ...] = ("classification", "regression", "unsupervised")

#: Examples per build chunk (one shard file, one catalog transaction) and per engine call.
CHUNK_SIZE: int = 256

#: Default largest k of an in-process search (``open_index(max_k=...)`` raises it; the server
#: passes its own ``max_k`` so that its limit is the only one a client meets).
MAX_K: int = 10_000

#: Largest number of query examples one in-process ``embed``/``find_similar`` call accepts.
MAX_QUERIES: int = 10_000

#: Rows sampled to measure an index's recall@10 at the end of a build.
RECALL_SAMPLE: int = 200

# Projection of a Hugging Face text model's index when the config has no [projection] table: chosen
# by benchmarks/bench_text.py (TensorSketch met the fidelity and build-speed targets at k = 2,048 on
# the text classifier; the factored/LoGra form was more faithful but 6x slower to build).
TEXT_PROJECTION: dict = {"kind": "sketch", "dim": 2048}

__all__ = ["TEXT_PROJECTION", "TASKS", "CHUNK_SIZE", "MAX_K", "MAX_QUERIES", "RECALL_SAMPLE"]
