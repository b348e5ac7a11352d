"""BiLRP on networks with their own forward: residual blocks (torchvision's ResNet BasicBlock and a
functional one), torchvision's VGG-16 as shipped, Tanh/GELU, shared modules, zero-similarity pairs,
and the calls it refuses. References: conservation, the gradient x input identity of LRP-0 on
bias-free ReLU networks (plain autograd on the unmodified model), and hand-computed closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilrp_models import grad_x_input_bilrp, torchvision_models, zero_biases
from explainers.bilrp import BiLRP, explain_pair, penultimate_embedding

torch.set_num_threads(1)


class FunctionalResidual(nn.Module):
    """A residual network written with functions: relu, +, mean pooling, a constant scaling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        h = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.conv2(h) * 0.5)
        x = F.max_pool2d(x, 2)
        return F.relu(self.fc(x.mean((2, 3))))


def _resnet_embedding(seed: int = 0) -> nn.Module:
    """Stem conv, two torchvision BasicBlocks as shipped (the second with a downsample branch),
    adaptive average pooling: BatchNorm after every conv, residual additions in forward."""
    tvm = torchvision_models()
    torch.manual_seed(seed)
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
                          tvm.resnet.BasicBlock(4, 4), tvm.resnet.BasicBlock(4, 8, stride=2, downsample=down),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return zero_biases(model).eval()


def _image(seed: int, shape=(1, 10, 10)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


def _check_lrp0_equals_grad_x_input(model: nn.Module, xa: np.ndarray, xb: np.ndarray, dtype=torch.float64,
                                    rtol: float = 1e-6) -> None:
    e = BiLRP(model, rule="zero", dtype=dtype, batch_size=4)
    res = e.explain(xa, xb)
    assert res.similarity != 0
    assert abs(res.total - res.similarity) <= 1e-3 * abs(res.similarity), (res.total, res.similarity)
    ref = grad_x_input_bilrp(model, xa, xb)
    scale = np.abs(ref).max()
    assert scale > 0
    np.testing.assert_allclose(res.relevance, ref, rtol=rtol, atol=rtol * scale)


def test_resnet_basic_blocks_conserve_and_equal_grad_x_input():
    """torchvision's BasicBlock (BatchNorm folded, residual sums as zennit Sum + z-rule): sum R = y within
    1e-3, and the pair matrix equals the gradient x input reference."""
    model = _resnet_embedding()
    xa, xb = _image(1), _image(2)
    e = BiLRP(model, rule="zero", dtype=torch.float64)
    rewrites = e.rewrites(xa)
    assert sum("z-rule over the addends" in r for r in rewrites) == 2
    assert sum("folded" in r for r in rewrites) == 5  # bn1, bn2 of both blocks and the downsample's
    assert any("own copy" in r for r in rewrites)  # BasicBlock calls its ReLU twice
    with torch.no_grad():
        want = model.double()(torch.as_tensor(xa)[None]).reshape(-1).numpy()
    np.testing.assert_allclose(e.embed(xa), want, rtol=1e-10, atol=1e-12)
    _check_lrp0_equals_grad_x_input(_resnet_embedding(), xa, xb)


def test_residual_addition_without_the_sum_rule_would_break_conservation():
    """The z-rule on the residual addition is what keeps conservation: the plain gradient there copies
    the relevance into both branches (the check above is not vacuous)."""
    model = _resnet_embedding()
    xa, xb = _image(3), _image(4)
    e = BiLRP(model, rule="zero", dtype=torch.float64)
    prep = e._prepare(e._as_input(xa))
    for name, m in prep.module.named_modules():
        if type(m).__name__ == "StackSum":
            m.sum = nn.Identity()  # plain gradient through the stacked sum: no rule on it
            m.forward = lambda a, b: a + b  # noqa: E731
    res = e.explain(xa, xb)
    assert abs(res.total - res.similarity) > 1e-2 * abs(res.similarity)


def test_functional_forward_with_batchnorm_and_scaling():
    torch.manual_seed(5)
    model = zero_biases(FunctionalResidual()).eval()
    xa, xb = _image(5, (1, 8, 8)), _image(6, (1, 8, 8))
    e = BiLRP(model, rule="zero", dtype=torch.float64)
    kinds = " ".join(e.rewrites(xa))
    assert "pass (constant scaling)" in kinds and "z-rule over the addends" in kinds and "z-rule" in kinds
    assert "bn1 folded into conv1" in kinds
    _check_lrp0_equals_grad_x_input(model, xa, xb)


def test_vgg16_as_shipped_conserves_and_equals_grad_x_input():
    """torchvision's VGG-16 (its own forward: features, adaptive pooling, torch.flatten, classifier with
    Dropout), random init, biases zeroed, 32x32 input: sum R = y within 1e-3 in float32 and the pair
    matrix equals gradient x input (to 1e-3 of its largest entry: float32 through 16 layers)."""
    tvm = torchvision_models()
    torch.manual_seed(0)
    model = zero_biases(tvm.vgg16(weights=None, num_classes=4)).eval()
    rng = np.random.default_rng(0)
    xa, xb = rng.random((3, 32, 32)), rng.random((3, 32, 32))
    e = BiLRP(model, rule="zero", pool=(8, 8))
    res = e.explain(xa, xb)
    assert len(e.rules) == 16 and res.r_x.shape[0] >= 1
    assert res.similarity != 0
    assert abs(res.total - res.similarity) <= 1e-3 * abs(res.similarity), (res.total, res.similarity)
    assert res.pooled.shape == (16, 16)
    np.testing.assert_allclose(res.r_x.sum(axis=1), e.embed(xa)[(e.embed(xa) != 0) & (e.embed(xb) != 0)],
                               rtol=1e-3, atol=1e-3 * np.abs(e.embed(xa)).max())
    ref = grad_x_input_bilrp(model, xa, xb, dtype=torch.float32)
    # float32 through 16 layers: entries agree to 1e-3 of the largest one
    np.testing.assert_allclose(res.relevance, ref, rtol=1e-2, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("act", ["tanh_module", "gelu_module", "tanh_function", "gelu_function"])
def test_tanh_and_gelu_pass_relevance_through(act):
    """phi = W2 f(W1 x), bias-free: with the pass rule on f, LRP-0 gives the closed form
    R^m_i = sum_j (x_i W1_ji / z_j) f(z_j) W2_mj (the relevance of f(z_j) handed to z_j unchanged)."""
    torch.manual_seed(1)
    l1, l2 = nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False)
    f = {"tanh_module": nn.Tanh(), "gelu_module": nn.GELU(), "tanh_function": torch.tanh, "gelu_function": F.gelu}[act]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = l1, l2
            if isinstance(f, nn.Module):
                self.f = f

        def forward(self, x):
            return self.l2(self.f(self.l1(x)) if isinstance(f, nn.Module) else f(self.l1(x)))

    x, xo = np.random.default_rng(2).normal(size=(2, 5))
    e = BiLRP(Net().eval(), rule="zero", dtype=torch.float64)
    res = e.explain(x, xo)
    W1, W2 = l1.weight.detach().double().numpy(), l2.weight.detach().double().numpy()
    fn = np.tanh if "tanh" in act else (lambda z: F.gelu(torch.as_tensor(z)).numpy())

    def first_order(v):
        z = W1 @ v
        return np.einsum("i,ji,j,mj->mi", v, W1, fn(z) / z, W2)  # (m, i)

    ra, rb = first_order(x), first_order(xo)
    np.testing.assert_allclose(res.relevance, ra.T @ rb, rtol=1e-9, atol=1e-12)
    assert res.total == pytest.approx(res.similarity, rel=1e-9)  # pass + LRP-0 without biases: conservative


def test_shared_module_called_twice():
    """A weight-tied Linear called twice: each call is explained with its own input."""
    torch.manual_seed(2)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6, bias=False)

        def forward(self, x):
            return torch.relu(self.lin(torch.relu(self.lin(x))))

    model = Tied().eval()
    x, xo = np.abs(np.random.default_rng(3).normal(size=(2, 6)))
    _check_lrp0_equals_grad_x_input(model, x, xo)


def test_zero_similarity_pair_gives_a_zero_explanation():
    """Embeddings with no active dimension in common (y = 0): an all-zero explanation, not a crash;
    also through the server hook and for a blank image on a bias-free CNN."""
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
    e = BiLRP(nn.Sequential(lin, nn.ReLU()), rule="zero")
    res = e.explain(np.array([1.0, -1.0]), np.array([-1.0, 1.0]))
    assert res.similarity == 0 and res.total == 0
    assert res.relevance.shape == (2, 2) and not res.relevance.any()
    assert res.r_x.shape == (0, 2) and res.to_dict()["top_pairs"][0]["relevance"] == 0.0
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 5, bias=False),
                        nn.ReLU()).eval()
    blank, img = np.zeros((1, 10, 10)), _image(7)
    res = explain_pair(cnn, blank, img, rule="epsilon", pool=(5, 5))
    assert res.similarity == 0 and res.pooled.shape == (4, 4) and not res.pooled.any()
    assert res.pool_grid == (2, 2)


def test_vmapped_backward_equals_repeated_input():
    """The two ways of pushing many seeds: the input repeated once per seed along the batch axis (the
    default) and one forward with a vmapped backward (``batched_backward = True``) agree, on the
    residual network with z^B and gamma."""
    model = _resnet_embedding(seed=3)
    xa, xb = _image(8), _image(9)
    opts = dict(rule="gamma", input_rule="zb", bounds=(0.0, 1.0), dtype=torch.float64, batch_size=3)
    repeated = BiLRP(model, **opts).explain(xa, xb)
    vm = BiLRP(model, **opts)
    vm.batched_backward = True
    vmapped = vm.explain(xa, xb)
    assert vm.batched_backward  # it ran, no fallback
    assert np.abs(repeated.relevance).max() > 0
    np.testing.assert_allclose(repeated.relevance, vmapped.relevance, rtol=1e-10, atol=1e-14)


def test_refused_calls_name_the_node():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) * torch.sigmoid(self.b(x))

    with pytest.raises(TypeError, match="product or quotient"):
        BiLRP(Gate()).explain(np.ones(3), np.ones(3))

    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return torch.softmax(self.a(x), -1)

    with pytest.raises(TypeError, match="no LRP rule for softmax"):
        BiLRP(Soft()).explain(np.ones(3), np.ones(3))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else -self.a(x)

    with pytest.raises(TypeError, match="cannot be traced"):
        BiLRP(Branchy())


def test_penultimate_embedding_of_a_model_with_its_own_forward():
    """VGG-16 as shipped: phi is the classifier's input to its last Linear (4096 dims after ReLU and
    Dropout), computed by a traced graph that shares the model's layers; the logits are W phi + b."""
    tvm = torchvision_models()
    torch.manual_seed(0)
    model = tvm.vgg11(weights=None, num_classes=3).eval()
    phi = penultimate_embedding(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        h = phi(x)
        np.testing.assert_allclose(model.classifier[-1](h).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert h.shape == (2, 4096)
    assert phi.get_submodule("features.0").weight is model.features[0].weight
    with pytest.raises(ValueError, match="must return the output of an nn.Linear"):
        penultimate_embedding(FunctionalResidual())  # ends in a ReLU


@pytest.mark.parametrize("opts", [
    dict(rule="gamma", input_rule="zb", bounds=(0.0, 1.0)),
    dict(rule="epsilon", epsilon=0.1),
])
def test_direct_rules_equal_zennits_own_hooks(opts):
    """``DirectRule`` (the rule run without zennit's discarded ordinary backward and nested autograd,
    its forward on the distinct example only) gives zennit's own hook result, on the ResNet blocks."""
    model = _resnet_embedding(seed=4)
    xa, xb = _image(10), _image(11)
    fast = BiLRP(model, dtype=torch.float64, batch_size=5, **opts)
    slow = BiLRP(model, dtype=torch.float64, batch_size=5, **opts)
    slow.direct = False
    a, b = fast.explain(xa, xb), slow.explain(xa, xb)
    assert np.abs(b.relevance).max() > 0
    np.testing.assert_allclose(a.relevance, b.relevance, rtol=1e-9, atol=1e-12 * np.abs(b.relevance).max())


def test_direct_general_gamma_on_negative_inputs_equals_zennit():
    """Behind a Tanh the gamma layer sees negative inputs: the one-pass form hands over to zennit's
    generalized Gamma (four passes), still equal to zennit's own hooks."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU()).eval()
    x, xo = np.random.default_rng(4).normal(size=(2, 6))
    fast = BiLRP(model, rule="gamma", dtype=torch.float64)
    slow = BiLRP(model, rule="gamma", dtype=torch.float64)
    slow.direct = False
    a, b = fast.explain(x, xo), slow.explain(x, xo)
    assert np.abs(b.relevance).max() > 0
    np.testing.assert_allclose(a.relevance, b.relevance, rtol=1e-9, atol=1e-13)


def test_direct_rule_computes_all_copies_when_they_differ():
    """The shortcut (forward on the distinct examples only) applies to a batch of equal copies; a batch
    announced as copies whose copies differ is computed on all of them (same LRP as unannounced)."""
    from explainers.bilrp.prepare import prepare

    model = _resnet_embedding(seed=5)
    e = BiLRP(model, rule="zero", dtype=torch.float64)
    x = torch.as_tensor(np.stack([_image(12), _image(13)]))
    prep = prepare(e._traced, x[:1], e.rules, epsilon=e.epsilon, gamma=e.gamma, dtype=torch.float64)
    seeds = torch.as_tensor(np.random.default_rng(5).normal(size=(2, 8)))

    def lrp(n):
        prep.copies.n = n
        try:
            with prep.composite.context(prep.module) as m:
                xi = x.clone().requires_grad_(True)
                return torch.autograd.grad(m(xi), xi, grad_outputs=seeds)[0]
        finally:
            prep.copies.n = None

    np.testing.assert_allclose(lrp(1).numpy(), lrp(None).numpy(), rtol=1e-12, atol=1e-15)


def test_traced_model_is_cached_until_its_weights_change():
    """Explainers of the same model reuse one traced copy (the server builds one per request); an
    in-place weight update (an optimizer step) makes the next explainer trace the model again."""
    model = _resnet_embedding(seed=6)
    e1, e2 = BiLRP(model, rule="zero"), BiLRP(model, rule="zero")
    assert e1._traced is e2._traced
    xa, xb = _image(14), _image(15)
    before = e2.explain(xa, xb).relevance
    assert e1._prepare(e1._as_input(xa)) is e2._prepare(e2._as_input(xa))
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    e3 = BiLRP(model, rule="zero")
    assert e3._traced is not e1._traced
    after = e3.explain(xa, xb).relevance
    assert not np.allclose(before, after)
