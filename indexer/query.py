"""The query-side API over built indexes: what the gRPC server and in-process callers use.

```python
from indexer.query import open_index, list_indexes
idx = open_index(workdir, "digits")
res = idx.find_similar(X, Y, k=5, mode="both")   # res.scores/res.ids (most), res.least_scores/res.least_ids
rows = idx.get_examples(res.ids[0])
d = idx.describe()                                # IndexDescription: count, dim, kernel, input_shape ...
```

A query is embedded by the same :class:`indexer.embedder.Embedder` the build used (engine per
checkpoint → recorded projection → concatenation → ``scale_query``), so its scores equal those a
brute-force computation on the stored vectors gives. The model's weights are checked against the
fingerprint the index was built with: a mismatch raises :class:`~indexer.errors.ModelMismatch`
instead of answering with silent garbage. Errors are the classes of :mod:`indexer.errors`.

Concurrency: searches and catalog reads are thread-safe. Everything that runs the model (target
prediction, embedding, explainers given :meth:`GradIndex.model`) is serialized by the index's one
re-entrant :attr:`GradIndex.lock`, because the engines keep per-call hook state. Callers outside
the indexer never reach an engine: they go through the methods here.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from indexer.catalog import Catalog, Example, IndexRow
from indexer.config import BuildConfig
from indexer.data import load_payload
from indexer.defaults import MAX_K, MAX_QUERIES
from indexer.errors import FailedPrecondition, InvalidArgument, ModelMismatch, NotFound, ResourceExhausted
from indexer.store import IndexSpec, VectorStore
from indexer.text import text_description
from indexer import vectorstore  # two-stage / Milvus stores (hook marked "vectorstore hook")

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
    exact_scores: bool = False  # every score is the exact kernel value of the unprojected gradients


@dataclass(frozen=True)
class CheckpointDescription:
    """One checkpoint of the indexed model (TracIn sums over them)."""

    path: str
    learning_rate: float
    fingerprint: str


def _masked_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The index parameters with the credentials of a Milvus URI (``https://user:password@host``) masked:
    descriptions go to clients."""
    d = dict(params or {})
    uri = d.get("milvus_uri")
    if isinstance(uri, str) and "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        d["milvus_uri"] = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return d


@dataclass(frozen=True)
class IndexDescription:
    """What a client may want to know about an index, read once from the catalog.

    ``gradient_dim`` (the number of selected parameters) is known once the model is loaded and
    None before (:func:`list_indexes` does not load models).
    """

    name: str
    version: int
    model: str
    framework: str
    task: str
    loss: str
    class_names: list[str] | None
    kernel: str
    params: Any
    projection: dict[str, Any]
    faiss: str
    faiss_params: dict[str, Any]
    dim: int
    count: int
    recall_at_10: float | None
    fingerprint: str
    input_shape: list[int] | None
    path: str | None
    created: str
    checkpoints: list[CheckpointDescription] = field(default_factory=list)
    gradient_dim: int | None = None
    parameter_rules: dict[str, str] = field(default_factory=dict)  # parameter -> per-example gradient rule
    rules_verified: bool | None = None  # the engine's check against a batched backward passed (None: not recorded)
    text: dict[str, Any] | None = None  # text models: hf_kind and the tokenization (max_length, truncation, inputs)
    exact_rerank: bool = False  # candidates re-scored with exact gradient kernel values (index.exact_rerank)

    @classmethod
    def from_row(cls, r: IndexRow, gradient_dim: int | None = None) -> "IndexDescription":
        """The description of a catalog row (its model and checkpoints loaded)."""
        return cls(name=r.name, version=r.version, model=r.model.name, framework=r.model.framework,
                   task=r.model.task, loss=r.loss, class_names=r.model.class_names, kernel=r.kernel, params=r.params,
                   projection=r.projection, faiss=r.faiss_kind, faiss_params=_masked_params(r.faiss_params), dim=r.dim,
                   count=int(r.count), recall_at_10=r.recall_at_10, fingerprint=r.fingerprint,
                   input_shape=r.config.get("input_shape"), path=r.path, created=r.created.isoformat(),
                   checkpoints=[CheckpointDescription(c.path, c.learning_rate, c.fingerprint)
                                for c in r.model.checkpoints],
                   gradient_dim=gradient_dim, parameter_rules=dict(r.config.get("parameter_rules") or {}),
                   rules_verified=r.config.get("rules_verified"),
                   text=text_description((r.config.get("build") or {}).get("model") or {}),
                   exact_rerank=bool((r.faiss_params or {}).get("exact_rerank")))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``gradient_dim`` left out while unknown)."""
        d = asdict(self)
        if d["gradient_dim"] is None:
            del d["gradient_dim"]
        return d


class GradIndex:
    """An opened, ready index: catalog row, FAISS store, and (lazily or eagerly) the model and engines.

    ``max_k`` / ``max_queries`` bound one call (defaults in :mod:`indexer.defaults`); a server
    opens its indexes with its own ``max_k`` so that only its limit applies.
    """

    def __init__(self, cat: Catalog, row: IndexRow, store: VectorStore, load_model: bool = True,
                 max_k: int = MAX_K, max_queries: int = MAX_QUERIES) -> None:
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
        self.task: str = row.model.task
        self.class_names: list[str] | None = row.model.class_names
        self.max_k, self.max_queries = int(max_k), int(max_queries)
        self._description = IndexDescription.from_row(row)
        self._emb = None
        self._preprocess: Callable[[list[str]], Any] | None = None
        self._text_encoder: Any = None
        self._trim_ok = False  # query padding trimmed: set by warm_up once it matched the padded path
        self.lock = threading.RLock()  # the one lock: the engines keep per-call hook state
        if load_model:
            self.embedder()

    # ---- metadata ----------------------------------------------------------------------------
    def describe(self) -> IndexDescription:
        """The index's description (with ``gradient_dim`` once the model is loaded)."""
        d = self._description
        if d.gradient_dim is None and self._emb is not None:
            d = self._description = IndexDescription.from_row(self._row, self._emb.gradient_dim)
        return d

    @property
    def exact_rerank(self) -> bool:
        """Whether searches given the queries' exact gradients (:meth:`embed` ``exact=True``) re-rank with them."""
        return getattr(self.store, "factors", None) is not None

    def scores_exact(self, reranked: bool) -> bool:
        """Whether a search's scores are the exact kernel values of the unprojected gradients: re-ranked with
        the exact factors, or stored without projection in an exact store (flat, or two-stage re-scoring)."""
        if reranked and self.exact_rerank:
            return True
        proj = (self._row.projection or {}).get("kind", "none")
        unprojected = proj == "none" and len(self._row.model.checkpoints) <= 1
        return unprojected and (self.exact or isinstance(self.store, vectorstore.TwoStageStore))

    @property
    def exact(self) -> bool:
        """Whether searches are exact (flat index): then a top-k is the prefix of any larger top-k."""
        return self._row.faiss_kind == "flat"

    # ---- the model ---------------------------------------------------------------------------
    def embedder(self):
        """The engines + projection, loaded once; checks the weights against the index's fingerprint."""
        from indexer.embedder import Embedder

        if self._emb is None:
            with self.lock:
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

    def warm_up(self) -> None:
        """Load the model and embed one dummy example (projection matrices, lazy kernels), so that
        the first real query does not pay for it."""
        self.embedder()
        self.describe()
        if self.text_encoder() is not None:
            # two texts: the engine checks chunks until one of two or more passes (else every 1-text query pays)
            X, Y = self.text_inputs(["warm up", "a second one"], [".", "."] if self.is_causal_lm else None)
            self.embed(X, Y)
            self._check_trim(X, Y)
        elif self.input_shape:
            self.embed(np.zeros((1, *self.input_shape), dtype=np.float32))

    def _check_trim(self, X: np.ndarray, Y: np.ndarray | None) -> None:
        """Turn on query padding trimming (:meth:`indexer.text.TextEncoder.trim_padding`) only after
        the trimmed path gave the same predicted targets and (to float32 rounding) the same query
        vectors as the padded one, here, on this model; otherwise queries stay on the padded path
        and a warning says so. Why check: the cut is exact only for a model whose padded positions
        are fully masked, which the attention mask promises but a custom model may not keep."""
        if self.exact_rerank:  # the stored exact factors are compared at the build's padded length
            return
        enc = self.text_encoder()
        Xt, Yt = enc.trim_padding(X, Y)
        if Xt.shape == np.asarray(X).shape:
            return
        emb = self.embedder()
        with self.lock:
            Yf = emb.resolve_targets(X, Y)
            Ytr = emb.resolve_targets(Xt, Yt)
            Vf = emb.query_vectors(X, Yf)
            Vt = emb.query_vectors(Xt, Yt if Yt is not None else Ytr)
        same_y = Yf is None or np.array_equal(np.asarray(Yf)[..., :np.shape(Ytr)[-1]] if np.ndim(Yf) == 2 else Yf, Ytr)
        tol = 1e-5 * max(float(np.abs(Vf).max()), 1e-30)
        if same_y and np.allclose(Vt, Vf, rtol=1e-4, atol=tol):
            self._trim_ok = True
        else:
            warnings.warn(f"index {self.name!r}: query vectors of padding-trimmed texts differ from the padded ones "
                          "(the model does not mask its padding fully): queries run at the full max_length.",
                          RuntimeWarning, stacklevel=2)

    def _trimmed(self, X: Any, Y: Any = None) -> tuple[Any, Any]:
        """(X, Y) with the text padding no example uses cut off, once :meth:`warm_up` proved it exact."""
        if not self._trim_ok or not isinstance(X, np.ndarray) or X.dtype.kind not in "iu":
            return X, Y
        return self.text_encoder().trim_padding(X, Y)

    def model(self) -> Any:
        """The served model object (last checkpoint), for explainers; run it under :attr:`lock`."""
        return self.embedder().model

    def predict(self, X: Any) -> np.ndarray:
        """The served model's outputs for inputs ``X`` (serialized by :attr:`lock`)."""
        emb = self.embedder()
        with self.lock:
            return emb.predict(X)

    @property
    def is_causal_lm(self) -> bool:
        """Whether the index's model is a causal LM (queries are prompt + completion, targets are token ids)."""
        return self.config.model.get("hf_kind") == "causal_lm"

    def text_encoder(self) -> Any:
        """The model's own tokenizer with the index's recorded settings (:class:`indexer.text.TextEncoder`),
        loaded once; None when the model is not a Hugging Face directory."""
        if self._text_encoder is None and "hf_dir" in self.config.model:
            from indexer.text import TextEncoder

            with self.lock:
                self._text_encoder = self._text_encoder or TextEncoder.from_model(self.config.model)
        return self._text_encoder

    def text_inputs(self, texts: Any, completions: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(packed inputs, targets or None) of query texts, tokenized exactly as the build was.

        A causal LM's targets are the token ids (-100 on padding); with ``completions`` the texts are
        prompts and only the completions' tokens count. InvalidArgument for a model without a
        tokenizer, completions for a classifier, empty or too long texts."""
        enc = self.text_encoder()
        if enc is None:
            if self.config.data.get("preprocess") and completions is None:
                return np.asarray(self.preprocess()(list(texts))), None
            raise InvalidArgument(f"index {self.name!r} has a model of numeric inputs with no tokenizer: send "
                                  "inputs as a Tensor, not texts.")
        if completions is not None and len(completions):
            if not self.is_causal_lm:
                raise InvalidArgument(f"completions are for a causal LM; index {self.name!r} has a "
                                      f"{self.config.model.get('hf_kind')} model: send texts only.")
            return enc.encode_completions(texts, completions)
        X = enc.encode(texts)
        return X, (enc.lm_labels(X) if self.is_causal_lm else None)

    def preprocess(self) -> Callable[[list[str]], Any] | None:
        """The index's text preprocessing (its build config's ``data.preprocess``, loaded once, or the
        model's own tokenizer), which turns raw texts into the model's numeric inputs; None for a
        model that takes numbers only."""
        self._preprocess = self._preprocess or (self.text_encoder().encode if self.text_encoder() else None)
        if self._preprocess is None:
            pre = self.config.data.get("preprocess")
            if not pre:
                return None
            from indexer.entries import load_entry

            self._preprocess = load_entry(pre, "data.preprocess")
        return self._preprocess

    def predict_targets(self, X: Any) -> np.ndarray | None:
        """The targets a query without targets is embedded with: the model's predicted classes for a
        classification index, None otherwise (regression needs the client's targets; unsupervised
        has none)."""
        if self.task != "classification":
            return None
        emb = self.embedder()
        X, _ = self._trimmed(np.asarray(X))
        with self.lock:
            return emb.resolve_targets(X)

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
        if len(X) > self.max_queries:
            raise ResourceExhausted(f"{len(X)} query examples in one call; the limit is {self.max_queries}.")
        if X.dtype.kind == "f" and not np.all(np.isfinite(X)):
            raise InvalidArgument("X contains NaN or infinite values.")
        return X

    def embed(self, X: Any, Y: Any = None, exact: bool = False) -> Any:
        """Query vectors (m, dim) float32: gradients → projection → ``scale_query``. ``exact=True``: (vectors,
        :class:`~indexer.vectorstore.ExactQueries` of the queries' exact compact gradients from the same
        pass, or None when the index keeps no exact factors), for :meth:`search`'s ``exact``."""
        X = self._check_x(X)
        emb = self.embedder()
        pre = self.preprocess()
        if pre and (isinstance(X, (list, tuple)) or getattr(X, "dtype", None) is not None and X.dtype.kind in "OU"):
            X = np.asarray(pre(list(X)))
        if Y is None and self.is_causal_lm:
            Y = self.text_encoder().lm_labels(np.asarray(X))  # every real token counts
        if Y is not None:
            Y = np.asarray(Y)
            cn = self.class_names
            if cn and Y.dtype.kind in "US":
                unknown = [v for v in Y.tolist() if v not in cn]
                if unknown:
                    raise InvalidArgument(f"unknown class labels {unknown[:5]}: use one of {cn}.")
                Y = np.asarray([cn.index(v) for v in Y.tolist()], dtype=np.int64)
        sink = vectorstore.FactorSink() if exact and self.exact_rerank else None
        X, Y = self._trimmed(X, Y)
        with self.lock:
            try:
                Q = emb.query_vectors(X, Y, sink=sink)  # a query needs its vector only, no gradient norms
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(str(exc)) from exc
        if not exact:
            return Q
        return Q, None if sink is None else vectorstore.ExactQueries.of(sink.records())

    def project_gradients(self, G: np.ndarray, projected: bool = False) -> np.ndarray:
        """Query vectors from client-computed flat gradients (m, gradient_dim), or from already
        projected vectors (m, dim) with ``projected``: the index's projection, then query scaling.
        FailedPrecondition where raw gradients are ambiguous (several checkpoints, factored or
        sketched projections)."""
        return self.embedder().project_gradients(G, projected, self.name)

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
               exact: Any = None, **search_params: Any) -> SearchResult:
        """Top-k training examples by score for query vectors Q (m, dim) (from :meth:`embed`).

        ``mode='least'`` searches with −Q (the most negative scores, without sorting everything).
        ``labels`` / ``split`` restrict the candidates (FAISS ID selector / masked GEMM). ``exact``: the
        queries' exact gradients (:meth:`embed` ``exact=True``): an index built with ``exact_rerank``
        re-ranks its candidates with the exact kernel values (``SearchResult.exact_scores``).
        """
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise InvalidArgument(f"k must be a positive integer, got {k!r}.")
        if k > self.max_k:
            raise ResourceExhausted(f"k={k} exceeds the limit {self.max_k}.")
        Q = np.asarray(Q, dtype=np.float32)
        if Q.ndim == 1:
            Q = Q[None]
        if Q.ndim != 2 or Q.shape[1] != self.dim:
            raise InvalidArgument(f"query vectors must be (m, {self.dim}), got {list(Q.shape)}.")
        if not np.all(np.isfinite(Q)):
            raise InvalidArgument("query vectors contain NaN or infinite values.")
        allowed = self.allowed_ids(labels, split)
        E = exact if exact is not None and self.exact_rerank else None
        if E is not None:  # the rows' signs follow the query rows: -Q searches for the least similar
            search_params["exact"] = E if mode == "most" else E.negated() if mode == "least" else \
                vectorstore.ExactQueries.concat([E, E.negated()])
        ex = self.scores_exact(E is not None)
        if mode == "most":
            s, i = self.store.search(Q, int(k), allowed, **search_params)
            return SearchResult(s, i, mode=mode, exact_scores=ex)
        if mode == "least":
            s, i = self.store.search(-Q, int(k), allowed, **search_params)
            return SearchResult(-s, i, mode=mode, exact_scores=ex)
        # both: Q and -Q in one search, so the index is scanned once, not twice
        m = len(Q)
        s, i = self.store.search(np.concatenate([Q, -Q]), int(k), allowed, **search_params)
        return SearchResult(s[:m], i[:m], -s[m:], i[m:], mode=mode, exact_scores=ex)

    def find_similar(self, X: Any, Y: Any = None, k: int = 5, mode: str = "most", labels: Any = None,
                     split: Any = None, **search_params: Any) -> SearchResult:
        """Embed query examples and search: the training examples most (least) similar to each (re-ranked
        with the exact gradients where the index keeps them)."""
        Q, E = self.embed(X, Y, exact=True)
        return self.search(Q, k, mode, labels, split, exact=E, **search_params)

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
               load_model: bool = True, max_k: int = MAX_K, catalog_url: str | None = None) -> GradIndex:
    """Open the ready index ``name`` (newest version unless given) in ``workdir``; ``max_k`` bounds k.

    ``catalog_url``: the catalog database (operator configuration only; None = ``workdir``'s SQLite
    file). The index files are read from ``workdir`` either way.

    Raises NotFound (no such index/catalog), FailedPrecondition (index still building, file
    missing) or ModelMismatch (weights changed since the build).
    """
    cat = Catalog(workdir, create=False, url=catalog_url)
    with cat.session() as s:
        row = cat.index(s, name, version)
        if row is None:
            building = cat.index(s, name, version, ready_only=False)
            cat.close()
            if building is not None:
                raise FailedPrecondition(f"index {name!r} is not built yet (status {building.status}); finish it "
                                         "with gradindex build --resume.")
            raise NotFound(f"no index {name!r} in {cat.where if catalog_url else Path(workdir).resolve()}.")
        _ = row.model.checkpoints  # load relationships before the session closes
    path = cat.workdir / row.path
    spec = IndexSpec.from_dict(row.faiss_params)
    # Vectors in a Milvus cluster: the catalog row names the collection, so a server needs no
    # file from the build's workdir (stateless replicas); a Lite file is opened via its store.json.
    in_cluster = spec.backend == "milvus" and "://" in (spec.milvus_uri or "")
    if not path.exists() and not in_cluster:
        cat.close()
        raise FailedPrecondition(f"index file {path} is missing: rebuild the index with --replace.")
    try:
        if in_cluster and not path.exists():
            from indexer.vectorstore.milvus import MilvusStore, collection_name

            store = MilvusStore(path.parent, spec, row.kernel, row.dim, cat.workdir,
                                meta={"collection": collection_name(row.name, row.version), "count": int(row.count)})
        elif vectorstore.handles(spec):  # vectorstore hook: two-stage FAISS / Milvus stores
            store = vectorstore.open_store(path, spec, row.kernel, row.dim, cat.workdir, mmap=mmap)
        else:
            store = VectorStore.load(path, spec, row.kernel, row.dim, mmap=mmap)
    except BaseException:
        cat.close()
        raise
    try:
        return GradIndex(cat, row, store, load_model=load_model, max_k=max_k)
    except BaseException:
        cat.close()
        raise


def list_indexes(workdir: str | Path, catalog_url: str | None = None) -> list[IndexDescription]:
    """Descriptions of the current ready version of every index in ``workdir``'s catalog (or the one
    at ``catalog_url``), by name, without loading models ([] when there is no catalog)."""
    try:
        cat = Catalog(workdir, create=False, url=catalog_url)
    except NotFound:
        return []
    try:
        with cat.session() as s:
            return [IndexDescription.from_row(r) for r in cat.ready_indexes(s)]
    finally:
        cat.close()


__all__ = ["open_index", "list_indexes", "GradIndex", "SearchResult", "IndexDescription", "CheckpointDescription",
           "MODES"]
