"""A small VAE on the digits: the unsupervised model of the influence diagnostics (VAE-TracIn).

Kong & Chaudhuri 2021 explain a VAE's training data with TracIn on the loss
l(x) = -ELBO(x), estimated by averaging over several encoder samples. Here:

    -ELBO(x) ≈ (1/S) sum_s [ -log p(x | z_s) ] + KL(q(z|x) || N(0, I)),   z_s = mu(x) + sigma(x) * eps_s

with a Bernoulli decoder (binary cross-entropy with logits, summed over the 784 pixels; the digits
are grey levels in [0, 1], used as Bernoulli means as is customary for MNIST VAEs) and the KL term in
closed form.

Where the S noise vectors eps_s come from (``noise=``):

* ``"per_example"`` (default): every example draws its own S vectors, from a generator seeded by
  ``noise_seed`` and a hash of the example's bytes. Draws of different examples are independent, as
  fresh noise per gradient is; yet the loss of an example is a deterministic function of the
  example, the weights and ``noise_seed`` — the same bits whatever batch or chunk it is computed in,
  so builds resume and queries reproduce. Two models with different ``noise_seed`` give the same
  example independent draws (TracIn's query and training gradients, see
  :func:`indexer.influence.vae_tracin`).
* ``"shared"``: one buffer of S vectors drawn once and used by every example. Cheaper to reason
  about, but every gradient then carries the error of the same S draws: a common direction shared
  by all per-example gradients, which TracIn's dot products pick up (measured in
  benchmarks/bench_influence.py; kept for that comparison).

Training itself draws fresh noise for every example at every step (a seeded generator), as a VAE is
normally trained. The model's ``forward`` returns the per-example loss (n,), so the gradient engine
takes it as ``make_engine(vae_loss_model(vae), None, task="unsupervised")``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["VAE", "train_vae", "vae_loss_model", "paper_hidden", "NOISE_MODES", "LIKELIHOODS"]

NOISE_MODES = ("per_example", "shared")
LIKELIHOODS = ("bernoulli", "gaussian")


def _mlp(dims: Sequence[int]) -> list[nn.Module]:
    """Linear layers between consecutive sizes, ReLU between them (none after the last)."""
    out: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            out.append(nn.ReLU())
        out.append(nn.Linear(a, b))
    return out


def paper_hidden(latent: int) -> tuple[int, int, int]:
    """Hidden sizes of Kong & Chaudhuri's MNIST VAE (BetaVAE_MNIST, 3 layers) for ``latent`` latents:
    784 -> 8d -> 4d -> 2d -> (mu, log sigma^2) and back; d = 128 in the paper (784-1024-512-256)."""
    return (8 * int(latent), 4 * int(latent), 2 * int(latent))


class VAE(nn.Module):
    """MLP VAE: encoder input -> hidden... -> (mu, log sigma^2), decoder latent -> hidden (reversed)
    -> pixel logits. ``hidden``: one size (the small default 784-128-8) or several
    (:func:`paper_hidden` gives the paper's MNIST VAE, with ``init="kaiming"`` as it initialises).

    ``forward(x)`` returns the per-example loss (n,) averaged over ``n_samples`` encoder samples: each
    example's own draws (``noise="per_example"``) or the ``noise`` buffer shared by all
    (``noise="shared"``); see the module docstring. The loss is reconstruction + ``beta`` * KL
    (beta = 1: the negative ELBO; the paper's MNIST VAE uses beta = 4), the reconstruction either the
    Bernoulli negative log-likelihood (``likelihood="bernoulli"``) or the squared error of the
    decoded means sum (sigmoid(logits) - x)^2 (``"gaussian"``: what Kong & Chaudhuri's code
    differentiates for TracIn, calc_loss in tracin.py, although it trains with the Bernoulli one).
    Inputs: (n, 1, 28, 28) or anything that flattens to (n, input_dim), values in [0, 1].
    """

    def __init__(self, input_dim: int = 784, hidden: int | Sequence[int] = 128, latent: int = 8, n_samples: int = 8,
                 noise_seed: int = 0, noise: str = "per_example", beta: float = 1.0,
                 likelihood: str = "bernoulli", init: str = "default") -> None:
        super().__init__()
        hs = [int(hidden)] if isinstance(hidden, (int, np.integer)) else [int(h) for h in hidden]
        if not hs or min([input_dim, latent, n_samples, *hs]) < 1:
            raise ValueError(f"input_dim, hidden, latent and n_samples must be >= 1, got "
                             f"{input_dim}, {hidden}, {latent}, {n_samples}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if init not in ("default", "kaiming"):
            raise ValueError(f"init must be 'default' or 'kaiming', got {init!r}")
        if not (np.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        self.input_dim, self.latent, self.hidden = int(input_dim), int(latent), tuple(hs)
        self.noise_mode, self.noise_seed, self.likelihood = noise, int(noise_seed), likelihood
        self.enc = nn.Sequential(*_mlp([self.input_dim, *hs, 2 * self.latent]))
        self.dec = nn.Sequential(*_mlp([self.latent, *hs[::-1], self.input_dim]))
        if init == "kaiming":  # as Kong & Chaudhuri's BetaVAE_MNIST: Kaiming-normal weights, zero biases
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight)
                    nn.init.zeros_(m.bias)
        g = torch.Generator().manual_seed(int(noise_seed))
        self.register_buffer("noise", torch.randn(int(n_samples), int(latent), generator=g))
        # the KL weight is part of the loss TracIn differentiates: stored with the checkpoints
        self.register_buffer("kl_weight", torch.tensor(float(beta)))

    @property
    def n_samples(self) -> int:
        return int(self.noise.shape[0])

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.input_dim:
            raise ValueError(f"the VAE expects {self.input_dim} features per example, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x), each (n, latent)."""
        mu, logvar = self.enc(self._flat(x)).chunk(2, dim=-1)
        return mu, logvar

    def example_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder noise the loss uses for each example of x: (n, S, latent).

        ``per_example``: drawn from ``numpy.random.default_rng([noise_seed, h0, h1])`` with (h0, h1)
        a 128-bit BLAKE2b hash of the example's float32 bytes; ``shared``: the buffer, repeated."""
        xf = self._flat(x)
        n, S = xf.shape[0], self.n_samples
        if self.noise_mode == "shared":
            return self.noise[None].expand(n, S, self.latent)
        rows = np.ascontiguousarray(xf.detach().cpu().numpy().astype(np.float32))
        eps = np.empty((n, S, self.latent))
        for i in range(n):
            h = hashlib.blake2b(rows[i].tobytes(), digest_size=16).digest()
            key = [self.noise_seed, int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")]
            eps[i] = np.random.default_rng(key).standard_normal((S, self.latent))
        return torch.as_tensor(eps, dtype=self.noise.dtype, device=self.noise.device)

    def neg_elbo(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-example negative ELBO (n,) with the reparameterization noise ``eps``: (S, latent)
        shared by all examples, or (n, S, latent), one set per example."""
        xf = self._flat(x)
        mu, logvar = self.encode(xf)
        if eps.dim() == 2:
            eps = eps[None]
        z = mu[:, None, :] + torch.exp(0.5 * logvar)[:, None, :] * eps  # (n, S, latent)
        logits = self.dec(z)  # (n, S, input_dim)
        target = xf[:, None, :].expand_as(logits)
        if self.likelihood == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:  # "gaussian": the squared error of the decoded means, as the paper's TracIn loss
            rec = (torch.sigmoid(logits) - target).pow(2)
        rec = rec.sum(-1).mean(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return rec + self.kl_weight * kl

    def neg_elbo_sampled(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example training objective (n,): Bernoulli reconstruction + beta * KL with one fresh
        noise draw per example (unbiased for every example, unlike one draw shared by a whole batch).
        Always the Bernoulli likelihood, whatever ``likelihood`` the TracIn loss uses: the paper's
        MNIST VAE is trained so."""
        xf = self._flat(x)
        mu, logvar = self.encode(xf)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        rec = F.binary_cross_entropy_with_logits(self.dec(z), xf, reduction="none").sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return rec + self.kl_weight * kl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neg_elbo(x, self.example_noise(x))


def _check_X(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim < 2 or len(X) == 0:
        raise ValueError(f"X must be a non-empty batch of examples (n, ...), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    if X.min() < 0 or X.max() > 1:
        raise ValueError(f"the Bernoulli VAE needs pixel values in [0, 1], got [{X.min():.3g}, {X.max():.3g}]")
    return X


def train_vae(X: np.ndarray, epochs: int = 10, seed: int = 0, checkpoints: list[str] | None = None,
              lr: float = 2e-3, batch_size: int = 64, hidden: int | Sequence[int] = 128, latent: int = 8,
              n_samples: int = 8, optimizer: str = "adam", noise: str = "per_example", beta: float = 1.0,
              init: str = "default", likelihood: str = "bernoulli") -> VAE:
    """Train a VAE on X (n, 1, 28, 28) in [0, 1]; return it in eval mode.

    ``optimizer``: "adam" (default) or "sgd" (plain SGD, no momentum: the VAE-TracIn paper's
    recipe, Kong & Chaudhuri 2021, and the one TracIn's first-order analysis assumes; see
    docs/influence.md for why it matters to the self-proponent check). Every example of a batch
    draws its own reparameterization noise (one sample per example and step).

    ``hidden``, ``latent``, ``beta``, ``init``, ``likelihood``: see :class:`VAE` (training always
    uses the Bernoulli reconstruction + beta * KL; ``likelihood`` only sets the loss the returned
    model and its checkpoints' TracIn differentiate). The paper's MNIST recipe:
    ``hidden=paper_hidden(latent), beta=4, init="kaiming", optimizer="sgd"``.

    Deterministic for a given seed (weights, batch order and training noise are seeded; the noise
    of the loss is seeded by ``seed`` too, ``noise`` picks its mode: see :class:`VAE`).
    ``checkpoints``: optional paths where the
    state_dict is saved at evenly spaced epochs, the last after the final epoch (one per epoch when
    there are ``epochs`` of them), for TracIn; the learning rate is ``lr`` at every checkpoint,
    recorded as ``vae.train_lr``.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    X = _check_X(X)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    checkpoints = list(checkpoints or [])
    if len(checkpoints) > epochs:
        raise ValueError(f"{len(checkpoints)} checkpoints need at least as many epochs, got epochs={epochs}")
    C = len(checkpoints)
    # evenly spaced, the last one after the final epoch (every epoch when C == epochs)
    save_at = {round((k + 1) * epochs / C): p for k, p in enumerate(checkpoints)} if C else {}
    torch.manual_seed(seed)
    vae = VAE(int(np.prod(X.shape[1:])), hidden=hidden, latent=latent, n_samples=n_samples, noise_seed=seed,
              noise=noise, beta=beta, likelihood=likelihood, init=init)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(vae.parameters(), lr=lr)
    Xt = torch.as_tensor(X.reshape(len(X), -1))
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(Xt), generator=g)
        for i in range(0, len(Xt), batch_size):
            xb = Xt[perm[i:i + batch_size]]
            opt.zero_grad()
            vae.neg_elbo_sampled(xb, g).mean().backward()
            opt.step()
        if epoch + 1 in save_at:
            path = save_at[epoch + 1]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(vae.state_dict(), path)
    vae.eval()
    vae.train_lr = lr
    return vae


def vae_loss_model(vae: VAE, n_samples: int | None = None, noise_seed: int | None = None,
                   noise: str | None = None, likelihood: str | None = None) -> VAE:
    """The module whose output is the per-example loss (negative ELBO), for the gradient engine
    (``make_engine(vae_loss_model(vae), None, task="unsupervised")``).

    That is the VAE itself in eval mode (same parameter names as its checkpoints' state_dicts, so
    TracIn can load them). With ``n_samples`` / ``noise_seed`` / ``noise``, a copy with that many
    encoder samples (more: a lower-variance ELBO estimate, as Kong & Chaudhuri recommend), that
    seed (another seed: independent draws for the same examples), that noise mode and that
    reconstruction term (``likelihood``, see :class:`VAE`).
    """
    if not isinstance(vae, VAE):
        raise TypeError(f"vae_loss_model needs an indexer.vae.VAE, got {type(vae).__name__}")
    if n_samples is None and noise_seed is None and noise is None and likelihood is None:
        return vae.eval()
    out = copy.deepcopy(vae)
    if likelihood is not None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        out.likelihood = likelihood
    S = vae.n_samples if n_samples is None else int(n_samples)
    if S < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if noise is not None:
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        out.noise_mode = noise
    if noise_seed is not None:
        out.noise_seed = int(noise_seed)
    if n_samples is not None or noise_seed is not None:
        gen = torch.Generator().manual_seed(0 if noise_seed is None else int(noise_seed))
        out.noise = torch.randn(S, vae.latent, generator=gen, dtype=vae.noise.dtype)
    return out.eval()
