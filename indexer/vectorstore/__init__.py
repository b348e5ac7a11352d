"""Vector stores behind one interface: two-stage FAISS (compressed candidates + exact re-scoring) and Milvus.

The exact flat FAISS index and the single-stage approximate kinds stay in :mod:`indexer.store`.
This package serves the index configs that ask for more (``index.factory``, ``index.rerank`` or
``index.backend = "milvus"``; :func:`handles` says which). The build pipeline and the query API
reach it through two calls:

* :func:`build_store` — at the end of a build, stream the committed shards into the store
  (two-stage files, or a Milvus collection in batches, resumable), measure recall@10 against brute
  force over the shards, and return the catalog path (``indexes/<name>/v<version>/store.json``);
* :func:`open_store` — open that path for queries (same ``search`` / ``vectors`` / ``ntotal`` as
  :class:`indexer.store.VectorStore`).

:func:`build_lock` serializes builds of one index name across processes (a clear error instead of
two builds racing on the same catalog rows and files).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import FailedPrecondition
from indexer.store import IndexSpec
from indexer.vectorstore.base import SearchBackend, ShardSource, exact_topk, max_norm, sample_rows
from indexer.build_lock import BuildLocked, build_lock
from indexer.vectorstore.factors import ExactQueries, FactorSink, write_factors
from indexer.vectorstore.twostage import TwoStageStore, TwoStageWriter


def handles(spec: IndexSpec | dict[str, Any]) -> bool:
    """Whether an index spec is built and served by this package (not by :class:`indexer.store.VectorStore`)."""
    if isinstance(spec, dict):
        spec = IndexSpec.from_dict(spec)
    return spec.backend == "milvus" or spec.kind == "factory" or spec.rerank > 0


def build_store(spec: IndexSpec, kernel: str, dim: int, n: int, shards: ShardSource, workdir: str | os.PathLike,
                name: str, version: int, recall_sample: int = 200,
                progress: bool = False, factor_shards: Any = None) -> tuple[str, float | None, IndexSpec]:
    """Build the store an index version's spec asks for from the build's shards.

    Returns (path of ``store.json`` relative to ``workdir``, recall@10 of the served search against
    brute force on a seeded sample of stored rows, the spec with what the build measured/set:
    ``max_norm``, ``nlist``, ``recall_stage1``, ``recall_least``). Memory: one shard, the training sample and the
    candidate index's codes (two-stage), one batch (Milvus). ``factor_shards`` (``index.exact_rerank``): a
    callable iterating the shards' exact gradient factor records, written next to the vectors.
    """
    workdir = Path(workdir).resolve()
    rel = Path("indexes") / name / f"v{version}"
    directory = workdir / rel
    spec = IndexSpec.from_dict(spec.to_dict())
    Q = None
    if recall_sample > 0 and n > 0:
        Q, _ = sample_rows(shards, n, recall_sample, seed=0)
    if spec.backend == "milvus":
        from indexer.vectorstore.milvus import MilvusStore, write_collection

        path = write_collection(spec, kernel, dim, n, shards, workdir, directory, name, version, progress)
        store: Any = MilvusStore(directory, spec, kernel, dim, workdir)
    else:
        if spec.augmented(kernel):
            spec.max_norm = max_norm(shards)
        shutil.rmtree(directory, ignore_errors=True)  # a killed earlier attempt: start the files over
        w = TwoStageWriter(directory, spec, kernel, dim, n)
        try:
            if w.needs_training:
                sample, _ = sample_rows(shards, n, w.train_size(), seed=1)
                w.train(sample)
                del sample
            for V, ids in shards():
                w.add(V, ids)
            path = w.finish()
            if spec.exact_rerank:
                if factor_shards is None:
                    raise FailedPrecondition("index.exact_rerank needs the build's gradient factors.")
                write_factors(directory, factor_shards, kernel, np.load(directory / "ids.npy"))
        except BaseException:
            w.abort()
            raise
        store = TwoStageStore(directory, spec, kernel, dim)
    recall = None
    try:
        if Q is not None:
            k, m = min(10, n), len(Q)
            _, I_both = exact_topk(shards, np.concatenate([Q, -Q]), k)  # "least similar" searches with -q
            I_true, I_least = I_both[:m], I_both[m:]
            from indexer.store import recall_at_k

            recall = recall_at_k(store.search(Q, k)[1], I_true, k)
            spec.recall_least = recall_at_k(store.search(-Q, k)[1], I_least, k)
            if isinstance(store, TwoStageStore):
                P = store.candidates(Q, k)
                stage1_ids = np.where(P >= 0, store.ids[np.maximum(P, 0)], -1)
                spec.recall_stage1 = recall_at_k(stage1_ids, I_true, k)
    finally:
        store.close()
    (directory / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
    return str(rel / path.name), recall, spec


def open_store(path: str | os.PathLike, spec: IndexSpec | dict[str, Any], kernel: str, dim: int,
               workdir: str | os.PathLike | None = None, mmap: bool | None = None) -> SearchBackend:
    """Open the store at ``path`` (a ``store.json``) for queries; ``workdir`` resolves a Lite file URI."""
    if isinstance(spec, dict):
        spec = IndexSpec.from_dict(spec)
    path = Path(path)
    meta = json.loads(path.read_text())
    if meta["backend"] == "milvus":
        from indexer.vectorstore.milvus import MilvusStore

        return MilvusStore(path.parent, spec, kernel, dim, workdir or path.parents[3])
    return TwoStageStore(path.parent, spec, kernel, dim, mmap_index=bool(mmap))


__all__ = ["handles", "build_store", "open_store", "drop_store", "build_lock", "BuildLocked", "TwoStageStore",
           "TwoStageWriter", "ExactQueries", "FactorSink",
           "SearchBackend"]


def drop_store(workdir: str | os.PathLike, path: str | None, spec: dict[str, Any] | None, name: str,
               version: int) -> None:
    """Free what an index version holds outside its directory (its Milvus collection); files are the caller's."""
    if not spec or IndexSpec.from_dict(spec).backend != "milvus":
        return
    from indexer.vectorstore.milvus import collection_name, connect

    client = connect(IndexSpec.from_dict(spec), workdir)
    try:
        coll = collection_name(name, version)
        if client.has_collection(coll):
            client.drop_collection(coll)
    finally:
        client.close()
