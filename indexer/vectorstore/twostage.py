"""Two-stage search with exact answers: candidates from a compressed FAISS index, exact re-scoring.

Stage 1 searches a compact candidate index (any FAISS ``index_factory`` string: ``IVF1024,SQ8``,
``IVF1024,PQ256x8``, ``HNSW32,SQ8``, ``PCA256,IVF256,Flat`` ...) for the ``rerank`` best
candidates. Stage 2 re-scores those candidates exactly, against the full-precision float32
vectors stored in ``vectors.f32`` and *memory-mapped* (only the candidate rows are read; the OS
reads ahead nothing; re-scoring reads the candidate rows with ``pread``, exact scans go through the
map, advised ``MADV_RANDOM``), and returns the exact top-k by exact
score. Every returned score is an exact inner product; what stays approximate is only whether a
true neighbour made it into the candidates, which the build measures (recall@10 of the two-stage
search and of the candidate index alone, against brute force over the build's shards) and records.

Raw inner-product kernels (grad_dot, grad_asym_dot) go through the MIPS-to-L2 augmentation in
stage 1 (IVF/HNSW are built for cosine/L2 and lose recall on raw inner products); stage 2 scores the
raw vectors, so the augmentation never reaches a returned score.

On disk, in the index version's directory: ``store.json`` (what this is), ``candidates.faiss``
(positional ids 0..n-1), ``vectors.f32`` (n × d float32, row i = position i), ``ids.npy`` (catalog
row id of each position). Every file is written under a temporary name, fsynced and renamed.

With ``index.exact_rerank`` the directory also holds each example's exact compact gradient factors
(:mod:`indexer.vectorstore.factors`), and a search given the queries' own exact factors re-scores
its candidates with the exact kernel value of the unprojected gradients instead: the projection
then only chooses the candidates. Without query factors (a search by projected vectors) the store
re-scores against ``vectors.f32`` as above.

Builds stream: :class:`TwoStageWriter` appends each shard's vectors to ``vectors.f32`` and its
codes to the candidate index, so memory holds the candidate index's codes (2 KiB per vector for
SQ8 at d = 2,048; a ``Flat``-storage HNSW holds the full vectors, pick ``HNSW32,SQ8`` at scale) plus
one shard and the training sample.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import FailedPrecondition, InvalidArgument
from indexer.store import ExactSearcher, IndexSpec, atomic_write_index, augment_query, augment_train, fsync_path
from indexer.vectorstore.base import check_query
from indexer.vectorstore.factors import FACTORS_FILE, ExactQueries, FactorStore, exact_scores

STORE_FILE = "store.json"
EXACT_GATHER_ROWS = 16384  # rows gathered from the memory map per exact-scan step (bounded memory)
RESIDENT_BUDGET = 256 << 20  # file-backed resident bytes (over those at open) before the map's pages are dropped
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _faiss():
    import faiss

    return faiss


def candidate_factory(spec: IndexSpec, n: int) -> str:
    """The FAISS factory string of the candidate index (``index.factory``, or the one ``index.faiss`` names)."""
    if spec.kind == "factory":
        return spec.factory
    nlist = spec.nlist or max(1, min(int(4 * np.sqrt(max(n, 1))), max(1, n // 39)))
    spec.nlist = nlist
    return {"ivf": f"IVF{nlist},Flat", "ivf_sq8": f"IVF{nlist},SQ8",
            "ivf_pq": f"IVF{nlist},PQ{spec.pq_m}x{spec.pq_bits}",
            "hnsw": f"HNSW{spec.hnsw_m},Flat"}[spec.kind]


def _inner(index: Any) -> Any:
    """The index under an optional pre-transform (PCA, OPQ ...), downcast to its concrete class."""
    faiss = _faiss()
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return idx


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class TwoStageWriter:
    """Streams a two-stage store into ``directory``: train on a sample, then :meth:`add` shard by shard.

    Nothing appears under the final names until :meth:`finish` (vectors, ids, candidate index, and
    ``store.json`` last), so a reader never sees a half-written store.
    """

    def __init__(self, directory: str | os.PathLike, spec: IndexSpec, kernel: str, dim: int, n: int) -> None:
        faiss = _faiss()
        spec.check_kernel(kernel, dim)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob(".*.tmp-*"):  # leftovers of a killed writer
            p.unlink(missing_ok=True)
        self.spec, self.kernel, self.dim, self.n_hint = spec, kernel, dim, n
        self.augmented = spec.augmented(kernel)
        self.factory = candidate_factory(spec, n)
        d = dim + int(self.augmented)
        metric = faiss.METRIC_L2 if self.augmented else faiss.METRIC_INNER_PRODUCT
        try:
            self.index = faiss.index_factory(d, self.factory, metric)
        except RuntimeError as exc:
            raise InvalidArgument(f"index.factory {self.factory!r} is not a FAISS index_factory string for "
                                  f"d={d}: {str(exc).strip().splitlines()[-1]}") from exc
        inner = _inner(self.index)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efConstruction = spec.ef_construction
        self._vec_tmp = self.dir / f".vectors.f32.tmp-{os.getpid()}"
        self._fh = open(self._vec_tmp, "wb")
        self._ids: list[np.ndarray] = []
        self.count = 0

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    def train_size(self) -> int:
        """Rows to sample for training: ``index.train_sample`` or ~50 per IVF list (at least 20,000)."""
        if self.spec.train_sample:
            return int(self.spec.train_sample)
        ivf = _faiss().try_extract_index_ivf(self.index)
        return max(20_000, 50 * int(ivf.nlist)) if ivf is not None else 20_000

    def _prep(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise InvalidArgument(f"vectors must be (n, {self.dim}), got {X.shape}.")
        return augment_train(X, self.spec.max_norm) if self.augmented else X

    def train(self, sample: np.ndarray) -> None:
        """Train the candidate index's quantizers (IVF centroids, SQ ranges, PQ codebooks, PCA) on a sample."""
        if self.index.is_trained:
            return
        if len(sample) == 0:
            raise FailedPrecondition("cannot train the candidate index on an empty sample.")
        ivf = _faiss().try_extract_index_ivf(self.index)
        if ivf is not None and len(sample) < ivf.nlist:
            raise InvalidArgument(f"index {self.factory!r} has {ivf.nlist} lists but only {len(sample)} training rows: "
                                  "use fewer lists (e.g. IVF{max(1, len(sample) // 39)}) or more data.")
        self.index.train(self._prep(sample))

    def add(self, X: np.ndarray, ids: np.ndarray) -> None:
        """Append a shard: full-precision rows to ``vectors.f32``, codes to the candidate index."""
        Xp = self._prep(X)
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        self._fh.write(X32.tobytes())
        self.index.add(Xp)  # positional ids: position i is row i of vectors.f32
        self._ids.append(np.asarray(ids, dtype=np.int64))
        self.count += len(X32)

    def finish(self) -> Path:
        """Make the store durable under its final names; returns the path of ``store.json``."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        if len(np.unique(ids)) != len(ids):
            raise InvalidArgument("duplicate ids in the vectors given to the two-stage store.")
        os.replace(self._vec_tmp, self.dir / "vectors.f32")
        _atomic_npy(self.dir / "ids.npy", ids)
        atomic_write_index(self.index, self.dir / "candidates.faiss")
        meta = {"backend": "twostage", "count": self.count, "dim": self.dim, "factory": self.factory,
                "augmented": self.augmented, "max_norm": self.spec.max_norm, "kernel": self.kernel}
        _atomic_bytes(self.dir / STORE_FILE, json.dumps(meta, indent=1).encode())
        fsync_path(self.dir)
        return self.dir / STORE_FILE

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._vec_tmp.unlink(missing_ok=True)


class TwoStageStore:
    """Candidate index in memory (or memory-mapped), full vectors memory-mapped; exact scores."""

    def __init__(self, directory: str | os.PathLike, spec: IndexSpec, kernel: str, dim: int,
                 mmap_index: bool = False) -> None:
        faiss = _faiss()
        self.dir = Path(directory)
        meta = json.loads((self.dir / STORE_FILE).read_text())
        if meta["dim"] != dim:
            raise FailedPrecondition(f"store {self.dir} has dim {meta['dim']}, the catalog says {dim}.")
        self.spec, self.kernel, self.dim = spec, kernel, dim
        self.n = int(meta["count"])
        self.augmented = bool(meta["augmented"])
        self.max_norm = float(meta["max_norm"])
        self.factory = meta["factory"]
        flags = faiss.IO_FLAG_MMAP if mmap_index else 0
        self.index = faiss.read_index(str(self.dir / "candidates.faiss"), flags)
        vec = self.dir / "vectors.f32"
        if vec.stat().st_size != self.n * dim * 4:
            raise FailedPrecondition(f"{vec} has {vec.stat().st_size} bytes, expected {self.n}x{dim} float32: "
                                     "rebuild the index with --replace.")
        self.X = np.memmap(vec, dtype=np.float32, mode="r", shape=(self.n, dim)) if self.n else \
            np.zeros((0, dim), np.float32)
        mm = getattr(self.X, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_RANDOM)  # candidate rows are scattered: no read-ahead into resident memory
        self.ids = np.load(self.dir / "ids.npy")
        self._base_resident = self._file_resident()
        self._fd = os.open(vec, os.O_RDONLY)  # re-scoring reads candidate rows with pread: nothing gets mapped
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._contig = bool(self.n and self.ids[-1] - self.ids[0] == self.n - 1 and np.all(np.diff(self.ids) == 1))
        self._sorter = None if self._contig else np.argsort(self.ids, kind="stable")
        inner = _inner(self.index)
        self._ivf = faiss.try_extract_index_ivf(self.index)
        self._hnsw = hasattr(inner, "hnsw")
        self._pretransform = isinstance(faiss.downcast_index(self.index), faiss.IndexPreTransform)
        self.factors = FactorStore(self.dir, self.n) if (self.dir / FACTORS_FILE).exists() else None

    @property
    def ntotal(self) -> int:
        return self.n

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(full-precision vectors (memory-mapped), ids) in storage order."""
        return self.X, self.ids

    def close(self) -> None:
        if getattr(self, "factors", None) is not None:
            self.factors.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except (AttributeError, OSError):
            pass

    def read_rows(self, pos: np.ndarray) -> np.ndarray:
        """Rows ``pos`` of the full vectors read with ``pread`` (from the page cache or disk), one call per row.

        Mapping the rows instead costs a page fault per row, and a fault can map far more than the
        row (measured ~700 KiB per 8 KiB row here), which at a million rows made re-scoring 300
        candidates take ~7 ms; a pread copies just the row.
        """
        row = self.dim * 4
        out = np.empty((len(pos), self.dim), np.float32)
        buf = memoryview(out).cast("B")
        for j, p in enumerate(pos.tolist()):
            if os.preadv(self._fd, [buf[j * row:(j + 1) * row]], p * row) != row:
                raise FailedPrecondition(f"{self.dir / 'vectors.f32'} is shorter than its {self.n} rows: rebuild "
                                         "the index with --replace.")
        return out

    # ---- helpers ------------------------------------------------------------------------------
    def _gather(self, pos: np.ndarray) -> np.ndarray:
        """Rows ``pos`` (sorted) of the full vectors, copied out of the map; keeps the map's resident share bounded.

        Pages read through the map count in this process's resident set until dropped; once the
        process's file-backed resident memory has grown by RESIDENT_BUDGET they are released with
        MADV_DONTNEED (they stay in the page cache, a later read is a minor fault), so serving never
        makes the whole file resident.
        """
        out = np.asarray(self.X[pos])
        # A fault can map far more than the row it reads (fault-around, large page-cache folios: measured
        # ~700 KiB per 8 KiB row on this kernel), so the resident share is read back from the kernel.
        if self._file_resident() - self._base_resident > RESIDENT_BUDGET:
            mm = getattr(self.X, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)
        return out

    @staticmethod
    def _file_resident() -> int:
        """File-backed resident bytes of this process (``shared`` of /proc/self/statm; 0 where unavailable)."""
        try:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[2]) * _PAGE
        except (OSError, IndexError, ValueError):
            return 0

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Storage positions of the given ids (unknown ids are dropped)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if self.n == 0:
            return np.zeros(0, np.int64)
        if self._contig:
            p = ids - self.ids[0]
            return np.unique(p[(p >= 0) & (p < self.n)])
        j = np.searchsorted(self.ids, ids, sorter=self._sorter)
        j = np.clip(j, 0, self.n - 1)
        pos = self._sorter[j]
        return np.unique(pos[self.ids[pos] == ids])

    def _params(self, R: int, nprobe: int | None, ef_search: int | None, sel: Any) -> Any:
        faiss = _faiss()
        if self._ivf is not None:
            p = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe or self.spec.nprobe)) if sel is not None else \
                faiss.SearchParametersIVF(nprobe=int(nprobe or self.spec.nprobe))
        elif self._hnsw:
            p = faiss.SearchParametersHNSW(efSearch=int(max(ef_search or self.spec.ef_search, R)))
            if sel is not None:
                p.sel = sel
        else:
            p = faiss.SearchParameters(sel=sel) if sel is not None else None
        if self._pretransform and p is not None:
            p = faiss.SearchParametersPreTransform(index_params=p)
            p._keep = p.index_params  # the wrapper does not own its inner parameters
        return p

    def candidates(self, Q: np.ndarray, R: int, nprobe: int | None = None, ef_search: int | None = None,
                   allowed_pos: np.ndarray | None = None) -> np.ndarray:
        """Stage 1: (m, R) candidate positions (-1 = none), best first by the candidate index's own score."""
        faiss = _faiss()
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_pos, dtype=np.int64)) if allowed_pos is not None \
            else None
        Qs = augment_query(Q) if self.augmented else Q
        _, P = self.index.search(Qs, int(min(R, max(self.n, 1))), params=self._params(R, nprobe, ef_search, sel))
        return P

    def _rescore(self, Q: np.ndarray, P: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2: exact inner products of each query with its candidates' stored vectors; exact top-k."""
        return self._top_k_of_candidates(P, k, lambda i, pos: self.read_rows(pos) @ Q[i])

    def _rescore_exact(self, E: ExactQueries, P: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2 with exact gradients: each query's exact factors against its candidates' stored factors,
        the exact kernel value (times the query row's sign: −1 for least-similar searches); exact top-k."""
        return self._top_k_of_candidates(
            P, k, lambda i, pos: exact_scores(E.records[i:i + 1], self.factors.read(pos), self.kernel)[0] * E.sign[i])

    def _top_k_of_candidates(self, P: np.ndarray, k: int, score: Any) -> tuple[np.ndarray, np.ndarray]:
        """Each query's exact top-k among its candidate storage positions ``P[i]`` (-1: none), scored by
        ``score(i, positions)``; ties broken by id, so the answer does not depend on candidate order."""
        m = len(P)
        S_out = np.full((m, k), -np.inf, dtype=np.float32)
        I_out = np.full((m, k), -1, dtype=np.int64)
        for i in range(m):
            pos = np.unique(P[i][P[i] >= 0])  # sorted: the reads go forward through the file
            if not len(pos):
                continue
            s = score(i, pos)
            kk = min(k, len(pos))
            top = np.argpartition(-s, kk - 1)[:kk] if len(pos) > kk else np.arange(len(pos))
            ids, sc = self.ids[pos[top]], s[top]
            order = np.lexsort((ids, -sc))
            S_out[i, :kk], I_out[i, :kk] = sc[order], ids[order]
        return S_out, I_out

    def _positions_of(self, I: np.ndarray) -> np.ndarray:
        """Storage positions (m, r) of result ids (m, r); -1 stays -1."""
        P = np.full(I.shape, -1, np.int64)
        ok = I >= 0
        if self._contig:
            P[ok] = I[ok] - self.ids[0]
        elif ok.any():
            P[ok] = self._sorter[np.searchsorted(self.ids, I[ok], sorter=self._sorter)]
        return P

    def exact_over(self, Q: np.ndarray, k: int, pos: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the given positions (all when None), gathered in bounded steps from the map."""
        best_s = np.full((len(Q), 0), -np.inf, np.float32)
        best_i = np.zeros((len(Q), 0), np.int64)
        total = self.n if pos is None else len(pos)
        for s in range(0, total, EXACT_GATHER_ROWS):
            sel = np.arange(s, min(total, s + EXACT_GATHER_ROWS)) if pos is None else pos[s:s + EXACT_GATHER_ROWS]
            Xc = self._gather(sel)
            s_, i_ = ExactSearcher(Xc, self.ids[sel]).search(Q, k)
            best_s, best_i = np.hstack([best_s, s_]), np.hstack([best_i, i_])
            order = np.lexsort((best_i, -best_s), axis=1)[:, :k] if best_s.shape[1] > k else \
                np.lexsort((best_i, -best_s), axis=1)
            best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        S_out = np.full((len(Q), k), -np.inf, dtype=np.float32)
        I_out = np.full((len(Q), k), -1, dtype=np.int64)
        S_out[:, :best_s.shape[1]], I_out[:, :best_i.shape[1]] = best_s, best_i
        I_out[~np.isfinite(S_out)] = -1
        return S_out, I_out

    # ---- search -------------------------------------------------------------------------------
    def search(self, Q: np.ndarray, k: int, allowed_ids: np.ndarray | None = None, use_faiss: bool | None = None,
               nprobe: int | None = None, ef_search: int | None = None,
               rerank: int | None = None, exact: ExactQueries | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k exact inner products (m, k) and ids (m, k) of the best of ``rerank`` candidates.

        ``rerank`` (default: the index's) candidates come from the candidate index and are re-scored
        exactly; 0 re-scores just the k it returns (scores exact, ranking the candidate index's).
        ``allowed_ids`` (filters): small allowed sets are scanned exactly; large ones filter stage 1,
        and a query left with fewer than k candidates falls back to the exact scan of the allowed rows.
        ``use_faiss`` is accepted for interface compatibility (this store always searches two-stage).
        ``exact``: the queries' exact gradient factors (one per row of Q, with the row's sign); the
        candidates are then re-scored with the exact kernel values of the unprojected gradients, which
        needs a store built with ``index.exact_rerank`` (else FailedPrecondition). Filtered searches
        take the candidates from the exact scan of the allowed projected rows in that case.
        """
        Q, k = check_query(Q, k, self.dim)
        R = max(int(self.spec.rerank if rerank is None else rerank), k)
        if R <= 0:
            raise InvalidArgument(f"rerank must be >= 0, got {rerank!r}.")
        if exact is not None:
            if self.factors is None:
                raise FailedPrecondition("this index keeps no exact gradient factors: rebuild it with "
                                         "index.exact_rerank = true, or search without exact factors.")
            if len(exact) != len(Q):
                raise InvalidArgument(f"{len(exact)} exact query gradients for {len(Q)} query vectors.")
            self.factors.check_queries(exact)
        allowed_pos = None
        if allowed_ids is not None:
            allowed_pos = self.positions(allowed_ids)
            if len(allowed_pos) <= max(4 * R, self.n // 64):  # few rows: exact scan is cheaper than stage 1
                if exact is None:
                    return self.exact_over(Q, k, allowed_pos)
                return self._rescore_exact(exact, self._positions_of(self.exact_over(Q, R, allowed_pos)[1]), k)
        P = self.candidates(Q, R, nprobe, ef_search, allowed_pos)
        S, I = self._rescore(Q, P, k) if exact is None else self._rescore_exact(exact, P, k)
        if allowed_pos is not None:
            short = np.flatnonzero((I >= 0).sum(1) < min(k, len(allowed_pos)))
            if len(short):  # the filter left too few candidates: answer those queries exactly
                if exact is None:
                    S[short], I[short] = self.exact_over(Q[short], k, allowed_pos)
                else:
                    P2 = self._positions_of(self.exact_over(Q[short], R, allowed_pos)[1])
                    S[short], I[short] = self._rescore_exact(exact.rows_at(short), P2, k)
        return S, I


__all__ = ["TwoStageWriter", "TwoStageStore", "candidate_factory", "STORE_FILE"]
