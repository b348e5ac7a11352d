"""FAISS storage of gradient vectors: exact flat inner product by default, IVF / HNSW / SQ / PQ as options.

Every kernel is an inner product after scaling (``indexer.kernels``), so the exact index is an
``IDMap2,Flat`` inner-product index with stable ids (the catalog's row ids). Approximate indexes are
built for cosine: on raw inner products (grad_dot, grad_asym_dot) their recall collapses (FAISS
#1496), so for those kernels they either go through the MIPS-to-L2 augmentation (append
√(M² − ‖x‖²), query [q, 0]; nearest in L2 = largest inner product) or are refused.

Exact search is served by :class:`ExactSearcher`, a chunked GEMM plus top-k over the flat index's
own (possibly memory-mapped) vectors: FAISS's ``IndexFlatIP`` reaches the memory bandwidth at batch
1 but stays far below the GEMM peak at batch 64 (measured in ``benchmarks/bench_search.py``); the
GEMM path keeps batched exact search near the peak. Both sit behind :meth:`VectorStore.search`.

Files are written to a temporary name, fsynced and renamed into place, so a crash never leaves a
half-written index at the final path. Large indexes load memory-mapped.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import InvalidArgument

FAISS_KINDS = ("flat", "ivf", "ivf_sq8", "ivf_pq", "hnsw", "factory")
APPROX_KINDS = FAISS_KINDS[1:]
BACKENDS = ("faiss", "milvus")
RAW_IP_KERNELS = ("grad_dot", "grad_asym_dot")
MMAP_THRESHOLD = 256 << 20  # indexes larger than this load memory-mapped


@dataclass
class IndexSpec:
    """FAISS index kind and parameters (recorded in the catalog)."""

    kind: str = "flat"
    nlist: int = 0  # IVF lists; 0 = about 4·√n, capped by the data
    nprobe: int = 16
    pq_m: int = 16  # PQ sub-quantizers (must divide the dimension)
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    mips: str = "augment"  # for grad_dot / grad_asym_dot under approximate kinds: augment | refuse
    max_norm: float = 0.0  # M of the MIPS augmentation, set at build
    # two-stage search and other backends (indexer.vectorstore): see docs/indexer.md
    factory: str = ""  # FAISS index_factory string of the candidate index, e.g. "IVF1024,SQ8"; sets kind "factory"
    rerank: int = 0  # rescore this many candidates exactly against the full-precision vectors (0 = off)
    train_sample: int = 0  # rows sampled (uniformly, seeded) to train IVF/PQ/PCA; 0 = automatic
    backend: str = "faiss"  # faiss (in process) | milvus (pymilvus: Milvus Lite file or cluster URI)
    milvus_uri: str = ""  # "" = Milvus Lite file milvus.db in the workdir; a path, or http(s)://host:19530
    milvus_token_env: str = "MILVUS_TOKEN"  # environment variable holding the cluster token (never stored)
    milvus_index: str = "FLAT"  # Milvus index type: FLAT (exact), IVF_FLAT, IVF_SQ8, HNSW
    milvus_batch: int = 1000  # rows per Milvus upsert during a build
    exact_rerank: bool = False  # keep the exact gradient factors; re-score candidates with exact kernel values
    recall_stage1: float | None = None  # recall@10 of the candidate index alone (set at build, two-stage)
    recall_least: float | None = None  # recall@10 of least-similar (-q) searches (set at build, vectorstore)

    def __post_init__(self) -> None:
        if self.factory and self.kind in ("flat", "factory"):
            self.kind = "factory"
        elif self.factory:
            raise InvalidArgument(f"index.factory={self.factory!r} replaces index.faiss={self.kind!r}: give one.")
        if self.kind == "factory" and not self.factory:
            raise InvalidArgument("index.faiss='factory' needs index.factory, a FAISS index_factory string "
                                  "such as 'IVF1024,SQ8' or 'HNSW32,SQ8'.")
        if self.backend not in BACKENDS:
            raise InvalidArgument(f"index.backend {self.backend!r} is unknown: use one of {', '.join(BACKENDS)}.")
        if int(self.rerank) < 0 or int(self.train_sample) < 0 or int(self.milvus_batch) <= 0:
            raise InvalidArgument("index.rerank and index.train_sample must be >= 0, index.milvus_batch > 0.")
        if self.rerank and self.kind == "flat":
            raise InvalidArgument("index.rerank re-scores the candidates of an approximate index; a flat index is "
                                  "already exact: drop index.rerank or choose index.factory (e.g. 'IVF1024,SQ8').")
        if self.backend == "milvus" and (self.kind not in ("flat",) or self.rerank):
            raise InvalidArgument("index.backend='milvus' chooses its index with index.milvus_index; leave "
                                  "index.faiss='flat' and drop index.factory / index.rerank.")
        if self.exact_rerank and (self.backend != "faiss" or not (self.rerank or self.kind == "factory")):
            raise InvalidArgument("index.exact_rerank re-scores the candidates of a two-stage index: set index.rerank "
                                  "(the number of candidates, e.g. 200) and index.factory (e.g. 'Flat' or "
                                  "'IVF256,SQ8'), on the faiss backend.")
        if self.kind not in FAISS_KINDS:
            raise InvalidArgument(f"index.faiss {self.kind!r} is unknown: use one of {', '.join(FAISS_KINDS)}.")
        if self.mips not in ("augment", "refuse"):
            raise InvalidArgument("index.mips must be 'augment' or 'refuse'.")
        for f in ("nprobe", "pq_m", "pq_bits", "hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, f)) <= 0:
                raise InvalidArgument(f"index.{f} must be a positive integer.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def augmented(self, kernel: str) -> bool:
        """Whether vectors go through the MIPS-to-L2 augmentation for this kernel."""
        return self.kind in APPROX_KINDS and kernel in RAW_IP_KERNELS

    def check_kernel(self, kernel: str, dim: int) -> None:
        """Refuse combinations that cannot work; say what to change."""
        if self.augmented(kernel) and self.mips == "refuse":
            raise InvalidArgument(
                f"index.faiss={self.kind!r} with kernel={kernel!r}: approximate indexes lose recall on raw inner "
                "products; use kernel='grad_cos', index.faiss='flat', or index.mips='augment'.")
        if self.kind == "ivf_pq" and (dim + int(self.augmented(kernel))) % self.pq_m:
            raise InvalidArgument(f"index.pq_m={self.pq_m} must divide the vector dimension "
                                  f"{dim + int(self.augmented(kernel))}.")


def _faiss():
    import faiss

    return faiss


def make_index(spec: IndexSpec, dim: int, kernel: str, n_hint: int) -> Any:
    """An empty FAISS index for ``dim``-dimensional vectors of ``kernel``; ``n_hint`` sizes IVF lists."""
    faiss = _faiss()
    spec.check_kernel(kernel, dim)
    if spec.kind == "factory":
        raise InvalidArgument("index.factory indexes are built by indexer.vectorstore (two-stage store).")
    aug = spec.augmented(kernel)
    d = dim + int(aug)
    metric = faiss.METRIC_L2 if aug else faiss.METRIC_INNER_PRODUCT
    if spec.kind == "flat":
        return faiss.index_factory(d, "IDMap2,Flat", metric)
    if spec.kind == "hnsw":
        idx = faiss.index_factory(d, f"IDMap2,HNSW{spec.hnsw_m},Flat", metric)
        faiss.downcast_index(idx.index).hnsw.efConstruction = spec.ef_construction
        return idx
    nlist = spec.nlist or max(1, min(int(4 * np.sqrt(max(n_hint, 1))), max(1, n_hint // 39)))
    spec.nlist = nlist
    tail = {"ivf": "Flat", "ivf_sq8": "SQ8", "ivf_pq": f"PQ{spec.pq_m}x{spec.pq_bits}"}[spec.kind]
    return faiss.index_factory(d, f"IVF{nlist},{tail}", metric)


def augment_train(X: np.ndarray, max_norm: float) -> np.ndarray:
    """[x, √(M² − ‖x‖²)]: all rows get norm M, so L2 order equals inner-product order."""
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    extra = np.sqrt(np.maximum(max_norm ** 2 - sq, 0.0)).astype(np.float32)
    return np.hstack([X.astype(np.float32, copy=False), extra[:, None]])


def augment_query(Q: np.ndarray) -> np.ndarray:
    """[q, 0] for the MIPS augmentation."""
    return np.hstack([Q.astype(np.float32, copy=False), np.zeros((len(Q), 1), np.float32)])


def atomic_write_index(index: Any, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` via a temporary file, fsync and rename: never half-written at ``path``."""
    faiss = _faiss()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory (durability of a rename needs the directory too)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Owner:
    """Exposes FAISS-owned memory to numpy while keeping the index alive (the array's base)."""

    def __init__(self, raw: np.ndarray, shape: tuple[int, int], owner: Any) -> None:
        self.owner = owner
        self.__array_interface__ = {"data": (raw.__array_interface__["data"][0], True), "shape": shape,
                                    "typestr": "<f4", "version": 3}


def _owned_view(raw: np.ndarray, shape: tuple[int, int], owner: Any) -> np.ndarray:
    """A read-only (n, d) view of FAISS storage that keeps ``owner`` (the index) alive as long as it lives."""
    return np.asarray(_Owner(raw, shape, owner))


class ExactSearcher:
    """Exact top-k inner-product search over a (n, d) float32 matrix by chunked GEMM + top-k (torch).

    Works on memory-mapped matrices (the flat index's own storage): chunks are read as the scan
    goes. ``chunk_rows`` bounds the temporary score matrix to about ``m × chunk_rows`` floats.
    """

    def __init__(self, X: np.ndarray, ids: np.ndarray) -> None:
        import torch

        self.X = X
        self.ids = np.asarray(ids, dtype=np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only (mmap) arrays: we never write through the tensor
            self.Xt = torch.from_numpy(X)

    def search(self, Q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (m, k), ids (m, k)); rows beyond the candidates get score -inf and id -1.

        ``allowed``: optional bool mask over rows (filters); small allowed sets are gathered first.
        """
        import torch

        Q = np.ascontiguousarray(Q, dtype=np.float32)
        m, n = len(Q), len(self.X)
        if allowed is not None:
            rows = np.flatnonzero(allowed)
            if len(rows) * 4 < n:  # few candidates: gather them and scan only those
                S, I = ExactSearcher(np.ascontiguousarray(self.X[rows]), self.ids[rows]).search(Q, k)
                return S, I
        q = torch.from_numpy(Q)
        chunk = int(min(max(4096, (16 << 20) // max(m, 1)), max(n, 1)))
        best_s = torch.full((m, 0), -torch.inf)
        best_i = torch.zeros((m, 0), dtype=torch.int64)
        for c in range(0, n, chunk):
            S = q @ self.Xt[c:c + chunk].T
            if allowed is not None:
                S[:, torch.from_numpy(~allowed[c:c + chunk])] = -torch.inf
            kk = min(k, S.shape[1])
            s, i = torch.topk(S, kk, dim=1)
            best_s = torch.cat([best_s, s], 1)
            best_i = torch.cat([best_i, i + c], 1)
            if best_s.shape[1] > k:
                best_s, j = torch.topk(best_s, k, dim=1)
                best_i = torch.gather(best_i, 1, j)
        S_out = np.full((m, k), -np.inf, dtype=np.float32)
        I_out = np.full((m, k), -1, dtype=np.int64)
        kk = best_s.shape[1]
        S_out[:, :kk] = best_s.numpy()
        rows = best_i.numpy()
        I_out[:, :kk] = self.ids[rows] if n else -1
        bad = ~np.isfinite(S_out)
        I_out[bad] = -1
        return S_out, I_out


class VectorStore:
    """One FAISS index plus what is needed to search it as inner products (augmentation, exact path)."""

    def __init__(self, index: Any, spec: IndexSpec, kernel: str, dim: int) -> None:
        self.index = index
        self.spec = spec
        self.kernel = kernel
        self.dim = dim
        self._exact: ExactSearcher | None = None

    # ---- building -----------------------------------------------------------------------------
    @classmethod
    def create(cls, spec: IndexSpec, dim: int, kernel: str, n_hint: int) -> "VectorStore":
        return cls(make_index(spec, dim, kernel, n_hint), spec, kernel, dim)

    @property
    def augmented(self) -> bool:
        return self.spec.augmented(self.kernel)

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    def _prep_train(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise InvalidArgument(f"vectors must be (n, {self.dim}), got {X.shape}.")
        return augment_train(X, self.spec.max_norm) if self.augmented else X

    def train(self, X: np.ndarray) -> None:
        """Train IVF/PQ quantizers on a sample (no-op for flat/HNSW)."""
        if not self.index.is_trained:
            self.index.train(self._prep_train(X))

    def add(self, X: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors with their stable ids (catalog row ids)."""
        self.index.add_with_ids(self._prep_train(X), np.ascontiguousarray(ids, dtype=np.int64))
        self._exact = None

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_index(self.index, path)

    @classmethod
    def load(cls, path: str | os.PathLike, spec: IndexSpec, kernel: str, dim: int,
             mmap: bool | None = None) -> "VectorStore":
        """Read an index file; memory-mapped when ``mmap`` or (None) when it is larger than MMAP_THRESHOLD."""
        faiss = _faiss()
        if mmap is None:
            mmap = os.path.getsize(path) > MMAP_THRESHOLD
        flags = 0
        if mmap:
            flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if spec.kind in ("flat", "hnsw") else faiss.IO_FLAG_MMAP
        return cls(faiss.read_index(str(path), flags), spec, kernel, dim)

    # ---- reading ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def exact_searcher(self) -> ExactSearcher:
        """The GEMM searcher over the flat index's own storage (flat kind only)."""
        faiss = _faiss()
        if self.spec.kind != "flat":
            raise InvalidArgument("exact GEMM search needs a flat index.")
        if self._exact is None:
            inner = faiss.downcast_index(self.index.index)
            n, d = inner.ntotal, inner.d
            X = _owned_view(faiss.rev_swig_ptr(inner.get_xb(), n * d), (n, d), self.index) if n else \
                np.zeros((0, d), np.float32)
            ids = faiss.vector_to_array(self.index.id_map)
            self._exact = ExactSearcher(X, ids)
        return self._exact

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(X, ids) of a flat index without copying (views on the index storage)."""
        ex = self.exact_searcher()
        return ex.X, ex.ids

    def search(self, Q: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
               use_faiss: bool | None = None, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products (m, k) and ids (m, k); missing hits are score -inf, id -1.

        ``allowed_ids``: restrict to these ids (label/split filters). Flat indexes are searched by the
        GEMM path except at batch 1 without a filter where FAISS's scan is as fast (``use_faiss``
        overrides). Per-call ``nprobe`` / ``ef_search`` are passed as search parameters, never by
        mutating the shared index (concurrent searches are safe).
        """
        faiss = _faiss()
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        if Q.ndim != 2 or Q.shape[1] != self.dim:
            raise InvalidArgument(f"query vectors must be (m, {self.dim}), got {Q.shape}.")
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidArgument(f"k must be a positive integer, got {k!r}.")
        k = int(k)
        if self.spec.kind == "flat" and not use_faiss and (use_faiss is not None or len(Q) > 1 or allowed_ids is not None):
            ex = self.exact_searcher()
            allowed = None
            if allowed_ids is not None:
                allowed = np.isin(ex.ids, np.asarray(allowed_ids, dtype=np.int64))
            return ex.search(Q, k, allowed)
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)) if allowed_ids is not None else None
        if self.spec.kind.startswith("ivf"):
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe or self.spec.nprobe))
        elif self.spec.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=int(max(ef_search or self.spec.ef_search, k)))
            if sel is not None:
                params.sel = sel
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        Qs = augment_query(Q) if self.augmented else Q
        D, I = self.index.search(Qs, k, params=params)
        if self.augmented:  # L2 on augmented vectors -> inner product
            qn = np.einsum("ij,ij->i", Q, Q, dtype=np.float64)[:, None]
            D = ((qn + self.spec.max_norm ** 2 - D) / 2).astype(np.float32)
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        return D, I.astype(np.int64)


def hits_at_k(candidate_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query, how many of its exact top-k ids (-1 padding ignored) are among its candidate ids (every
    column of ``candidate_ids``: a top-k, or a longer candidate list before re-ranking)."""
    return np.array([len(set(c.tolist()) & set(e[:k].tolist()) - {-1}) for c, e in zip(candidate_ids, exact_ids)],
                    dtype=np.int64)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k ids found in the approximate top-k."""
    hits = hits_at_k([a[:k] for a in approx_ids], exact_ids, k)
    found = [max(1, min(k, int((e[:k] >= 0).sum()))) for e in exact_ids]
    return float(np.mean(hits / np.asarray(found))) if len(hits) else 1.0


__all__ = ["IndexSpec", "VectorStore", "ExactSearcher", "make_index", "atomic_write_index", "recall_at_k",
           "hits_at_k",
           "augment_train", "augment_query", "FAISS_KINDS", "APPROX_KINDS", "fsync_path"]
