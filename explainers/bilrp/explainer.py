"""The BiLRP explainer: one explicit layer-wise LRP backward pass per input for a batch of output
seeds, the pair relevances as the product of the two passes; plus the helpers around it (PCA
projection, the penultimate embedding of a classifier, the server hook)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explainers.bilrp.prepare import (RULES, _forward, _lin_forward, _lin_vjp, _Op, _pool_args, _prepare, _sign0,
                                      _stab, _vjp)
from explainers.bilrp.result import BiLRPResult, _pool_rows
from explainers.explanation import Explanation


class BiLRP:
    """BiLRP explainer for an embedding model phi (an nn.Sequential; see the module docstring).

    Parameters
    ----------
    model: the embedding phi; explained in eval mode (Dropout off, BatchNorm folded with running stats).
    rule: LRP rule for every Linear/Conv layer ("zero", "epsilon", "gamma"), or a sequence with one
        rule per Linear/Conv layer, input side first.
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
        self._stab = _stab(dtype)
        self.ops = _prepare(model, dtype)
        n_lin = sum(op.kind == "linear" for op in self.ops)
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
        # rule per op index
        self._op_rule: dict[int, str] = {}
        j = 0
        for i, op in enumerate(self.ops):
            if op.kind == "linear":
                self._op_rule[i] = rules[j]
                j += 1

    # -- public ------------------------------------------------------------------------------

    def embed(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """phi(x) of one example (no batch axis) as seen by the explainer (eval mode, BN folded)."""
        return _forward(self.ops, self._as_input(x))[-1][0].reshape(-1).numpy()

    def explain(self, x: np.ndarray | torch.Tensor, x_other: np.ndarray | torch.Tensor) -> BiLRPResult:
        """Pair relevances R_{ii'} = sum_m R_i(phi_m; x) R_{i'}(phi_m; x') for one pair (no batch axis)."""
        xa, xb = self._as_input(x), self._as_input(x_other)
        if self.rules[0] == "zb":
            for name, t in (("x", xa), ("x_other", xb)):
                lo, hi = self._input_bounds(t)
                if bool((t < lo).any() or (t > hi).any()):
                    raise ValueError(f"{name} has values outside the z^B bounds {self.bounds}: widen the bounds "
                                     "to the input's range")
        acts_a = _forward(self.ops, xa)
        acts_b = _forward(self.ops, xb)
        phi_a = acts_a[-1][0].reshape(-1)
        phi_b = acts_b[-1][0].reshape(-1)
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
        da, db = int(np.prod(in_a)), int(np.prod(in_b))
        R = torch.zeros(da, db, dtype=self.dtype)
        rows_a, rows_b = [], []
        pooled = None
        grid_a = grid_b = (da,)
        pool_used = None
        for s in range(0, max(seeds_a.shape[0], 1), self.batch_size):
            ra = self._lrp(acts_a, seeds_a[s:s + self.batch_size])
            rb = self._lrp(acts_b, seeds_b[s:s + self.batch_size])
            rows_a.append(ra.reshape(ra.shape[0], -1))
            rows_b.append(rb.reshape(rb.shape[0], -1))
            R += rows_a[-1].T @ rows_b[-1]
            pa, grid_a, pool_used = _pool_rows(ra, in_a, self.pool)
            pb, grid_b, _ = _pool_rows(rb, in_b, self.pool)
            pooled = pa.T @ pb if pooled is None else pooled + pa.T @ pb
        return BiLRPResult(
            relevance=R.numpy(), pooled=pooled.numpy(), similarity=float(phi_a @ phi_b), explained=explained,
            r_x=torch.cat(rows_a).numpy(), r_other=torch.cat(rows_b).numpy(), input_shape=in_a,
            input_shape_other=in_b, pool=pool_used, pool_grid=tuple(grid_a), pool_grid_other=tuple(grid_b),
            rules=list(self.rules))

    def explanation(self, x: np.ndarray | torch.Tensor, x_other: np.ndarray | torch.Tensor) -> Explanation:
        """``explain`` wrapped in the alibi-style ``Explanation(meta, data)`` envelope (``meta`` carries
        the explainer's parameters; ``data`` the result's fields, e.g. ``exp.pooled``, ``exp.top_pairs``)."""
        return self.explain(x, x_other).to_explanation(self.meta)

    def relevance(self, x: np.ndarray | torch.Tensor, seeds: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Ordinary (first-order) LRP of one input for a batch of output seeds (k, dim(phi)).

        Default seeds: diag(phi(x)), i.e. row m explains phi_m(x) alone. Returns (k, *input_shape).
        """
        xa = self._as_input(x)
        acts = _forward(self.ops, xa)
        phi = acts[-1][0].reshape(-1)
        S = torch.diag(phi) if seeds is None else torch.as_tensor(np.asarray(seeds), dtype=self.dtype)
        return torch.cat([self._lrp(acts, S[i:i + self.batch_size])
                          for i in range(0, S.shape[0], self.batch_size)]).numpy()

    # -- internals ---------------------------------------------------------------------------

    def _as_input(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x), dtype=self.dtype)
        return t.unsqueeze(0)

    def _input_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The z^B bounds broadcast to the input x (1, *input_shape)."""
        lo, hi = self.bounds
        try:
            lo = torch.as_tensor(np.asarray(lo), dtype=self.dtype) * torch.ones_like(x)
            hi = torch.as_tensor(np.asarray(hi), dtype=self.dtype) * torch.ones_like(x)
        except RuntimeError as e:
            raise ValueError(f"bounds do not broadcast to the input shape {tuple(x.shape[1:])}: {e}") from None
        return lo, hi

    def _bounds_at(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds carried through the layers before op i (e.g. padding gets bounds 0, 0: padded
        zeros are fixed, so they take no z^B relevance)."""
        lo, hi = self._input_bounds(x)
        return _forward(self.ops[:i], lo)[-1], _forward(self.ops[:i], hi)[-1]

    def _lrp(self, acts: list[torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        """Explicit layer-wise LRP backward for a batch of seeds (M, dim(phi)) -> (M, *input_shape)."""
        M = seeds.shape[0]
        out_shape = acts[-1].shape[1:]
        R = seeds.reshape(M, *out_shape)
        if M == 0:
            return torch.zeros(0, *acts[0].shape[1:], dtype=self.dtype)
        for i in range(len(self.ops) - 1, -1, -1):
            op, a = self.ops[i], acts[i]
            if op.kind in ("relu", "identity"):
                continue
            if op.kind == "linear":
                bounds = self._bounds_at(i, acts[0]) if self._op_rule[i] == "zb" else None
                R = self._lrp_linear(op, self._op_rule[i], a, R, bounds)
            elif op.kind == "affine":
                shape = (1, -1) + (1,) * (a.dim() - 2)
                z = a * op.scale.reshape(shape) + op.shift.reshape(shape)
                z = z + self.epsilon * _sign0(z) if self.epsilon > 0 else z + self._stab * _sign0(z)
                R = a * op.scale.reshape(shape) * (R / z)
            elif op.kind == "maxpool":
                # winner takes all: the relevance of each pooled unit goes to its argmax input
                if a.dim() == 3:
                    _, idx = F.max_pool1d(a, *_pool_args(op.fn.__self__, 1), return_indices=True)
                else:
                    _, idx = F.max_pool2d(a, *_pool_args(op.fn.__self__, 2), return_indices=True)
                Rin = torch.zeros(M, a.shape[1], int(np.prod(a.shape[2:])), dtype=self.dtype)
                Rin.scatter_add_(2, idx.flatten(2).expand(M, -1, -1), R.flatten(2))
                R = Rin.reshape(M, *a.shape[1:])
            elif op.kind == "avgpool":
                z = op.fn(a)
                s = R / (z + self._stab * _sign0(z))
                R = a * _vjp(op.fn, a, s)
            elif op.kind == "route":
                R = _vjp(op.fn, a, R)
        return R

    def _lrp_linear(self, op: _Op, rule: str, a: torch.Tensor, R: torch.Tensor,
                    bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        in_shape = a.shape[1:]
        if rule == "zb":
            Wp, Wn = op.W.clamp(min=0), op.W.clamp(max=0)
            lo, hi = bounds
            # x w - l w+ - h w- written as (x - l) w+ + (x - h) w-: two non-negative terms, so a
            # saturated patch gives z = 0 exactly instead of rounding noise that 1/z would blow up
            dl, dh = a - lo, a - hi
            # a saturated patch (z = 0) has no root point inside the box: its relevance is dropped
            z = _lin_forward(op, dl, Wp, None) + _lin_forward(op, dh, Wn, None)
            s = torch.where(z > 0, R / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(R))
            return dl * _lin_vjp(op, s, Wp, in_shape) + dh * _lin_vjp(op, s, Wn, in_shape)
        if rule == "gamma":
            W = op.W + self.gamma * op.W.clamp(min=0)
            b = op.b + self.gamma * op.b.clamp(min=0)
            eps = self._stab
        elif rule == "epsilon":
            W, b, eps = op.W, op.b, max(self.epsilon, self._stab)
        else:  # zero
            W, b, eps = op.W, op.b, self._stab
        z = _lin_forward(op, a, W, b)
        s = R / (z + eps * _sign0(z))
        return a * _lin_vjp(op, s, W, in_shape)



# --------------------------------------------------------------------------------------------
# helpers: projection, embedding choice, server hook, plot


def pca_projection(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Top-k right singular vectors (dim(phi), k) of a matrix of embeddings (n, dim(phi)) — uncentered,
    because BiLRP explains the raw dot product. With k = rank, <P^T phi, P^T phi'> = <phi, phi'> on
    the span of the embeddings."""
    E = np.asarray(embeddings, dtype=np.float64)
    if E.ndim != 2 or not 1 <= k <= min(E.shape):
        raise ValueError(f"need embeddings (n, dim) and 1 <= k <= min(n, dim), got shape {E.shape} and k={k}")
    _, _, vt = np.linalg.svd(E, full_matrices=False)
    return vt[:k].T.astype(np.float32)


def penultimate_embedding(classifier: nn.Sequential) -> nn.Sequential:
    """The classifier without its last Linear layer: phi(x) = the activations the logits are read from.

    For gradients restricted to the last Linear layer, the gradient-similarity kernel factorises
    exactly: <g(x), g(x')> = <delta, delta'> (<phi(x), phi(x')> + 1), delta = dLoss/dlogits, so
    BiLRP on this phi explains the input-dependent factor of a grad_dot match (docs/bilrp.md).
    """
    if not isinstance(classifier, nn.Sequential):
        raise TypeError("penultimate_embedding needs an nn.Sequential classifier")
    layers = list(classifier)
    last = max((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
    if last is None or last == 0:
        raise ValueError("the classifier needs a final Linear layer with layers before it")
    return nn.Sequential(*layers[:last]).eval()


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


