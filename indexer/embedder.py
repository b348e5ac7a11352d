"""The one object that turns examples into the vectors an index stores or searches with.

An :class:`Embedder` holds the gradient engine of each checkpoint, the recorded projection and
the index's kernel. The build (local and Ray), the query path and the server all embed through
it, so a query is embedded exactly as the training set was and its scores equal those a
brute-force computation over the stored vectors gives.

For C checkpoints with learning rates lr_c the raw embedding is [√lr_1·P g_1, …, √lr_C·P g_C]
(TracIn as one inner-product index); with one checkpoint and lr 1 it is just P g. The kernel then
scales training rows (:func:`indexer.kernels.scale_train`) and query rows
(:func:`indexer.kernels.scale_query`) so that every kernel is a plain inner product. The exact
squared gradient norms Σ_c lr_c‖g_c‖² (self-influence) come from the gradient blocks, not from the
projection.

An embedder is complete once constructed: the projection needs the gradient block layout, which
is either recorded in the catalog (queries, resumed and Ray builds) or read from a dry run on two
examples (:func:`probe_layout`, a fresh build) before the embedder is made.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from indexer.config import BuildConfig, load_model, make_loss
from indexer.defaults import CHUNK_SIZE
from indexer.errors import FailedPrecondition
from indexer.kernels import check_kernel, scale_query, scale_train
from indexer.projection import BlockInfo, Projector, layout_from_json, layout_of


def load_engines(cfg: BuildConfig) -> list[Any]:
    """One gradient engine per checkpoint of the config (the model loaded once per checkpoint)."""
    from indexer.engine import make_engine

    loss = make_loss(cfg.model)
    engines = []
    for ck in cfg.checkpoints:
        w = ck["weights"]
        model = load_model(cfg.model, w) if w else load_model(cfg.model)
        engines.append(make_engine(model, loss, task=cfg.model["task"], params=cfg.model.get("params"),
                                   framework=cfg.model["framework"],
                                   chunk_size=cfg.build.get("chunk_size", CHUNK_SIZE)))
    return engines


def probe_layout(engine: Any, X: Any, Y: Any) -> list[BlockInfo]:
    """The gradient block layout of ``engine``'s model, from a dry run on a few examples."""
    _, blocks = next(engine.iter_blocks(X, Y, chunk_size=len(X)))
    return layout_of(blocks, engine.offsets())


class Embedder:
    """Engines per checkpoint → projection → concatenation → kernel scaling."""

    def __init__(self, engines: list[Any], lrs: list[float], projector: Projector, kernel: str) -> None:
        if len(engines) != len(lrs) or not engines:
            raise ValueError(f"one learning rate per engine is needed, got {len(engines)} engines and {len(lrs)} rates.")
        self.engines = list(engines)
        self.lrs = [float(x) for x in lrs]
        self.projector = projector
        self.kernel = check_kernel(kernel)
        self.keep_factors = False  # build chunks also keep the exact compact gradients (index.exact_rerank)

    @classmethod
    def from_config(cls, cfg: BuildConfig, layout: list[dict[str, Any]] | list[BlockInfo],
                    engines: list[Any] | None = None) -> "Embedder":
        """The embedder a config describes, with a recorded ``layout`` (JSON or BlockInfo rows).

        ``engines`` reuses engines already loaded (the build loads them once to validate the data).
        """
        lay = [b if isinstance(b, BlockInfo) else None for b in layout]
        lay = lay if all(b is not None for b in lay) else layout_from_json(layout)
        emb = cls(engines if engines is not None else load_engines(cfg), [ck["learning_rate"] for ck in cfg.checkpoints],
                  Projector(cfg.projection, lay), cfg.kernel)
        emb.keep_factors = bool(cfg.faiss.exact_rerank)
        return emb

    # ---- description -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Dimension of the stored/query vectors (projection dim × checkpoints)."""
        return self.projector.dim * len(self.engines)

    @property
    def gradient_dim(self) -> int:
        """Number of selected parameters (the dimension of one raw gradient)."""
        return int(self.projector.input_dim)

    @property
    def checkpoints(self) -> int:
        return len(self.engines)

    @property
    def task(self) -> str:
        return self.engines[-1].task

    def fingerprint(self) -> str:
        """Fingerprint of the weights queries are checked against (the last checkpoint's)."""
        return self.engines[-1].fingerprint()

    # ---- model outputs -----------------------------------------------------------------------
    def predict(self, X: Any) -> np.ndarray:
        """Model outputs of the last checkpoint (the served model)."""
        return np.asarray(self.engines[-1].predict(X))

    def resolve_targets(self, X: Any, Y: Any = None) -> np.ndarray | None:
        """``Y`` if given, else the targets the task implies (classification: predicted classes)."""
        return self.engines[-1].resolve_targets(X, Y)

    @property
    def model(self) -> Any:
        """The served model object (last checkpoint), for explainers that rewrite a copy of it."""
        return self.engines[-1].model

    # ---- vectors -----------------------------------------------------------------------------
    def raw(self, X: Any, Y: Any = None, norms: bool = True,
            sink: Any = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(embeddings (n, dim) float32, self-influence Σ lr‖g‖² (n,), gradient norm of the last checkpoint (n,)).

        ``norms=False`` (the query path) skips the exact norms, which for conv layers under a
        sketch projection means forming gradients the projection itself never forms; the two
        norm outputs are then None. ``sink`` (a :class:`indexer.vectorstore.factors.FactorSink`) also
        receives every chunk of gradient blocks, to keep the exact compact gradients (one checkpoint).
        """
        if sink is not None and len(self.engines) != 1:
            raise FailedPrecondition("exact gradient factors are kept for an index of one checkpoint only.")
        parts, selfinf, last_sq = [], None, None
        for eng, lr in zip(self.engines, self.lrs):
            rows, sqs = [], []
            for _, blocks in eng.iter_blocks(X, Y):
                if sink is not None:
                    sink.put(blocks)
                V, sq = self.projector.project_with_norms(blocks, norms=norms)
                rows.append(V)
                sqs.append(sq)
            V = np.concatenate(rows)
            if lr != 1.0:
                V *= np.float32(math.sqrt(lr))
            parts.append(V)
            if norms:
                sq = np.concatenate(sqs)
                selfinf = lr * sq if selfinf is None else selfinf + lr * sq
                last_sq = sq
        V = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return V, selfinf, None if last_sq is None else np.sqrt(last_sq)

    def train_vectors(self, X: Any, Y: Any = None, sink: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stored vectors, self-influence, gradient norm) of training examples (``sink``: see :meth:`raw`)."""
        V, selfinf, gnorm = self.raw(X, Y, sink=sink)
        return scale_train(V, self.kernel), selfinf, gnorm

    def query_vectors(self, X: Any, Y: Any = None, sink: Any = None) -> np.ndarray:
        """Query vectors (m, dim) float32; a query needs no gradient norms, so none are computed
        (``sink``: the queries' exact compact gradients too, from the same pass; see :meth:`raw`)."""
        V, _, _ = self.raw(X, Y, norms=False, sink=sink)
        return scale_query(V, self.kernel)

    def project_gradients(self, G: np.ndarray, projected: bool, name: str = "the index") -> np.ndarray:
        """Query vectors from client-computed flat gradients (m, gradient_dim), or from vectors
        already projected (m, dim) when ``projected``: the recorded projection, then query scaling.

        Raw gradients are refused with FailedPrecondition (saying what to send instead) where they
        are ambiguous: several checkpoints, or a projection applied to per-layer factors.
        """
        V = np.asarray(G, dtype=np.float32)
        if not projected:
            kind = self.projector.spec.kind
            if len(self.engines) > 1:
                raise FailedPrecondition(
                    f"index {name!r} concatenates {len(self.engines)} checkpoints; raw gradients are ambiguous "
                    "there: send projected vectors (projected=true) or use FindSimilar")
            if kind == "dense":
                V = self.projector.project_flat(V)
            elif kind != "none":
                raise FailedPrecondition(
                    f"index {name!r} uses a {kind!r} projection, which is applied to per-layer gradient factors, "
                    f"not to flat gradients: send projected vectors (projected=true, shape (batch, {self.dim})) "
                    "or use FindSimilar")
        return scale_query(V, self.kernel)


__all__ = ["Embedder", "load_engines", "probe_layout"]
