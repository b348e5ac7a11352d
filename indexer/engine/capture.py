"""What the PyTorch engine records during its one forward pass: every use of a selected parameter.

Layer calls are recorded by module hooks; ``F.linear`` calls (which ``nn.MultiheadAttention`` and
models applying a weight themselves use, bypassing any submodule) are routed, while an engine
captures on this thread, to that engine's :class:`Capture`. Each record keeps the call's input and
output, so that the engine can form per-example gradients from them and one backward pass, and the
autograd sequence numbers that let the engine prove which graph nodes a rule covers.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
GENERIC_RULES = ("vmap", "loop")

# ------------------------------------------------------------------ F.linear interception
_ORIG_LINEAR = F.linear
_TLS = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = 0


def _linear_router(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` while some engine captures: route this thread's calls to its capture."""
    cap = getattr(_TLS, "capture", None)
    if cap is None:
        return _ORIG_LINEAR(input, weight, bias)
    return cap.linear(input, weight, bias)


@contextmanager
def capturing(cap: "Capture"):
    """Install the ``F.linear`` router (reference counted across threads) and set this thread's capture."""
    global _PATCH_DEPTH
    with _PATCH_LOCK:
        if _PATCH_DEPTH == 0:
            F.linear = _linear_router
        _PATCH_DEPTH += 1
    _TLS.capture = cap
    try:
        yield cap
    finally:
        _TLS.capture = None
        with _PATCH_LOCK:
            _PATCH_DEPTH -= 1
            if _PATCH_DEPTH == 0:
                F.linear = _ORIG_LINEAR


_PROBE = torch.zeros((), requires_grad=True)


def autograd_seq() -> int:
    """The current autograd node sequence number of this thread (nodes created later get larger ones)."""
    with torch.enable_grad():
        return int((_PROBE * 1).grad_fn._sequence_nr())


def module_rule(m: nn.Module) -> str | None:
    """The module-level rule for a module's own parameters (Linear is covered through ``F.linear``)."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.MultiheadAttention):
        return "linear"  # in_proj_weight/in_proj_bias through F.linear (packed self-attention)
    if isinstance(m, CONV_TYPES):
        return "conv"
    if isinstance(m, nn.Embedding):
        return "embedding" if m.max_norm is None and not m.scale_grad_by_freq else None
    if isinstance(m, BN_TYPES):
        return "batchnorm" if m.track_running_stats and m.running_mean is not None else None
    name = type(m).__name__
    if name == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None and m.weight.dim() == 2:
        return "hf_conv1d"
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or name.endswith(("LayerNorm", "RMSNorm")):
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and set(n for n, _ in m.named_parameters(recurse=False)) <= {"weight", "bias"}:
            return "norm"
    return None


@dataclass
class Call:
    """One captured use of selected parameters: rule, the parameters, input, output, batch layout."""

    rule: str
    names: dict[str, str]  # role ('weight'/'bias') -> parameter name
    inp: torch.Tensor
    out: torch.Tensor
    mode: str  # 'batch' | 'expand' | 'seq_first' | 'flat_tb'
    module: nn.Module | None = None
    seq: tuple[int, int] = (0, 0)
    grad: torch.Tensor | None = None
    B: int = 0


@dataclass
class Capture:
    """What one forward pass recorded."""

    engine: Any  # the TorchEngine that captures (its parameter names and rules)
    B: int
    verify: bool
    calls: list[Call] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    mha_depth: int = 0
    pre_seq: dict[int, list[int]] = field(default_factory=dict)

    def mode_for(self, x: torch.Tensor) -> str | None:
        """How the batch sits in a captured input, or None when it cannot be proven."""
        B = self.B
        if self.mha_depth:  # inside nn.MultiheadAttention everything is sequence first
            if x.dim() == 3 and x.shape[1] == B:
                return "seq_first"
            if x.dim() == 2 and x.shape[0] % B == 0:
                return "flat_tb"
            return None
        if x.dim() >= 1 and x.shape[0] == B:
            return "batch"
        if x.dim() >= 1 and x.shape[0] == 1 and B > 1:
            return "expand"
        return None

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        eng = self.engine
        names = {}
        wn = eng._hooked_name(w, "linear")
        bn = eng._hooked_name(b, "linear") if b is not None else None
        if wn:
            names["weight"] = wn
        if bn:
            names["bias"] = bn
        if not names:
            return _ORIG_LINEAR(x, w, b)
        s0 = autograd_seq() if self.verify else 0
        z = _ORIG_LINEAR(x, w, b)
        s1 = autograd_seq() if self.verify else 0
        return self.record("linear", names, x, z, None, (s0, s1))

    def record(self, rule: str, names: dict[str, str], x: torch.Tensor, z: torch.Tensor, module: nn.Module | None,
               seq: tuple[int, int]) -> torch.Tensor:
        mode = self.mode_for(x)
        if mode is None or (mode == "flat_tb" and z.shape[0] != x.shape[0]):
            for n in names.values():
                self.bad.setdefault(n, f"a call's input of shape {tuple(x.shape)} has no batch axis of {self.B}")
            return z
        if mode == "expand":
            z = z.expand(self.B, *z.shape[1:])
            x = x.expand(self.B, *x.shape[1:])
        elif self.engine._inplace:
            out = z
            z = z.clone()  # an in-place op after this call must not change the recorded output
            self.calls.append(Call(rule, names, x.detach(), out, mode, module, seq, B=self.B))
            return z
        self.calls.append(Call(rule, names, x.detach(), z, mode, module, seq, B=self.B))
        return z


def current_capture() -> Capture | None:
    """This thread's active capture, if an engine is capturing on it."""
    return getattr(_TLS, "capture", None)

