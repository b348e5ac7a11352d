"""PyTorch adapter of the gradient engine: exact per-example gradients from captured layer calls.

Measured on this CPU: ``torch.func.vmap(grad(...))`` is slower than a plain loop on the digits CNN,
while forming per-example gradients from each layer's saved input and output gradient runs at about
the speed of one batched backward. So the engine captures, during one forward pass, every use of a
selected parameter that an exact rule covers, and forms per-example gradients from the captured
inputs and the output gradients of one backward pass:

========================  ==========================================================================
rule                      where
========================  ==========================================================================
``linear``                every ``F.linear`` call whose weight/bias is a selected parameter: ``nn.Linear``
                          on (batch, ..., features) inputs (Σ_t δ_t a_tᵀ), ``nn.MultiheadAttention``'s
                          packed ``in_proj`` and ``out_proj`` (applied through ``F.linear``, sequence
                          first), a weight a model applies itself through ``F.linear``
``embedding``             ``nn.Embedding`` over token sequences, incl. (1, T) position ids broadcast
                          over the batch (the output is expanded to the batch before it is used)
``hf_conv1d``             Hugging Face ``Conv1D`` (GPT-2's transposed linear)
``conv``                  ``nn.Conv1d/2d`` (unfolded patches; grouped and depthwise convolutions too)
``norm``                  LayerNorm, RMSNorm and modules of that shape (``y = w ⊙ u(x) + b``)
``batchnorm``             BatchNorm in eval mode
``tied``                  a parameter used by several rules (tied input/output embeddings): the sum
``vmap`` / ``loop``       the exact generic path, for everything else
========================  ==========================================================================

Never silently wrong: a vectorized rule is used for a parameter only when (1) every call it
covers carries the chunk's batch as its leading axis (or a broadcast axis of 1), (2) the autograd
graph shows that the parameter reaches the loss only through calls that a rule covers (a weight also
used elsewhere, e.g. through a functional op, fails), and (3) on the first chunk of at least two
examples, Σ_i w_i g_i from the rules equals one batched backward of Σ_i w_i L_i, for random weights w
(a per-example error that cancels in the plain sum, e.g. examples mixed up along an axis, fails
too). A parameter failing any check goes to the exact generic path (``torch.func.vmap``, or a
per-example loop where vmap cannot run), with one warning naming it. ``engine.rules`` says which
rule each parameter used.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from indexer.defaults import CHUNK_SIZE
from indexer.engine.base import Block, GradientEngine, select_names, guard_tolerance
from indexer.engine.capture import (BN_TYPES, CONV_TYPES, GENERIC_RULES, Call, Capture, autograd_seq, capturing,
                                    current_capture, module_rule)

class TorchEngine(GradientEngine):
    """Per-example gradients of a ``torch.nn.Module``'s loss, in eval mode, chunk by chunk."""

    framework = "pytorch"
    _generic_rules = GENERIC_RULES
    _fallback_rule = "vmap"
    _generic_path = "torch.func.vmap, or a per-example loop"

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
        all_named = list(model.named_parameters())  # tied parameters appear once, under their first name
        if not all_named:
            raise ValueError("The model has no parameters: there is no gradient to index.")
        trainable = [n for n, p in all_named if p.requires_grad]
        frozen = len(all_named) - len(trainable)
        name_of = {id(p): n for n, p in all_named}
        by_layer = {id(m): [name_of[id(p)] for p in m.parameters()] for m in model.modules()}
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
        self._name_of = {id(p): n for n, p in self._params.items()}
        self.param_names = [n for n, _ in all_named if n in chosen]
        self.param_sizes = [self._params[n].numel() for n in self.param_names]
        self.dtype = self._params[self.param_names[0]].dtype
        # Which rule each selected parameter is planned for: every module owning it (tied parameters
        # have several owners) must have a rule, else the generic path.
        owners: dict[str, list[tuple[nn.Module, str, str | None]]] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in self._name_of:
                    owners.setdefault(self._name_of[id(p)], []).append((mod, pname, module_rule(mod)))
        self._planned: dict[str, str] = {}
        self._reasons: dict[str, str] = {}
        for n in self.param_names:
            rules = {r for _, _, r in owners.get(n, [])}
            if None in rules or not rules:
                # No module rule: it may still be applied through F.linear (a rule of its own); the
                # checks of the first chunk decide, and send it to the generic path otherwise.
                self._planned[n] = "auto"
                self._reasons[n] = "no vectorized rule for its layer"
            else:
                self._planned[n] = rules.pop() if len(rules) == 1 else "tied"
        self._rule_of_param: dict[str, str] = dict(self._planned)  # final rules (after the guard)
        self._inplace = any(getattr(m, "inplace", False) for m in model.modules())
        self._verified = False
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._hooks = []
        hooked_modules = {id(mod): mod for n, lst in owners.items() for mod, _, r in lst
                          if r not in (None, "linear")}
        for mod in list(hooked_modules.values()):
            self._hooks.append(mod.register_forward_pre_hook(self._pre_hook))
            self._hooks.append(mod.register_forward_hook(self._post_hook))
        for mod in model.modules():
            if isinstance(mod, nn.MultiheadAttention):
                self._hooks.append(mod.register_forward_pre_hook(self._mha_enter))
                self._hooks.append(mod.register_forward_hook(self._mha_exit))

    # ------------------------------------------------------------- rules API
    def _hooked_name(self, p: Any, rule: str) -> str | None:
        """The selected parameter's name if ``p`` is one and it is (still) covered by a rule."""
        if p is None:
            return None
        n = self._name_of.get(id(p))
        if n is None or self._rule_of_param[n] in GENERIC_RULES:
            return None
        return n

    # ------------------------------------------------------------------ hooks
    def _current(self) -> "Capture | None":
        """This thread's capture if it belongs to this engine (another thread's forward is left alone)."""
        cap = current_capture()
        return cap if cap is not None and cap.engine is self else None

    def _mha_enter(self, mod: nn.Module, args: tuple) -> None:
        cap = self._current()
        if cap is not None:
            cap.mha_depth += 1

    def _mha_exit(self, mod: nn.Module, args: tuple, out: Any) -> None:
        cap = self._current()
        if cap is not None:
            cap.mha_depth -= 1

    def _pre_hook(self, mod: nn.Module, args: tuple) -> None:
        cap = self._current()
        if cap is not None and cap.verify:
            cap.pre_seq.setdefault(id(mod), []).append(autograd_seq())

    def _post_hook(self, mod: nn.Module, args: tuple, output: Any) -> Any:
        cap = self._current()
        if cap is None or not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            return None
        rule = module_rule(mod)
        names = {}
        for pname, p in mod.named_parameters(recurse=False):
            n = self._hooked_name(p, rule)
            if n is not None:
                names[pname] = n
        if not names:
            return None
        seq = (cap.pre_seq[id(mod)].pop(), autograd_seq()) if cap.verify else (0, 0)
        return cap.record(rule, names, args[0], output, mod, seq)

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

    # ---------------------------------------------------------------- chunks
    def _chunk_blocks(self, X: np.ndarray, Y: np.ndarray | None) -> list[Block]:
        x = self._to_x(X)
        y = self._to_y(Y)
        with self._lock:  # rules and checks are per engine: one chunk at a time
            return self._chunk_blocks_locked(x, y)

    def _chunk_blocks_locked(self, x: torch.Tensor, y: torch.Tensor | None) -> list[Block]:
        for _ in range(3):  # at most: plan -> structural failures -> guard failures
            verify = not self._verified
            blocks, failed = self._try_chunk(x, y, verify)
            if not failed:
                if verify and len(x) >= 2:
                    self._verified = True
                    self._settle_rules()
                self._announce()  # one warning for everything this chunk's checks sent to the generic path
                return blocks
            self._demote(failed)
        raise RuntimeError("gradindex: the per-example gradient checks kept failing; please report this model.")

    def _settle_rules(self) -> None:
        """After a verified chunk: each parameter's rule is the one its captured calls used."""
        seen: dict[str, set[str]] = {}
        for names, rule in self._last_calls:
            for n in names.values():
                seen.setdefault(n, set()).add(rule)
        for n in self.param_names:
            r = self._rule_of_param[n]
            if r in GENERIC_RULES or r == "tied":
                continue
            rules = seen.get(n)
            self._rule_of_param[n] = "unused" if not rules else (rules.pop() if len(rules) == 1 else "tied")

    def _try_chunk(self, x: torch.Tensor, y: torch.Tensor | None, verify: bool) -> tuple[list[Block], dict[str, str]]:
        cap = Capture(self, len(x), verify)
        with capturing(cap), torch.enable_grad():
            out = self.model(x)
            L = self.per_example_loss(out, y)
        failed = dict(cap.bad)
        hooked = [n for n in self.param_names if self._rule_of_param[n] not in GENERIC_RULES]
        if verify:
            failed.update(self._structural(L, cap, hooked))
        if failed:
            return [], failed
        need_graph = verify or bool(self._generic())
        if cap.calls:
            gouts = torch.autograd.grad(L.sum(), [c.out for c in cap.calls], allow_unused=True, retain_graph=need_graph)
            for c, g in zip(cap.calls, gouts):
                c.grad = torch.zeros_like(c.out) if g is None else g
        blocks = self._blocks(cap.calls)
        self._last_calls = [(c.names, c.rule) for c in cap.calls]
        if verify and hooked and len(x) >= 2:
            failed.update(self._numeric_guard(x, y, L, blocks, hooked))
            if failed:
                return [], failed
        if self._generic():
            blocks.append(self._fallback_block(x, y))
        return blocks, {}

    # ------------------------------------------------------------- the checks
    def _structural(self, L: torch.Tensor, cap: Capture, hooked: list[str]) -> dict[str, str]:
        """Parameters reaching the loss through autograd nodes created outside the calls covering them."""
        intervals: dict[str, list[tuple[int, int]]] = {}
        for c in cap.calls:
            for n in c.names.values():
                intervals.setdefault(n, []).append(c.seq)
        want = {id(self._params[n]): n for n in hooked}
        consumers: dict[str, list[int]] = {}
        seen: set[int] = set()
        stack = [L.grad_fn] if L.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            for child, _ in node.next_functions:
                if child is None:
                    continue
                var = getattr(child, "variable", None)
                if var is not None and id(var) in want:
                    consumers.setdefault(want[id(var)], []).append(node._sequence_nr())
                stack.append(child)
        bad = {}
        for n, seqs in consumers.items():
            iv = intervals.get(n, [])
            stray = [s for s in seqs if not any(a < s < b for a, b in iv)]
            if stray or (not iv and self._rule_of_param[n] == "auto"):
                bad[n] = ("used outside the layer calls its rule covers (e.g. through a functional op)"
                          if iv else "its layer's rule never saw it used (e.g. applied through a functional op)")
        return bad

    def _numeric_guard(self, x: torch.Tensor, y: torch.Tensor | None, L: torch.Tensor, blocks: list[Block],
                       hooked: list[str]) -> dict[str, str]:
        """Σ_i w_i g_i from the rules vs one batched backward of Σ_i w_i L_i (random w), per parameter."""
        n = len(x)
        w = np.random.default_rng(12345).uniform(0.5, 1.5, size=n)
        with torch.enable_grad():
            Lr = self.per_example_loss(self.model(x), y)
            ps = [self._params[p] for p in hooked]
            R = torch.autograd.grad((Lr * torch.as_tensor(w, dtype=Lr.dtype, device=Lr.device)).sum(), ps,
                                    allow_unused=True)
        refs = {p: np.zeros(self._params[p].numel()) if r is None else
                r.detach().to_dense().double().cpu().numpy().reshape(-1) for p, r in zip(hooked, R)}
        return self._guard_verdict(w, blocks, refs, _np(Lr.double()), _np(L.double()), guard_tolerance(self.dtype))

    # ----------------------------------------------------------------- blocks
    @staticmethod
    def _batch_first(t: torch.Tensor, mode: str, B: int) -> torch.Tensor:
        """A captured tensor with the batch on axis 0."""
        if mode == "seq_first":
            return t.transpose(0, 1)
        if mode == "flat_tb":
            return t.reshape(-1, B, t.shape[-1]).transpose(0, 1)
        return t

    def _blocks(self, calls: list[Call]) -> list[Block]:
        """One block per parameter group, in parameter order."""
        groups: dict[tuple[str, str], list[Call]] = {}
        for c in calls:
            key = (c.rule, c.names.get("weight") or next(iter(c.names.values())))
            groups.setdefault(key, []).append(c)
        # parameters used by several groups (tied): merged below
        users: dict[str, set[tuple[str, str]]] = {}
        for key, cs in groups.items():
            for c in cs:
                for n in c.names.values():
                    users.setdefault(n, set()).add(key)
        order = {n: i for i, n in enumerate(self.param_names)}
        made: dict[str, Block] = {}
        tied_done: set[str] = set()
        for key in sorted(groups, key=lambda k: order[k[1]]):
            cs = groups[key]
            shared = [n for c in cs for n in c.names.values() if len(users[n]) > 1]
            if shared:
                for n in dict.fromkeys(shared):
                    if n not in tied_done:
                        tied_done.add(n)
                        made[n] = self._tied_block(n, [c for k in users[n] for c in groups[k]])
                        self._rule_of_param[n] = "tied"
                own = {r: n for c in cs for r, n in c.names.items() if len(users[n]) == 1}
                if own:  # e.g. a tied linear's own bias
                    cs = [Call(c.rule, {r: n for r, n in c.names.items() if n in own.values()}, c.inp, c.out, c.mode,
                                c.module, c.seq, c.grad, c.B) for c in cs]
                    made[own[next(iter(own))]] = self._group_block(cs)
                continue
            made[key[1]] = self._group_block(cs)
        return [made[k] for k in sorted(made, key=lambda k: order[k])]

    def _factors(self, c: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, d) with shapes (n, L, din), (n, L, dout) for linear, hf_conv1d and conv calls."""
        if c.rule in ("linear", "hf_conv1d"):
            inp = self._batch_first(c.inp, c.mode, c.B)
            g = self._batch_first(c.grad, c.mode, c.B)
            n = inp.shape[0]
            return inp.reshape(n, -1, inp.shape[-1]), g.reshape(n, -1, g.shape[-1])
        return self._conv_factors(c.module, c.inp, c.grad)

    def _group_block(self, cs: list[Call]) -> Block:
        rule = cs[0].rule
        names = {}
        for c in cs:
            for r, n in c.names.items():
                if names.get(r, n) != n:  # the same weight with different biases: no single block
                    raise RuntimeError("inconsistent parameter roles")
                names[r] = n
        wname, bname = names.get("weight"), names.get("bias")
        parts = [(n, self._params[n].numel()) for n in (wname, bname) if n is not None]
        label = _label(wname or bname)
        if rule in ("linear", "hf_conv1d") or (rule == "conv" and cs[0].module.groups == 1):
            pairs = [self._factors(c) for c in cs]
            a = torch.cat([p[0] for p in pairs], dim=1) if len(pairs) > 1 else pairs[0][0]
            d = torch.cat([p[1] for p in pairs], dim=1) if len(pairs) > 1 else pairs[0][1]
            return Block(label, "outer", parts, a_in=_np(a), d=_np(d),
                         layout="in_out" if rule == "hf_conv1d" else "out_in",
                         has_bias=bname is not None, has_weight=wname is not None)
        if rule == "embedding":
            mod = cs[0].module
            idx = torch.cat([c.inp.reshape(c.inp.shape[0], -1).long() for c in cs], dim=1)
            d = torch.cat([c.grad.reshape(c.grad.shape[0], -1, mod.embedding_dim) for c in cs], dim=1)
            if mod.padding_idx is not None:
                d = d * (idx != mod.padding_idx).unsqueeze(-1).to(d.dtype)
            return Block(label, "outer", parts, idx=_np(idx), vocab=mod.num_embeddings, d=_np(d), layout="in_out")
        full = None
        for c in cs:
            rows = self._full_rows(c, wname is not None, bname is not None)
            full = rows if full is None else full + rows
        return Block(label, "full", parts, full=_np(full))

    def _tied_block(self, n: str, cs: list[Call]) -> Block:
        """A parameter used by several rules: the sum of every use's per-example gradient."""
        p = self._params[n]
        total = None
        for c in cs:
            role = next(r for r, m in c.names.items() if m == n)
            sub = Call(c.rule, {role: n}, c.inp, c.out, c.mode, c.module, c.seq, c.grad, c.B)
            rows = self._group_block([sub]).materialize()
            total = rows if total is None else total + rows
        return Block(_label(n), "full", [(n, p.numel())], full=total)

    def _conv_factors(self, mod: nn.Module, inp: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unfolded patches (n, L, C·k) and output gradients (n, L, O) of a Conv1d/2d call."""
        n = inp.shape[0]
        conv2d = isinstance(mod, nn.Conv2d)
        x = inp if conv2d else inp.unsqueeze(2)
        gg = g if conv2d else g.unsqueeze(2)
        k = mod.kernel_size if conv2d else (1, mod.kernel_size[0])
        st = mod.stride if conv2d else (1, mod.stride[0])
        dl = mod.dilation if conv2d else (1, mod.dilation[0])
        pad = mod.padding
        if isinstance(pad, str):  # 'same' / 'valid': reproduce torch's own padding
            if pad == "valid":
                pad = (0, 0)
            else:
                tot = [dl[i] * (k[i] - 1) for i in range(2)]
                x = F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
                pad = (0, 0)
        elif not conv2d:
            pad = (0, pad[0])
        if mod.padding_mode != "zeros" and any(pad):
            x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]), mode=mod.padding_mode)
            pad = (0, 0)
        cols = F.unfold(x, k, dilation=dl, padding=pad, stride=st)  # (n, C*kh*kw, L)
        return cols.transpose(1, 2), gg.reshape(n, gg.shape[1], -1).transpose(1, 2)

    def _full_rows(self, c: Call, has_w: bool, has_b: bool) -> torch.Tensor:
        mod, inp, g = c.module, c.inp, c.grad
        n = g.shape[0]
        if isinstance(mod, CONV_TYPES):  # grouped / depthwise: one GEMM per group
            a, d = self._conv_factors(mod, inp, g)
            G = mod.groups
            Lp = a.shape[1]
            a = a.reshape(n, Lp, G, -1)
            d = d.reshape(n, Lp, G, -1)
            gw = torch.einsum("nlgo,nlgc->ngoc", d, a).reshape(n, -1)
            gb = d.sum(1).reshape(n, -1)
        elif isinstance(mod, BN_TYPES):
            shape = [1, -1] + [1] * (inp.dim() - 2)
            xhat = (inp - mod.running_mean.reshape(shape)) / torch.sqrt(mod.running_var.reshape(shape) + mod.eps)
            gw = (g * xhat).transpose(0, 1).reshape(g.shape[1], n, -1).sum(-1).T
            gb = g.transpose(0, 1).reshape(g.shape[1], n, -1).sum(-1).T
        else:  # norm: y = w ⊙ u(x) + b with u the module's own output at w = 1, b = 0
            wshape = mod.weight.shape
            sub = {"weight": torch.ones_like(mod.weight)}
            if getattr(mod, "bias", None) is not None:
                sub["bias"] = torch.zeros_like(mod.bias)
            with torch.no_grad():
                if type(mod) is nn.LayerNorm:  # the same u without functional_call's per-call reparametrization
                    u = F.layer_norm(c.inp, mod.normalized_shape, sub["weight"], sub.get("bias"), mod.eps)
                else:
                    u = torch.func.functional_call(mod, sub, (c.inp,))
            if c.mode == "expand":
                u = u.expand(n, *u.shape[1:])
            size = int(np.prod(wshape))
            gw = (g * u).reshape(n, -1, size).sum(1)
            gb = g.reshape(n, -1, size).sum(1)
        pieces = ([gw] if has_w else []) + ([gb] if has_b else [])
        return torch.cat(pieces, dim=1)

    # ---------------------------------------------------------- generic path
    def _fallback_block(self, x: torch.Tensor, y: torch.Tensor | None) -> Block:
        """Exact per-example gradients of the parameters without a proven rule: vmap, else a loop."""
        names = self._generic()
        fparams = {n: self._params[n].detach() for n in names}
        rest = {n: p.detach() for n, p in self.model.named_parameters() if n not in fparams}
        rest.update(dict(self.model.named_buffers()))

        def f(fp: dict, xi: torch.Tensor, yi: torch.Tensor | None) -> torch.Tensor:
            out = torch.func.functional_call(self.model, {**rest, **fp}, (xi[None],))
            return self.per_example_loss(out, None if yi is None else yi[None]).sum()

        rows = None
        if all(self._rule_of_param[n] == "vmap" for n in names):
            try:
                if y is None:
                    g = torch.func.vmap(torch.func.grad(lambda fp, xi: f(fp, xi, None)), in_dims=(None, 0))(fparams, x)
                else:
                    g = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(fparams, x, y)
                rows = torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1)
            except Exception:  # not vmappable (data-dependent control flow, in-place ops, ...)
                rows = None
        if rows is None:
            for n in names:
                self._rule_of_param[n] = "loop"
            ps = [self._params[n] for n in names]
            per = []
            with torch.enable_grad():
                for i in range(len(x)):
                    Li = self.per_example_loss(self.model(x[i:i + 1]), None if y is None else y[i:i + 1]).sum()
                    gi = torch.autograd.grad(Li, ps, allow_unused=True)
                    per.append(torch.cat([(torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
                                          for p, g in zip(ps, gi)]))
            rows = torch.stack(per)
        parts = [(n, self._params[n].numel()) for n in names]
        return Block("<fallback>", "full", parts, full=_np(rows))


def _label(name: str) -> str:
    """A block's name from its first parameter's: 'fc1.weight' -> 'fc1', 'attn.in_proj_weight' -> 'attn.in_proj'."""
    for suf in (".weight", ".bias", "_weight", "_bias"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
