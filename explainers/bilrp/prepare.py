"""Model preparation for BiLRP: any PyTorch network becomes a graph zennit's LRP rules can hook.

LRP in zennit (Anders et al., "Software for dataset-wide XAI", zennit) carries relevance as the
gradient: a rule is a backward hook on a module, every module without a hook passes the gradient
unchanged. That is exact for routing (reshape, flatten, padding, indexing, max pooling: winner takes
all) and for fan-out (a tensor used twice sums its two relevances), but wrong for three things a
network written with its own ``forward`` does with plain functions:

- adding two activations (a residual connection): the gradient copies the relevance into both
  branches (2x the relevance); LRP splits it by each addend's share (z-rule);
- element-wise activations called as functions (``torch.tanh``, ``F.gelu``): the gradient scales the
  relevance by f'(z); LRP passes it through unchanged;
- reductions and constant scalings (``x.mean((2, 3))``, ``x * 0.5``, average pooling called as a
  function): the gradient spreads 1/n of the relevance to each input; LRP splits it by contribution.

So the model is traced with ``torch.fx`` and those calls become modules that carry a zennit rule
(zennit's ``Sum`` layer for additions, small wrappers for the rest); any call whose relevance has no
rule here (a product of two activations, softmax, a functional linear map) is refused with its name.
BatchNorm after a Linear/Conv is folded into it (zennit's ``MergeBatchNorm``, the pair found in the
traced graph, so it is right for any ``forward``, not only for ``nn.Sequential`` order) and removed
from the graph; any other BatchNorm is an element-wise affine layer under the epsilon rule.

Rules (``RULES``) for Linear/Conv layers: ``zero`` (LRP-0), ``epsilon``, ``gamma`` (zennit's rules with
this module's stabilizer), ``zb`` (the z^B input rule, written as a zennit ``BasicHook`` so a
saturated patch gives z = 0 exactly; see ``ZBoxExact``). Everything else:

| layer | rule |
| --- | --- |
| ReLU, Tanh, GELU, Sigmoid, SiLU, ELU, LeakyReLU, Softplus (module or function) | pass (zennit ``Pass``) |
| residual ``a + b`` / ``a - b`` of two activations | z-rule over the addends (zennit ``Sum`` + ``Norm``) |
| AvgPool / AdaptiveAvgPool, ``mean`` / ``sum`` reductions | z-rule (zennit ``Norm``) |
| ``x * c``, ``x / c``, ``-x`` with a constant c | pass |
| ``x + c`` with a constant c | z-rule (c absorbs its share, like a bias) |
| BatchNorm after Linear/Conv | folded; elsewhere epsilon rule |
| MaxPool, padding, reshape, flatten, indexing, concatenation, Dropout (eval) | gradient (routing) |
"""

from __future__ import annotations

import copy
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from indexer.compat import ensure_torchvision_importable


ensure_torchvision_importable()  # zennit's __init__ imports torchvision

from zennit.canonizers import MergeBatchNorm  # noqa: E402
from zennit.core import BasicHook, Composite, Hook, ParamMod, RemovableHandle, RemovableHandleList, Stabilizer  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import Epsilon, Gamma, GammaMod, Norm, Pass  # noqa: E402


def stabilizer(dtype: torch.dtype) -> float:
    """Stabilizer for rules without an epsilon of their own: avoids 0/0 on dead units while staying far
    below the dtype's resolution (so LRP-0 is exact to rounding)."""
    return torch.finfo(dtype).eps * 1e-3


# ------------------------------------------------------------------------------------------------
# modules that stand in for traced function calls, so zennit can hook them


class Elementwise(nn.Module):
    """A traced element-wise call ``fn(x)`` (activation, constant scaling or shift) as a module."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple = (), kwargs: dict | None = None,
                 what: str = "") -> None:
        super().__init__()
        self.fn, self.args, self.kwargs, self.what = fn, args, dict(kwargs or {}), what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return self.what


class Reduce(Elementwise):
    """A traced reduction or pooling call (``mean``, ``sum``, ``F.avg_pool2d``) as a module (z-rule)."""


class StackSum(nn.Module):
    """``a + b`` (or ``a - b`` with the second addend negated) as zennit's ``Sum`` over a stacked axis,
    so the z-rule splits the relevance between the addends. Broadcasting addends are expanded first
    (their gradient sums the relevance back)."""

    def __init__(self) -> None:
        super().__init__()
        self.sum = Sum()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.sum(torch.stack(torch.broadcast_tensors(a, b), dim=-1))


_ACTIVATION_MODULES = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus,
                       nn.ReLU6, nn.Hardtanh, nn.Mish)
_LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVGPOOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveAvgPool3d)
_ROUTING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                    nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.Identity, nn.Dropout,
                    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_ACTIVATION_FUNCS = {torch.relu, F.relu, torch.tanh, F.tanh, F.gelu, torch.sigmoid, F.sigmoid, F.silu, F.elu,
                     F.leaky_relu, F.softplus, F.relu6, F.hardtanh, F.mish, torch.relu_}
_ACTIVATION_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
_REDUCE_FUNCS = {torch.mean, torch.sum, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                 F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_REDUCE_METHODS = {"mean", "sum"}
_ROUTING_FUNCS = {torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.squeeze,
                  torch.unsqueeze, torch.transpose, torch.permute, torch.chunk, torch.split, operator.getitem,
                  F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                  torch.max_pool1d, torch.max_pool2d, F.dropout, F.dropout1d, F.dropout2d, torch.clone,
                  getattr, torch.t}
_ROUTING_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                    "chunk", "split", "expand", "expand_as", "repeat", "clone", "t", "view_as", "reshape_as",
                    "size", "dim", "type_as", "to", "float", "double", "detach"}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_SCALE = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}


# ------------------------------------------------------------------------------------------------
# the z^B rule with exact zeros


@dataclass
class _Bounds:
    """The z^B bounds at the input of the first layer, set before each backward pass."""

    low: torch.Tensor | None = None
    high: torch.Tensor | None = None


class ZBoxExact(BasicHook):
    """The z^B rule for the input layer (Montavon et al. 2017), on zennit's ``BasicHook``.

    z_j = sum_i (x_i - l_i) w_ij^+ + (x_i - h_i) w_ij^-: two non-negative terms, so a saturated patch
    (every pixel at the bound its weight sign pulls to, frequent on digits: exact 0 background, exact 1
    strokes) gives z = 0 exactly and its relevance is dropped, where zennit's ``ZBox`` computes
    x w - l w^+ - h w^- and amplifies the rounding noise of that difference by 1/z.
    """

    def __init__(self, bounds: _Bounds) -> None:
        def gradient_mapper(out_grad: torch.Tensor, outputs: list[torch.Tensor]) -> tuple:
            # z comes from the stored input (one example); out_grad may be a batch of seeds: 1/z once
            z = (outputs[0] + outputs[1]).detach()
            inv = torch.where(z > 0, 1.0 / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(z))
            g = out_grad * inv
            return (g, g)

        super().__init__(
            input_modifiers=[lambda x: x - bounds.low.to(x), lambda x: x - bounds.high.to(x)],
            param_modifiers=[ParamMod(lambda p, _: p.clamp(min=0), zero_params=["bias"], require_params=False),
                             ParamMod(lambda p, _: p.clamp(max=0), zero_params=["bias"], require_params=False)],
            output_modifiers=[lambda out: out] * 2,
            gradient_mapper=gradient_mapper,
            reducer=lambda inputs, grads: inputs[0] * grads[0] + inputs[1] * grads[1],
        )
        self.bounds = bounds

    def copy(self) -> "ZBoxExact":
        return ZBoxExact(self.bounds)


class GammaBeforeReLU(BasicHook):
    """zennit's ``Gamma`` rule in one pass, for a layer whose output goes only into a ReLU.

    zennit's generalized Gamma runs four modified passes (positive and negative inputs, for units with
    z > 0 and z < 0). With a non-negative input (pixels, the output of a ReLU or max pooling) the
    negative-input passes are zero, and with a ReLU after the layer every unit with z <= 0 carries no
    relevance, so only x (w + gamma w^+) remains. The input's sign is checked on every backward; a
    negative entry hands the layer to zennit's ``Gamma``. ``prepare`` checks the ReLU in the graph.
    """

    def __init__(self, gamma: float, stabilizer: float) -> None:
        stab = Stabilizer.ensure(stabilizer)
        super().__init__(
            input_modifiers=[lambda x: x],
            param_modifiers=[GammaMod(gamma, min=0.0)],
            output_modifiers=[lambda out: out],
            gradient_mapper=lambda out_grad, outputs: out_grad / stab(outputs[0].detach()),
            reducer=lambda inputs, grads: inputs[0] * grads[0],
        )
        self.gamma, self.stab = gamma, stabilizer
        self.general = Gamma(gamma=gamma, stabilizer=stabilizer)

    def backward(self, module: nn.Module, grad_input: Any, grad_output: Any) -> Any:
        if bool((self.stored_tensors["input"][0] < 0).any()):
            self.general.stored_tensors = self.stored_tensors
            return self.general.backward(module, grad_input, grad_output)
        return super().backward(module, grad_input, grad_output)

    def copy(self) -> "GammaBeforeReLU":
        return GammaBeforeReLU(self.gamma, self.stab)


# ------------------------------------------------------------------------------------------------
# running a zennit rule without the ordinary backward underneath it


class _Relevance(torch.autograd.Function):
    """Connects a Linear/Conv layer's output to its input with the layer's LRP rule as the backward:
    forward returns the output (computed without autograd), backward returns the rule's relevance."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out: torch.Tensor, hook: "DirectRule", module: nn.Module) -> torch.Tensor:
        ctx.hook, ctx.module = hook, module
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return ctx.hook.relevance(ctx.module, grad), None, None, None


def _numeric_padding(module: nn.Module) -> Any:
    """A conv's padding as numbers, or None for an asymmetric 'same' padding (even kernel)."""
    pad = module.padding
    if not isinstance(pad, str):
        return pad
    if pad == "valid":
        return 0
    total = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


_CONV_TRANSPOSE = {nn.Conv1d: F.conv_transpose1d, nn.Conv2d: F.conv_transpose2d, nn.Conv3d: F.conv_transpose3d}


@dataclass
class Copies:
    """How the batch of the current forward is laid out: ``n`` distinct examples repeated ``c`` times
    as (c, n) along the batch axis (BiLRP feeds one output seed per copy), or ``n = None``: no
    repetition. Set by the explainer around each pass; read by ``DirectRule``."""

    n: int | None = None


class DirectRule(Hook):
    """A zennit ``BasicHook`` rule (its input, parameter and output modifiers, gradient mapper and
    reducer: the rule itself, unchanged) run on a Linear/Conv layer without the costs of zennit's own
    hook plumbing, which dominate BiLRP's time on a deep conv stack (profiled on VGG-16):

    - zennit lets autograd compute the layer's ordinary input gradient and then throws it away for the
      rule's relevance; here the layer's forward runs on a detached input and ``_Relevance`` connects
      output to input with the rule as its only backward;
    - zennit's ``BasicHook.backward`` gets the modified gradients with a nested ``autograd.grad``
      through a re-run forward; for a Linear/Conv layer that gradient is the transposed linear map of
      the modified weight, applied here directly (``g @ W``, or the transposed convolution). A layer
      this does not cover (an asymmetric 'same' padding) uses the nested ``autograd.grad`` as zennit does;
    - when the batch is ``c`` copies of ``n`` examples (``Copies``: one output seed per copy), the
      layer's forward and the rule's modified forwards (the z's) run on the ``n`` distinct examples
      only, and only the transposed map runs on all copies; the copies are checked to be equal (the
      last against the first) and a layer whose copies differ is computed on all of them.

    The relevance equals zennit's ``BasicHook`` result for the same rule (tested against zennit's own
    hooks). The output modifiers of the rules used here are identities.
    """

    def __init__(self, rule: BasicHook, copies: Copies) -> None:
        super().__init__()
        self.rule = rule
        self.copies = copies

    def copy(self) -> "DirectRule":
        return DirectRule(self.rule.copy(), self.copies)

    def register(self, module: nn.Module) -> RemovableHandleList:
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ])

    def _pre(self, module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        n = self.copies.n
        xu = x.detach()
        if n is not None and x.shape[0] > n and x.shape[0] % n == 0 and torch.equal(xu[-n:], xu[:n]):
            xu = xu[:n]
        self.stored_tensors["input"] = (xu,)
        self.stored_tensors["graph_input"] = x
        return (xu,) + tuple(inputs[1:])

    def _post(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = self.stored_tensors.pop("graph_input")
        c = x.shape[0] // output.shape[0]
        if c > 1:
            output = output.repeat(c, *([1] * (output.dim() - 1)))
        if not (self.active and x.requires_grad):
            return output
        return _Relevance.apply(x, output, self, module)

    def _rule_for(self, x: torch.Tensor) -> BasicHook:
        rule = self.rule
        if isinstance(rule, GammaBeforeReLU) and bool((x < 0).any()):
            return rule.general  # the one-pass form needs a non-negative input
        return rule

    def relevance(self, module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        """The rule's relevance at the layer's input for the upper relevance ``grad`` (all copies)."""
        x = self.stored_tensors["input"][0]
        n = x.shape[0]
        c = grad.shape[0] // n
        g = grad.reshape(c, *x.shape[:1], *grad.shape[1:])  # (copies, examples, ...)
        rule = self._rule_for(x)
        inputs, outputs, weights = [], [], []
        with torch.no_grad():
            for in_mod, param_mod, out_mod in zip(rule.input_modifiers, rule.param_modifiers, rule.output_modifiers):
                inp = in_mod(x)
                with ParamMod.ensure(param_mod)(module) as modified:
                    outputs.append(out_mod(modified.forward(inp)))
                    weights.append(modified.weight.detach())
                inputs.append(inp)
        grads = rule.gradient_mapper(g, outputs)  # broadcasts the examples' z over the copies
        if isinstance(grads, torch.Tensor):  # a single tensor stands for one per output (as autograd.grad reads it)
            grads = (grads,)
        gradients = [self._input_vjp(module, w, gk.reshape(c * n, *gk.shape[2:]), inp, param_mod)
                     .reshape(c, n, *inp.shape[1:])
                     for w, gk, inp, param_mod in zip(weights, grads, inputs, rule.param_modifiers)]
        relevance = rule.reducer(inputs, gradients)
        return relevance.reshape(c * n, *x.shape[1:])

    @staticmethod
    def _input_vjp(module: nn.Module, weight: torch.Tensor, grad: torch.Tensor, inp: torch.Tensor,
                   param_mod: Any) -> torch.Tensor:
        """The modified layer's transposed linear map applied to grad (all copies of the examples in inp)."""
        if isinstance(module, nn.Linear):
            return grad @ weight
        transpose = _CONV_TRANSPOSE.get(type(module))
        pad = _numeric_padding(module) if transpose is not None else None
        if transpose is not None and pad is not None:
            # the transposed convolution, with the output padding that restores the input's size
            nd = weight.dim() - 2
            pads = (pad,) * nd if isinstance(pad, int) else tuple(pad)
            out_pad = tuple(
                i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                for i, o, s, p, d, k in zip(inp.shape[-nd:], grad.shape[-nd:], module.stride, pads, module.dilation,
                                            weight.shape[2:]))
            return transpose(grad, weight, stride=module.stride, padding=pads, output_padding=out_pad,
                             groups=module.groups, dilation=module.dilation)
        c = grad.shape[0] // inp.shape[0]
        with ParamMod.ensure(param_mod)(module) as modified, torch.enable_grad():
            i = inp.detach().repeat(c, *([1] * (inp.dim() - 1))).requires_grad_(True)
            return torch.autograd.grad(modified.forward(i), i, grad_outputs=grad)[0]


# ------------------------------------------------------------------------------------------------
# preparation


@dataclass
class Prepared:
    """A model ready for zennit: the traced, rewritten graph module (eval mode, BatchNorm folded), its
    Linear/Conv layers in execution order, and the composite that hooks each module with its rule."""

    module: fx.GraphModule
    linear_names: list[str]
    composite: Composite
    bounds: _Bounds
    first_linear: nn.Module
    rewrites: list[str] = field(default_factory=list)
    out_shape: tuple[int, ...] = ()  # the output's shape for one example (batch axis included, = 1)
    copies: Copies = field(default_factory=Copies)  # shared with the DirectRule hooks
    per_example_bytes: int = 0  # memory of one example's activations (from the shape propagation)
    lock: threading.Lock = field(default_factory=threading.Lock)  # hooks and bounds are per call: one at a time


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("tensor_meta"), fx.passes.shape_prop.TensorMetadata)


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return f"{node.name} ({node.op} {target})"


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def _add_module(gm: fx.GraphModule, stem: str, module: nn.Module) -> str:
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    gm.add_submodule(f"{stem}_{i}", module)
    return f"{stem}_{i}"


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        raise TypeError(f"BiLRP traces the model's forward with torch.fx to find its residual additions and "
                        f"functional activations, and this forward cannot be traced ({type(exc).__name__}: "
                        f"{exc}); write data-dependent control flow as modules or pass the traceable part "
                        "of the model") from None


def _call(node: fx.Node, *names: Any) -> bool:
    """Whether ``node`` calls one of ``names`` (functions for call_function, method names for call_method)."""
    return node.op in ("call_function", "call_method") and any(node.target is n or node.target == n for n in names
                                                               if isinstance(n, str) == (node.op == "call_method"))


def _rewrite(gm: fx.GraphModule, example: torch.Tensor) -> list[str]:
    """Replace the traced calls whose gradient is not their LRP rule by hookable modules (see the
    module docstring); refuse calls with no rule. Returns a description of each rewrite."""
    try:
        fx.passes.shape_prop.ShapeProp(gm).propagate(example)
    except Exception as exc:  # ShapeProp wraps the failing op's error
        raise RuntimeError(f"the model's forward failed on an input of shape {tuple(example.shape[1:])}: "
                           f"{exc}") from None
    graph = gm.graph
    dep = _input_dependent(graph)
    done: list[str] = []
    for node in list(graph.nodes):
        if node.op in ("placeholder", "output", "get_attr") or node not in dep:
            continue
        if node.op == "call_module":
            continue  # checked by trace()
        if not _is_tensor(node):
            continue  # shape arithmetic (x.size(0) * 2, getattr(x, "shape")) or a tuple from split/chunk
        target = node.target
        tensors = [a for a in node.args if _is_tensor(a) and a in dep]
        if node.op == "call_function" and target in _ROUTING_FUNCS or \
                node.op == "call_method" and target in _ROUTING_METHODS:
            continue
        if node.op == "call_function" and target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
            if mode != "constant" or value not in (0, 0.0, None):
                raise TypeError(f"{_describe(node)}: only zero padding is supported, got mode={mode!r}, "
                                f"value={value!r}")
            continue
        is_act = node.op == "call_function" and target in _ACTIVATION_FUNCS or \
            node.op == "call_method" and target in _ACTIVATION_METHODS
        is_red = node.op == "call_function" and target in _REDUCE_FUNCS or \
            node.op == "call_method" and target in _REDUCE_METHODS
        if is_act or is_red:
            if len(tensors) != 1 or node.args[0] is not tensors[0]:
                raise TypeError(f"{_describe(node)}: expected one activation as the first argument")
            if node.op == "call_method":
                fn = getattr(torch.Tensor, target.rstrip("_"))  # in-place methods as their out-of-place twin
            else:
                fn = torch.relu if target is torch.relu_ else target
            kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
            cls = Reduce if is_red else Elementwise
            name = _add_module(gm, "bilrp_reduce" if is_red else "bilrp_act",
                               cls(fn, tuple(node.args[1:]), kwargs, what=str(getattr(target, "__name__", target))))
            _replace(graph, node, name, (tensors[0],), dep)
            done.append(f"{_describe(node)} -> {'z-rule' if is_red else 'pass'}")
            continue
        is_add = _call(node, *_ADD, "add", "add_", "__add__", "__iadd__", "__radd__")
        is_sub = _call(node, *_SUB, "sub", "sub_", "__sub__", "__isub__")
        if is_add or is_sub:
            if node.kwargs.get("alpha", 1) != 1:
                raise TypeError(f"{_describe(node)}: add/sub with alpha != 1 is not supported")
            a, b = node.args[0], node.args[1]
            if len(tensors) == 2:
                with graph.inserting_before(node):
                    if is_sub:
                        b = graph.call_module(_add_module(gm, "bilrp_neg", Elementwise(torch.neg, what="neg")),
                                              (b,))
                    new = graph.call_module(_add_module(gm, "bilrp_sum", StackSum()), (a, b))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                dep.update((new, b))
                done.append(f"{_describe(node)} -> z-rule over the addends")
                continue
            if len(tensors) == 1:
                x = tensors[0]
                other = b if a is x else a
                if isinstance(other, fx.Node):
                    raise TypeError(f"{_describe(node)}: adding a parameter tensor to an activation is not "
                                    "supported; use a module with a bias")
                if is_sub and a is not x:
                    raise TypeError(f"{_describe(node)}: a constant minus an activation is not supported")
                # a constant shift: the constant absorbs its share of the relevance, like a bias
                name = _add_module(gm, "bilrp_shift", Reduce(torch.sub if is_sub else torch.add, (other,),
                                                             what=f"{'-' if is_sub else '+'} {other}"))
                _replace(graph, node, name, (x,), dep)
                done.append(f"{_describe(node)} -> z-rule (constant shift)")
                continue
        is_neg = _call(node, operator.neg, torch.neg, "neg", "__neg__")
        is_div = _call(node, operator.truediv, operator.itruediv, torch.div, "div", "div_", "__truediv__")
        is_mul = _call(node, operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__")
        if is_neg or is_div or is_mul:
            others = [a for a in node.args if a is not (tensors[0] if tensors else None)]
            if len(tensors) == 1 and not any(isinstance(a, fx.Node) for a in others):
                x = tensors[0]
                if is_neg:
                    fn, args = torch.neg, ()
                elif is_div:
                    if node.args[0] is not x:
                        raise TypeError(f"{_describe(node)}: dividing by an activation is not supported")
                    fn, args = torch.div, (node.args[1],)
                else:
                    fn, args = torch.mul, (others[0],)
                name = _add_module(gm, "bilrp_scale", Elementwise(fn, args, what=f"{fn.__name__} {args}"))
                _replace(graph, node, name, (x,), dep)
                done.append(f"{_describe(node)} -> pass (constant scaling)")
                continue
            raise TypeError(f"{_describe(node)}: a product or quotient with another activation or a parameter "
                            "tensor (gating, attention, layer scale) has no LRP rule here")
        raise TypeError(f"BiLRP has no LRP rule for {_describe(node)} in the model's forward; supported calls: "
                        "residual additions, element-wise activations, mean/sum/average pooling, max pooling, "
                        "constant scaling, reshaping/indexing/concatenation and zero padding (write other "
                        "layers as the nn modules listed in docs/bilrp.md)")
    graph.lint()
    gm.recompile()
    return done


def _unshare(gm: fx.GraphModule) -> list[str]:
    """Give every call of a module its own copy: a zennit hook keeps the input of one call, so a module
    called twice (a shared ReLU or pooling layer, a weight-tied Linear) would be explained with the
    input of its last call."""
    seen: set[str] = set()
    done = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target in seen:
            m = gm.get_submodule(node.target)
            node.target = _add_module(gm, node.target.replace(".", "_") + "_call", copy.deepcopy(m))
            done.append(f"{node.name}: second call of a shared module gets its own copy")
        seen.add(node.target)
    gm.recompile()
    return done


def _replace(graph: fx.Graph, node: fx.Node, module_name: str, args: tuple, dep: set[fx.Node]) -> None:
    with graph.inserting_before(node):
        new = graph.call_module(module_name, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    dep.add(new)


def _fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold each BatchNorm whose input is a Linear/Conv output used by nothing else into that layer
    (zennit's ``MergeBatchNorm`` arithmetic) and drop the BatchNorm from the graph: the folded layer
    computes BN(Wx + b) exactly."""
    modules = dict(gm.named_modules())
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BN_MODULES):
            continue
        bn = modules[node.target]
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{node.target}: BatchNorm without running statistics (track_running_stats=False) "
                             "cannot be explained; LRP explains the eval-mode model")
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules[src.target], _LINEAR_MODULES)
                and len(src.users) == 1):
            continue
        lin = modules[src.target]
        if not bn.affine:
            bn.weight = nn.Parameter(torch.ones_like(bn.running_mean))
            bn.bias = nn.Parameter(torch.zeros_like(bn.running_mean))
        with torch.no_grad():
            MergeBatchNorm.merge_batch_norm([lin], bn)
        if lin.bias is not None and lin.bias.shape != (lin.weight.shape[0],):
            lin.bias = nn.Parameter(lin.bias.expand(lin.weight.shape[0]).clone())
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        done.append(f"{node.target} folded into {src.target}")
    gm.graph.lint()
    gm.recompile()
    return done


def _feeding_relu_only(gm: fx.GraphModule) -> set[str]:
    """Linear/Conv modules whose every output path reaches a ReLU through routing only (max pooling,
    reshape, padding, Dropout): none of their units with z <= 0 carries relevance."""
    modules = dict(gm.named_modules())
    routing = _ROUTING_MODULES

    def reaches_relu(node: fx.Node) -> bool:
        if not node.users:
            return False
        for user in node.users:
            if user.op == "call_module":
                m = modules[user.target]
                relu_fns = (torch.relu, F.relu, torch.Tensor.relu)
                if isinstance(m, nn.ReLU) or isinstance(m, Elementwise) and m.fn in relu_fns:
                    continue
                if isinstance(m, routing) and reaches_relu(user):
                    continue
            elif _call(user, torch.flatten, torch.reshape, "view", "reshape", "flatten") and reaches_relu(user):
                continue
            return False
        return True

    return {n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules[n.target], _LINEAR_MODULES) and reaches_relu(n)}


def trace(model: nn.Module, dtype: torch.dtype) -> tuple[fx.GraphModule, int]:
    """A private eval-mode copy of ``model`` in ``dtype``, traced; every module it calls checked against
    the supported layers. Returns the graph module and its number of Linear/Conv calls."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"BiLRP needs a torch.nn.Module, got {type(model).__name__}")
    m = _copy_without_hooks(model).eval().to(dtype)
    for p in m.parameters():
        p.requires_grad_(False)
    gm = _trace(m)
    gm.eval()
    supported = _LINEAR_MODULES + _BN_MODULES + _AVGPOOL_MODULES + _ROUTING_MODULES + _ACTIVATION_MODULES
    n_linear = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, supported):
            raise TypeError(f"BiLRP does not support layer {node.target!r} ({type(mod).__name__}); supported: "
                            "Linear, Conv1d/2d/3d, BatchNorm, ReLU/Tanh/GELU/Sigmoid/SiLU/ELU/LeakyReLU/Softplus, "
                            "Max/AvgPool (also adaptive), Flatten, Unflatten, ZeroPad, Dropout, Identity, and "
                            "residual additions in forward()")
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode != "zeros":
            raise TypeError(f"{node.target}: only zero padding is supported, got padding_mode={mod.padding_mode!r}")
        n_linear += isinstance(mod, _LINEAR_MODULES)
    if n_linear == 0:
        raise TypeError("the embedding model has no Linear or Conv layer to explain")
    return gm, n_linear


def prepare(traced: fx.GraphModule, example: torch.Tensor, rules: list[str], *, epsilon: float, gamma: float,
            dtype: torch.dtype, direct: bool = True) -> Prepared:
    """Rewrite and fold a copy of the traced model for inputs shaped like ``example`` (batch of one), as
    the module docstring says, and build the zennit composite: ``rules`` has one rule per Linear/Conv
    call in execution order, input side first. ``direct``: the Linear/Conv rules run through
    ``DirectRule`` (same rules, no ordinary backward underneath, no nested autograd); False hooks
    zennit's rules with zennit's own plumbing (the tests compare the two)."""
    gm = copy.deepcopy(traced)
    done = _rewrite(gm, example)
    done += _fold_batchnorm(gm)
    done += _unshare(gm)
    modules = dict(gm.named_modules())
    linear_names = [n.target for n in gm.graph.nodes
                    if n.op == "call_module" and isinstance(modules[n.target], _LINEAR_MODULES)]
    if len(rules) != len(linear_names):  # trace() counted the same calls
        raise AssertionError(f"{len(rules)} rules for {len(linear_names)} Linear/Conv calls")
    stab = stabilizer(dtype)
    bounds = _Bounds()
    rule_of = dict(zip(linear_names, rules))
    for name in _feeding_relu_only(gm):
        if rule_of.get(name) == "gamma":
            rule_of[name] = "gamma_relu"
    templates = {
        "zero": Epsilon(epsilon=stab),
        "epsilon": Epsilon(epsilon=max(epsilon, stab)),
        "gamma": Gamma(gamma=gamma, stabilizer=stab),
        "gamma_relu": GammaBeforeReLU(gamma, stab),
        "zb": ZBoxExact(bounds),
    }
    copies = Copies()
    if direct:
        templates = {k: DirectRule(v, copies) for k, v in templates.items()}
    affine = Epsilon(epsilon=epsilon if epsilon > 0 else stab)
    norm, passing = Norm(stabilizer=stab), Pass()

    def module_map(ctx: dict, name: str, module: nn.Module) -> Any:
        if name in rule_of:
            return templates[rule_of[name]]
        if isinstance(module, _BN_MODULES):
            return affine
        if isinstance(module, _AVGPOOL_MODULES + (Sum, Reduce)):
            return norm
        if isinstance(module, _ACTIVATION_MODULES + (Elementwise,)):
            return passing
        return None

    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out_shape = tuple(out.meta["tensor_meta"].shape) if _is_tensor(out) else ()
    return Prepared(module=gm, linear_names=linear_names, composite=Composite(module_map=module_map),
                    bounds=bounds, first_linear=modules[linear_names[0]], rewrites=done, out_shape=out_shape,
                    copies=copies, per_example_bytes=_activation_bytes(gm))


def _activation_bytes(gm: fx.GraphModule) -> int:
    """Bytes of all intermediate tensors of one example's forward (from the shape propagation)."""
    total = 0
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if isinstance(tm, fx.passes.shape_prop.TensorMetadata):
            total += int(torch.Size(tm.shape).numel()) * torch.empty((), dtype=tm.dtype).element_size()
    return total


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that carries none of its hooks.

    A served model has hooks of its gradient engine registered (bound methods of an object that
    holds locks); copying them would copy that object, which cannot be copied, and BiLRP must not
    run them anyway. The hooks' owners are shared with the copy, never copied, and the copy's
    hook tables are then emptied.
    """
    memo: dict[int, Any] = {}
    tables = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    for mod in model.modules():
        for t in tables:
            table = getattr(mod, t, None)
            if isinstance(table, dict):
                for h in table.values():
                    owner = getattr(h, "__self__", None)
                    if owner is not None:
                        memo[id(owner)] = owner
    m = copy.deepcopy(model, memo)
    for mod in m.modules():
        for t in tables:
            table = getattr(mod, t, None)
            if isinstance(table, dict):
                table.clear()
    return m
