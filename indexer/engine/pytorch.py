"""PyTorch adapter of the gradient engine: per-example gradients from layer hooks.

Measured on this CPU (benchmarks/bench_gradients.py): ``torch.func.vmap(grad(...))`` is slower than a plain loop on
the digits CNN, while forming per-example gradients from each layer's saved input and output
gradient runs at about the speed of one batched backward. So supported layers (Linear, Conv1d/2d,
Embedding, BatchNorm in eval mode, LayerNorm) are handled from hooks, and ``torch.func`` covers any
other layer that owns selected parameters, announced once.

One backward per chunk computes only the gradients w.r.t. the hooked layers' outputs
(``torch.autograd.grad``), not the summed parameter gradients, and the loss is made per example
first, so a user's mean-reducing loss still yields each example's own gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from indexer.defaults import CHUNK_SIZE
from indexer.engine.base import Block, GradientEngine, WarnOnce, select_names

_CONV = (nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, _CONV):
        return m.groups == 1
    if isinstance(m, nn.Embedding):
        return m.max_norm is None
    if isinstance(m, _BN):
        return m.track_running_stats and m.running_mean is not None
    if isinstance(m, nn.LayerNorm):
        return True
    return False


class TorchEngine(GradientEngine):
    """Per-example gradients of a ``torch.nn.Module``'s loss, in eval mode, chunk by chunk."""

    framework = "pytorch"

    def __init__(self, model: nn.Module, loss_fn: Any, task: str = "classification",
                 params: Sequence[str] | str | None = None, device: Any = None, chunk_size: int = CHUNK_SIZE) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"backend='pytorch' needs a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.loss_fn = loss_fn
        self.task = task
        self.chunk_size = int(chunk_size)
        self.device = torch.device(device) if device is not None else next(
            (p.device for p in model.parameters()), torch.device("cpu"))
        model.to(self.device)
        model.eval()
        all_named = list(model.named_parameters())
        if not all_named:
            raise ValueError("The model has no parameters: there is no gradient to index.")
        trainable = [n for n, p in all_named if p.requires_grad]
        frozen = len(all_named) - len(trainable)
        by_layer = {id(m): [f"{mn}.{pn}" if mn else pn for pn, _ in m.named_parameters()]
                    for mn, m in model.named_modules()}
        chosen = set(select_names(trainable, params, by_layer))
        if params is not None and not chosen:
            raise ValueError(f"No trainable parameter matches params={params!r}; trainable ones are: "
                             f"{', '.join(trainable[:20])}{' ...' if len(trainable) > 20 else ''}.")
        if not chosen:
            raise ValueError("No parameter of the model requires grad: unfreeze some (requires_grad=True) "
                             "or pass a model with trainable parameters.")
        if frozen:
            warnings.warn(f"{frozen} frozen parameter tensor(s) (requires_grad=False) are excluded from the "
                          "gradients.", UserWarning, stacklevel=3)
        self._params = {n: p for n, p in all_named if n in chosen}
        self.param_names = [n for n, _ in all_named if n in chosen]
        self.param_sizes = [self._params[n].numel() for n in self.param_names]
        self.dtype = self._params[self.param_names[0]].dtype
        # Modules owning selected parameters, split into hooked and fallback.
        self._hooked: dict[str, nn.Module] = {}
        self._fallback: list[str] = []
        for mname, mod in model.named_modules():
            own = [f"{mname}.{pn}" if mname else pn for pn, _ in mod.named_parameters(recurse=False)]
            own = [n for n in own if n in chosen]
            if not own:
                continue
            if _supported(mod):
                self._hooked[mname] = mod
            else:
                self._fallback.extend(own)
        self._inplace = any(getattr(m, "inplace", False) for m in model.modules())
        self._warn_fallback = WarnOnce()
        self._capture: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        for mname, mod in self._hooked.items():
            mod.register_forward_hook(self._make_hook(mname))

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, mname: str):
        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor):
            if self._capture is None:
                return None
            out = output.clone() if self._inplace else output
            self._capture.setdefault(mname, []).append((inputs[0].detach(), out))
            return out
        return hook

    # -------------------------------------------------------------- helpers
    def _to_x(self, X: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.ascontiguousarray(X))  # torch refuses negative strides (e.g. X[::-1])
        if t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def _to_y(self, Y: np.ndarray | None) -> torch.Tensor | None:
        if Y is None:
            return None
        t = torch.as_tensor(Y)
        if t.is_floating_point():
            t = t.to(self.dtype)
        elif self.task == "classification":
            t = t.long()
        return t.to(self.device)

    def parameter_arrays(self) -> list[np.ndarray]:
        return [self._params[n].detach().cpu().numpy() for n in self.param_names]

    def predict(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(self._to_x(np.asarray(X))).cpu().numpy()

    def per_example_loss(self, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Loss per example (n,), whatever reduction the user's loss applies."""
        n = out.shape[0]
        if self.loss_fn is None:
            L = out
        else:
            L = self.loss_fn(out, y)
        if L.dim() >= 1 and L.shape[0] == n:
            return L.reshape(n, -1).sum(1) if L.dim() > 1 else L
        if L.dim() == 0 and n == 1:
            return L.reshape(1)
        # A reducing loss: evaluate it on each example as a batch of one, vectorized.
        if y is None:
            return torch.func.vmap(lambda o: self.loss_fn(o[None], None))(out)
        try:
            return torch.func.vmap(lambda o, t: self.loss_fn(o[None], t[None]))(out, y)
        except Exception:  # a loss vmap cannot trace: loop over the loss only (cheap next to the model)
            return torch.stack([self.loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(n)])

    # ---------------------------------------------------------------- blocks
    def _chunk_blocks(self, X: np.ndarray, Y: np.ndarray | None) -> list[Block]:
        x = self._to_x(X)
        y = self._to_y(Y)
        self._capture = {}
        try:
            with torch.enable_grad():
                out = self.model(x)
                L = self.per_example_loss(out, y)
            cap = self._capture
        finally:
            self._capture = None
        names = list(cap)
        outs = [o for mname in names for (_, o) in cap[mname]]
        blocks: list[Block] = []
        if outs:
            gouts = torch.autograd.grad(L.sum(), outs, allow_unused=True, retain_graph=bool(self._fallback))
            i = 0
            for mname in names:
                calls = []
                for inp, o in cap[mname]:
                    g = gouts[i]
                    i += 1
                    calls.append((inp, torch.zeros_like(o) if g is None else g))
                blocks.append(self._module_block(mname, self._hooked[mname], calls))
        if self._fallback:
            blocks.append(self._fallback_block(x, y))
        return blocks

    def _own(self, mname: str, pname: str) -> str:
        return f"{mname}.{pname}" if mname else pname

    def _module_block(self, mname: str, mod: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> Block:
        wname, bname = self._own(mname, "weight"), self._own(mname, "bias")
        has_w, has_b = wname in self._params, bname in self._params
        parts = [(n, self._params[n].numel()) for n in (wname, bname) if n in self._params]
        if isinstance(mod, (nn.Linear, *_CONV)):
            pairs = [self._factors(mod, inp, g) for inp, g in calls]
            a = torch.cat([p[0] for p in pairs], dim=1) if len(pairs) > 1 else pairs[0][0]
            d = torch.cat([p[1] for p in pairs], dim=1) if len(pairs) > 1 else pairs[0][1]
            return Block(mname, "outer", parts, a_in=a.detach().cpu().numpy(), d=d.detach().cpu().numpy(),
                         layout="out_in", has_bias=has_b, has_weight=has_w)
        full = None
        for inp, g in calls:
            rows = self._full_rows(mod, inp, g, has_w, has_b)
            full = rows if full is None else full + rows
        return Block(mname, "full", parts, full=full.detach().cpu().numpy())

    @staticmethod
    def _factors(mod: nn.Module, inp: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, d) with shapes (n, L, din), (n, L, dout) for Linear or Conv."""
        n = inp.shape[0]
        if isinstance(mod, nn.Linear):
            return inp.reshape(n, -1, inp.shape[-1]), g.reshape(n, -1, g.shape[-1])
        conv2d = isinstance(mod, nn.Conv2d)
        x = inp if conv2d else inp.unsqueeze(2)
        gg = g if conv2d else g.unsqueeze(2)
        k = mod.kernel_size if conv2d else (1, mod.kernel_size[0])
        st = mod.stride if conv2d else (1, mod.stride[0])
        dl = mod.dilation if conv2d else (1, mod.dilation[0])
        pad = mod.padding
        if isinstance(pad, str):  # 'same' / 'valid': reproduce torch's own padding
            if pad == "valid":
                pad = (0, 0) if conv2d else (0, 0)
            else:
                tot = [dl[i] * (k[i] - 1) for i in range(2)]
                x = F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
                pad = (0, 0)
        elif not conv2d:
            pad = (0, pad[0])
        if mod.padding_mode != "zeros" and any(pad):
            mode = "circular" if mod.padding_mode == "circular" else mod.padding_mode
            x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]), mode=mode)
            pad = (0, 0)
        cols = F.unfold(x, k, dilation=dl, padding=pad, stride=st)  # (n, C*kh*kw, L)
        return cols.transpose(1, 2), gg.reshape(n, gg.shape[1], -1).transpose(1, 2)

    def _full_rows(self, mod: nn.Module, inp: torch.Tensor, g: torch.Tensor, has_w: bool, has_b: bool) -> torch.Tensor:
        n = inp.shape[0]
        pieces = []
        if isinstance(mod, nn.Embedding):
            idx = inp.reshape(n, -1).long()
            gd = g.reshape(n, -1, mod.embedding_dim)
            W = torch.zeros(n, mod.num_embeddings, mod.embedding_dim, dtype=g.dtype, device=g.device)
            W.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, mod.embedding_dim), gd)
            if mod.padding_idx is not None:
                W[:, mod.padding_idx] = 0
            return W.reshape(n, -1)
        if isinstance(mod, _BN):
            shape = [1, -1] + [1] * (inp.dim() - 2)
            xhat = (inp - mod.running_mean.reshape(shape)) / torch.sqrt(mod.running_var.reshape(shape) + mod.eps)
            gw = (g * xhat).transpose(0, 1).reshape(g.shape[1], n, -1).sum(-1).T
            gb = g.transpose(0, 1).reshape(g.shape[1], n, -1).sum(-1).T
        else:  # LayerNorm
            nd = len(mod.normalized_shape)
            dims = tuple(range(inp.dim() - nd, inp.dim()))
            mu = inp.mean(dim=dims, keepdim=True)
            var = inp.var(dim=dims, keepdim=True, unbiased=False)
            xhat = (inp - mu) / torch.sqrt(var + mod.eps)
            size = int(np.prod(mod.normalized_shape))
            gw = (g * xhat).reshape(n, -1, size).sum(1)
            gb = g.reshape(n, -1, size).sum(1)
        if has_w:
            pieces.append(gw)
        if has_b:
            pieces.append(gb)
        return torch.cat(pieces, dim=1)

    def _fallback_block(self, x: torch.Tensor, y: torch.Tensor | None) -> Block:
        """Per-example gradients of parameters in layers without a hook rule, via torch.func."""
        names = self._fallback
        self._warn_fallback(
            f"gradindex: no vectorized rule for the layers owning {', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}; using torch.func.vmap for them (slower).")
        fparams = {n: self._params[n].detach() for n in names}
        rest = {n: p.detach() for n, p in self.model.named_parameters() if n not in fparams}
        rest.update(dict(self.model.named_buffers()))

        def f(fp: dict, xi: torch.Tensor, yi: torch.Tensor | None) -> torch.Tensor:
            out = torch.func.functional_call(self.model, {**rest, **fp}, (xi[None],))
            return self.per_example_loss(out, None if yi is None else yi[None]).sum()

        try:
            if y is None:
                g = torch.func.vmap(torch.func.grad(lambda fp, xi: f(fp, xi, None)), in_dims=(None, 0))(fparams, x)
            else:
                g = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(fparams, x, y)
            rows = torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1)
        except Exception:  # not vmappable: one example at a time
            per = []
            for i in range(len(x)):
                gi = torch.func.grad(f)(fparams, x[i], None if y is None else y[i])
                per.append(torch.cat([gi[n].reshape(-1) for n in names]))
            rows = torch.stack(per)
        parts = [(n, self._params[n].numel()) for n in names]
        return Block("<fallback>", "full", parts, full=rows.detach().cpu().numpy())
