"""Model preparation for BiLRP: flatten an ``nn.Sequential``, fold BatchNorm, describe each layer as
an op, and the forward / vector-Jacobian helpers the explicit LRP pass is built from.

Supported layers: Linear, Conv1d/Conv2d, ReLU, MaxPool/AvgPool (1d/2d, AdaptiveAvgPool),
Flatten/Unflatten, ZeroPad, Dropout (identity: LRP explains the eval-mode model) and BatchNorm
(folded into the preceding Linear/Conv; a BatchNorm with no such layer before it becomes an
element-wise affine layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

RULES = ("zero", "epsilon", "gamma", "zb")


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


