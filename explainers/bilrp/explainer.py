"""The BiLRP explainer on any PyTorch network: zennit's LRP rules (see ``prepare``) run as one
batched backward pass per input for all output seeds at once; the pair relevances are the product of
the two passes. Plus the helpers around it (PCA projection, the penultimate embedding of a
classifier, the server hook)."""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx, nn

from explainers.bilrp.options import check_options
from explainers.bilrp.prepare import Prepared, prepare, trace
from explainers.bilrp.result import BiLRPResult, _pool_rows
from explainers.explanation import Explanation


# Traced (and prepared) models, reused by every explainer of the same model and options: the server
# builds an explainer per request. An entry is valid while the model's parameters and buffers are the
# same tensors at the same version (an in-place update, e.g. an optimizer step, bumps the version).
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                 for t in itertools.chain(model.parameters(), model.buffers()))


def _traced(model: nn.Module, dtype: torch.dtype) -> tuple[fx.GraphModule, int, dict]:
    """The traced copy of ``model`` in ``dtype``, its Linear/Conv count and its cache of prepared graphs
    (cached per model while the model's weights are unchanged)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"BiLRP needs a torch.nn.Module, got {type(model).__name__}")
    fp = _fingerprint(model)
    with _CACHE_LOCK:
        try:
            per_model = _CACHE.setdefault(model, {})
        except TypeError:  # not weak-referenceable: no caching
            per_model = {}
        entry = per_model.get(dtype)
        if entry is None or entry[0] != fp:
            traced, n_lin = trace(model, dtype)
            entry = per_model[dtype] = (fp, traced, n_lin, {})
    return entry[1], entry[2], entry[3]


class BiLRP:
    """BiLRP explainer for an embedding model phi (any ``nn.Module`` torch.fx can trace; see ``prepare``).

    Parameters
    ----------
    model: the embedding phi; explained in eval mode (Dropout off, BatchNorm folded with running stats).
        A private copy is explained: the model itself is not modified. The traced copy is cached per
        model (and dropped when the model's weights change), so building an explainer per call is cheap.
    rule: LRP rule for every Linear/Conv layer ("zero", "epsilon", "gamma"), or a sequence with one
        rule per Linear/Conv call in execution order, input side first.
    input_rule: optional rule for the first Linear/Conv layer (typically "zb" for pixels).
    bounds: (low, high) input bounds for the z^B rule: scalars or arrays broadcastable to the input.
    epsilon, gamma: parameters of the epsilon and gamma rules.
    projection: optional (dim(phi), k) matrix P; BiLRP then explains <P^T phi(x), P^T phi(x')>
        with k seeds instead of dim(phi) (use ``pca_projection`` or an orthonormal basis).
    pool: 'auto' (4x4 patches for (C,H,W), tokens for (T,D), none for vectors), an int or (h, w)
        patch size, 'tokens', or None/'features'.
    batch_size: seeds pushed through the network at once (memory knob).
    dtype: computation dtype (float32 default; float64 for exactness checks).
    """

    def __init__(self, model: nn.Module, rule: str | Sequence[str] = "epsilon", input_rule: str | None = None,
                 bounds: tuple[Any, Any] | None = None, epsilon: float = 1e-6, gamma: float = 0.25,
                 projection: np.ndarray | torch.Tensor | None = None, pool: Any = "auto", batch_size: int = 256,
                 dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._traced, n_lin, self._prepared_cache = _traced(model, dtype)
        o = check_options(n_lin, rule, input_rule, bounds, epsilon, gamma, projection, pool, batch_size, dtype)
        self.rules, self.bounds, self.epsilon, self.gamma = o.rules, o.bounds, o.epsilon, o.gamma
        self.pool, self.batch_size, self.projection, self.meta = o.pool, o.batch_size, o.projection, o.meta
        # False (default): the inputs repeated once per seed along the batch axis, one backward per
        # chunk; True: one forward and a vmapped backward per chunk (slower on CPU: torch's vmap rule for
        # convolutions loops over the seeds)
        self.batched_backward = False
        # Linear/Conv rules through ``prepare.DirectRule`` (False: zennit's own hook plumbing; same values)
        self.direct = True

    # -- public ------------------------------------------------------------------------------

    def embed(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """phi(x) of one example (no batch axis) as seen by the explainer (eval mode, BN folded)."""
        t = self._as_input(x)
        with torch.no_grad():
            return self._prepare(t).module(t)[0].reshape(-1).numpy()

    def explain(self, x: np.ndarray | torch.Tensor, x_other: np.ndarray | torch.Tensor) -> BiLRPResult:
        """Pair relevances R_{ii'} = sum_m R_i(phi_m; x) R_{i'}(phi_m; x') for one pair (no batch axis).

        Each input goes through one forward and one backward per chunk of seeds (the input repeated
        once per seed along the batch axis; see ``_lrp``). A pair whose embeddings share no active dimension (similarity
        0 without projection) gets an all-zero explanation: no seed has relevance to propagate."""
        xa, xb = self._as_input(x), self._as_input(x_other)
        if self.rules[0] == "zb":
            for name, t in (("x", xa), ("x_other", xb)):
                lo, hi = self._input_bounds(t)
                if bool((t < lo).any() or (t > hi).any()):
                    raise ValueError(f"{name} has values outside the z^B bounds {self.bounds}: widen the bounds "
                                     "to the input's range")
        prep_a = self._prepare(xa)
        prep_b = prep_a if xa.shape == xb.shape else self._prepare(xb)
        with torch.no_grad():
            phi_a, phi_b = self._forward(prep_a, xa)[0], self._forward(prep_b, xb)[0]
        D = phi_a.numel()
        P = self.projection
        if P is not None:
            if P.shape[0] != D:
                raise ValueError(f"projection has {P.shape[0]} rows but the embedding has {D} dimensions")
            seeds_a = (P * phi_a[:, None]).T  # (k, D): row k is P[:, k] * phi
            seeds_b = (P * phi_b[:, None]).T
            explained = float((P.T @ phi_a) @ (P.T @ phi_b))
        else:
            # only dimensions active in both embeddings contribute (a zero seed gives zero relevance)
            active = torch.nonzero((phi_a != 0) & (phi_b != 0)).reshape(-1)
            eye = torch.eye(D, dtype=self.dtype)[active]
            seeds_a, seeds_b = eye * phi_a, eye * phi_b
            explained = float(phi_a @ phi_b)
        in_a, in_b = tuple(xa.shape[1:]), tuple(xb.shape[1:])
        # one pass per input (its seeds as copies along the batch axis): every number computed for x is
        # independent of the input it is paired with (a batch of both would let the convolution's
        # algorithm, and with it the rounding of near-zero pre-activations, depend on the partner)
        ra = self._lrp(prep_a, xa, seeds_a[:, None])[:, 0]
        rb = self._lrp(prep_b, xb, seeds_b[:, None])[:, 0]
        fa, fb = ra.reshape(ra.shape[0], int(np.prod(in_a))), rb.reshape(rb.shape[0], int(np.prod(in_b)))
        pa, grid_a, pool_used = _pool_rows(ra, in_a, self.pool)
        pb, grid_b, _ = _pool_rows(rb, in_b, self.pool)
        return BiLRPResult(
            relevance=(fa.T @ fb).numpy(), pooled=(pa.T @ pb).numpy(), similarity=float(phi_a @ phi_b),
            explained=explained, r_x=fa.numpy(), r_other=fb.numpy(), input_shape=in_a, input_shape_other=in_b,
            pool=pool_used, pool_grid=tuple(grid_a), pool_grid_other=tuple(grid_b), rules=list(self.rules))

    def explanation(self, x: np.ndarray | torch.Tensor, x_other: np.ndarray | torch.Tensor) -> Explanation:
        """``explain`` wrapped in the alibi-style ``Explanation(meta, data)`` envelope (``meta`` carries
        the explainer's parameters; ``data`` the result's fields, e.g. ``exp.pooled``, ``exp.top_pairs``)."""
        return self.explain(x, x_other).to_explanation(self.meta)

    def relevance(self, x: np.ndarray | torch.Tensor, seeds: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Ordinary (first-order) LRP of one input for a batch of output seeds (k, dim(phi)).

        Default seeds: diag(phi(x)), i.e. row m explains phi_m(x) alone. Returns (k, *input_shape).
        """
        xa = self._as_input(x)
        prep = self._prepare(xa)
        with torch.no_grad():
            phi = self._forward(prep, xa)[0]
        S = torch.diag(phi) if seeds is None else torch.as_tensor(np.asarray(seeds), dtype=self.dtype)
        return self._lrp(prep, xa, S[:, None])[:, 0].numpy()

    def rewrites(self, x: np.ndarray | torch.Tensor) -> list[str]:
        """What the preparation did to the model for inputs shaped like ``x``: each traced call given an
        LRP rule, each BatchNorm folded, each shared module copied (see ``explainers.bilrp.prepare``)."""
        return list(self._prepare(self._as_input(x)).rewrites)

    # -- internals ---------------------------------------------------------------------------

    def _as_input(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x), dtype=self.dtype)
        return t.unsqueeze(0)

    def _prepare(self, x: torch.Tensor) -> Prepared:
        key = (tuple(x.shape), tuple(self.rules), self.epsilon, self.gamma, self.direct)
        with _CACHE_LOCK:
            prep = self._prepared_cache.get(key)
        if prep is None:
            prep = prepare(self._traced, x, self.rules, epsilon=self.epsilon, gamma=self.gamma, dtype=self.dtype,
                           direct=self.direct)
            with _CACHE_LOCK:
                prep = self._prepared_cache.setdefault(key, prep)
        return prep

    @staticmethod
    def _check_batch(prep: Prepared, y: torch.Tensor, n: int) -> None:
        """The model must keep the batch axis: n inputs give n outputs of the one-example shape (a
        forward that flattens the batch axis away would mix the copies' relevances)."""
        if prep.out_shape and tuple(y.shape) != (n, *prep.out_shape[1:]):
            raise TypeError(f"the model maps a batch of {n} inputs to shape {tuple(y.shape)}, not "
                               f"{(n, *prep.out_shape[1:])}: BiLRP needs a forward that keeps the batch axis")

    def _forward(self, prep: Prepared, x: torch.Tensor) -> torch.Tensor:
        """phi of a batch of inputs (n, *shape) -> (n, dim(phi)), without hooks."""
        y = prep.module(x)
        self._check_batch(prep, y, x.shape[0])
        return y.reshape(x.shape[0], -1)

    def _input_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The z^B bounds broadcast to the input x (n, *input_shape)."""
        lo, hi = self.bounds
        try:
            lo = torch.as_tensor(np.asarray(lo), dtype=self.dtype) * torch.ones_like(x)
            hi = torch.as_tensor(np.asarray(hi), dtype=self.dtype) * torch.ones_like(x)
        except RuntimeError as e:
            raise ValueError(f"bounds do not broadcast to the input shape {tuple(x.shape[1:])}: {e}") from None
        return lo, hi

    def _set_bounds(self, prep: Prepared, x: torch.Tensor) -> None:
        """The z^B bounds at the first layer's input: the input bounds carried through the calls before it
        (padding gives bounds 0, 0 to padded pixels: fixed zeros take no relevance)."""
        captured: list[torch.Tensor] = []
        handle = prep.first_linear.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].detach()))
        try:
            with torch.no_grad():
                for t in self._input_bounds(x):
                    prep.module(t)
        finally:
            handle.remove()
        prep.bounds.low, prep.bounds.high = captured[0], captured[1]

    def _lrp(self, prep: Prepared, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """LRP of the inputs x (n, *shape) for output seeds (M, n, dim(phi)) -> (M, n, *shape): zennit's
        rules hooked on the prepared model, the seeds fed as output gradients, a chunk at a time.

        Default: the n inputs repeated once per seed of the chunk along the batch axis (c copies of n
        examples), one forward and one backward per chunk; the Linear/Conv rules compute their forward
        and their z's on the n distinct examples only (``prepare.DirectRule``). ``batched_backward =
        True``: one forward of the n inputs and a vmapped backward per chunk instead."""
        M, n = seeds.shape[0], x.shape[0]
        if M == 0:
            return torch.zeros(0, *x.shape, dtype=self.dtype)
        with prep.lock:
            if self.batched_backward:
                try:
                    return self._lrp_vmapped(prep, x, seeds)
                except RuntimeError as exc:  # an op without a batching rule: redo it exactly, unbatched
                    warnings.warn(f"BiLRP: the batched backward failed ({exc}); falling back to one forward of "
                                  "the input repeated per seed", RuntimeWarning, stacklevel=3)
                    self.batched_backward = False
            if self.rules[0] == "zb":
                self._set_bounds(prep, x)  # bounds of the n distinct examples (the rule runs on those)
            # copies per pass: batch_size seeds, fewer where their activations would pass ~1 GiB
            per_copy = max(1, 3 * n * prep.per_example_bytes)
            chunk_size = max(1, min(self.batch_size, (1 << 30) // per_copy))
            out: list[torch.Tensor] = []
            prep.copies.n = n
            try:
                with prep.composite.context(prep.module) as model:
                    for s in range(0, M, chunk_size):
                        chunk = seeds[s:s + chunk_size]
                        c = chunk.shape[0]
                        xi = x.unsqueeze(0).expand(c, *x.shape).reshape(c * n, *x.shape[1:]).clone()
                        if self.rules[0] == "zb" and not self.direct:  # zennit's hooks run on every copy
                            self._set_bounds(prep, xi)
                        xi.requires_grad_(True)
                        y = model(xi)
                        self._check_batch(prep, y, c * n)
                        g, = torch.autograd.grad(y, xi, grad_outputs=chunk.reshape(y.shape))
                        out.append(g.reshape(c, *x.shape))
            finally:
                prep.copies.n = None
            return torch.cat(out).detach()

    def _lrp_vmapped(self, prep: Prepared, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        M = seeds.shape[0]
        if self.rules[0] == "zb":
            self._set_bounds(prep, x)
        out: list[torch.Tensor] = []
        with prep.composite.context(prep.module) as model:
            xi = x.clone().requires_grad_(True)
            y = model(xi)
            self._check_batch(prep, y, x.shape[0])
            for s in range(0, M, self.batch_size):
                chunk = seeds[s:s + self.batch_size]
                g, = torch.autograd.grad(y, xi, grad_outputs=chunk.reshape(chunk.shape[0], *y.shape),
                                         retain_graph=True, is_grads_batched=True)
                out.append(g)
        return torch.cat(out).detach()


def pca_projection(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Top-k right singular vectors (dim(phi), k) of a matrix of embeddings (n, dim(phi)) — uncentered,
    because BiLRP explains the raw dot product. With k = rank, <P^T phi, P^T phi'> = <phi, phi'> on
    the span of the embeddings."""
    E = np.asarray(embeddings, dtype=np.float64)
    if E.ndim != 2 or not 1 <= k <= min(E.shape):
        raise ValueError(f"need embeddings (n, dim) and 1 <= k <= min(n, dim), got shape {E.shape} and k={k}")
    _, _, vt = np.linalg.svd(E, full_matrices=False)
    return vt[:k].T.astype(np.float32)


def penultimate_embedding(classifier: nn.Module) -> nn.Module:
    """The classifier without its last Linear layer: phi(x) = the activations the logits are read from.

    For gradients restricted to the last Linear layer, the gradient-similarity kernel factorises
    exactly: <g(x), g(x')> = <delta, delta'> (<phi(x), phi(x')> + 1), delta = dLoss/dlogits, so
    BiLRP on this phi explains the input-dependent factor of a grad_dot match (docs/bilrp.md).

    An ``nn.Sequential`` is sliced before its last Linear; any other model is traced with torch.fx and
    must return the output of an ``nn.Linear`` module (torchvision's VGG and ResNet do): the returned
    graph module computes that Linear's input. The layers are shared with ``classifier``, not copied.
    """
    if isinstance(classifier, nn.Sequential):
        layers = list(classifier)
        last = max((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
        if last is None or last == 0:
            raise ValueError("the classifier needs a final Linear layer with layers before it")
        return nn.Sequential(*layers[:last]).eval()
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"penultimate_embedding needs a torch.nn.Module, got {type(classifier).__name__}")
    try:
        gm = fx.symbolic_trace(classifier)
    except Exception as exc:  # fx raises many kinds
        raise TypeError(f"penultimate_embedding traces the classifier's forward with torch.fx, and it cannot be "
                        f"traced ({type(exc).__name__}: {exc})") from None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0]
    if not (isinstance(last, fx.Node) and last.op == "call_module"
            and isinstance(gm.get_submodule(last.target), nn.Linear)):
        raise ValueError("the classifier's forward must return the output of an nn.Linear layer (the logits), "
                         f"got {getattr(last, 'name', last)!r}")
    feed = last.args[0]
    if not isinstance(feed, fx.Node) or feed.op == "placeholder":
        raise ValueError("the classifier needs layers before its final Linear layer")
    out.args = (feed,)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval()


def explain_pair(embedding_model: nn.Module, x: Any, x_other: Any, **opts: Any) -> BiLRPResult:
    """Server hook: validate a pair of single inputs (no batch axis) and explain their similarity.

    ``opts`` are the ``BiLRP`` constructor arguments (rule, input_rule, bounds, epsilon, gamma,
    projection, pool, batch_size). Raises ValueError with what to fix on bad input.
    """
    arrs = []
    for name, v in (("x", x), ("x_other", x_other)):
        if v is None:
            raise ValueError(f"{name} is missing")
        try:
            arr = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be a numeric array: {e}") from None
        if arr.size == 0:
            raise ValueError(f"{name} is empty")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values; send finite numbers")
        arrs.append(arr)
    if arrs[0].shape != arrs[1].shape:
        raise ValueError(f"x and x_other must have the same shape (one example each, no batch axis): "
                         f"got {arrs[0].shape} and {arrs[1].shape}")
    known = {"rule", "input_rule", "bounds", "epsilon", "gamma", "projection", "pool", "batch_size", "dtype"}
    unknown = set(opts) - known
    if unknown:
        raise ValueError(f"unknown BiLRP options {sorted(unknown)}; allowed: {sorted(known)}")
    explainer = BiLRP(embedding_model, **opts)
    try:
        return explainer.explain(arrs[0], arrs[1])
    except RuntimeError as e:  # shape errors from torch ops
        raise ValueError(f"inputs of shape {arrs[0].shape} do not fit the embedding model "
                         f"(one example, no batch axis): {e}") from None


