"""Training-data influence: TracIn proponents and opponents, self-influence rankings as an outlier
and mislabel detector, for supervised and unsupervised (VAE) models, in memory or over a built index.

Two ways in, with the same definitions:

* **In memory** (:class:`TracIn`): the checkpoints' models, their learning rates, and the training
  data. Scores are exact (no projection): the TracIn influence of training example x on a query z is

      TracIn(x, z) = Σ_c lr_c · ∇ℓ(z; θ_c) · ∇ℓ(x; θ_c)

  (Pruthi et al. 2020, TracInCP; Kong & Chaudhuri 2021 for a VAE, ℓ = negative ELBO averaged over
  several encoder samples). Proponents are the training examples with the largest positive scores
  (they lowered the query's loss), opponents the most negative ones. Self-influence is
  TracIn(x, x) = Σ_c lr_c‖∇ℓ(x; θ_c)‖²: high for atypical, ambiguous and mislabeled examples.
  Training gradients are streamed chunk by chunk, so memory stays at one chunk of gradients per
  checkpoint plus the (m, n) score matrix.
* **Over a built index** (:func:`index_proponents`, :func:`index_self_influence_ranking`,
  :func:`index_self_proponent_rate`): a ``grad_dot`` index built with ``[[model.checkpoints]]``
  stores the concatenation of √lr_c·g_c, so one inner-product search returns TracIn proponents (and,
  with the negated query, opponents); the build stores each example's exact self-influence in the
  catalog, so ranking by it is one indexed SQL query. The CLI (``gradindex self-influence``,
  ``gradindex proponents``) and the server (``SelfInfluence``, ``FindSimilar``) use these.

Helpers for the sanity checks of the literature: :func:`mislabel_auc` (ROC AUC of a score for
finding known flipped labels), :func:`self_proponent_rate` (share of examples that are their own
strongest proponent: > 99 % in Kong & Chaudhuri 2021), :func:`identical_class_rate` (Hanawa et al.
2021: share of test examples whose top-scored training example has the test example's predicted
class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import InvalidArgument

__all__ = ["TracIn", "Influence", "ranking", "mislabel_auc", "precision_at_k", "self_proponent_rate",
           "identical_class_rate", "load_vae", "vae_tracin", "tracin_scores", "index_proponents",
           "index_self_influence_ranking", "index_self_proponent_rate"]


@dataclass
class Influence:
    """Top-k proponents and opponents of m queries.

    ``proponent_ids`` / ``proponent_scores`` (m, k): largest TracIn scores first;
    ``opponent_ids`` / ``opponent_scores`` (m, k): most negative first. Ids are row numbers in the
    training set given to :class:`TracIn` (or catalog row ids for an index)."""

    proponent_ids: np.ndarray
    proponent_scores: np.ndarray
    opponent_ids: np.ndarray
    opponent_scores: np.ndarray


def _check_k(k: Any, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(min(k, n))


def _top_k(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise top-k largest and top-k smallest of S (ties: lower id first)."""
    n = S.shape[1]
    k = min(k, n)
    ids = np.arange(n)
    # stable sorts on (-score, id) and (score, id)
    hi = np.lexsort((np.broadcast_to(ids, S.shape), -S), axis=1)[:, :k]
    lo = np.lexsort((np.broadcast_to(ids, S.shape), S), axis=1)[:, :k]
    return hi, np.take_along_axis(S, hi, 1), lo, np.take_along_axis(S, lo, 1)


class TracIn:
    """TracIn over checkpoints, exact and in memory.

    ``models``: one model per checkpoint (PyTorch modules or Keras models, loaded with that
    checkpoint's weights); ``lrs``: the learning rate in force at each checkpoint (one float for
    all). ``loss_fn``/``task``/``params`` as :func:`indexer.engine.make_engine` takes them
    (``task="unsupervised", loss_fn=None`` when the model outputs its per-example loss, e.g.
    :func:`indexer.vae.vae_loss_model`). For classification queries without labels, the target is
    the *last* checkpoint's predicted class (the model being explained), used at every checkpoint.

    ``query_models`` (optional, one per checkpoint, same parameters): the models whose gradients
    stand for the *queries* — the same weights with another estimator of a stochastic loss, e.g. a
    VAE whose encoder noise is drawn independently of the training gradients'. Default: ``models``.
    """

    def __init__(self, models: Sequence[Any], lrs: Sequence[float] | float, loss_fn: Any = None,
                 task: str = "classification", params: Sequence[str] | str | None = None,
                 chunk_size: int = 256, query_models: Sequence[Any] | None = None) -> None:
        from indexer.engine import make_engine

        models = list(models)
        if not models:
            raise ValueError("TracIn needs at least one checkpoint model")
        if isinstance(lrs, (int, float, np.floating)):
            lrs = [float(lrs)] * len(models)
        lrs = [float(v) for v in lrs]
        if len(lrs) != len(models):
            raise ValueError(f"{len(models)} checkpoints but {len(lrs)} learning rates: give one per checkpoint")
        if any(not np.isfinite(v) or v <= 0 for v in lrs):
            raise ValueError(f"learning rates must be finite and > 0, got {lrs}")
        self.lrs = lrs
        self.task = task
        self.engines = [make_engine(m, loss_fn, task=task, params=params, chunk_size=chunk_size) for m in models]
        dims = {e.dim for e in self.engines}
        if len(dims) != 1:
            raise ValueError(f"the checkpoints select different parameter counts {sorted(dims)}: same model, please")
        self.chunk_size = int(chunk_size)
        self.query_engines = self.engines
        if query_models is not None:
            query_models = list(query_models)
            if len(query_models) != len(models):
                raise ValueError(f"{len(models)} checkpoints but {len(query_models)} query models: one per checkpoint")
            self.query_engines = [make_engine(m, loss_fn, task=task, params=params, chunk_size=chunk_size)
                                  for m in query_models]
            if {e.dim for e in self.query_engines} != dims:
                raise ValueError("the query models select other parameters than the checkpoints: same model, please")

    @classmethod
    def from_checkpoints(cls, make_model: Callable[[], Any], paths: Sequence[str | Path], lrs: Sequence[float] | float,
                         **kwargs: Any) -> "TracIn":
        """PyTorch: build ``make_model()`` once per checkpoint file and load its state_dict."""
        import torch

        models = []
        for p in paths:
            m = make_model()
            m.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
            models.append(m.eval())
        return cls(models, lrs, **kwargs)

    # ---- targets -----------------------------------------------------------------------------
    def targets(self, X: Any, Y: Any = None) -> np.ndarray | None:
        """Y as given; for classification without Y, the last checkpoint's predicted class."""
        X = np.asarray(X)
        if Y is not None or self.task == "unsupervised":
            return None if Y is None else np.asarray(Y)
        return self.engines[-1].resolve_targets(X, None)

    # ---- scores ------------------------------------------------------------------------------
    def _query_grads(self, Xq: np.ndarray, Yq: np.ndarray | None) -> list[np.ndarray]:
        return [e.grads(Xq, Yq).astype(np.float64) for e in self.query_engines]

    def scores(self, Xq: Any, X: Any, Yq: Any = None, Y: Any = None) -> np.ndarray:
        """TracIn scores (m, n) of queries Xq against training examples X: Σ_c lr_c g_c(q)·g_c(x)."""
        Xq, X = np.asarray(Xq), np.asarray(X)
        if len(Xq) == 0 or len(X) == 0:
            raise ValueError("Xq and X must each hold at least one example")
        Yq, Y = self.targets(Xq, Yq), self.targets(X, Y)
        Gq = self._query_grads(Xq, Yq)
        S = np.zeros((len(Xq), len(X)))
        for e, lr, G in zip(self.engines, self.lrs, Gq):
            for s, Gt in e.iter_grads(X, Y, reuse_buffer=True):
                S[:, s:s + len(Gt)] += lr * (G @ Gt.T.astype(np.float64))
        return S

    def gram(self, X: Any, Y: Any = None) -> np.ndarray:
        """TracIn scores (n, n) of the training set against itself: row i = example i as the query
        (diagonal: self-influence)."""
        X = np.asarray(X)
        Y = self.targets(X, Y)
        n = len(X)
        S = np.zeros((n, n))
        for e, q, lr in zip(self.engines, self.query_engines, self.lrs):
            G = e.grads(X, Y).astype(np.float64)
            Gq = G if q is e else q.grads(X, Y).astype(np.float64)
            S += lr * (Gq @ G.T)
        return S

    def self_influence(self, X: Any, Y: Any = None) -> np.ndarray:
        """Σ_c lr_c‖g_c(x)‖² per example (n,); with separate query models Σ_c lr_c g_c^query(x)·g_c(x)
        (the diagonal of :meth:`gram`)."""
        X = np.asarray(X)
        Y = self.targets(X, Y)
        out = np.zeros(len(X))
        for e, q, lr in zip(self.engines, self.query_engines, self.lrs):
            for s, G in e.iter_grads(X, Y, reuse_buffer=True):
                Gq = G if q is e else q.grads(X[s:s + len(G)], None if Y is None else Y[s:s + len(G)])
                out[s:s + len(G)] += lr * np.einsum("ij,ij->i", Gq, G, dtype=np.float64)
        return out

    def influence(self, Xq: Any, X: Any, Yq: Any = None, Y: Any = None, k: int = 5) -> Influence:
        """Top-k proponents and opponents of each query among the training examples X."""
        k = _check_k(k, len(np.asarray(X)))
        hi, hs, lo, ls = _top_k(self.scores(Xq, X, Yq, Y), k)
        return Influence(hi, hs, lo, ls)

    def proponents(self, Xq: Any, X: Any, Yq: Any = None, Y: Any = None, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) (m, k) of the strongest proponents, largest score first."""
        r = self.influence(Xq, X, Yq, Y, k)
        return r.proponent_ids, r.proponent_scores

    def opponents(self, Xq: Any, X: Any, Yq: Any = None, Y: Any = None, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) (m, k) of the strongest opponents, most negative score first."""
        r = self.influence(Xq, X, Yq, Y, k)
        return r.opponent_ids, r.opponent_scores

    def self_influence_ranking(self, X: Any, Y: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores): training examples by decreasing self-influence (likely outliers first)."""
        return ranking(self.self_influence(X, Y))


# ---- rankings and sanity checks ------------------------------------------------------------------
def ranking(scores: Any, descending: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) sorted by score (largest first unless ``descending=False``; ties by id)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    order = np.lexsort((np.arange(len(s)), -s if descending else s))
    return order, s[order]


def _flag_mask(flagged: Any, n: int) -> np.ndarray:
    f = np.asarray(flagged)
    if f.dtype == bool:
        if f.shape != (n,):
            raise ValueError(f"a boolean mask of flipped labels must have shape ({n},), got {f.shape}")
        return f
    ids = f.astype(np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"flipped ids must be in 0..{n - 1}")
    m = np.zeros(n, dtype=bool)
    m[ids] = True
    return m


def mislabel_auc(scores: Any, flipped: Any) -> float:
    """ROC AUC of ``scores`` (higher = more suspicious) for finding the examples in ``flipped``
    (a boolean mask or a list of ids): 1 = every flipped example outranks every clean one, 0.5 =
    chance. Ties count one half (the Mann-Whitney statistic)."""
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    m = _flag_mask(flipped, len(s))
    if m.all() or not m.any():
        raise ValueError("the AUC needs both flipped and clean examples")
    return float(roc_auc_score(m, s))


def precision_at_k(scores: Any, flipped: Any, k: int | None = None) -> float:
    """Share of flipped examples among the k highest scores (k defaults to the number flipped)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    m = _flag_mask(flipped, len(s))
    k = int(m.sum()) if k is None else _check_k(k, len(s))
    order, _ = ranking(s)
    return float(m[order[:k]].mean())


def self_proponent_rate(S: Any) -> float:
    """Share of rows i of a square TracIn matrix S (n, n) whose largest entry is S[i, i] (strictly:
    a tie with another example counts as a miss)."""
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be square (n, n), got {S.shape}")
    off = S.copy()
    np.fill_diagonal(off, -np.inf)
    return _own_share(np.diag(S) > off.max(axis=1))


def _own_share(is_own_top: np.ndarray) -> float:
    """The self-proponent share from a per-example "was it its own top-1" mask (both entry points)."""
    if is_own_top.size == 0:
        raise ValueError("the self-proponent share needs at least one example")
    return float(np.mean(is_own_top))


def identical_class_rate(S: Any, train_labels: Any, query_classes: Any) -> float:
    """Hanawa et al. (2021) identical-class test: share of queries whose top-scored training example
    has the query's class, where the query's class is the *model's predicted* class (the test
    checks the explanation of the model's decision, not the ground truth)."""
    S = np.asarray(S, dtype=np.float64)
    yt, yq = np.asarray(train_labels).reshape(-1), np.asarray(query_classes).reshape(-1)
    if S.shape != (len(yq), len(yt)):
        raise ValueError(f"S must be (queries, train) = ({len(yq)}, {len(yt)}), got {S.shape}")
    return float(np.mean(yt[np.argmax(S, axis=1)] == yq))


# ---- the unsupervised model ---------------------------------------------------------------------
def load_vae(path: str | Path, n_samples: int | None = None, noise_seed: int | None = None,
             noise: str = "per_example", likelihood: str = "bernoulli"):
    """An :class:`indexer.vae.VAE` rebuilt from a checkpoint's state_dict (layer sizes read from its
    shapes, the KL weight from its ``kl_weight`` buffer, 1 when the checkpoint predates it), as the
    per-example-loss module (``vae_loss_model``) with ``n_samples`` encoder samples (default: the
    checkpoint's), noise mode ``noise``, seed ``noise_seed`` (default 0) and reconstruction term
    ``likelihood``."""
    import torch

    from indexer.vae import VAE, vae_loss_model

    sd = torch.load(path, map_location="cpu", weights_only=True)
    enc = sorted((int(k.split(".")[1]), v) for k, v in sd.items() if k.startswith("enc.") and k.endswith(".weight"))
    if not enc or "noise" not in sd:
        raise ValueError(f"{path} is not an indexer.vae.VAE checkpoint (no encoder weights or noise buffer)")
    input_dim = enc[0][1].shape[1]
    hidden = [int(w.shape[0]) for _, w in enc[:-1]]
    latent = enc[-1][1].shape[0] // 2
    sd = dict(sd)
    sd.setdefault("kl_weight", torch.tensor(1.0))
    vae = VAE(int(input_dim), hidden=hidden, latent=int(latent), n_samples=int(sd["noise"].shape[0]),
              noise_seed=0 if noise_seed is None else int(noise_seed), noise=noise,
              beta=float(sd["kl_weight"]), likelihood=likelihood)
    vae.load_state_dict(sd)  # the shared-noise buffer too: kept unless n_samples / noise_seed redraw it
    return vae_loss_model(vae, n_samples=n_samples, noise_seed=noise_seed)


def vae_tracin(paths: Sequence[str | Path], lrs: Sequence[float] | float, n_samples: int | None = None,
               noise_seed: int | None = None, chunk_size: int = 256, noise: str = "per_example",
               query_noise_seed: int | None = None, likelihood: str = "bernoulli") -> TracIn:
    """VAE-TracIn (Kong & Chaudhuri 2021) over VAE checkpoint files: the loss is the negative ELBO
    averaged over ``n_samples`` encoder samples (default: the checkpoint's count).

    ``noise="per_example"`` (default) gives every example its own draws (see :mod:`indexer.vae`);
    with ``query_noise_seed`` set (and different from ``noise_seed``), query gradients use draws
    independent of the training gradients' even for the same example — fresh noise for every
    gradient, as in the paper, so a self-influence TracIn(x, x) is not inflated by the noise's own
    square. ``noise="shared"``: one set of draws for every example (for comparison).
    ``likelihood="gaussian"``: the reconstruction term Kong & Chaudhuri's code differentiates (squared
    error of the decoded means, see :class:`indexer.vae.VAE`); the KL weight is the checkpoint's."""
    models = [load_vae(p, n_samples=n_samples, noise_seed=noise_seed, noise=noise, likelihood=likelihood)
              for p in paths]
    qmodels = None
    if query_noise_seed is not None and query_noise_seed != noise_seed:
        qmodels = [load_vae(p, n_samples=n_samples, noise_seed=query_noise_seed, noise=noise, likelihood=likelihood)
                   for p in paths]
    return TracIn(models, lrs, loss_fn=None, task="unsupervised", chunk_size=chunk_size, query_models=qmodels)


# ---- over a built index (CLI and server) ---------------------------------------------------------
def tracin_scores(idx: Any, X: Any, Y: Any = None, k: int = 10, mode: str = "most") -> Any:
    """Top-k TracIn proponents (mode 'most'), opponents ('least') or both ('both') of query examples
    in a built index, as the index's search result.

    Refuses an index whose kernel is not ``grad_dot``: TracIn is a plain sum of checkpoint dot
    products, and any other kernel (cosine, asymmetric) would rank by something else."""
    if idx.kernel != "grad_dot":
        raise InvalidArgument(f"TracIn scores need an index with kernel 'grad_dot', {idx.name!r} uses {idx.kernel!r}.")
    return idx.find_similar(X, Y, k=k, mode=mode)


def index_proponents(idx: Any, X: Any, Y: Any = None, k: int = 5) -> Influence:
    """TracIn proponents and opponents of queries X in a built ``grad_dot`` index (with its
    checkpoints): one search with the query vector and one with its negation."""
    res = tracin_scores(idx, X, Y, k=k, mode="both")
    return Influence(res.ids, res.scores, res.least_ids, res.least_scores)


def index_self_influence_ranking(idx: Any, k: int | None = None, lowest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, self-influences) from an index's catalog: the highest first, or the lowest first with
    ``lowest=True`` (typical examples); all examples unless ``k``. Ties by id, as :func:`ranking`."""
    k = int(idx.count) if k is None else _check_k(k, int(idx.count))
    rows = idx.self_influence_top(k, payload=False, lowest=lowest)
    return (np.asarray([r["id"] for r in rows], dtype=np.int64),
            np.asarray([r["self_influence"] for r in rows], dtype=np.float64))


def index_self_proponent_rate(idx: Any, sample: int | None = None, seed: int = 0) -> float:
    """:func:`self_proponent_rate` over a built index: the share of stored examples whose top-1
    search hit is the example itself (``sample``: a seeded random subset of that many examples).

    The stored vectors serve as the queries: for every kernel the stored vector is a positive
    multiple of the example's query vector, so the ranking is the one a query with the example
    itself gives (ties are broken by the index, not counted as misses as in the matrix version)."""
    V, ids = idx.vectors()
    rows = np.arange(len(V))
    if sample is not None and sample < len(V):
        rows = np.sort(np.random.default_rng(seed).choice(len(V), size=sample, replace=False))
    _, top = idx.store.search(np.ascontiguousarray(V[rows]), 1)
    return _own_share(top[:, 0] == ids[rows])
