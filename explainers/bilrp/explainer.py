"""The BiLRP explainer on any PyTorch network: zennit's LRP rules (see ``prepare``) run as one
batched backward pass per input for all output seeds at once; the pair relevances are the product of
the two passes. Plus the helpers around it (PCA projection, the penultimate embedding of a
classifier, the server hook)."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx, nn

from explainers.bilrp.prepare import RULES, Prepared, prepare, trace
from explainers.bilrp.result import BiLRPResult, _pool_rows
from explainers.explanation import Explanation


class BiLRP:
    """BiLRP explainer for an embedding model phi (any ``nn.Module`` torch.fx can trace; see ``prepare``).

    Parameters
    ----------
    model: the embedding phi; explained in eval mode (Dropout off, BatchNorm folded with running stats).
        A private copy is explained: the model itself is not modified.
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
        self._traced, n_lin = trace(model, dtype)
        rules = [rule] * n_lin if isinstance(rule, str) else list(rule)
        if len(rules) != n_lin:
            raise ValueError(f"rule list has {len(rules)} entries but the model has {n_lin} Linear/Conv layers")
        if input_rule is not None:
            rules[0] = input_rule
        for r in rules:
            if r not in RULES:
                raise ValueError(f"unknown LRP rule {r!r}; choose from {RULES}")
        if "zb" in rules[1:]:
            raise ValueError("the z^B rule applies to the input layer only (input_rule='zb')")
        if rules[0] == "zb" and bounds is None:
            raise ValueError("the z^B rule needs input bounds: bounds=(low, high), e.g. (0, 1) for pixels")
        if epsilon < 0 or gamma < 0:
            raise ValueError(f"epsilon and gamma must be >= 0, got epsilon={epsilon}, gamma={gamma}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rules = rules
        self.bounds = bounds
        self.epsilon = float(epsilon)
        self.gamma = float(gamma)
        self.pool = pool
        self.batch_size = int(batch_size)
        self.projection = None if projection is None else torch.as_tensor(np.asarray(projection), dtype=dtype)
        if self.projection is not None and self.projection.dim() != 2:
            raise ValueError(f"projection must be a (dim(phi), k) matrix, got shape {tuple(self.projection.shape)}")
        self.meta: dict[str, Any] = {
            "name": "BiLRP", "type": ["whitebox"], "explanations": ["local"],
            "params": {"rules": list(rules), "bounds": bounds, "epsilon": self.epsilon, "gamma": self.gamma,
                       "projection_rank": None if self.projection is None else int(self.projection.shape[1]),
                       "pool": pool, "batch_size": self.batch_size, "dtype": str(dtype).replace("torch.", "")},
        }
        self._prepared: dict[tuple[int, ...], Prepared] = {}
        self.batched_backward = True  # one vmap'ed backward per seed chunk; False: the input repeated per seed

    # -- public ------------------------------------------------------------------------------

    def embed(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """phi(x) of one example (no batch axis) as seen by the explainer (eval mode, BN folded)."""
        t = self._as_input(x)
        with torch.no_grad():
            return self._prepare(t).module(t)[0].reshape(-1).numpy()

    def explain(self, x: np.ndarray | torch.Tensor, x_other: np.ndarray | torch.Tensor) -> BiLRPResult:
        """Pair relevances R_{ii'} = sum_m R_i(phi_m; x) R_{i'}(phi_m; x') for one pair (no batch axis).

        A pair whose embeddings share no active dimension (similarity 0 without projection) gets an
        all-zero explanation: no seed has relevance to propagate."""
        xa, xb = self._as_input(x), self._as_input(x_other)
        if self.rules[0] == "zb":
            for name, t in (("x", xa), ("x_other", xb)):
                lo, hi = self._input_bounds(t)
                if bool((t < lo).any() or (t > hi).any()):
                    raise ValueError(f"{name} has values outside the z^B bounds {self.bounds}: widen the bounds "
                                     "to the input's range")
        prep_a, prep_b = self._prepare(xa), self._prepare(xb)
        with torch.no_grad():
            phi_a = prep_a.module(xa)[0].reshape(-1)
            phi_b = prep_b.module(xb)[0].reshape(-1)
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
        ra = self._lrp(prep_a, xa, seeds_a)
        rb = self._lrp(prep_b, xb, seeds_b)
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
            phi = prep.module(xa)[0].reshape(-1)
        S = torch.diag(phi) if seeds is None else torch.as_tensor(np.asarray(seeds), dtype=self.dtype)
        return self._lrp(prep, xa, S).numpy()

    def rewrites(self, x: np.ndarray | torch.Tensor) -> list[str]:
        """What the preparation did to the model for inputs shaped like ``x``: each traced call given an
        LRP rule, each BatchNorm folded, each shared module copied (see ``explainers.bilrp.prepare``)."""
        return list(self._prepare(self._as_input(x)).rewrites)

    # -- internals ---------------------------------------------------------------------------

    def _as_input(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x), dtype=self.dtype)
        return t.unsqueeze(0)

    def _prepare(self, x: torch.Tensor) -> Prepared:
        key = tuple(x.shape)
        if key not in self._prepared:
            self._prepared[key] = prepare(self._traced, x, self.rules, epsilon=self.epsilon, gamma=self.gamma,
                                          dtype=self.dtype)
        return self._prepared[key]

    def _input_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The z^B bounds broadcast to the input x (1, *input_shape)."""
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
        """LRP of input x (1, *shape) for a batch of output seeds (M, dim(phi)) -> (M, *shape): zennit's
        rules hooked on the prepared model, the seeds fed as output gradients in chunks of batch_size."""
        M = seeds.shape[0]
        if M == 0:
            return torch.zeros(0, *x.shape[1:], dtype=self.dtype)
        if self.rules[0] == "zb":
            self._set_bounds(prep, x)
        out: list[torch.Tensor] = []
        with prep.composite.context(prep.module) as model:
            if self.batched_backward:
                xi = x.clone().requires_grad_(True)
                y = model(xi)
                for s in range(0, M, self.batch_size):
                    chunk = seeds[s:s + self.batch_size]
                    try:
                        g, = torch.autograd.grad(y, xi, grad_outputs=chunk.reshape(chunk.shape[0], *y.shape),
                                                 retain_graph=True, is_grads_batched=True)
                    except RuntimeError as exc:  # an op without a batching rule: redo it exactly, unbatched
                        warnings.warn(f"BiLRP: the batched backward failed ({exc}); falling back to one "
                                      "forward of the input repeated per seed", RuntimeWarning, stacklevel=3)
                        self.batched_backward = False
                        break
                    out.append(g[:, 0])
            if not self.batched_backward:
                out = []
                for s in range(0, M, self.batch_size):
                    chunk = seeds[s:s + self.batch_size]
                    xi = x.expand(chunk.shape[0], *x.shape[1:]).clone().requires_grad_(True)
                    y = model(xi)
                    g, = torch.autograd.grad(y, xi, grad_outputs=chunk.reshape(y.shape))
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


