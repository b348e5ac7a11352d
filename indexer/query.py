"""The query-side API over built indexes (what the gRPC server uses).

```python
from indexer.query import open_index, list_indexes
idx = open_index(workdir, "digits")
res = idx.find_similar(X, Y, k=5, mode="both")   # res.scores/res.ids (most), res.least_scores/res.least_ids
rows = idx.get_examples(res.ids[0])
```

A query is embedded by the same :class:`indexer.build.Embedder` the build used (engine per
checkpoint → recorded projection → concatenation → ``scale_query``), so its scores equal those a
brute-force computation on the stored vectors gives. The model's weights are checked against the
fingerprint the index was built with: a mismatch raises :class:`~indexer.errors.ModelMismatch`
instead of answering with silent garbage. Errors are the classes of :mod:`indexer.errors`.
Searches are thread-safe; embedding is serialized by a lock (the engines keep hook state).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from indexer.catalog import Catalog, Example, IndexRow
from indexer.config import BuildConfig
from indexer.data import load_payload
from indexer.errors import FailedPrecondition, InvalidArgument, ModelMismatch, NotFound, ResourceExhausted
from indexer.store import IndexSpec, VectorStore
from indexer import vectorstore  # two-stage / Milvus stores (hook marked "vectorstore hook")

MAX_K = 10_000
MAX_QUERIES = 10_000
MODES = ("most", "least", "both")


@dataclass
class SearchResult:
    """Top-k hits. ``scores``/``ids`` (m, k): most similar for mode 'most' and 'both', least similar
    (most negative first) for 'least'; ``least_scores``/``least_ids`` hold the least similar for
    'both'. Missing hits (fewer candidates than k) have id -1 and score -inf (+inf for least)."""

    scores: np.ndarray
    ids: np.ndarray
    least_scores: np.ndarray | None = None
    least_ids: np.ndarray | None = None
    mode: str = "most"


class GradIndex:
    """An opened, ready index: catalog row, FAISS store, and (lazily or eagerly) the model and engines."""

    def __init__(self, cat: Catalog, row: IndexRow, store: VectorStore, load_model: bool = True) -> None:
        self._cat = cat
        self._row = row
        self.store = store
        self.name: str = row.name
        self.version: int = row.version
        self.kernel: str = row.kernel
        self.dim: int = row.dim
        self.count: int = int(row.count)
        self.model_name: str = row.model.name
        self.fingerprint: str = row.fingerprint
        self.recall_at_10: float | None = row.recall_at_10
        self.config = BuildConfig.from_json(row.config["build"])
        self.input_shape: list[int] | None = row.config.get("input_shape")
        self._emb = None
        self._lock = threading.Lock()
        if load_model:
            self.embedder()

    # ---- metadata ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Everything a client may want to know about the index (JSON-able)."""
        r = self._row
        return {"name": r.name, "version": r.version, "model": self.model_name, "framework": r.model.framework,
                "task": r.model.task, "loss": r.loss, "class_names": r.model.class_names, "kernel": r.kernel,
                "params": r.params, "projection": r.projection, "faiss": r.faiss_kind, "faiss_params": r.faiss_params,
                "dim": r.dim, "count": int(r.count), "recall_at_10": r.recall_at_10, "fingerprint": r.fingerprint,
                "input_shape": self.input_shape, "path": r.path, "created": r.created.isoformat(),
                "checkpoints": [{"path": c.path, "learning_rate": c.learning_rate, "fingerprint": c.fingerprint}
                                for c in r.model.checkpoints]}

    # ---- embedding ---------------------------------------------------------------------------
    def embedder(self):
        """The engines + projection, loaded once; checks the weights against the index's fingerprint."""
        from indexer.build import Embedder

        if self._emb is None:
            with self._lock:
                if self._emb is None:
                    emb = Embedder.from_config(self.config, self._row.layout)
                    self.check_model(emb.fingerprint())
                    self._emb = emb
        return self._emb

    def check_model(self, engine_fingerprint: str) -> None:
        """Raise ModelMismatch when ``engine_fingerprint`` is not the fingerprint the index was built with."""
        if engine_fingerprint != self.fingerprint:
            raise ModelMismatch(f"index {self.name!r} was built with model weights {self.fingerprint[:12]}…, "
                                f"the model now has {engine_fingerprint[:12]}…: rebuild the index (gradindex build "
                                "--replace) or restore the weights.")

    def _check_x(self, X: Any) -> np.ndarray:
        if isinstance(X, np.ndarray) and X.dtype == object or isinstance(X, (list, tuple)) and X and isinstance(X[0], str):
            return X  # text: the preprocess function turns it into arrays
        X = np.asarray(X)
        if X.dtype.kind not in "fiub":
            raise InvalidArgument(f"X must be numeric, got dtype {X.dtype}.")
        if self.input_shape is not None and list(X.shape[1:]) != list(self.input_shape):
            if list(X.shape) == list(self.input_shape):
                raise InvalidArgument(f"X has shape {list(X.shape)}: add the batch dimension, e.g. X[None] "
                                      f"(expected (n, {', '.join(map(str, self.input_shape))})).")
            raise InvalidArgument(f"X has shape {list(X.shape)}, expected (n, {', '.join(map(str, self.input_shape))}).")
        if len(X) > MAX_QUERIES:
            raise ResourceExhausted(f"{len(X)} query examples in one call; the limit is {MAX_QUERIES}.")
        if X.dtype.kind == "f" and not np.all(np.isfinite(X)):
            raise InvalidArgument("X contains NaN or infinite values.")
        return X

    def embed(self, X: Any, Y: Any = None) -> np.ndarray:
        """Query vectors (m, dim) float32: gradients → projection → ``scale_query``."""
        from indexer.kernels import scale_query

        X = self._check_x(X)
        emb = self.embedder()
        pre = self.config.data.get("preprocess")
        if pre and (isinstance(X, (list, tuple)) or getattr(X, "dtype", None) is not None and X.dtype.kind in "OU"):
            from indexer.config import load_entry

            X = np.asarray(load_entry(pre, "data.preprocess")(list(X)))
        if Y is not None:
            Y = np.asarray(Y)
            cn = self._row.model.class_names
            if cn and Y.dtype.kind in "US":
                unknown = [v for v in Y.tolist() if v not in cn]
                if unknown:
                    raise InvalidArgument(f"unknown class labels {unknown[:5]}: use one of {cn}.")
                Y = np.asarray([cn.index(v) for v in Y.tolist()], dtype=np.int64)
        with self._lock:
            try:
                V, _, _ = emb.raw(X, Y, norms=False)  # a query needs its vector only
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(str(exc)) from exc
        return scale_query(V, self.kernel)

    # ---- search ------------------------------------------------------------------------------
    def allowed_ids(self, labels: Any = None, split: Any = None) -> np.ndarray | None:
        """Row ids passing the label/split filters (None when unfiltered)."""
        if labels is None and split is None:
            return None
        q = select(Example.row_id).where(Example.index_id == self._row.id)
        if labels is not None:
            labs = [labels] if isinstance(labels, (str, int, np.integer)) else list(labels)
            cn = self._row.model.class_names or []
            labs = [str(cn.index(v)) if isinstance(v, str) and v in cn else str(v) for v in labs]
            q = q.where(Example.label.in_(labs))
        if split is not None:
            q = q.where(Example.split.in_([split] if isinstance(split, str) else list(split)))
        with self._cat.session() as s:
            return np.fromiter((r for (r,) in s.execute(q)), dtype=np.int64)

    def search(self, Q: Any, k: int, mode: str = "most", labels: Any = None, split: Any = None,
               **search_params: Any) -> SearchResult:
        """Top-k training examples by score for query vectors Q (m, dim) (from :meth:`embed`).

        ``mode='least'`` searches with −Q (the most negative scores, without sorting everything).
        ``labels`` / ``split`` restrict the candidates (FAISS ID selector / masked GEMM).
        """
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise InvalidArgument(f"k must be a positive integer, got {k!r}.")
        if k > MAX_K:
            raise ResourceExhausted(f"k={k} exceeds the limit {MAX_K}.")
        Q = np.asarray(Q, dtype=np.float32)
        if Q.ndim == 1:
            Q = Q[None]
        if Q.ndim != 2 or Q.shape[1] != self.dim:
            raise InvalidArgument(f"query vectors must be (m, {self.dim}), got {list(Q.shape)}.")
        if not np.all(np.isfinite(Q)):
            raise InvalidArgument("query vectors contain NaN or infinite values.")
        allowed = self.allowed_ids(labels, split)
        if mode == "most":
            s, i = self.store.search(Q, int(k), allowed, **search_params)
            return SearchResult(s, i, mode=mode)
        if mode == "least":
            s, i = self.store.search(-Q, int(k), allowed, **search_params)
            return SearchResult(-s, i, mode=mode)
        # both: Q and -Q in one search, so the index is scanned once, not twice
        m = len(Q)
        s, i = self.store.search(np.concatenate([Q, -Q]), int(k), allowed, **search_params)
        return SearchResult(s[:m], i[:m], -s[m:], i[m:], mode=mode)

    def find_similar(self, X: Any, Y: Any = None, k: int = 5, mode: str = "most", labels: Any = None,
                     split: Any = None, **search_params: Any) -> SearchResult:
        """Embed query examples and search: the training examples most (least) similar to each."""
        return self.search(self.embed(X, Y), k, mode, labels, split, **search_params)

    # ---- examples ----------------------------------------------------------------------------
    def _example_dict(self, e: Example, payload: bool) -> dict[str, Any]:
        return {"id": int(e.row_id), "external_id": e.external_id, "label": e.label, "split": e.split,
                "source": e.source, "payload": load_payload(e.payload_ref) if payload else None,
                "grad_norm": e.grad_norm, "self_influence": e.self_influence}

    def get_examples(self, ids: Any, payload: bool = True) -> list[dict[str, Any]]:
        """Catalog rows (and stored examples) for row ids, in the order given; NotFound for unknown ids."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        with self._cat.session() as s:
            rows = {e.row_id: e for e in s.scalars(select(Example).where(Example.index_id == self._row.id,
                                                                          Example.row_id.in_(ids)))}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise NotFound(f"example ids {missing[:10]} are not in index {self.name!r} (ids are 0..{self.count - 1}).")
        return [self._example_dict(rows[i], payload) for i in ids]

    def self_influence_top(self, k: int, payload: bool = False, lowest: bool = False) -> list[dict[str, Any]]:
        """The k training examples with the largest self-influence (Σ_c lr_c‖g_c‖²), largest first;
        with ``lowest=True`` the smallest first (the most typical examples)."""
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidArgument(f"k must be a positive integer, got {k!r}.")
        order = Example.self_influence.asc() if lowest else Example.self_influence.desc()
        with self._cat.session() as s:
            rows = s.scalars(select(Example).where(Example.index_id == self._row.id)
                             .order_by(order, Example.row_id).limit(int(k))).all()
        return [self._example_dict(e, payload) for e in rows]

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(stored vectors, ids) of a flat index (views, no copy)."""
        return self.store.vectors()

    def close(self) -> None:
        getattr(self.store, "close", lambda: None)()  # vectorstore hook: Milvus clients hold a connection
        self._cat.close()


def open_index(workdir: str | Path, name: str, version: int | None = None, mmap: bool | None = None,
               load_model: bool = True) -> GradIndex:
    """Open the ready index ``name`` (newest version unless given) in ``workdir``.

    Raises NotFound (no such index/catalog), FailedPrecondition (index still building, file
    missing) or ModelMismatch (weights changed since the build).
    """
    cat = Catalog(workdir, create=False)
    with cat.session() as s:
        row = cat.index(s, name, version)
        if row is None:
            building = cat.index(s, name, version, ready_only=False)
            cat.close()
            if building is not None:
                raise FailedPrecondition(f"index {name!r} is not built yet (status {building.status}); finish it "
                                         "with gradindex build --resume.")
            raise NotFound(f"no index {name!r} in {Path(workdir).resolve()}.")
        _ = row.model.checkpoints  # load relationships before the session closes
    path = cat.workdir / row.path
    if not path.exists():
        cat.close()
        raise FailedPrecondition(f"index file {path} is missing: rebuild the index with --replace.")
    spec = IndexSpec.from_dict(row.faiss_params)
    if vectorstore.handles(spec):  # vectorstore hook: two-stage FAISS / Milvus stores
        store = vectorstore.open_store(path, spec, row.kernel, row.dim, cat.workdir, mmap=mmap)
    else:
        store = VectorStore.load(path, spec, row.kernel, row.dim, mmap=mmap)
    try:
        return GradIndex(cat, row, store, load_model=load_model)
    except BaseException:
        cat.close()
        raise


def list_indexes(workdir: str | Path) -> list[dict[str, Any]]:
    """info() of the current ready version of every index in ``workdir`` (without loading models)."""
    try:
        cat = Catalog(workdir, create=False)
    except NotFound:
        return []
    try:
        with cat.session() as s:
            rows = cat.ready_indexes(s)
            out = []
            for r in rows:
                _ = r.model.checkpoints
                out.append({"name": r.name, "version": r.version, "model": r.model.name, "kernel": r.kernel,
                            "dim": r.dim, "count": int(r.count), "faiss": r.faiss_kind, "recall_at_10": r.recall_at_10,
                            "fingerprint": r.fingerprint, "projection": r.projection,
                            "input_shape": r.config.get("input_shape"), "class_names": r.model.class_names})
        return out
    finally:
        cat.close()


__all__ = ["open_index", "list_indexes", "GradIndex", "SearchResult", "MODES"]
