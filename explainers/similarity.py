"""GradientSimilarity: a faster, exact drop-in for alibi 0.9.6's explainer of the same name.

Scores a query z against training examples z' by the similarity of their loss gradients
(Charpiat et al. 2019, Hanawa et al. 2021) with the kernels ``grad_dot``, ``grad_cos`` and
``grad_asym_dot`` (training-side squared norm in the denominator), exactly as alibi defines them.

What differs from alibi, and why:
- Per-example gradients come from the vectorized engine (``indexer.engine``), for a whole batch of
  queries at once, instead of one backward pass per example.
- With ``precompute_grads=True`` the training gradients are stored compactly and exactly: a
  Linear/Dense layer applied once per example has the rank-one gradient ``d aᵀ``, so only ``a`` and
  ``d`` are kept (1,825 numbers instead of 401,408 for the digits CNN's fc1) and
  ⟨d_q a_qᵀ, d_t a_tᵀ⟩ = (d_q·d_t)(a_q·a_t) is scored with two small GEMMs; other layers are
  kept as full rows. Memory and explain time shrink by the same factor, with no approximation.
- The device is per instance (alibi keeps it class-wide, so two explainers in a process clash).
- The number of most/least similar examples returned is configurable (``n_examples``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from explainers.explanation import Explanation
from indexer.defaults import CHUNK_SIZE
from indexer.defaults import TASKS as ALL_TASKS
from indexer.engine import Block, make_engine
from indexer.kernels import EPS, check_kernel

BACKENDS = ("tensorflow", "pytorch")
#: The indexer's tasks an explainer can attribute (an unsupervised model has no loss on a target).
TASKS = tuple(t for t in ALL_TASKS if t != "unsupervised")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        return np.asarray(x.numpy())
    return np.asarray(x)


@dataclass
class _Layout:
    """How each block of a chunk is stored: as factors (a, d) or appended to the full rows."""

    factored: list[bool]
    full_width: int
    factor_dims: list[tuple[int, int]]

    @staticmethod
    def of(blocks: list[Block]) -> "_Layout":
        factored, width, dims = [], 0, []
        for b in blocks:
            rank_one = b.kind == "outer" and b.has_weight and b.d.shape[1] == 1
            din = b.a_in.shape[2] + int(b.has_bias) if rank_one else 0
            if rank_one and din + b.d.shape[2] < b.size:
                factored.append(True)
                dims.append((din, b.d.shape[2]))
            else:
                factored.append(False)
                width += b.size
        return _Layout(factored, width, dims)


class _GradStore:
    """Per-example gradients of a set of examples in the compact exact form of a :class:`_Layout`."""

    def __init__(self, layout: _Layout, n: int, dtype: Any) -> None:
        self.layout = layout
        self.full = np.empty((n, layout.full_width), dtype=dtype)
        self.A = [np.empty((n, da), dtype=dtype) for da, _ in layout.factor_dims]
        self.D = [np.empty((n, dd), dtype=dtype) for _, dd in layout.factor_dims]
        self.sq = np.zeros(n, dtype=np.float64)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored gradients."""
        return int(self.full.nbytes + sum(a.nbytes for a in self.A) + sum(d.nbytes for d in self.D) + self.sq.nbytes)

    def put(self, s: int, blocks: list[Block]) -> None:
        """Store the blocks of the chunk starting at row ``s``."""
        n = blocks[0].n
        col, fi = 0, 0
        for b, fac in zip(blocks, self.layout.factored):
            if fac:
                self.A[fi][s:s + n] = b.a[:, 0]
                self.D[fi][s:s + n] = b.d[:, 0]
                fi += 1
                self.sq[s:s + n] += b.sq_norms()
            else:
                rows = b.materialize(self.full[s:s + n, col:col + b.size])
                col += b.size
                self.sq[s:s + n] += np.einsum("ij,ij->i", rows, rows, dtype=np.float64)

    def dots(self, other: "_GradStore") -> np.ndarray:
        """Gradient inner products (m, n) between the rows of ``self`` and of ``other``."""
        out = self.full @ other.full.T if self.full.shape[1] else np.zeros((len(self.sq), len(other.sq)))
        out = out.astype(np.float64)
        for Aq, Dq, At, Dt in zip(self.A, self.D, other.A, other.D):
            out += (Dq @ Dt.T) * (Aq @ At.T)
        return out


class GradientSimilarity:
    """Explain a prediction by the training examples whose loss gradients are most similar.

    Parameters match alibi 0.9.6: ``predictor`` (torch.nn.Module or tf.keras.Model), ``loss_fn``
    (as written for the framework: torch ``loss(pred, target)``, Keras ``loss(target, pred)``; mean
    reduction is fine), ``sim_fn`` ('grad_dot' | 'grad_cos' | 'grad_asym_dot'), ``task``
    ('classification' | 'regression'), ``precompute_grads``, ``backend`` ('tensorflow' |
    'pytorch'), ``device`` (PyTorch device, per instance), ``verbose`` (progress bar).
    Extra: ``params`` (regexes or layer objects selecting parameters; default all trainable),
    ``n_examples`` (how many most/least similar examples to return, default 5 as alibi),
    ``chunk_size``, and ``eps`` (alibi's 1e-7 in the denominators; 0 gives the exact cosine, as the
    served index computes it — see ``indexer.kernels``).
    """

    def __init__(self, predictor: Any, loss_fn: Any, sim_fn: str = "grad_dot", task: str = "classification",
                 precompute_grads: bool = False, backend: str = "tensorflow", device: Any = None,
                 verbose: bool = False, params: Any = None, n_examples: int = 5, chunk_size: int = CHUNK_SIZE,
                 eps: float = EPS) -> None:
        check_kernel(sim_fn)
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}: use one of {', '.join(TASKS)}.")
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}: use one of {', '.join(BACKENDS)}.")
        if int(n_examples) < 1:
            raise ValueError(f"n_examples must be >= 1, got {n_examples}.")
        self.predictor = predictor
        self.sim_fn = sim_fn
        self.task = task
        self.precompute_grads = bool(precompute_grads)
        self.backend = backend
        self.verbose = verbose
        self.n_examples = int(n_examples)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        self.eps = float(eps)
        self.engine = make_engine(predictor, loss_fn, task=task, params=params, framework=backend, device=device,
                                  chunk_size=chunk_size)
        self.meta: dict[str, Any] = {
            "name": "GradientSimilarity",
            "type": ["whitebox"],
            "explanations": ["local"],
            "params": {"sim_fn_name": sim_fn, "store_grads": self.precompute_grads, "backend_name": backend,
                       "task_name": task},
            "version": "gradindex-0.1.0",
        }
        self.X_train: np.ndarray | None = None
        self.Y_train: np.ndarray | None = None
        self._store: _GradStore | None = None

    def __repr__(self) -> str:
        return f"GradientSimilarity(meta={self.meta!r})"

    # ------------------------------------------------------------------ fit
    def fit(self, X_train: Any, Y_train: Any) -> "GradientSimilarity":
        """Keep the training set; with ``precompute_grads`` also its gradients, in compact exact form."""
        X_train, Y_train = _to_numpy(X_train), _to_numpy(Y_train)
        if X_train.ndim < 1 or len(X_train) == 0:
            raise ValueError("X_train must hold at least one example with a leading batch dimension.")
        if Y_train is None or Y_train.ndim == 0:
            raise ValueError("Y_train must have one target per training example.")
        if len(X_train) != len(Y_train):
            raise ValueError(f"X_train and Y_train lengths differ: {len(X_train)} vs {len(Y_train)}.")
        self.engine.check_inputs(X_train, Y_train)
        self.X_train, self.Y_train = X_train, Y_train
        self._store = self._compute_store(X_train, Y_train) if self.precompute_grads else None
        return self

    def _compute_store(self, X: np.ndarray, Y: np.ndarray | None, chunk: int | None = None) -> _GradStore:
        """Gradients of X in compact form. ``chunk=None`` (fit): size chunks so that the transient
        memory of a chunk (its per-layer blocks) stays about 2% of the store, measured on a first
        chunk of 8 examples, which keeps fit's peak memory close to what it keeps."""
        store = None
        bar = None
        if self.verbose:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(X), desc="gradients", unit="ex")
        start, step = 0, chunk or 8
        while start < len(X):
            stop = start + step
            for s, blocks in self.engine.iter_blocks(X[start:stop], None if Y is None else Y[start:stop], step):
                if store is None:
                    dtype = np.float64 if _dtype_of(blocks[0]) == np.float64 else np.float32
                    store = _GradStore(_Layout.of(blocks), len(X), dtype)
                store.put(start + s, blocks)
                if bar is not None:
                    bar.update(blocks[0].n)
                if chunk is None and start == 0:
                    per_example = sum(_block_bytes(b) for b in blocks) / blocks[0].n
                    per_stored = store.nbytes / len(X)
                    step = int(np.clip(0.02 * len(X) * per_stored / per_example, 8, self.engine.chunk_size))
            start = stop
        if bar is not None:
            bar.close()
        return store

    @property
    def grad_bytes(self) -> int:
        """Bytes held by the precomputed training gradients (0 without ``precompute_grads``)."""
        return 0 if self._store is None else self._store.nbytes

    # -------------------------------------------------------------- explain
    def _match_shape(self, X: np.ndarray, what: str, ref: np.ndarray) -> np.ndarray:
        if X.shape == ref.shape[1:]:
            return X[None]
        if X.shape[1:] != ref.shape[1:]:
            raise ValueError(f"{what} has shape {X.shape}, expected (n, {', '.join(map(str, ref.shape[1:]))}) or "
                             f"({', '.join(map(str, ref.shape[1:]))}) to match the training data.")
        return X

    def explain(self, X: Any, Y: Any = None) -> Explanation:
        """Score each query against every training example; return them sorted, most similar first.

        ``Y``: targets, one per query or one for all; optional for classification (the model's
        predicted class is used), required for regression.
        """
        if self.X_train is None:
            raise ValueError("Call fit(X_train, Y_train) before explain.")
        X = self._match_shape(_to_numpy(X), "X", self.X_train)
        if len(X) == 0:
            raise ValueError("X is empty: pass at least one query example.")
        if Y is not None:
            Y = _to_numpy(Y)
            if Y.ndim == self.Y_train.ndim - 1 and Y.shape == self.Y_train.shape[1:] and Y.ndim > 0:
                Y = Y[None]
        if self.task == "regression" and Y is None:
            raise ValueError("Regression task requires a target value: pass Y.")
        X, Y = self.engine.check_inputs(X, Y)
        Y = self.engine.resolve_targets(X, Y)
        if self._store is not None:
            q = self._compute_store(X, Y, chunk=self.engine.chunk_size)
            scores = self._kernel(q.dots(self._store), q.sq, self._store.sq)
        else:
            scores = self._adhoc_scores(X, Y)
        return self._build_explanation(scores)

    def _adhoc_scores(self, X: np.ndarray, Y: np.ndarray | None) -> np.ndarray:
        """Scores without stored training gradients: stream the training set in chunks."""
        q = self._compute_store(X, Y, chunk=self.engine.chunk_size)
        out = np.empty((len(X), len(self.X_train)))
        cs = self.engine.chunk_size
        for s in range(0, len(self.X_train), cs):
            t = self._compute_store(self.X_train[s:s + cs], self.Y_train[s:s + cs], chunk=cs)
            out[:, s:s + cs] = self._kernel(q.dots(t), q.sq, t.sq)
        return out

    def _kernel(self, dots: np.ndarray, sq_q: np.ndarray, sq_t: np.ndarray) -> np.ndarray:
        if self.sim_fn == "grad_dot":
            return dots
        if self.sim_fn == "grad_cos":
            den = np.sqrt(sq_q)[:, None] * np.sqrt(sq_t)[None, :] + self.eps
        else:
            den = np.broadcast_to(sq_t[None, :] + self.eps, dots.shape)
        out = np.zeros_like(dots)
        np.divide(dots, den, out=out, where=den > 0)  # eps=0 and a zero gradient: score 0, not NaN
        return out

    def _build_explanation(self, scores: np.ndarray) -> Explanation:
        order = np.argsort(-scores, axis=1, kind="stable")
        k = min(self.n_examples, scores.shape[1])
        data = {
            "scores": np.take_along_axis(scores, order, axis=1),
            "ordered_indices": order,
            "most_similar": self.X_train[order[:, :k]],
            "least_similar": self.X_train[order[:, ::-1][:, :k]],
        }
        return Explanation(meta=dict(self.meta, params=dict(self.meta["params"])), data=data)


def _block_bytes(b: Block) -> int:
    """Bytes of a block's arrays: the transient memory one chunk of gradients holds."""
    return int(sum(x.nbytes for x in (b.full, b.a_in, b.d) if x is not None))


def _dtype_of(b: Block) -> Any:
    arr = b.full if b.kind == "full" else b.d
    return arr.dtype
