"""Independent BiLRP implementations for the tests and the benchmark (not shipped with the explainer).

- ``ExplicitBiLRP``: the previous implementation, for ``nn.Sequential`` stacks only: the model is
  flattened into layer ops (BatchNorm folded by hand) and every LRP rule is written out as an explicit
  backward pass over a batch of seeds. The benchmark times the zennit-based ``explainers.bilrp.BiLRP``
  against it in the same run; the tests check that both agree.
- ``bilrp_reference``: slow brute force: one modified-gradient backward per embedding dimension, the
  LRP rules written as modified gradients of the forward pass, R = sum_m outer(R^m(x), R^m(x')).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explainers.bilrp.options import check_options
from explainers.bilrp.result import BiLRPResult, _pool_rows


def _stab(dtype: torch.dtype) -> float:
    """Stabilizer for rules without an epsilon of their own: avoids 0/0 on dead units while staying far
    below the dtype's resolution (so LRP-0 is exact to rounding)."""
    return torch.finfo(dtype).eps * 1e-3


@dataclass
class _Op:
    """One layer of the prepared model. ``kind`` is 'linear' (Linear/Conv, with W and b),
    'affine' (stand-alone BatchNorm: per-channel scale/shift), 'relu', 'maxpool', 'route'
    (a linear map whose relevance is routed by its gradient: pad, flatten, reshape), 'avgpool'
    (a positive linear map, z-rule) or 'identity'."""

    kind: str
    fn: Callable[..., torch.Tensor] | None = None  # forward of route/avgpool/maxpool ops
    W: torch.Tensor | None = None
    b: torch.Tensor | None = None
    conv: dict[str, Any] | None = None  # stride/padding/dilation/groups and dimension (1 or 2)
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    name: str = ""


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in model.named_children():
            out.extend(_leaves(child, f"{prefix}{name}."))
        return out
    return [(prefix.rstrip("."), model)]


def _numeric_padding(conv: nn.Module) -> Any:
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return 0
        # 'same' with odd effective kernels is symmetric
        ks = conv.kernel_size
        dil = conv.dilation
        out = []
        for k, d in zip(ks, dil):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(f"{conv}: padding='same' with an even kernel pads asymmetrically; "
                                 "use nn.ZeroPad2d before a padding=0 convolution instead")
            out.append(total // 2)
        return tuple(out)
    return pad


def _bn_affine(bn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn}: BatchNorm without running statistics (track_running_stats=False) "
                         "cannot be folded; LRP explains the eval-mode model")
    var = bn.running_var.detach().to(dtype)
    mean = bn.running_mean.detach().to(dtype)
    scale = 1.0 / torch.sqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale = scale * bn.weight.detach().to(dtype)
        shift = shift * bn.weight.detach().to(dtype) + bn.bias.detach().to(dtype)
    return scale, shift


def _prepare(model: nn.Module, dtype: torch.dtype) -> list[_Op]:
    """Turn the model into a list of ops with BatchNorm folded. Raises TypeError on other layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"BiLRP needs a torch.nn.Module (an nn.Sequential), got {type(model).__name__}")
    if not isinstance(model, nn.Sequential):
        raise TypeError("BiLRP needs the embedding as an nn.Sequential (nested allowed) of Linear, Conv, "
                        f"ReLU, pooling, Flatten, ZeroPad, Dropout and BatchNorm; got {type(model).__name__}. "
                        "Rebuild it with nn.Sequential(*layers) or slice a Sequential model.")
    ops: list[_Op] = []
    for name, m in _leaves(model):
        if isinstance(m, nn.Linear):
            b = m.bias.detach().to(dtype) if m.bias is not None else torch.zeros(m.out_features, dtype=dtype)
            ops.append(_Op("linear", W=m.weight.detach().to(dtype).clone(), b=b.clone(), name=name))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            if m.padding_mode != "zeros":
                raise TypeError(f"{name}: only zero padding is supported, got padding_mode={m.padding_mode!r}")
            b = m.bias.detach().to(dtype) if m.bias is not None else torch.zeros(m.out_channels, dtype=dtype)
            conv = dict(stride=m.stride, padding=_numeric_padding(m), dilation=m.dilation, groups=m.groups,
                        dim=1 if isinstance(m, nn.Conv1d) else 2)
            ops.append(_Op("linear", W=m.weight.detach().to(dtype).clone(), b=b.clone(), conv=conv, name=name))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = _bn_affine(m, dtype)
            prev = ops[-1] if ops else None
            if prev is not None and prev.kind == "linear":
                # fold: BN(Wa + b) = (scale*W) a + (scale*b + shift), scale per output unit/channel
                shape = (-1,) + (1,) * (prev.W.dim() - 1)
                prev.W = prev.W * scale.reshape(shape)
                prev.b = prev.b * scale + shift
                prev.name += f"+{name}"
            else:
                ops.append(_Op("affine", scale=scale, shift=shift, name=name))
        elif isinstance(m, nn.ReLU):
            ops.append(_Op("relu", name=name))
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
            if m.return_indices:
                raise TypeError(f"{name}: MaxPool with return_indices=True is not a plain layer")
            ops.append(_Op("maxpool", fn=m.forward, name=name))
        elif isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            ops.append(_Op("avgpool", fn=m.forward, name=name))
        elif isinstance(m, (nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d)):
            ops.append(_Op("route", fn=m.forward, name=name))
        elif isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)):
            ops.append(_Op("identity", name=name))
        else:
            raise TypeError(f"BiLRP does not support layer {name!r} ({type(m).__name__}); supported: Linear, "
                            "Conv1d, Conv2d, ReLU, MaxPool1d/2d, AvgPool1d/2d, AdaptiveAvgPool1d/2d, Flatten, "
                            "Unflatten, ZeroPad1d/2d, Dropout, BatchNorm1d/2d")
    n_lin = sum(op.kind == "linear" for op in ops)
    if n_lin == 0:
        raise TypeError("the embedding model has no Linear or Conv layer to explain")
    return ops


def _lin_forward(op: _Op, a: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if op.conv is None:
        return F.linear(a, W, b)
    c = op.conv
    f = F.conv1d if c["dim"] == 1 else F.conv2d
    return f(a, W, b, stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])


def _lin_vjp(op: _Op, s: torch.Tensor, W: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    """W^T s for a batch of output-side vectors s (M, ...) -> (M, *in_shape)."""
    if op.conv is None:
        return s @ W
    c = op.conv
    g = torch.nn.grad.conv1d_input if c["dim"] == 1 else torch.nn.grad.conv2d_input
    return g((s.shape[0], *in_shape), W, s, stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
             groups=c["groups"])


def _sign0(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _forward(ops: list[_Op], x: torch.Tensor) -> list[torch.Tensor]:
    """Activations a_0 = x, a_1, ..., a_L (eval-mode forward of the prepared model)."""
    acts = [x]
    a = x
    for op in ops:
        if op.kind == "linear":
            a = _lin_forward(op, a, op.W, op.b)
        elif op.kind == "affine":
            shape = (1, -1) + (1,) * (a.dim() - 2)
            a = a * op.scale.reshape(shape) + op.shift.reshape(shape)
        elif op.kind == "relu":
            a = torch.relu(a)
        elif op.kind in ("maxpool", "avgpool", "route"):
            a = op.fn(a)
        acts.append(a)
    return acts



def _pool_args(m: nn.Module, dim: int) -> tuple:
    return (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def _vjp(fn: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian products of a linear map fn at input shape a.shape[1:] for a batch v (M, ...)."""
    primal = torch.zeros(v.shape[0], *a.shape[1:], dtype=a.dtype)
    _, pull = torch.func.vjp(fn, primal)
    return pull(v)[0]




class ExplicitBiLRP:
    """The previous BiLRP implementation: explicit batched LRP backward over layer ops (nn.Sequential only).

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
        # only the option checks are shared with the explainer; the computation below is this file's own
        o = check_options(n_lin, rule, input_rule, bounds, epsilon, gamma, projection, pool, batch_size, dtype)
        self.rules, self.bounds, self.epsilon, self.gamma = o.rules, o.bounds, o.epsilon, o.gamma
        self.pool, self.batch_size, self.projection, self.meta = o.pool, o.batch_size, o.projection, o.meta
        rules = o.rules
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

def _same_value(z: torch.Tensor, zr: torch.Tensor) -> torch.Tensor:
    """Exactly the value z, with the gradient of zr * (z / zr): the rule's modified gradient.

    (Plain ``zr * (z / zr).detach()`` rounds differently from z, which changes max-pool tie-breaks.)"""
    v = zr * (z / zr).detach()
    return z.detach() + (v - v.detach())


def _trick_forward(expl: ExplicitBiLRP, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward whose gradient x input equals LRP: every layer's output has the gradient of
    z_rule * (z / z_rule).detach() (value z).

    Returns phi and the tensors whose grad x value sum to the input relevance (x, and the z^B bounds).
    """
    leaves = [x]
    a = x
    for i, op in enumerate(expl.ops):
        if op.kind == "linear":
            rule = expl._op_rule[i]
            z = _lin_forward(op, a, op.W, op.b)
            if rule == "zb":
                lo_in, hi_in = expl._input_bounds(x.detach())
                lo_in.requires_grad_(True)
                hi_in.requires_grad_(True)
                leaves += [lo_in, hi_in]
                lo, hi = _forward(expl.ops[:i], lo_in)[-1], _forward(expl.ops[:i], hi_in)[-1]
                zr = (_lin_forward(op, a - lo, op.W.clamp(min=0), None)
                      + _lin_forward(op, a - hi, op.W.clamp(max=0), None))
                ratio = torch.where(zr > 0, z / torch.where(zr > 0, zr, torch.ones_like(zr)), torch.zeros_like(z))
                v = zr * ratio.detach()
                a = z.detach() + (v - v.detach())
                continue
            elif rule == "gamma":
                zr = _lin_forward(op, a, op.W + expl.gamma * op.W.clamp(min=0), op.b + expl.gamma * op.b.clamp(min=0))
                zr = zr + expl._stab * _sign0(zr).detach()
            else:
                eps = max(expl.epsilon, expl._stab) if rule == "epsilon" else expl._stab
                zr = z + eps * _sign0(z).detach()
            a = _same_value(z, zr)
        elif op.kind == "affine":
            shape = (1, -1) + (1,) * (a.dim() - 2)
            z = a * op.scale.reshape(shape) + op.shift.reshape(shape)
            eps = expl.epsilon if expl.epsilon > 0 else expl._stab
            zr = z + eps * _sign0(z).detach()
            a = _same_value(z, zr)
        elif op.kind == "relu":
            a = torch.relu(a)
        elif op.kind == "avgpool":
            z = op.fn(a)
            zr = z + expl._stab * _sign0(z).detach()
            a = _same_value(z, zr)
        elif op.kind in ("maxpool", "route"):
            a = op.fn(a)
    return a.reshape(-1), leaves


def bilrp_reference(explainer: ExplicitBiLRP | nn.Module, x: np.ndarray | torch.Tensor,
                    x_other: np.ndarray | torch.Tensor, **opts: Any) -> np.ndarray:
    """Slow reference BiLRP: a loop over embedding dimensions m, each explained by gradient x input of a
    forward pass whose gradients are modified to implement the LRP rules; R = sum_m outer(R^m(x), R^m(x')).

    ``explainer`` is an ``ExplicitBiLRP`` or an ``nn.Sequential`` embedding (then ``opts`` are the
    ``ExplicitBiLRP`` options: rule, input_rule, bounds, epsilon, gamma, projection, dtype).
    """
    if not isinstance(explainer, ExplicitBiLRP):
        explainer = ExplicitBiLRP(explainer, **opts)
    def per_dim(inp: torch.Tensor) -> list[torch.Tensor]:
        x0 = inp.clone().requires_grad_(True)
        phi, leaves = _trick_forward(explainer, x0)
        rows = []
        P = explainer.projection
        n = phi.numel() if P is None else P.shape[1]
        for m in range(n):
            out = phi[m] if P is None else (P[:, m] * phi).sum()
            grads = torch.autograd.grad(out, leaves, retain_graph=True, allow_unused=True)
            r = sum(l.detach() * g for l, g in zip(leaves, grads) if g is not None)
            rows.append(r.reshape(-1))
        return rows

    ra = per_dim(explainer._as_input(x))
    rb = per_dim(explainer._as_input(x_other))
    R = torch.zeros(ra[0].numel(), rb[0].numel(), dtype=explainer.dtype)
    for u, v in zip(ra, rb):
        R += torch.outer(u, v)
    return R.numpy()


