"""The digits VAE: negative ELBO against a hand computation, determinism, per-example gradients
(through the gradient engine, against a plain autograd loop), checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from indexer.vae import VAE, train_vae, vae_loss_model

torch.set_num_threads(1)


def _sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def _recipe_noise(x: np.ndarray, seed: int, S: int, latent: int) -> np.ndarray:
    """The documented per-example draw, recomputed here: rng([seed, BLAKE2b-128 of the float32 bytes])."""
    import hashlib

    h = hashlib.blake2b(np.asarray(x, np.float32).tobytes(), digest_size=16).digest()
    key = [seed, int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")]
    return np.random.default_rng(key).standard_normal((S, latent))


def _hand_vae(noise: str) -> VAE:
    vae = VAE(input_dim=2, hidden=2, latent=1, n_samples=2, noise=noise, noise_seed=5).double()
    with torch.no_grad():
        vae.enc[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64))
        vae.enc[0].bias.copy_(torch.tensor([0.0, -1.0], dtype=torch.float64))
        vae.enc[2].weight.copy_(torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64))  # rows: mu, logvar
        vae.enc[2].bias.copy_(torch.tensor([0.1, -0.5], dtype=torch.float64))
        vae.dec[0].weight.copy_(torch.tensor([[1.0], [-2.0]], dtype=torch.float64))
        vae.dec[0].bias.copy_(torch.tensor([0.2, 0.3], dtype=torch.float64))
        vae.dec[2].weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 2.0]], dtype=torch.float64))
        vae.dec[2].bias.copy_(torch.tensor([0.0, 0.1], dtype=torch.float64))
        vae.noise.copy_(torch.tensor([[0.5], [-1.5]], dtype=torch.float64))
    return vae


@pytest.mark.parametrize("noise", ["shared", "per_example"])
def test_neg_elbo_matches_hand_computation(noise):
    """2 pixels, 2 hidden units, 1 latent, 2 noise samples: every number worked out by hand (with the
    shared buffer's draws, or with the example's own draws recomputed from the documented recipe)."""
    vae = _hand_vae(noise)
    x = [0.8, 0.25]
    draws = (0.5, -1.5) if noise == "shared" else tuple(_recipe_noise(np.array(x), 5, 2, 1)[:, 0])
    # encoder: h = relu([0.8 - 0.25, 0.4 + 0.5 - 1]) = [0.55, 0]
    h = [0.55, 0.0]
    mu = 0.3 * h[0] - 0.2 * h[1] + 0.1
    logvar = 0.1 * h[0] + 0.4 * h[1] - 0.5
    sigma = math.exp(0.5 * logvar)
    rec = 0.0
    for eps in draws:
        z = mu + sigma * eps
        hd = [max(0.0, z + 0.2), max(0.0, -2.0 * z + 0.3)]
        logits = [hd[0] + 0.5 * hd[1], -hd[0] + 2.0 * hd[1] + 0.1]
        for xi, li in zip(x, logits):
            p = _sigmoid(li)
            rec += -(xi * math.log(p) + (1 - xi) * math.log(1 - p)) / 2  # mean over the 2 samples
    kl = 0.5 * (mu ** 2 + math.exp(logvar) - 1 - logvar)
    got = vae(torch.tensor([x], dtype=torch.float64)).detach()
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(rec + kl, rel=1e-12)


def test_per_example_noise_is_own_draw_batch_independent_and_seeded():
    """Each example draws its own encoder noise: the documented recipe, the same whatever batch it is
    in, different for different examples and for another noise_seed; 'shared' repeats the buffer."""
    rng = np.random.default_rng(0)
    X = rng.random((5, 6)).astype(np.float32)
    vae = VAE(input_dim=6, hidden=4, latent=3, n_samples=7, noise_seed=11)
    eps = vae.example_noise(torch.as_tensor(X)).numpy()
    assert eps.shape == (5, 7, 3)
    for i in range(5):
        np.testing.assert_allclose(eps[i], _recipe_noise(X[i], 11, 7, 3), rtol=1e-6)
    np.testing.assert_array_equal(vae.example_noise(torch.as_tensor(X[3:4])).numpy()[0], eps[3])
    assert not np.allclose(eps[0], eps[1])
    other = vae_loss_model(vae, noise_seed=12).example_noise(torch.as_tensor(X)).numpy()
    assert not np.allclose(other, eps)
    # the loss sees exactly these draws: forward == neg_elbo with them
    with torch.no_grad():
        np.testing.assert_allclose(vae(torch.as_tensor(X)).numpy(),
                                   vae.neg_elbo(torch.as_tensor(X), torch.as_tensor(eps, dtype=torch.float32)).numpy(),
                                   rtol=1e-6)
    shared = vae_loss_model(vae, noise="shared")
    np.testing.assert_array_equal(shared.example_noise(torch.as_tensor(X)).numpy(),
                                  np.broadcast_to(vae.noise.numpy(), (5, 7, 3)))
    with pytest.raises(ValueError, match="noise must be"):
        VAE(input_dim=6, noise="fresh")


TRAIN = dict(epochs=2, lr=3e-3, batch_size=32, n_samples=4)


@pytest.fixture(scope="module")
def digits():
    from indexer.demo import load_digits_28

    X, _ = load_digits_28(240)
    return X


@pytest.fixture(scope="module")
def vae(digits, tmp_path_factory):
    ck = tmp_path_factory.mktemp("vae")
    paths = [str(ck / f"ep{i}.pt") for i in range(2)]
    model = train_vae(digits, seed=0, checkpoints=paths, **TRAIN)
    model.checkpoint_paths = paths
    return model


def test_training_is_deterministic_and_learns(digits, vae):
    again = train_vae(digits, seed=0, **TRAIN)
    for (n1, p1), (n2, p2) in zip(vae.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    other = train_vae(digits, seed=1, **TRAIN)
    assert not torch.equal(other.enc[0].weight, vae.enc[0].weight)
    x = torch.as_tensor(digits)
    untrained = VAE(784, n_samples=4)
    with torch.no_grad():
        assert vae(x).mean() < 0.8 * untrained(x).mean()
    assert vae.train_lr == 3e-3


def test_loss_is_deterministic_and_per_example(digits, vae):
    x = torch.as_tensor(digits[:16])
    model = vae_loss_model(vae)
    assert model is vae and not model.training
    with torch.no_grad():
        a, b = model(x), model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(a, b)
    np.testing.assert_allclose(a.numpy(), single.numpy(), rtol=1e-5)
    more = vae_loss_model(vae, n_samples=32, noise_seed=3)
    assert more.noise.shape == (32, 8) and vae.noise.shape == (4, 8)
    with torch.no_grad():
        m = more(x)
    assert torch.equal(m, more(x).detach()) and not torch.equal(m, a)
    with pytest.raises(TypeError):
        vae_loss_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="784 features"):
        model(torch.zeros(2, 10))


def _loop_grads(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    """Reference: one forward and backward per example, parameters flattened in model order."""
    rows = []
    params = [p for p in model.parameters()]
    for i in range(len(X)):
        loss = model(torch.as_tensor(X[i:i + 1]))[0]
        g = torch.autograd.grad(loss, params)
        rows.append(torch.cat([t.reshape(-1) for t in g]).numpy())
    return np.stack(rows)


def test_engine_per_example_gradients_match_autograd_loop(digits, vae):
    """make_engine(vae_loss_model(vae), None, task='unsupervised') gives each example's own gradient."""
    engine_mod = pytest.importorskip("indexer.engine")
    X = digits[:12]
    ref = _loop_grads(vae, X)
    eng = engine_mod.make_engine(vae_loss_model(vae), None, task="unsupervised", chunk_size=5)
    G = eng.grads(X)
    assert G.shape == ref.shape == (12, eng.dim)
    rel = np.linalg.norm(G - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-5, rel  # float32 rounding of differently ordered sums
    np.testing.assert_allclose(G, ref, rtol=1e-2, atol=1e-3 * np.abs(ref).max())
    # deterministic: the same query twice gives the same gradient bits; another batch, the same
    # gradient up to float32 rounding
    q = eng.grads(X[:3])
    np.testing.assert_array_equal(eng.grads(X[:3]), q)
    np.testing.assert_allclose(q, G[:3], rtol=1e-2, atol=1e-5 * np.abs(ref).max())


def test_checkpoints_hold_each_epoch(vae):
    states = [torch.load(p) for p in vae.checkpoint_paths]
    assert set(states[0]) == set(vae.state_dict())
    for k, v in vae.state_dict().items():  # the last checkpoint is the returned model
        assert torch.equal(states[-1][k], v)
    assert not torch.equal(states[0]["enc.0.weight"], states[1]["enc.0.weight"])


def test_bad_training_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_vae(np.full((4, 1, 28, 28), 2.0, dtype=np.float32), epochs=1)
    with pytest.raises(ValueError, match="NaN"):
        train_vae(np.full((4, 1, 28, 28), np.nan, dtype=np.float32), epochs=1)


def test_gaussian_loss_and_kl_weight_match_hand_computation():
    """The paper's TracIn loss: sum (sigmoid(logit) - x)^2 over pixels, averaged over the draws, plus
    beta * KL; the same 2-pixel VAE worked out by hand with beta = 4."""
    base = _hand_vae("shared")
    vae = VAE(input_dim=2, hidden=2, latent=1, n_samples=2, noise="shared", beta=4.0, likelihood="gaussian").double()
    vae.load_state_dict({**base.state_dict(), "kl_weight": torch.tensor(4.0, dtype=torch.float64)})
    x = [0.8, 0.25]
    h = [0.55, 0.0]
    mu = 0.3 * h[0] - 0.2 * h[1] + 0.1
    logvar = 0.1 * h[0] + 0.4 * h[1] - 0.5
    rec = 0.0
    for eps in (0.5, -1.5):
        z = mu + math.exp(0.5 * logvar) * eps
        hd = [max(0.0, z + 0.2), max(0.0, -2.0 * z + 0.3)]
        logits = [hd[0] + 0.5 * hd[1], -hd[0] + 2.0 * hd[1] + 0.1]
        rec += sum((_sigmoid(li) - xi) ** 2 for xi, li in zip(x, logits)) / 2
    kl = 0.5 * (mu ** 2 + math.exp(logvar) - 1 - logvar)
    got = float(vae(torch.tensor([x], dtype=torch.float64)).detach()[0])
    assert got == pytest.approx(rec + 4.0 * kl, rel=1e-12)
    # vae_loss_model switches the reconstruction term of a copy, the KL weight stays
    bern = vae_loss_model(vae, likelihood="bernoulli")
    assert bern.likelihood == "bernoulli" and vae.likelihood == "gaussian" and float(bern.kl_weight) == 4.0
    with pytest.raises(ValueError, match="likelihood"):
        vae_loss_model(vae, likelihood="poisson")


def test_paper_architecture_and_checkpoint_reload(tmp_path):
    """paper_hidden(d) gives Kong & Chaudhuri's BetaVAE_MNIST layout (784-8d-4d-2d, mirrored), Kaiming
    init with zero biases; load_vae rebuilds it (sizes, beta) from a checkpoint."""
    from indexer.influence import load_vae
    from indexer.vae import paper_hidden

    assert paper_hidden(128) == (1024, 512, 256)
    vae = VAE(784, hidden=paper_hidden(4), latent=4, beta=4.0, init="kaiming")
    enc = [tuple(m.weight.shape) for m in vae.enc if isinstance(m, torch.nn.Linear)]
    dec = [tuple(m.weight.shape) for m in vae.dec if isinstance(m, torch.nn.Linear)]
    assert enc == [(32, 784), (16, 32), (8, 16), (8, 8)]
    assert dec == [(8, 4), (16, 8), (32, 16), (784, 32)]
    assert all(float(m.bias.detach().abs().max()) == 0 for m in vae.enc if isinstance(m, torch.nn.Linear))
    assert float(vae.enc[0].weight.detach().std()) == pytest.approx(math.sqrt(2 / 784), rel=0.1)  # Kaiming normal, fan_in
    torch.save(vae.state_dict(), tmp_path / "ck.pt")
    back = load_vae(tmp_path / "ck.pt", likelihood="gaussian")
    assert back.hidden == (32, 16, 8) and back.latent == 4 and float(back.kl_weight) == 4.0
    assert back.likelihood == "gaussian"
    for (k1, v1), (k2, v2) in zip(vae.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # a checkpoint from before the KL weight was stored loads with beta = 1
    sd = vae.state_dict()
    del sd["kl_weight"]
    torch.save(sd, tmp_path / "old.pt")
    assert float(load_vae(tmp_path / "old.pt").kl_weight) == 1.0
    with pytest.raises(ValueError, match="likelihood"):
        VAE(784, likelihood="laplace")
    with pytest.raises(ValueError, match="beta"):
        VAE(784, beta=-1.0)
