"""Slow reference BiLRP for the tests and the benchmark: one modified-gradient backward per
embedding dimension, with the LRP rules written as modified gradients of the forward pass
(independent of the explicit batched pass in ``explainers.bilrp``)."""

from __future__ import annotations

import numpy as np
import torch

from explainers.bilrp import BiLRP
from explainers.bilrp.prepare import _forward, _lin_forward, _sign0


def _same_value(z: torch.Tensor, zr: torch.Tensor) -> torch.Tensor:
    """Exactly the value z, with the gradient of zr * (z / zr): the rule's modified gradient.

    (Plain ``zr * (z / zr).detach()`` rounds differently from z, which changes max-pool tie-breaks.)"""
    v = zr * (z / zr).detach()
    return z.detach() + (v - v.detach())


def _trick_forward(expl: BiLRP, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
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


def bilrp_reference(explainer: BiLRP, x: np.ndarray | torch.Tensor, x_other: np.ndarray | torch.Tensor) -> np.ndarray:
    """Slow reference BiLRP: a loop over embedding dimensions m, each explained by gradient x input of a
    forward pass whose gradients are modified to implement the LRP rules; R = sum_m outer(R^m(x), R^m(x')).

    Independent of the batched explicit pass in ``BiLRP.explain`` (used to test and benchmark it).
    """
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


