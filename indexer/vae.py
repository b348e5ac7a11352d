"""A small VAE on the digits: the unsupervised model of the influence diagnostics (VAE-TracIn).

Kong & Chaudhuri 2021 explain a VAE's training data with TracIn on the loss
l(x) = -ELBO(x), estimated by averaging over several encoder samples. Here:

    -ELBO(x) ≈ (1/S) sum_s [ -log p(x | z_s) ] + KL(q(z|x) || N(0, I)),   z_s = mu(x) + sigma(x) * eps_s

with a Bernoulli decoder (binary cross-entropy with logits, summed over the 784 pixels; the digits
are grey levels in [0, 1], used as Bernoulli means as is customary for MNIST VAEs) and the KL term in
closed form. The S noise vectors eps_s are a fixed buffer drawn once from a seeded generator and
shared by all examples, so the loss of an example is a deterministic function of the example and the
weights: gradients of queries are reproducible, and per-example gradients do not depend on the batch.
Training itself draws fresh noise every step (a seeded generator), as a VAE is normally trained.

The model's ``forward`` returns the per-example loss (n,), so the gradient engine takes it as
``make_engine(vae_loss_model(vae), None, task="unsupervised")``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["VAE", "train_vae", "vae_loss_model"]


class VAE(nn.Module):
    """MLP VAE: encoder input -> hidden -> (mu, log sigma^2), decoder latent -> hidden -> pixel logits.

    ``forward(x)`` returns the per-example negative ELBO (n,) averaged over the ``n_samples`` fixed
    noise vectors in the ``noise`` buffer. Inputs: (n, 1, 28, 28) or anything that flattens to
    (n, input_dim), values in [0, 1].
    """

    def __init__(self, input_dim: int = 784, hidden: int = 128, latent: int = 8, n_samples: int = 8,
                 noise_seed: int = 0) -> None:
        super().__init__()
        if min(input_dim, hidden, latent, n_samples) < 1:
            raise ValueError(f"input_dim, hidden, latent and n_samples must be >= 1, got "
                             f"{input_dim}, {hidden}, {latent}, {n_samples}")
        self.input_dim, self.latent = int(input_dim), int(latent)
        self.enc = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, input_dim))
        g = torch.Generator().manual_seed(int(noise_seed))
        self.register_buffer("noise", torch.randn(int(n_samples), int(latent), generator=g))

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

    def neg_elbo(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-example negative ELBO (n,) with the reparameterization noise ``eps`` (S, latent)."""
        xf = self._flat(x)
        mu, logvar = self.encode(xf)
        z = mu[:, None, :] + torch.exp(0.5 * logvar)[:, None, :] * eps[None, :, :]  # (n, S, latent)
        logits = self.dec(z)  # (n, S, input_dim)
        rec = F.binary_cross_entropy_with_logits(logits, xf[:, None, :].expand_as(logits), reduction="none")
        rec = rec.sum(-1).mean(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return rec + kl

    def neg_elbo_sampled(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-example negative ELBO (n,) with one fresh noise draw per example (for training:
        unbiased for every example, unlike one draw shared by a whole batch)."""
        xf = self._flat(x)
        mu, logvar = self.encode(xf)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        rec = F.binary_cross_entropy_with_logits(self.dec(z), xf, reduction="none").sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return rec + kl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neg_elbo(x, self.noise)


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
              lr: float = 2e-3, batch_size: int = 64, hidden: int = 128, latent: int = 8,
              n_samples: int = 8, optimizer: str = "adam") -> VAE:
    """Train a VAE on X (n, 1, 28, 28) in [0, 1]; return it in eval mode.

    ``optimizer``: "adam" (default) or "sgd" (plain SGD, no momentum: the VAE-TracIn paper's
    recipe, Kong & Chaudhuri 2021, and the one TracIn's first-order analysis assumes; see
    docs/influence.md for why it matters to the self-proponent check). Every example of a batch
    draws its own reparameterization noise (one sample per example and step).

    Deterministic for a given seed (weights, batch order and training noise are seeded; the fixed
    noise buffer of the loss is seeded by ``seed`` too). ``checkpoints``: optional paths where the
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
    vae = VAE(int(np.prod(X.shape[1:])), hidden=hidden, latent=latent, n_samples=n_samples, noise_seed=seed)
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


def vae_loss_model(vae: VAE, n_samples: int | None = None, noise_seed: int | None = None) -> VAE:
    """The module whose output is the per-example loss (negative ELBO), for the gradient engine
    (``make_engine(vae_loss_model(vae), None, task="unsupervised")``).

    That is the VAE itself in eval mode (same parameter names as its checkpoints' state_dicts, so
    TracIn can load them). With ``n_samples`` / ``noise_seed``, a copy whose fixed noise buffer is
    redrawn (more samples: a lower-variance ELBO estimate, as Kong & Chaudhuri recommend).
    """
    if not isinstance(vae, VAE):
        raise TypeError(f"vae_loss_model needs an indexer.vae.VAE, got {type(vae).__name__}")
    if n_samples is None and noise_seed is None:
        return vae.eval()
    out = copy.deepcopy(vae)
    S = vae.n_samples if n_samples is None else int(n_samples)
    if S < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    gen = torch.Generator().manual_seed(0 if noise_seed is None else int(noise_seed))
    out.noise = torch.randn(S, vae.latent, generator=gen, dtype=vae.noise.dtype)
    return out.eval()
