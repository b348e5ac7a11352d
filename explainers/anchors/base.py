"""KL-LUCB beam search for anchors (Ribeiro et al. 2018), shared by the tabular, text and image explainers.

The search is a port of the algorithm in alibi 0.9.6 (``AnchorBaseBeam``), with the same knobs and
defaults, and with three deliberate differences:

* **No global state.** Every ``explain`` call owns its search state and a local
  ``np.random.Generator``; nothing calls ``np.random.seed``. Explanations running in parallel
  threads are therefore independent, and the same seed gives the same anchor.
* **Batched predictor calls.** Wherever the algorithm samples several candidate anchors at once
  (the first samples of every candidate, the two critical arms of each KL-LUCB round, the arms
  that still need samples to certify precision), the perturbed samples of all of them go to the
  predictor in ONE call. The statistics are identical to sampling them one by one; the predictor's
  per-call overhead (a scikit-learn forest spends milliseconds per call) is paid once.
* **All blocking arms per KL-LUCB round** (``lucb_arms=None``): each round samples the
  two critical arms *and* every other arm whose upper bound still exceeds the best arm's lower bound
  by more than ``tau`` (which must all be sampled before the stopping rule can fire anyway). Bounds,
  stopping rule and certification are unchanged; on a 90-predicate tabular problem the rounds (and
  predictor calls) drop ~25x for about the same number of samples. ``lucb_arms=2`` restores the
  paper's and alibi's sampling rule exactly. The default ``'auto'`` takes the sampler's
  ``lucb_arms_auto``: all blocking arms for tabular (a scikit-learn forest costs per *call*: ~5 ms
  per call and microseconds per row), 2 for images and text (a CNN costs per *row*: ~0.4 ms per
  28x28 image vs ~0.5 ms per call; the benchmark's text pipeline ~4-5 us per sentence vs ~0.3 ms
  per call, and sampling every blocking arm labelled 2.5x more sentences: extra arms cost more than
  the rounds they save; measured in ``benchmarks/bench_anchors.py``). It is a fixed rule per modality, not a
  timing measurement, so the same seed still gives the same anchor.
* **Shared draws** (samplers that perturb features independently and say so, ``shared_draws``:
  images). A draw conditioned on anchor Q whose kept features include anchor A is a draw from A's
  distribution for any A containing Q, so every labelled draw is counted for every tracked
  candidate it is a valid sample of, and the critical arms of a KL-LUCB round are drawn from their
  common parent (:meth:`AnchorSearch._draw_shared`). Each arm's samples stay i.i.d. from its own
  distribution; the other candidates gain samples for free.
* **Ties are broken by coverage.** When two arms have exactly the same empirical precision, the one
  with the larger coverage ranks higher, which is what the paper's objective (maximise coverage under
  the precision constraint) asks for; alibi breaks such ties by candidate order.

A *sampler* supplies the data modality: :class:`Sampler` below is the protocol. The predictor
wrapper lives in :mod:`.predictor`, the KL bounds in :mod:`.bounds` (both re-exported here).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

import numpy as np

from explainers.explanation import Explanation  # noqa: F401  (re-exported: one class for every explainer)

# re-exported: the explainers and tests import these from here
from .bounds import compute_beta, dlow_bernoulli, dup_bernoulli, kl_bernoulli, kl_bounds  # noqa: F401
from .predictor import PREDICTOR_TYPES, Predictor, infer_predictor_type, resolve_predictor  # noqa: F401

logger = logging.getLogger(__name__)

#: The search knobs and their alibi 0.9.6 defaults (``stop_on_first`` is True for text).
SEARCH_DEFAULTS: dict[str, Any] = dict(
    threshold=0.95,
    delta=0.1,
    tau=0.15,
    batch_size=100,
    coverage_samples=10000,
    beam_size=1,
    stop_on_first=False,
    max_anchor_size=None,
    min_samples_start=100,
    n_covered_ex=10,
    binary_cache_size=10000,
    cache_margin=1000,
    lucb_arms="auto",
)


# --------------------------------------------------------------------------------------------------
# Sampler protocol
# --------------------------------------------------------------------------------------------------
class Sampler(Protocol):
    """What the search needs from a data modality.

    Features are indexed ``0..n_features-1`` (tabular predicates, words, superpixels).
    """

    n_features: int

    def perturb(self, anchor: tuple[int, ...], n: int, rng: np.random.Generator) -> tuple[Any, np.ndarray]:
        """Draw ``n`` perturbed inputs on which ``anchor`` holds.

        Returns ``(raw, data)``: ``raw`` the inputs in the predictor's format (an array whose first
        axis is the sample), ``data`` a bool array ``(n, n_features)``: feature j holds in sample i.
        """

    def coverage_data(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Bool ``(n, n_features)`` for ``n`` draws from the unconditioned perturbation distribution."""

    def labels(self, raw: Any) -> np.ndarray:
        """Bool: the predictor's label on each row of ``raw`` equals the instance's label."""

    def concat(self, raws: Sequence[Any]) -> Any:
        """Concatenate several ``raw`` batches along the sample axis (one predictor call)."""

    def examples(self, raw: Any) -> Any:
        """Turn up to ``n_covered_ex`` raw samples into the form stored in the explanation."""


# --------------------------------------------------------------------------------------------------
# KL bounds
# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------
def _rank(means: np.ndarray, coverages: np.ndarray) -> np.ndarray:
    """Indices sorted ascending by precision, ties broken by coverage (then by index, stably)."""
    return np.lexsort((coverages, means))


class AnchorSearch:
    """State and procedure of one anchor search. Create one per ``explain`` call (not thread-shared)."""

    def __init__(self, sampler: Sampler, rng: np.random.Generator, batch_size: int = 100,
                 n_covered_ex: int = 10, binary_cache_size: int = 10000, cache_margin: int = 1000,
                 lucb_arms: int | None = None, verbose: bool = False, verbose_every: int = 1) -> None:
        if binary_cache_size < 1:
            raise ValueError(f"binary_cache_size must be >= 1, got {binary_cache_size}")
        self.sampler = sampler
        self.rng = rng
        self.n_covered_ex = int(n_covered_ex)
        # arms sampled per KL-LUCB round: 2 = the paper's/alibi's rule (the two critical arms);
        # None = also every other arm that still blocks the stopping rule (default)
        self.lucb_arms = 1 << 30 if lucb_arms is None else max(2, int(lucb_arms))
        self.margin = int(cache_margin)
        # alibi's progress printout (stdout, its format): KL-LUCB rounds and each beam's candidates
        self.verbose = bool(verbose)
        self.verbose_every = max(1, int(verbose_every))
        # shared draws: only for samplers that perturb features independently and keep each free
        # feature often enough for a parent's draws to reach its children (see _draw_shared)
        rate = getattr(sampler, "share_rate", None)
        self.shared = bool(getattr(sampler, "shared_draws", False)) and rate is not None and rate >= 0.25
        self.tracked: list[tuple] = []  # the anchors every draw is counted for when it is a valid sample of them
        self.n_features = int(sampler.n_features)
        # the binary cache: alibi pre-allocates binary_cache_size batches; np.zeros is lazily
        # committed memory, so untouched rows cost nothing.
        self.prealloc = int(batch_size) * int(binary_cache_size)
        self.data = np.zeros((self.prealloc, self.n_features), dtype=bool)
        self.labels = np.zeros(self.prealloc, dtype=bool)
        self.current = 0
        self.coverage_data: np.ndarray | None = None
        # per-anchor statistics, keyed by the sorted tuple of feature indices
        self.t_idx: dict[tuple, list[np.ndarray]] = {}
        self.t_nsamples: dict[tuple, float] = {}
        self.t_positives: dict[tuple, float] = {}
        self.t_cov_mask: dict[tuple, np.ndarray] = {}
        self.t_coverage: dict[tuple, float] = {}
        # examples are kept as cache row indices (the covered true / false rows of each anchor's last
        # batch) and built only for the returned anchor's steps: building them per credited batch
        # (every candidate, every round) cost ~7% of an image explanation
        self.t_ex_rows: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        # every labelled batch in the predictor's format, by its first cache row (to rebuild examples)
        self._raw_starts: list[int] = []
        self._raws: list[Any] = []
        self.t_order: dict[tuple, list[int]] = {(): []}

    # ---- state ----------------------------------------------------------------------------------
    def _idx(self, anchor: tuple) -> np.ndarray:
        parts = self.t_idx.get(anchor)
        if not parts:
            return np.zeros(0, dtype=np.int64)
        if len(parts) > 1:
            self.t_idx[anchor] = [np.concatenate(parts)]
        return self.t_idx[anchor][0]

    def _ensure_capacity(self, n: int) -> None:
        if self.current + n >= self.data.shape[0] - max(self.margin, 0):
            extra = max(self.prealloc, n + self.margin)
            self.data = np.concatenate([self.data, np.zeros((extra, self.n_features), dtype=bool)])
            self.labels = np.concatenate([self.labels, np.zeros(extra, dtype=bool)])

    def draw_samples(self, anchors: list[tuple], batch_size: int, share: bool = True,
                     wanted: Sequence[tuple] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``batch_size`` perturbations for each anchor, label all in one predictor call.

        Returns the positives and samples each anchor gained. With shared draws (see
        :meth:`_draw_shared`) an anchor can gain more than ``batch_size``, and tracked anchors that
        were not asked for can gain samples too: callers re-read the statistics.
        """
        for a in anchors:
            if a not in self.t_order:
                self.t_order[a] = list(a)
        if self.shared and share and len(anchors) >= 2:
            return self._draw_shared(anchors, batch_size, wanted)
        raws, datas = [], []
        for a in anchors:
            raw, data = self.sampler.perturb(tuple(self.t_order[a]), batch_size, self.rng)
            raws.append(raw)
            datas.append(np.asarray(data, dtype=bool))
        labels = self.sampler.labels(self.sampler.concat(raws) if len(raws) > 1 else raws[0])
        pos = np.zeros(len(anchors))
        tot = np.zeros(len(anchors))
        off = 0
        for i, (a, raw, data) in enumerate(zip(anchors, raws, datas)):
            n = data.shape[0]
            lab = labels[off:off + n]
            off += n
            rows = self._store(data, lab, raw)
            pos[i], tot[i] = self._credit(a, rows, lab, np.ones(n, dtype=bool))
            if self.shared:  # a draw conditioned on a is also a draw for every tracked superset it keeps
                for b in self.tracked:
                    if b != a and set(a) < set(b):
                        self._credit(b, rows, lab, data[:, list(b)].all(axis=1))
        return pos, tot

    def _store(self, data: np.ndarray, lab: np.ndarray, raw: Any) -> np.ndarray:
        """Append labelled samples to the binary cache (and their inputs to the raw log); their row indices."""
        n = data.shape[0]
        self._ensure_capacity(n)
        rows = np.arange(self.current, self.current + n)
        self.data[rows] = data
        self.labels[rows] = lab
        self._raw_starts.append(self.current)
        self._raws.append(raw)
        self.current += n
        return rows

    def _credit(self, a: tuple, rows: np.ndarray, lab: np.ndarray, sel: np.ndarray) -> tuple[float, float]:
        """Count the selected samples for anchor ``a`` (statistics; example rows: alibi keeps the last batch's)."""
        idx = np.nonzero(sel)[0]
        if not len(idx):
            return 0.0, 0.0
        la = lab[idx]
        n_pos = float(np.count_nonzero(la))
        self.t_idx.setdefault(a, []).append(rows[idx])
        self.t_nsamples[a] = self.t_nsamples.get(a, 0.0) + len(idx)
        self.t_positives[a] = self.t_positives.get(a, 0.0) + n_pos
        self.t_ex_rows[a] = self._example_rows(rows[idx], la)
        return n_pos, float(len(idx))

    def _example_rows(self, rows: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n_covered_ex`` covered-true and covered-false rows among ``rows`` (their labels ``lab``)."""
        k = self.n_covered_ex
        return rows[np.nonzero(lab)[0][:k]], rows[np.nonzero(~lab)[0][:k]]

    def _gather(self, rows: np.ndarray) -> Any:
        """The labelled inputs of cache ``rows`` (ascending), in the predictor's format, from the raw log."""
        starts = np.asarray(self._raw_starts)
        batch = np.searchsorted(starts, rows, side="right") - 1
        parts = [self._raws[b][rows[batch == b] - starts[b]] for b in np.unique(batch)]
        if not parts:
            return self._raws[0][np.zeros(0, dtype=np.int64)]
        return parts[0] if len(parts) == 1 else self.sampler.concat(parts)

    def _draw_shared(self, anchors: list[tuple], batch_size: int, wanted: Sequence[tuple] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Draw for several anchors at once from their common parents' distributions.

        For a sampler whose features are perturbed independently (``sampler.share_rate``: the
        probability that a feature outside the conditioning anchor is kept), a draw conditioned on
        anchor Q in which the features of A are kept is distributed exactly as a draw conditioned on
        A, for every A containing Q. So instead of drawing ``batch_size`` samples for each anchor
        P + (f,) from its own distribution, draw from the parent P's distribution until each
        requested anchor has gained ``batch_size`` samples, label every draw once, and count every
        draw for every requested or tracked anchor between P and the draw's kept features. Each
        anchor's samples stay i.i.d. from its own distribution (which anchors get them depends only
        on the draw's features, never on its label), so KL-LUCB's per-arm bounds hold; the two
        critical arms of a round cost what they cost before, and every other candidate sharing the
        parent gains about as many samples for free. Anchors still short after a few rounds are
        topped up by direct draws.

        ``wanted`` (KL-LUCB passes the arms that still block its stopping rule, the requested ones
        among them): only the draws that some wanted arm of the group can use are labelled, i.e.
        those keeping at least one of the features F that the group's wanted arms add to P; they are
        counted only for anchors that contain a feature of F. A draw from P in which such an anchor
        A is kept is in that subset whatever its other features, so A's samples are still its own
        distribution's (the subset is chosen by features, never labels); anchors without a feature
        of F get nothing from these draws, which is why the rule applies only to arms that cannot
        change KL-LUCB's stopping decision now. In the last rounds of a stage, when only the two
        critical arms block, this skips the quarter of the parent's draws that keep neither.
        """
        gained = {a: [0.0, 0.0] for a in anchors}
        groups: dict[tuple, list[tuple]] = {}
        for a in anchors:
            order = self.t_order[a]
            groups.setdefault(tuple(order[:-1]) if order else (), []).append(a)
        targets = list(dict.fromkeys(list(anchors) + list(self.tracked)))
        rate = float(self.sampler.share_rate)
        for parent, group in groups.items():
            pset = set(parent)
            mine = [b for b in targets if pset <= set(b)]
            focus: list[int] | None = None
            if wanted is not None:
                focus = sorted({self.t_order[a][-1] for a in list(wanted) + group
                                if self.t_order.get(a) and tuple(self.t_order[a][:-1]) == parent})
                mine = [b for b in mine if not set(focus).isdisjoint(b)]
            cols = {b: list(b) for b in mine}
            for _ in range(4):
                need = max(batch_size - gained[a][1] for a in group)
                if need <= 0:
                    break
                n = int(np.ceil(need / rate * 1.1)) + 8
                raw, data = self.sampler.perturb(parent, n, self.rng)
                data = np.asarray(data, dtype=bool)
                if focus is not None:  # only the draws a wanted arm can use
                    use = np.nonzero(data[:, focus].any(axis=1))[0]
                    raw, data = raw[use], data[use]
                lab = self.sampler.labels(raw)
                rows = self._store(data, lab, raw)
                for b in mine:
                    p_, t_ = self._credit(b, rows, lab, data[:, cols[b]].all(axis=1) if cols[b] else
                                          np.ones(len(lab), dtype=bool))
                    if b in gained:
                        gained[b][0] += p_
                        gained[b][1] += t_
        short = [a for a in anchors if gained[a][1] < batch_size]
        for a in short:  # rare: top up from the anchor's own distribution
            n = int(batch_size - gained[a][1])
            raw, data = self.sampler.perturb(tuple(self.t_order[a]), n, self.rng)
            data = np.asarray(data, dtype=bool)
            lab = self.sampler.labels(raw)
            rows = self._store(data, lab, raw)
            p_, t_ = self._credit(a, rows, lab, np.ones(n, dtype=bool))
            gained[a][0] += p_
            gained[a][1] += t_
        return np.array([gained[a][0] for a in anchors]), np.array([gained[a][1] for a in anchors])

    def propose_anchors(self, previous_best: list[tuple]) -> list[tuple]:
        """Extend each anchor of the previous beam by one feature; initialise their statistics from the cache."""
        data = self.data[:self.current]
        labels = self.labels[:self.current]
        cov = self.coverage_data
        assert cov is not None
        if not previous_best:
            out = []
            for f in range(self.n_features):
                t = (f,)
                pres = np.nonzero(data[:, f])[0]
                self.t_idx[t] = [pres]
                self.t_nsamples[t] = float(len(pres))
                self.t_positives[t] = float(labels[pres].sum())
                self.t_order[t] = [f]
                self.t_cov_mask[t] = cov[:, f]
                self.t_coverage[t] = float(cov[:, f].mean())
                out.append(t)
            return out
        new: list[tuple] = []
        seen: set[tuple] = set()
        for f in range(self.n_features):
            for t in previous_best:
                nt = tuple(sorted(set(t + (f,))))
                if len(nt) != len(t) + 1 or nt in seen:
                    continue
                seen.add(nt)
                new.append(nt)
                self.t_order[nt] = list(self.t_order[t]) + [f]
                mask = self.t_cov_mask[t] & cov[:, f]
                self.t_cov_mask[nt] = mask
                self.t_coverage[nt] = float(mask.mean())
                tidx = self._idx(t)
                present = tidx[data[tidx, f]]
                self.t_idx[nt] = [present]
                self.t_nsamples[nt] = float(len(present))
                self.t_positives[nt] = float(labels[present].sum())
        return new

    def _stats(self, anchors: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = np.array([self.t_nsamples.get(a, 0.0) for a in anchors])
        p = np.array([self.t_positives.get(a, 0.0) for a in anchors])
        c = np.array([self.t_coverage.get(a, 0.0) for a in anchors])
        return n, p, c

    # ---- KL-LUCB ----------------------------------------------------------------------------------
    def kllucb(self, anchors: list[tuple], epsilon: float, delta: float, batch_size: int, top_n: int
               ) -> np.ndarray:
        """Indices of the ``top_n`` anchors of highest precision, within ``epsilon``, w.p. 1 - delta."""
        n_samples, positives, coverages = self._stats(anchors)
        zero = np.nonzero(n_samples == 0)[0]
        if len(zero):
            pos, tot = self.draw_samples([anchors[i] for i in zero], 1)
            if self.shared:
                n_samples, positives, _ = self._stats(anchors)
            else:
                positives[zero] += pos
                n_samples[zero] += tot
        n_arms = len(anchors)
        if n_arms == top_n:
            return np.arange(n_arms)
        means = positives / n_samples
        ub, lb = np.zeros(n_arms), np.zeros(n_arms)
        t = 1

        groups: dict[str, np.ndarray] = {}

        def critical(t: int) -> tuple[int, int]:
            order = _rank(means, coverages)
            beta = compute_beta(n_arms, t, delta)
            J, not_J = order[-top_n:], order[:-top_n]
            # challengers' upper and the beam's lower bounds in one vectorised bisection
            upper = np.zeros(n_arms, dtype=bool)
            upper[not_J] = True
            bound = kl_bounds(means, beta / n_samples, upper)
            ub[not_J], lb[J] = bound[not_J], bound[J]
            groups["not_J"], groups["J"] = not_J, J
            return int(not_J[np.argmax(ub[not_J])]), int(J[np.argmin(lb[J])])

        ut, lt = critical(t)
        verbose_count = 0
        while ub[ut] - lb[lt] > epsilon:
            verbose_count += 1
            if self.verbose and verbose_count % self.verbose_every == 0:
                print('Best: %d (mean:%.10f, n: %d, lb:%.4f)' % (lt, means[lt], n_samples[lt], lb[lt]), end=' ')
                print('Worst: %d (mean:%.4f, n: %d, ub:%.4f)' % (ut, means[ut], n_samples[ut], ub[ut]), end=' ')
                print('B = %.2f' % (ub[ut] - lb[lt]))
            idx = [ut, lt]
            if self.lucb_arms > 2:
                # also sample the other arms that still block the stopping rule (ub > lb[lt] + epsilon),
                # highest upper bound first: same bounds and stopping rule, fewer sequential rounds
                nj = groups["not_J"]
                nj = nj[np.argsort(-ub[nj], kind="stable")]
                extra = [int(i) for i in nj if i != ut and ub[i] - lb[lt] > epsilon][:self.lucb_arms - 2]
                idx += extra
            wanted = None
            if self.shared:
                # the arms that still block the stopping rule: their draws are the only ones worth labelling
                J = groups["J"]
                block = {int(i) for i in groups["not_J"] if ub[i] - lb[lt] > epsilon}
                block |= {int(j) for j in J if ub[ut] - lb[j] > epsilon}
                wanted = [anchors[i] for i in sorted(block | set(idx))]
            pos, tot = self.draw_samples([anchors[i] for i in idx], batch_size, wanted=wanted)
            if self.shared:  # other arms may have gained samples too
                n_samples, positives, _ = self._stats(anchors)
            else:
                positives[idx] += pos
                n_samples[idx] += tot
            means = positives / n_samples
            t += 1
            ut, lt = critical(t)
        return _rank(means, coverages)[-top_n:]

    # ---- beam search ------------------------------------------------------------------------------
    def anchor_beam(self, delta: float = 0.1, epsilon: float = 0.15, desired_confidence: float = 0.95,
                    beam_size: int = 1, epsilon_stop: float = 0.05, min_samples_start: int = 100,
                    max_anchor_size: int | None = None, stop_on_first: bool = False, batch_size: int = 100,
                    coverage_samples: int = 10000) -> dict:
        """Beam search over anchors with KL-LUCB arm selection (Ribeiro et al. 2018, Algorithm 2)."""
        self.coverage_data = np.asarray(self.sampler.coverage_data(coverage_samples, self.rng), dtype=bool)
        (pos,), (total,) = self.draw_samples([()], min_samples_start)
        mean = pos / total
        beta = np.log(1.0 / delta)
        lb = dlow_bernoulli(np.array([mean]), np.array([beta / total]))[0]
        while mean > desired_confidence and lb < desired_confidence - epsilon:
            (n_pos,), (n_total,) = self.draw_samples([()], batch_size)
            pos += n_pos
            total += n_total
            mean = pos / total
            lb = dlow_bernoulli(np.array([mean]), np.array([beta / total]))[0]
        if lb > desired_confidence:
            return {"feature": [], "mean": [], "precision": [], "coverage": [], "examples": [],
                    "all_precision": float(mean), "num_preds": int(total), "success": True}

        current_size, best_coverage = 1, -1.0
        best_of_size: dict[int, list[tuple]] = {0: []}
        best_anchor: tuple = ()
        if max_anchor_size is None:
            max_anchor_size = self.n_features
        while current_size <= max_anchor_size:
            anchors = self.propose_anchors(best_of_size[current_size - 1])
            anchors = [a for a in anchors if self.t_coverage[a] > best_coverage]
            if not anchors:
                break
            self.tracked = anchors
            cand = self.kllucb(anchors, epsilon, delta, batch_size, min(beam_size, len(anchors)))
            best_of_size[current_size] = [anchors[i] for i in cand]
            beam = best_of_size[current_size]
            n_samples, positives, coverages = self._stats(beam)
            beta = np.log(1.0 / (delta / (1 + (beam_size - 1) * self.n_features)))
            means = positives / n_samples
            lbs = dlow_bernoulli(means, beta / n_samples)
            ubs = dup_bernoulli(means, beta / n_samples)
            if self.verbose:
                print('Best of size ', current_size, ':')
                for i, m_, l_, u_ in zip(cand, means, lbs, ubs):
                    print(i, m_, l_, u_)

            def to_sample() -> np.ndarray:
                return (((means >= desired_confidence) & (lbs < desired_confidence - epsilon_stop))
                        | ((means < desired_confidence) & (ubs >= desired_confidence + epsilon_stop)))

            cont = to_sample()
            while cont.any():
                sel = np.nonzero(cont)[0]
                pos_, tot_ = self.draw_samples([beam[i] for i in sel], batch_size)
                if self.shared:
                    n_samples, positives, _ = self._stats(beam)
                    sel = np.arange(len(beam))
                else:
                    positives[sel] += pos_
                    n_samples[sel] += tot_
                means[sel] = positives[sel] / n_samples[sel]
                lbs[sel] = dlow_bernoulli(means[sel], beta / n_samples[sel])
                ubs[sel] = dup_bernoulli(means[sel], beta / n_samples[sel])
                cont = to_sample()
            valid = (means >= desired_confidence) & (lbs > desired_confidence - epsilon_stop)
            better = np.nonzero(valid & (coverages > best_coverage))[0]
            if self.verbose:
                for a, ok, m_, l_, u_, c_ in zip(beam, valid, means, lbs, ubs, coverages):
                    print('%s mean = %.2f lb = %.2f ub = %.2f coverage: %.2f n: %d'
                          % (a, m_, l_, u_, c_, self.t_nsamples[a]))
                    if ok:
                        print('Found eligible result ', a, 'Coverage:', c_, 'Is best?', c_ > best_coverage)
            if better.size:
                b = better[np.argmax(coverages[better])]
                best_coverage = float(coverages[b])
                best_anchor = beam[b]
                if best_coverage == 1.0 or stop_on_first:
                    break
            current_size += 1

        success = bool(best_anchor)
        if not success:
            logger.warning("Could not find an anchor satisfying the %s precision constraint; returning the "
                           "best non-eligible anchor.", desired_confidence)
            pool: list[tuple] = []
            for i in range(0, current_size):
                pool.extend(best_of_size.get(i, []))
            if pool:
                self.tracked = pool
                best_anchor = pool[int(self.kllucb(pool, epsilon, delta, batch_size, 1)[0])]
        return self.metadata(best_anchor, success, batch_size)

    def metadata(self, features: tuple, success: bool, batch_size: int) -> dict:
        """Per-step precision, coverage and examples of the partial anchors, in the order features were added."""
        out: dict = {"feature": [], "mean": [], "precision": [], "coverage": [], "examples": [],
                     "all_precision": 0, "num_preds": int(self.current), "success": success}
        order = self.t_order.get(features, list(features))
        partials: list[tuple] = []
        cur: tuple = ()
        for f in order:
            cur = tuple(sorted(set(cur + (f,))))
            partials.append(cur)
        # precision as estimated by the search, before any sampling for examples (as alibi reports it)
        had = {p: bool(self.t_nsamples.get(p)) for p in partials}
        means = {p: self.t_positives[p] / self.t_nsamples[p] for p in partials if had[p]}
        for p in partials:
            if p in self.t_ex_rows:
                continue
            # a partial anchor never drawn for directly: its examples from the last samples the search
            # counted for it (cached draws in which it holds), instead of labelling a batch for them
            rows = self._idx(p)[-int(batch_size):]
            if len(rows):
                self.t_ex_rows[p] = self._example_rows(rows, self.labels[rows])
        missing = [p for p in partials if p not in self.t_ex_rows]
        for p in missing:  # no sample at all: sample once to get examples
            self.t_order[p] = list(p)
        if missing:  # for examples only: each partial's own draws (shared draws would cost more here)
            self.draw_samples(missing, batch_size, share=False)
        cov = self.coverage_data
        for f, p in zip(order, partials):
            mean = means[p] if had[p] else self.t_positives[p] / self.t_nsamples[p]
            if p not in self.t_coverage and cov is not None:
                self.t_coverage[p] = float(cov[:, list(p)].all(axis=1).mean())
            out["feature"].append(f)
            out["mean"].append(mean)
            out["precision"].append(mean)
            out["coverage"].append(self.t_coverage[p])
            true_rows, false_rows = self.t_ex_rows[p]
            out["examples"].append({"covered_true": self.sampler.examples(self._gather(true_rows)),
                                    "covered_false": self.sampler.examples(self._gather(false_rows)),
                                    "uncovered_true": np.array([]), "uncovered_false": np.array([])})
        out["num_preds"] = int(self.current)
        return out


def validate_search_params(threshold: float, delta: float, tau: float, batch_size: int, coverage_samples: int,
                           beam_size: int, max_anchor_size: int | None, min_samples_start: int,
                           n_covered_ex: int, binary_cache_size: int, cache_margin: int) -> None:
    """Raise ``ValueError`` naming the parameter when a search knob is out of range."""
    def num(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
        return float(v)

    if not 0.0 < num("threshold", threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not 0.0 < num("delta", delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0.0 < num("tau", tau) < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    for name, v in (("batch_size", batch_size), ("coverage_samples", coverage_samples),
                    ("beam_size", beam_size), ("min_samples_start", min_samples_start),
                    ("binary_cache_size", binary_cache_size)):
        if num(name, v) < 1 or int(v) != v:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    for name, v in (("n_covered_ex", n_covered_ex), ("cache_margin", cache_margin)):
        if num(name, v) < 0 or int(v) != v:
            raise ValueError(f"{name} must be a non-negative integer, got {v}")
    if max_anchor_size is not None and (num("max_anchor_size", max_anchor_size) < 1
                                        or int(max_anchor_size) != max_anchor_size):
        raise ValueError(f"max_anchor_size must be None or a positive integer, got {max_anchor_size}")


def search_with_call_knobs(sampler: Sampler, default_seed: int | None, call: dict[str, Any]) -> tuple[dict, dict]:
    """Run the search with the knobs of an ``explain`` call, picked by name from its arguments.

    Returns ``(result, params)``: alibi's raw result and the knobs actually used (with the seed),
    for the explanation's ``meta``. The three explainers keep alibi's explicit signatures; this is
    the one place that turns them into a search.
    """
    params = {k: call[k] for k in SEARCH_DEFAULTS}
    seed = default_seed if call.get("seed") is None else call["seed"]
    progress = {k: call[k] for k in ("verbose", "verbose_every") if k in call}
    return run_search(sampler, seed, **params, **progress), {**params, "seed": seed}


def run_search(sampler: Sampler, seed: int | None, *, threshold: float, delta: float, tau: float,
               batch_size: int, coverage_samples: int, beam_size: int, stop_on_first: bool,
               max_anchor_size: int | None, min_samples_start: int, n_covered_ex: int,
               binary_cache_size: int, cache_margin: int, rng: np.random.Generator | None = None,
               lucb_arms: int | str | None = "auto", verbose: bool = False, verbose_every: int = 1) -> dict:
    """Validate the knobs, make the local generator, run the beam search; return alibi's raw result dict.

    ``lucb_arms``: arms sampled per KL-LUCB round: ``2`` (the paper's rule), an integer > 2, ``None``
    (every blocking arm) or ``'auto'`` (the sampler's ``lucb_arms_auto``; None when it has none).
    """
    validate_search_params(threshold, delta, tau, batch_size, coverage_samples, beam_size, max_anchor_size,
                           min_samples_start, n_covered_ex, binary_cache_size, cache_margin)
    if isinstance(lucb_arms, str) and lucb_arms == "auto":
        lucb_arms = getattr(sampler, "lucb_arms_auto", None)
    if lucb_arms is not None and (isinstance(lucb_arms, bool) or not isinstance(lucb_arms, (int, np.integer))
                                  or lucb_arms < 2):
        raise ValueError(f"lucb_arms must be 'auto', None or an integer >= 2, got {lucb_arms!r}")
    rng = rng if rng is not None else np.random.default_rng(seed)
    search = AnchorSearch(sampler, rng, batch_size=int(batch_size), n_covered_ex=n_covered_ex,
                          binary_cache_size=int(binary_cache_size), cache_margin=int(cache_margin),
                          lucb_arms=lucb_arms, verbose=verbose, verbose_every=verbose_every)
    return search.anchor_beam(delta=delta, epsilon=tau, desired_confidence=threshold, beam_size=int(beam_size),
                              min_samples_start=int(min_samples_start), max_anchor_size=max_anchor_size,
                              stop_on_first=bool(stop_on_first), batch_size=int(batch_size),
                              coverage_samples=int(coverage_samples))


def summary_precision_coverage(result: dict) -> tuple[float, float]:
    """The anchor's precision and coverage as alibi reports them (empty anchor: all_precision and 1)."""
    if result["precision"]:
        return float(result["precision"][-1]), float(result["coverage"][-1])
    return float(result["all_precision"]), 1.0


def explainer_meta(name: str, params: dict) -> dict:
    """alibi-style ``meta`` dict."""
    return {"name": name, "type": ["blackbox"], "explanations": ["local"], "params": dict(params),
            "version": "gradindex-anchors-1"}
