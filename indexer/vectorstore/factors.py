"""Exact gradient factors on disk, for re-ranking a projected index with exact scores.

With ``index.exact_rerank = true`` the build keeps, next to the projected vectors, every training
example's *exact* per-layer gradient in the compact form :class:`explainers.GradientSimilarity`
keeps in memory (``precompute_grads``): a Linear layer applied once as its factors (input
activations ``a``, output gradients ``d``: the gradient is ``d aᵀ``), a layer applied at L positions
as its L factor pairs where that is smaller than the gradient, an embedding as its token ids and
output gradients, every other layer as its gradient row, plus the exact squared norm ‖g‖². The
digits CNN needs 10,636 numbers per example this way instead of its 412,778 parameters.

A query's own exact factors come from the same gradient pass that projects it, and the two-stage
store (:mod:`indexer.vectorstore.twostage`) re-scores its candidates with the exact kernel value
⟨g_q, g_t⟩ (scaled as :mod:`indexer.kernels` says: cosine by the exact norms, asymmetric dot by
‖g_t‖² + 1e-7), vectorized over the candidates: one GEMM for the rows, "ghost" products
(a_q·a_t)(d_q·d_t) for the factors. The projection then only chooses candidates; every returned
score is the exact score of the unprojected gradients.

On disk (the index version's directory): ``factors.bin``, one fixed-size record per example in
the order of ``vectors.f32`` (a numpy structured dtype: ``sq`` float64, ``full`` the gradient rows,
``a<i>``/``d<i>`` the factors of factored block i), and ``factors.json`` (the record's fields,
count, kernel) written last. Queries read just the candidates' records with ``pread`` (one call per
record), so the file is never resident. Builds write each chunk's records into the chunk's shard
(so a killed build resumes from its committed chunks like the rest) and stream the shards into
``factors.bin`` at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explainers.similarity import _GradStore, _Layout
from indexer.errors import FailedPrecondition, InvalidArgument
from indexer.kernels import query_scale, train_scale

FACTORS_FILE = "factors.json"
RECORDS_FILE = "factors.bin"


def layout_of_dtype(dtype: np.dtype) -> _Layout:
    """The layout records of ``dtype`` hold (the gradient rows first, then the factored blocks in order:
    the order of the factored blocks is all that scoring needs)."""
    names = dtype.names or ()
    width = int(dtype["full"].shape[0]) if "full" in names else 0
    kinds, dims = (["full"] if width else []), []
    i = 0
    while f"d{i}" in names:
        a, d = dtype[f"a{i}"], dtype[f"d{i}"]
        L, dd = d.shape
        index = a.base.kind == "i"
        kinds.append("index" if index else "outer")
        dims.append((int(L), 0 if index else int(a.shape[1]), int(dd)))
        i += 1
    return _Layout(kinds, width, dims)


def _dtype_to_json(dtype: np.dtype) -> list[list[Any]]:
    return [[n, dtype[n].base.str, list(dtype[n].shape)] for n in dtype.names]


def _dtype_from_json(fields: list[list[Any]]) -> np.dtype:
    return np.dtype([(n, t, tuple(s)) if s else (n, t) for n, t, s in fields])


def record_dtype(layout: _Layout, dtype: Any) -> np.dtype:
    """The structured dtype of one example's record: ``sq`` (float64), ``full``, then ``a<i>``/``d<i>``."""
    dt = np.dtype(dtype)
    fields: list[tuple[Any, ...]] = [("sq", "<f8")]
    if layout.full_width:
        fields.append(("full", dt.str, (layout.full_width,)))
    for i, ((L, da, dd), kind) in enumerate(zip(layout.factor_dims, [k for k in layout.kinds if k != "full"])):
        fields.append((f"a{i}", "<i8", (L,)) if kind == "index" else (f"a{i}", dt.str, (L, da)))
        fields.append((f"d{i}", dt.str, (L, dd)))
    return np.dtype(fields)


def to_records(store: _GradStore) -> np.ndarray:
    """The records (n,) of a compact gradient store."""
    n = len(store.sq)
    rec = np.empty(n, dtype=record_dtype(store.layout, store.D[0].dtype if store.D else store.full.dtype))
    rec["sq"] = store.sq
    if store.layout.full_width:
        rec["full"] = store.full
    for i, (A, D) in enumerate(zip(store.A, store.D)):
        rec[f"a{i}"], rec[f"d{i}"] = A, D
    return rec


def from_records(layout: _Layout, rec: np.ndarray) -> _GradStore:
    """A compact gradient store over records (contiguous copies of the fields: the GEMMs want them)."""
    nf = len(layout.factor_dims)
    full = np.ascontiguousarray(rec["full"]) if layout.full_width else np.zeros((len(rec), 0), np.float32)
    return _GradStore.from_arrays(layout, full, [np.ascontiguousarray(rec[f"a{i}"]) for i in range(nf)],
                                  [np.ascontiguousarray(rec[f"d{i}"]) for i in range(nf)],
                                  np.ascontiguousarray(rec["sq"], dtype=np.float64))


class FactorSink:
    """Collects the exact compact gradients of the chunks of blocks an engine yields (one pass).

    :class:`indexer.embedder.Embedder` hands every list of blocks to :meth:`put` before projecting it;
    :meth:`records` returns the records of all examples seen, in order.
    """

    def __init__(self) -> None:
        self.layout: _Layout | None = None
        self._parts: list[np.ndarray] = []

    def put(self, blocks: Sequence[Any]) -> None:
        layout = _Layout.of(list(blocks))
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise InvalidArgument("the gradient blocks changed shape between chunks: inputs must have the "
                                  "training data's shape.")
        arr = blocks[0].full if blocks[0].kind == "full" else blocks[0].d
        dtype = np.float64 if arr.dtype == np.float64 else np.float32
        store = _GradStore(layout, blocks[0].n, dtype)
        store.put(0, list(blocks))
        self._parts.append(to_records(store))

    def records(self) -> np.ndarray:
        if not self._parts:
            raise InvalidArgument("no examples were embedded.")
        return self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)


@dataclass
class ExactQueries:
    """The exact compact gradients of m queries (records) and the sign each query row is searched
    with (+1, or −1 for least-similar searches, which search with −q)."""

    records: np.ndarray
    sign: np.ndarray

    @classmethod
    def of(cls, records: np.ndarray) -> "ExactQueries":
        return cls(records, np.ones(len(records), np.float64))

    def __len__(self) -> int:
        return len(self.records)

    def negated(self) -> "ExactQueries":
        return ExactQueries(self.records, -self.sign)

    def rows(self, a: int, b: int) -> "ExactQueries":
        return ExactQueries(self.records[a:b], self.sign[a:b])

    def rows_at(self, idx: np.ndarray) -> "ExactQueries":
        return ExactQueries(self.records[idx], self.sign[idx])

    @staticmethod
    def concat(parts: Sequence["ExactQueries"]) -> "ExactQueries":
        if len(parts) == 1:
            return parts[0]
        return ExactQueries(np.concatenate([p.records for p in parts]), np.concatenate([p.sign for p in parts]))


def exact_scores(q: np.ndarray, t: np.ndarray, kernel: str) -> np.ndarray:
    """Exact kernel values (m, n) float64 between query records ``q`` and training records ``t``."""
    layout = layout_of_dtype(t.dtype)
    Sq, St = from_records(layout, q), from_records(layout, t)
    dots = Sq.dots(St)
    return dots * query_scale(Sq.sq, kernel)[:, None] * train_scale(St.sq, kernel)[None, :]


class FactorWriter:
    """Streams records into ``factors.bin`` (temporary name until :meth:`finish`)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self._tmp = self.dir / f".{RECORDS_FILE}.tmp-{os.getpid()}"
        self._fh = open(self._tmp, "wb")
        self.dtype: np.dtype | None = None
        self.count = 0

    def add(self, rec: np.ndarray) -> None:
        if self.dtype is None:
            self.dtype = rec.dtype
        elif rec.dtype != self.dtype:
            raise FailedPrecondition("the chunks' gradient factors have different layouts: rebuild with --replace.")
        self._fh.write(np.ascontiguousarray(rec).tobytes())
        self.count += len(rec)

    def finish(self, kernel: str, ids: np.ndarray) -> None:
        """Make the records durable and write ``factors.json`` last."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if self.count != len(ids):
            raise FailedPrecondition(f"{self.count} factor records for {len(ids)} stored vectors: rebuild with "
                                     "--replace.")
        os.replace(self._tmp, self.dir / RECORDS_FILE)
        if self.dtype is None:
            raise FailedPrecondition("no gradient factors were written (an empty index).")
        meta = {"count": self.count, "kernel": kernel, "record_bytes": int(self.dtype.itemsize),
                "fields": _dtype_to_json(self.dtype)}
        tmp = self.dir / f".{FACTORS_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.dir / FACTORS_FILE)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


def write_factors(directory: str | os.PathLike, shards: Callable[[], Iterable[np.ndarray]], kernel: str,
                  ids: np.ndarray) -> None:
    """Stream the build shards' records into the factor store of ``directory`` (one shard in memory)."""
    w = FactorWriter(directory)
    try:
        for rec in shards():
            w.add(rec)
        w.finish(kernel, ids)
    except BaseException:
        w.abort()
        raise


class FactorStore:
    """Reads candidates' records with ``pread`` and scores them exactly against query records."""

    def __init__(self, directory: str | os.PathLike, n: int) -> None:
        self.dir = Path(directory)
        meta = json.loads((self.dir / FACTORS_FILE).read_text())
        self.dtype = _dtype_from_json(meta["fields"])
        self.layout = layout_of_dtype(self.dtype)
        self.n = int(meta["count"])
        if self.n != n:
            raise FailedPrecondition(f"{self.dir / RECORDS_FILE} holds {self.n} examples, the store {n}: rebuild the "
                                     "index with --replace.")
        path = self.dir / RECORDS_FILE
        if path.stat().st_size != self.n * self.dtype.itemsize:
            raise FailedPrecondition(f"{path} has {path.stat().st_size} bytes, expected {self.n} records of "
                                     f"{self.dtype.itemsize}: rebuild the index with --replace.")
        self._fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)

    @property
    def record_bytes(self) -> int:
        return int(self.dtype.itemsize)

    def read(self, pos: np.ndarray) -> np.ndarray:
        """Records at positions ``pos`` (one ``pread`` each; from the page cache or disk)."""
        size = self.dtype.itemsize
        out = np.empty(len(pos), dtype=self.dtype)
        buf = memoryview(out.view(np.uint8)).cast("B") if len(pos) else None
        for j, p in enumerate(np.asarray(pos).tolist()):
            if os.preadv(self._fd, [buf[j * size:(j + 1) * size]], int(p) * size) != size:
                raise FailedPrecondition(f"{self.dir / RECORDS_FILE} is shorter than its {self.n} records: rebuild "
                                         "the index with --replace.")
        return out

    def check_queries(self, q: ExactQueries) -> None:
        if q.records.dtype != self.dtype:
            raise InvalidArgument("the query's gradient factors do not match the index's layout (the model's "
                                  "input shape or parameters differ from the build's).")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


__all__ = ["FactorSink", "FactorStore", "FactorWriter", "ExactQueries", "exact_scores", "write_factors",
           "record_dtype", "to_records", "from_records", "layout_of_dtype",
           "FACTORS_FILE", "RECORDS_FILE"]
