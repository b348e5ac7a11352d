"""The gradient engine: per-example loss gradients w.r.t. model parameters, vectorized.

One engine serves the offline index build and the server's query path, so a query is embedded
exactly as the training set was. Framework adapters live in
``indexer.engine.pytorch`` and ``indexer.engine.keras``; this module holds what they share: the :class:`Block` a chunk's gradients come in, target
resolution, chunking and assembly into flat rows.

Why blocks: for a Linear/Dense layer the per-example weight gradient is an outer product
``d aᵀ`` (output gradient × input activation). Consumers that only need inner products or
projections (GradientSimilarity's precomputed store, the factored projection) can work on the
factors ``a`` and ``d`` directly and never materialize the (dout × din) matrix.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.defaults import TASKS


@dataclass
class Block:
    """Per-example gradients of one module's selected parameters for a chunk of n examples.

    ``kind == "full"``: ``full`` is (n, size), already in parameter order.
    ``kind == "outer"``: ``a`` is (n, L, din) input activations (a trailing column of ones when the
    bias is selected), ``d`` is (n, L, dout) output gradients; the gradient of the weight matrix is
    ``sum_l d_l a_lᵀ``. For a token sequence L is the number of positions (the gradient has rank ≤ L).
    An embedding gives ``idx`` (n, L) token ids instead of ``a_in``: ``a`` is then the one-hot rows
    (n, L, vocab), formed only when a consumer asks for it; materializing scatters ``d`` by ``idx``. ``layout`` says how the parameter stores that matrix: ``"out_in"`` (torch,
    (dout, din...)) or ``"in_out"`` (Keras, (..., din, dout)); ``parts`` lists (name, numel) of the
    covered parameters in order; with a bias the last column of ``a`` belongs to it.

    Engines pass the activations without the ones column (``a_in``); ``a`` appends it on first
    access only, because for conv layers that copy of the unfolded patches is a fifth of the
    engine's time and consumers that materialize or form norms never need it.
    """

    name: str
    kind: str
    parts: list[tuple[str, int]]
    full: np.ndarray | None = None
    a_in: np.ndarray | None = None
    d: np.ndarray | None = None
    layout: str = "out_in"
    has_bias: bool = False
    has_weight: bool = True
    idx: np.ndarray | None = None
    vocab: int = 0
    _a: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.idx is not None and self.a_in is None:
            self.a_in = _OneHot(self.idx, self.vocab)  # type: ignore[assignment]

    @property
    def a(self) -> np.ndarray | None:
        """Input activations (n, L, din[+1]): with a trailing ones column when the bias is selected."""
        if isinstance(self.a_in, _OneHot):
            self.a_in = self.a_in.dense(self.d.dtype)
        if self.a_in is None or not self.has_bias:
            return self.a_in if self.has_weight or self.a_in is None else None
        if self._a is None:
            x = self.a_in
            ones = np.ones(x.shape[:2] + (1,), dtype=x.dtype)
            self._a = np.concatenate([x, ones], axis=2) if self.has_weight else ones
        return self._a

    @property
    def a_shape(self) -> tuple[int, int, int]:
        """Shape of :attr:`a` without forming it (an embedding's one-hot rows are never formed for it)."""
        n, L = self.d.shape[0], self.d.shape[1]
        if not self.has_weight:
            return (n, L, 1)
        return (n, L, int(self.a_in.shape[2]) + int(self.has_bias))

    @a.setter
    def a(self, value: np.ndarray) -> None:
        """Set the activations including the ones column (when the bias is selected)."""
        self._a = value
        if self.has_bias:
            self.a_in = value[..., :-1] if self.has_weight else value[..., :0]
        else:
            self.a_in = value

    @property
    def size(self) -> int:
        """Number of parameters this block covers."""
        return int(sum(n for _, n in self.parts))

    @property
    def n(self) -> int:
        """Number of examples in the chunk."""
        return int((self.full if self.kind == "full" else self.d).shape[0])

    def materialize(self, out: np.ndarray | None = None) -> np.ndarray:
        """Return the per-example gradient rows (n, size) in parameter order (into ``out`` if given).

        The outer products run in torch (a batched GEMM, or a broadcast multiply when L = 1), which is
        several times faster than numpy's stacked matmul on these shapes; the arrays are shared, not copied.
        """
        import torch

        if self.kind == "full":
            if out is None:
                return self.full
            out[...] = self.full
            return out
        n = self.n
        if out is None:
            out = np.empty((n, self.size), dtype=self.d.dtype)
        d = torch.from_numpy(self.d)
        if isinstance(self.a_in, _OneHot):  # embedding: scatter the output gradients by token id
            idx = torch.from_numpy(self.a_in.idx).long()
            W = torch.zeros(n, self.a_in.vocab, d.shape[2], dtype=d.dtype)
            W.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d.shape[2]), d)
            out[...] = W.reshape(n, -1).numpy()
            return out
        if not self.has_weight:  # bias only
            out[...] = d.sum(dim=1).numpy()
            return out
        a = torch.from_numpy(self.a_in)
        din, dout = a.shape[2], d.shape[2]
        wsize = din * dout
        if self.has_bias:
            out[:, wsize:] = d.sum(dim=1).numpy()
        o = torch.from_numpy(out) if out.dtype == self.a_in.dtype else None
        if a.shape[1] == 1 and o is not None:
            if self.layout == "out_in":
                torch.mul(d[:, 0, :, None], a[:, 0, None, :], out=o[:, :wsize].view(n, dout, din))
            else:
                torch.mul(a[:, 0, :, None], d[:, 0, None, :], out=o[:, :wsize].view(n, din, dout))
            return out
        if self.layout == "out_in":
            W = torch.bmm(d.transpose(1, 2), a)  # (n, dout, din)
        else:
            W = torch.bmm(a.transpose(1, 2), d)  # (n, din, dout)
        out[:, :wsize] = W.reshape(n, wsize).numpy()
        return out

    def sq_norms(self) -> np.ndarray:
        """Squared gradient norm per example, without materializing when the factors are rank one."""
        if self.kind == "full":
            return np.einsum("ij,ij->i", self.full, self.full, dtype=np.float64)
        if self.d.shape[1] == 1 and self.has_weight and not isinstance(self.a_in, _OneHot):
            aa = np.einsum("nli,nli->n", self.a_in, self.a_in, dtype=np.float64) + (1.0 if self.has_bias else 0.0)
            return aa * np.einsum("nlo,nlo->n", self.d, self.d, dtype=np.float64)
        m = self.materialize()
        return np.einsum("ij,ij->i", m, m, dtype=np.float64)

    def weighted_sums(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Σ_i w_i g_i per covered parameter (float64, flat), without forming per-example rows.

        The engine's numeric guard compares this with one batched backward of Σ_i w_i L_i.
        """
        w = np.asarray(w, dtype=np.float64)
        if self.kind == "full":
            tot = w @ self.full.astype(np.float64)
        else:
            d = self.d.astype(np.float64) * w[:, None, None]
            dout = d.shape[2]
            if isinstance(self.a_in, _OneHot):
                W = np.zeros((self.a_in.vocab, dout))
                np.add.at(W, self.a_in.idx.reshape(-1), d.reshape(-1, dout))
                tot = W.reshape(-1)
            else:
                pieces = []
                if self.has_weight:
                    a = self.a_in.astype(np.float64).reshape(-1, self.a_in.shape[2])
                    dd = d.reshape(-1, dout)
                    pieces.append((dd.T @ a if self.layout == "out_in" else a.T @ dd).reshape(-1))
                if self.has_bias:
                    pieces.append(d.sum(axis=(0, 1)))
                tot = np.concatenate(pieces)
        out, c = {}, 0
        for name, size in self.parts:
            out[name] = tot[c:c + size]
            c += size
        return out


class _OneHot:
    """Token ids standing for one-hot activation rows (n, L, vocab); densified only on request."""

    def __init__(self, idx: np.ndarray, vocab: int) -> None:
        self.idx = np.asarray(idx, dtype=np.int64)
        self.vocab = int(vocab)
        self.shape = (self.idx.shape[0], self.idx.shape[1], self.vocab)
        self.nbytes = self.idx.nbytes

    def dense(self, dtype: Any) -> np.ndarray:
        out = np.zeros(self.shape, dtype=dtype)
        np.put_along_axis(out, self.idx[..., None], 1.0, axis=2)
        return out


def guard_tolerance(dtype: Any) -> float:
    """Relative tolerance of the numeric guard (error / largest entry) for a parameter dtype.

    A wrong rule is off by a sizeable fraction of the gradient (0.1-0.6 in the cases measured);
    rounding of a correct one is a few hundred ulps of the largest entry at most.
    """
    name = str(dtype).replace("torch.", "")
    if "float64" in name or "double" in name:
        return 1e-9
    if "float16" in name or "bfloat16" in name or "half" in name:
        return 3e-2
    return 2e-4


def select_names(names: Sequence[str], patterns: Sequence[str] | str | None,
                 layer_names: dict[int, list[str]] | None = None) -> list[str]:
    """Names selected by ``patterns`` (all names when None), in the given order.

    Each pattern is a regex searched in the parameter name, or a layer object (torch module or Keras
    layer) whose own parameters are taken; ``layer_names`` maps ``id(layer)`` to those names.
    """
    if patterns is None:
        return list(names)
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple, set)):
        patterns = [patterns]
    regs, chosen = [], set()
    for p in patterns:
        if isinstance(p, str):
            regs.append(re.compile(p))
        elif layer_names is not None and id(p) in layer_names:
            chosen.update(layer_names[id(p)])
        else:
            raise TypeError(f"params entries must be regex strings or layers of the model, got {type(p).__name__}.")
    return [n for n in names if n in chosen or any(r.search(n) for r in regs)]


class GradientEngine(ABC):
    """Framework-independent face of a model: predictions and per-example loss gradients."""

    framework: str
    task: str
    param_names: list[str]
    param_sizes: list[int]
    chunk_size: int

    # ---- framework specific -------------------------------------------------
    @abstractmethod
    def predict(self, X: np.ndarray) -> np.ndarray:
        """Model outputs in inference mode (no dropout, frozen normalization statistics)."""

    @abstractmethod
    def _chunk_blocks(self, X: np.ndarray, Y: np.ndarray | None) -> list[Block]:
        """Blocks for one chunk (X already validated, Y resolved)."""

    @abstractmethod
    def parameter_arrays(self) -> list[np.ndarray]:
        """Current values of the selected parameters, in order (for fingerprints)."""

    # ---- rules and checks ---------------------------------------------------
    @property
    def rules(self) -> dict[str, str]:
        """Which rule computes each selected parameter's per-example gradient (e.g. 'linear',
        'embedding', 'norm', 'tied', or the generic 'vmap'/'loop'/'tape_loop'). Final once
        :attr:`verified`; an index records it so a user can see how its gradients were made."""
        return dict(getattr(self, "_rule_of_param", {}))

    @property
    def verified(self) -> bool:
        """Whether the structural and numeric checks have passed on a chunk of two or more examples."""
        return bool(getattr(self, "_verified", False))

    def reset_guard(self) -> None:
        """Check again on the next chunk (called at the start of every fit/build)."""
        self._verified = False

    # ---- guard bookkeeping shared by the adapters ----------------------------
    # An adapter keeps ``_rule_of_param`` (name -> rule), ``_reasons`` (name -> why it is on the
    # generic path) and ``_warned`` (names already announced), and names its generic path below.
    #: rules of the adapter's exact generic path (a parameter with one of them has no proven rule)
    _generic_rules: tuple[str, ...] = ()
    #: the rule a parameter failing a check is sent to
    _fallback_rule: str = ""
    #: how the fallback warning describes the generic path
    _generic_path: str = ""

    def _generic(self) -> list[str]:
        """Selected parameters on the exact generic path, in parameter order."""
        return [n for n in self.param_names if self._rule_of_param[n] in self._generic_rules]

    def _demote(self, failed: dict[str, str]) -> None:
        """Send parameters that failed a check to the exact generic path, remembering why."""
        for n, why in failed.items():
            self._rule_of_param[n] = self._fallback_rule
            self._reasons[n] = why

    def _announce(self) -> None:
        """One warning naming the parameters newly sent to the generic path (and why); never repeated."""
        new = [n for n in self._generic() if n not in self._warned]
        if not new:
            return
        self._warned.update(new)
        desc = "; ".join(f"{n} ({self._reasons.get(n, 'no vectorized rule')})" for n in new[:8])
        more = f"; and {len(new) - 8} more" if len(new) > 8 else ""
        warnings.warn(f"gradindex: no vectorized rule proven exact for {desc}{more}: using the exact generic path "
                      f"({self._generic_path}) for them (slower).", RuntimeWarning, stacklevel=5)

    @staticmethod
    def _guard_verdict(w: np.ndarray, blocks: list[Block], refs: dict[str, np.ndarray], loss_ref: np.ndarray,
                       loss_seen: np.ndarray, tol: float) -> dict[str, str]:
        """The numeric guard's comparison, the same for every framework: name -> why, for each failure.

        ``refs`` holds, per checked parameter, the flat float64 gradient of Σ_i w_i L_i from one batched
        backward; the rules' blocks must reproduce it through :meth:`Block.weighted_sums`. ``loss_ref``
        and ``loss_seen`` are the per-example losses without and with the layer capture: if they differ,
        the capture itself changed the model and every checked parameter fails.
        """
        if np.abs(loss_ref - loss_seen).max() > tol * max(1.0, float(np.abs(loss_ref).max())):
            return {p: "the layer capture changed the model's output" for p in refs}
        S: dict[str, np.ndarray] = {}
        for b in blocks:
            for name, vec in b.weighted_sums(w).items():
                S[name] = S.get(name, 0) + vec
        # A gradient that is exactly zero in theory (e.g. key biases under softmax) is rounding noise:
        # it is measured against the largest gradient of the model, not against its own noise.
        floor = 1e-3 * max(np.abs(v).max(initial=0.0) for v in refs.values())
        bad = {}
        for p, ref in refs.items():
            got = S.get(p, np.zeros_like(ref))
            scale = max(np.abs(ref).max(initial=0.0), np.abs(got).max(initial=0.0), floor)
            err = np.abs(got - ref).max(initial=0.0)
            if err > tol * scale or not np.isfinite(err):
                bad[p] = (f"the numeric check failed: weighted sum off by {err / max(scale, 1e-300):.2g} "
                          "of its largest entry")
        return bad

    # ---- shared -------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Total number of selected parameters: the length of one gradient row."""
        return int(sum(self.param_sizes))

    def offsets(self) -> dict[str, int]:
        """Column offset of each selected parameter in a flat gradient row."""
        out, off = {}, 0
        for name, size in zip(self.param_names, self.param_sizes):
            out[name] = off
            off += size
        return out

    def fingerprint(self) -> str:
        """sha256 over selected parameter names, shapes and values: identifies the weights an index used."""
        h = hashlib.sha256()
        for name, arr in zip(self.param_names, self.parameter_arrays()):
            a = np.ascontiguousarray(arr)
            h.update(name.encode())
            h.update(str(a.shape).encode())
            h.update(str(a.dtype).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def check_inputs(self, X: Any, Y: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate a batch: finite values, matching lengths, targets where the task needs them."""
        X = np.asarray(X)
        if X.ndim == 0:
            raise ValueError("X must be a batch of examples with a leading batch dimension, got a scalar.")
        if X.dtype == object:
            raise TypeError("X must be a numeric array, got an object array.")
        if np.issubdtype(X.dtype, np.floating) and not np.all(np.isfinite(X)):
            raise ValueError("X contains NaN or infinite values: clean or impute them first.")
        if Y is None:
            if self.task == "regression":
                raise ValueError("task='regression' needs targets: pass Y (the regression targets).")
            return X, None
        Y = np.asarray(Y)
        if Y.ndim == 0:
            Y = Y[None]
        if len(Y) == 1 and len(X) > 1:
            Y = np.repeat(Y, len(X), axis=0)
        if len(Y) != len(X):
            raise ValueError(f"X and Y lengths differ: {len(X)} examples but {len(Y)} targets.")
        if np.issubdtype(Y.dtype, np.floating) and not np.all(np.isfinite(Y)):
            raise ValueError("Y contains NaN or infinite values.")
        return X, Y

    def resolve_targets(self, X: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray | None:
        """Targets as given; for classification without targets, the model's own predicted class."""
        if Y is not None or self.task == "unsupervised":
            return Y
        if self.task == "regression":
            raise ValueError("task='regression' needs targets: pass Y (the regression targets).")
        preds = []
        for s in range(0, len(X), self.chunk_size):
            preds.append(np.asarray(self.predict(X[s:s + self.chunk_size])))
        P = np.concatenate(preds)
        if P.ndim == 1 or P.shape[-1] == 1:  # a single logit: binary classification
            return (P.reshape(len(P)) > (0.0 if self._logits_binary else 0.5)).astype(np.int64)
        return P.argmax(axis=-1).astype(np.int64)

    _logits_binary = True

    def iter_blocks(self, X: Any, Y: Any = None, chunk_size: int | None = None) -> Iterator[tuple[int, list[Block]]]:
        """Yield ``(start, blocks)`` per chunk of at most ``chunk_size`` examples."""
        X, Y = self.check_inputs(X, Y)
        Y = self.resolve_targets(X, Y)
        cs = chunk_size or self.chunk_size
        for s in range(0, len(X), cs):
            yield s, self._chunk_blocks(X[s:s + cs], None if Y is None else Y[s:s + cs])

    def assemble(self, blocks: list[Block], out: np.ndarray) -> np.ndarray:
        """Write the blocks of a chunk into ``out`` (n, dim) in parameter order.

        Selected parameters that no block covers (a layer the forward pass did not use) have a zero
        gradient, written explicitly: ``out`` may be uninitialized or reused.
        """
        offs = self.offsets()
        covered = {name for b in blocks for name, _ in b.parts}
        for name, size in zip(self.param_names, self.param_sizes):
            if name not in covered:
                out[:, offs[name]:offs[name] + size] = 0
        for b in blocks:
            names = [name for name, _ in b.parts]
            starts = [offs[name] for name in names]
            contiguous = all(starts[i + 1] == starts[i] + b.parts[i][1] for i in range(len(starts) - 1))
            if contiguous:
                b.materialize(out[:, starts[0]:starts[0] + b.size])
                continue
            m = b.materialize()
            c = 0
            for (name, size), o in zip(b.parts, starts):
                out[:, o:o + size] = m[:, c:c + size]
                c += size
        return out

    def iter_grads(self, X: Any, Y: Any = None, chunk_size: int | None = None, dtype: Any = np.float32,
                   reuse_buffer: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, rows)``: flat per-example gradients (c, dim), float32 unless ``dtype`` says.

        With ``reuse_buffer=True`` every chunk is written into the same array (valid until the next
        chunk is requested): a streaming consumer (projection, index build) then avoids faulting in
        fresh pages for each chunk, which costs more than the gradients themselves for large models.
        """
        buf: np.ndarray | None = None
        total, cs = len(np.asarray(X)), chunk_size or self.chunk_size
        for s, blocks in self.iter_blocks(X, Y, chunk_size):
            n = min(cs, total - s)  # not blocks[0].n: a chunk may have no block (only unused layers selected)
            if not reuse_buffer or buf is None or len(buf) < n:
                buf = np.empty((n, self.dim), dtype=dtype)
            yield s, self.assemble(blocks, buf[:n])

    def grads(self, X: Any, Y: Any = None, chunk_size: int | None = None, dtype: Any = np.float32) -> np.ndarray:
        """All per-example gradient rows (n, dim), written straight into one array."""
        X = np.asarray(X)
        out = np.empty((len(X), self.dim), dtype=dtype)
        cs = chunk_size or self.chunk_size
        for s, blocks in self.iter_blocks(X, Y, chunk_size):
            self.assemble(blocks, out[s:s + min(cs, len(X) - s)])
        return out


class WarnOnce:
    """Warn once per engine instance (the generic fallback is announced, not repeated per chunk)."""

    def __init__(self) -> None:
        self.done = False

    def __call__(self, msg: str) -> None:
        if not self.done:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            self.done = True


__all__ = ["Block", "GradientEngine", "WarnOnce", "select_names", "guard_tolerance", "TASKS"]
