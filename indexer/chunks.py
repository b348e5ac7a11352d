"""One build chunk: compute it (embed + write its shard), commit it (catalog), show progress.

The data is split into fixed chunks (``build.chunk_size``). Each chunk's vectors and metadata
are written to a shard file under ``<workdir>/builds/<build id>/`` (temporary name, fsync,
rename), then committed to the catalog in one transaction (chunk row + example rows + progress).
:func:`compute_chunk` is a pure function of the chunk's data, which is what makes a resumed or a
Ray-computed build equal to an uninterrupted local one. Both :mod:`indexer.build` (local loop)
and :mod:`indexer.ray_build` (actors) use these functions, and neither imports the other's
internals.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, insert

from indexer.catalog import Build, BuildChunk, Catalog, Example
from indexer.data import Batch
from indexer.embedder import Embedder


def set_threads(n: int) -> None:
    """Pin torch, BLAS and OpenMP (FAISS) thread pools to ``n`` threads (0 = leave as is)."""
    if not n:
        return
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass
    import faiss

    faiss.omp_set_num_threads(n)


def shard_path(chunk_dir: Path, c: int) -> Path:
    """Where chunk ``c``'s shard lives."""
    return chunk_dir / f"chunk-{c:07d}.npz"


def write_shard(path: Path, **arrays: Any) -> None:
    """Write a shard atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def compute_chunk(emb: Embedder, batch: Batch, c: int, start: int, chunk_dir: Path) -> Path:
    """Embed one chunk and write its shard (vectors + metadata). Pure function of the chunk's data.

    With ``emb.keep_factors`` (``index.exact_rerank``) the shard also keeps the examples' exact compact
    gradients, from the same gradient pass."""
    sink = None
    if emb.keep_factors:
        from indexer.vectorstore.factors import FactorSink

        sink = FactorSink()
    S, selfinf, gnorm = emb.train_vectors(batch.X, batch.Y, sink=sink)
    extra = {} if sink is None else {"factors": sink.records()}
    n = len(S)
    labels = np.asarray(["" if batch.Y is None else str(v) for v in (batch.Y if batch.Y is not None else [None] * n)])
    path = shard_path(chunk_dir, c)
    write_shard(path, vectors=S, self_influence=selfinf.astype(np.float64), grad_norm=gnorm.astype(np.float64),
                row_ids=np.arange(start, start + n, dtype=np.int64), labels=labels,
                has_labels=np.asarray(batch.Y is not None),
                ids=np.asarray(batch.ids if batch.ids is not None else [str(start + i) for i in range(n)]),
                refs=np.asarray([r or "" for r in (batch.payload_refs or [None] * n)]),
                split=np.asarray(batch.split or ""), source=np.asarray(batch.source or ""), **extra)
    return path


def commit_chunk(cat: Catalog, build_id: int, index_id: int, c: int, path: Path) -> int:
    """Record a written shard in one transaction: chunk row, example rows, progress. Returns its rows.

    Idempotent: a chunk already committed is left alone (a resumed build may recompute it).
    """
    z = np.load(path)
    n = len(z["row_ids"])
    split, source = str(z["split"]) or None, str(z["source"]) or None
    has_labels = bool(z["has_labels"])
    rows = [{"index_id": index_id, "row_id": int(r), "external_id": str(e), "label": str(lb) if has_labels else None,
             "split": split, "source": source, "payload_ref": str(ref) or None, "grad_norm": float(g),
             "self_influence": float(si)}
            for r, e, lb, ref, g, si in zip(z["row_ids"], z["ids"], z["labels"], z["refs"], z["grad_norm"],
                                            z["self_influence"])]
    with cat.session() as s, s.begin():
        if s.get(BuildChunk, (build_id, c)) is not None:
            return n
        s.execute(delete(Example).where(Example.index_id == index_id, Example.row_id.in_([r["row_id"] for r in rows])))
        if rows:
            s.execute(insert(Example), rows)
        s.add(BuildChunk(build_id=build_id, chunk=c, rows=n, file=path.name))
        b = s.get(Build, build_id)
        b.rows_done = (b.rows_done or 0) + n
    return n


def iter_shards(chunk_dir: Path, chunks: Sequence[int]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(vectors, row ids) of each committed shard, in chunk order."""
    for c in chunks:
        z = np.load(shard_path(chunk_dir, c))
        yield z["vectors"], z["row_ids"]


def iter_factor_shards(chunk_dir: Path, chunks: Sequence[int]) -> Iterable[np.ndarray]:
    """The exact gradient factor records of each committed shard (``index.exact_rerank``), in chunk order;
    a clear error for a shard computed without them."""
    from indexer.errors import FailedPrecondition

    for c in chunks:
        z = np.load(shard_path(chunk_dir, c))
        if "factors" not in z.files:
            raise FailedPrecondition(f"chunk {c} of the build has no exact gradient factors (computed without "
                                     "index.exact_rerank): rebuild with --replace.")
        yield z["factors"]


def progress(total: int | None, initial: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar counting examples (``enabled=False``: a silent one)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="ex", desc=desc, disable=not enabled, smoothing=0.1)


__all__ = ["set_threads", "shard_path", "write_shard", "compute_chunk", "commit_chunk", "iter_shards", "iter_factor_shards",
           "progress"]
