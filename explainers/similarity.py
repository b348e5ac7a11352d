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
  ⟨d_q a_qᵀ, d_t a_tᵀ⟩ = (d_q·d_t)(a_q·a_t) is scored with two small GEMMs. Applied at T positions
  of a sequence the gradient Σ_t δ_t a_tᵀ has rank ≤ T: where T·(din + dout) < din·dout the factors
  are kept and scored exactly as Σ_{t,s} (a_t·a'_s)(δ_t·δ'_s); an embedding keeps its token ids and
  output gradients. Other layers are kept as full rows. No approximation anywhere.
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
    """How each block of a chunk is stored: as factors or appended to the full rows.

    ``kinds[i]`` is ``"full"``, ``"outer"`` (activations (L, din[+1]) and output gradients (L, dout) per
    example) or ``"index"`` (an embedding: token ids (L,) and output gradients (L, dout)). A block is
    kept as factors when that is smaller than its gradient: L·(din + dout) < din·dout.
    """

    kinds: list[str]
    full_width: int
    factor_dims: list[tuple[int, int, int]]  # (L, din or 0 for token ids, dout) per factored block

    @property
    def factored(self) -> list[bool]:
        return [k != "full" for k in self.kinds]

    @staticmethod
    def of(blocks: list[Block]) -> "_Layout":
        kinds, width, dims = [], 0, []
        for b in blocks:
            if b.kind == "outer" and b.has_weight:
                L, dout = b.d.shape[1], b.d.shape[2]
                if b.idx is not None:
                    if L * (dout + 1) < b.size:
                        kinds.append("index")
                        dims.append((L, 0, dout))
                        continue
                else:
                    din = b.a_in.shape[2] + int(b.has_bias)
                    if L * (din + dout) < b.size:
                        kinds.append("outer")
                        dims.append((L, din, dout))
                        continue
            kinds.append("full")
            width += b.size
        return _Layout(kinds, width, dims)


class _GradStore:
    """Per-example gradients of a set of examples in the compact exact form of a :class:`_Layout`.

    Inner products of factored blocks are exact "ghost" dot products: for G = Σ_t δ_t a_tᵀ and
    G' = Σ_s δ'_s a'_sᵀ, ⟨G, G'⟩ = Σ_{t,s} (a_t·a'_s)(δ_t·δ'_s); for an embedding a_t·a'_s is
    [id_t == id'_s]. Rank-one blocks (L = 1) reduce to (a·a')(δ·δ').
    """

    def __init__(self, layout: _Layout, n: int, dtype: Any) -> None:
        self.layout = layout
        self.full = np.empty((n, layout.full_width), dtype=dtype)
        self.A = [np.empty((n, L, da), dtype=dtype) if da else np.empty((n, L), dtype=np.int64)
                  for L, da, _ in layout.factor_dims]
        self.D = [np.empty((n, L, dd), dtype=dtype) for L, _, dd in layout.factor_dims]
        self.sq = np.zeros(n, dtype=np.float64)

    @classmethod
    def from_arrays(cls, layout: _Layout, full: np.ndarray, A: list[np.ndarray], D: list[np.ndarray],
                    sq: np.ndarray) -> "_GradStore":
        """A store over arrays that already hold the compact form (e.g. rows read back from disk by
        :mod:`indexer.vectorstore.factors`); nothing is copied."""
        self = cls.__new__(cls)
        self.layout, self.full, self.A, self.D, self.sq = layout, full, list(A), list(D), sq
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored gradients."""
        return int(self.full.nbytes + sum(a.nbytes for a in self.A) + sum(d.nbytes for d in self.D) + self.sq.nbytes)

    def put(self, s: int, blocks: list[Block]) -> None:
        """Store the blocks of the chunk starting at row ``s``."""
        n = blocks[0].n
        col, fi = 0, 0
        for b, kind in zip(blocks, self.layout.kinds):
            if kind == "full":
                rows = b.materialize(self.full[s:s + n, col:col + b.size])
                col += b.size
                self.sq[s:s + n] += np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
                continue
            if b.d.shape[1] != self.D[fi].shape[1]:
                raise ValueError(f"block {b.name!r} has {b.d.shape[1]} positions, the stored examples "
                                 f"{self.D[fi].shape[1]}: inputs must have the training data's shape.")
            self.A[fi][s:s + n] = b.idx if kind == "index" else b.a
            self.D[fi][s:s + n] = b.d
            self.sq[s:s + n] += _ghost(self.A[fi][s:s + n], self.D[fi][s:s + n], None, None, kind)
            fi += 1

    def dots(self, other: "_GradStore") -> np.ndarray:
        """Gradient inner products (m, n) between the rows of ``self`` and of ``other``."""
        out = self.full @ other.full.T if self.full.shape[1] else np.zeros((len(self.sq), len(other.sq)))
        out = out.astype(np.float64)
        for kind, Aq, Dq, At, Dt in zip([k for k in self.layout.kinds if k != "full"], self.A, self.D, other.A,
                                        other.D):
            out += _ghost(Aq, Dq, At, Dt, kind)
        return out


def _ghost(Aq: np.ndarray, Dq: np.ndarray, At: np.ndarray | None, Dt: np.ndarray | None, kind: str,
           budget: int = 1 << 24) -> np.ndarray:
    """Exact ⟨G_i, G'_j⟩ = Σ_{t,s} (a_it·a'_js)(δ_it·δ'_js) from factors; (m, n), or the squared norms (m,)
    when ``At`` is None. Runs in torch, in slices of the second set to bound the (m, L, c, L) temporaries."""
    import torch

    aq, dq = torch.from_numpy(np.ascontiguousarray(Aq)), torch.from_numpy(np.ascontiguousarray(Dq))
    m, L = dq.shape[0], dq.shape[1]
    if At is None:  # squared norms: each example with itself
        dd = torch.bmm(dq, dq.transpose(1, 2))
        aa = (aq[:, :, None] == aq[:, None, :]).to(dd.dtype) if kind == "index" else torch.bmm(aq, aq.transpose(1, 2))
        return (aa * dd).sum(dim=(1, 2)).double().numpy()
    at, dt = torch.from_numpy(np.ascontiguousarray(At)), torch.from_numpy(np.ascontiguousarray(Dt))
    n, Lt = dt.shape[0], dt.shape[1]
    out = torch.empty(m, n, dtype=torch.float64)
    step = max(1, budget // max(1, m * L * Lt))
    dq2 = dq.reshape(m * L, -1)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        dd = (dq2 @ dt[c0:c1].reshape((c1 - c0) * Lt, -1).T).reshape(m, L, c1 - c0, Lt)
        if kind == "index":
            aa = (aq[:, :, None, None] == at[None, None, c0:c1]).to(dd.dtype)
        else:
            aa = (aq.reshape(m * L, -1) @ at[c0:c1].reshape((c1 - c0) * Lt, -1).T).reshape(m, L, c1 - c0, Lt)
        out[:, c0:c1] = (aa * dd).sum(dim=(1, 3)).double()
    return out.numpy()


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
        self.engine.reset_guard()  # the engine's rule checks run on the first chunk of every fit
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
