"""The FindSimilar query pipeline, written once: targets → embedding → search → records.

A :class:`Job` is one validated request; :func:`run_jobs` answers a group of jobs of one index
snapshot with one engine call per embedding group and one search per search group, then reads the
hits' records in one catalog query. The micro-batcher (:mod:`server.batching`) calls it from an
index's lane with whatever is queued; with batching off the handler calls it in its own thread
with a batch of one. So every query-path change is made here, once.

Deadlines and cancellation are checked between stages (and between engine calls): a job whose
deadline passed or whose client went away is dropped with DEADLINE_EXCEEDED / CANCELLED and not
computed further. A job's failure (bad targets, say) fails that job alone: a group that fails is
retried one job at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from server.observability import Metrics
from server.rpc import RpcError

SC = grpc.StatusCode

#: How close to its deadline a call may end and still count as timed out rather than cancelled
#: (the request's transit time under load, by which the server's deadline trails the client's).
DEADLINE_SLACK_S = 0.05


@dataclass(eq=False)
class Job:
    """One validated FindSimilar request waiting for (or done with) its batch."""

    served: Any                       # server.registry.Served snapshot taken at the request's start
    X: np.ndarray                     # (n, *input_shape) decoded inputs
    Y: np.ndarray | None              # client targets, or None (predicted for classification)
    k: int
    direction: str                    # most | least | both
    labels: list[int] | None
    split: list[str] | None
    deadline: float | None            # time.monotonic() deadline, None = no deadline
    include_data: bool = False        # the stored examples travel with the hits
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    timed_out: bool = False           # gRPC ended the call because its deadline passed
    done: threading.Event = field(default_factory=threading.Event)
    # results
    targets: np.ndarray | None = None
    Q: np.ndarray | None = None
    hits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    exact: Any = None                 # the queries' exact gradients (index.exact_rerank), for the re-ranking
    exact_scores: bool = False        # the hits' scores are exact kernel values of the unprojected gradients
    error: BaseException | None = None
    records: dict[int, dict] | None = None  # catalog records of the hits, read once for the whole batch
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def expired(self) -> bool:
        return self.timed_out or self.deadline is not None and time.monotonic() >= self.deadline

    def watch(self, context: grpc.ServicerContext) -> None:
        """Stop working for the job once its RPC ends (client cancelled, or deadline passed).

        A client whose deadline passes cancels the call, and that cancellation reaches the server
        a little *before* the server's copy of the deadline passes (the server's clock started
        when the request arrived). So a call ending within ``DEADLINE_SLACK_S`` of its deadline
        counts as a passed deadline (DEADLINE_EXCEEDED), not a cancellation (CANCELLED).
        """
        def gone() -> None:
            remaining = context.time_remaining()
            if self.deadline is not None and (remaining is None or remaining <= DEADLINE_SLACK_S):
                self.timed_out = True
            self.cancelled = True
            self.done.set()

        if not context.add_callback(gone):  # already terminated
            gone()

    @property
    def alive(self) -> bool:
        return not self.cancelled and not self.expired and self.error is None

    def fail(self, exc: BaseException) -> None:
        if self.error is None and self.hits is None:
            self.error = exc
        self.done.set()

    def result(self, finished: bool = True) -> "Job":
        """The job itself once answered; else raise its error, DEADLINE_EXCEEDED (deadline passed, or
        ``finished`` False: the wait for the batch timed out) or CANCELLED."""
        if self.hits is not None and self.error is None:
            return self
        if self.error is not None:
            raise self.error
        self.cancelled = True
        if not finished or self.expired:
            raise RpcError(SC.DEADLINE_EXCEEDED, "the deadline passed while the query waited for or ran in its "
                           "batch; give the call a longer deadline or send fewer queries per call")
        raise RpcError(SC.CANCELLED, "the client cancelled the call")

    def embed_key(self) -> tuple:
        """Requests embedded in one engine call must agree on these (same dtypes, target shape)."""
        y = None if self.Y is None else (self.Y.dtype.str, self.Y.shape[1:])
        return (self.X.dtype.str, self.X.shape[1:], y)

    def search_key(self, exact: bool) -> tuple:
        """Requests searched together must agree on the filters (and on k, unless the search is
        exact, where the top-k is the prefix of the top-k_max)."""
        labels = tuple(sorted(self.labels)) if self.labels else None
        split = tuple(sorted(self.split)) if self.split else None
        return (labels, split, None if exact else self.k)


def search_hits(index: Any, Q: np.ndarray, k: int, direction: str, labels: Any = None,
                split: Any = None, exact: Any = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'most'|'least': (scores, ids)} of one search of the index (both directions in one scan);
    ``exact``: the queries' exact gradients, for an index that re-ranks with them."""
    res = index.search(Q, k, mode=direction, labels=labels, split=split, exact=exact)
    if direction == "least":
        return {"least": (res.scores, res.ids)}
    hits = {"most": (res.scores, res.ids)}
    if direction == "both":
        hits["least"] = (res.least_scores, res.least_ids)
    return hits


def run_jobs(jobs: list[Job], metrics: Metrics, embed_chunk: int, batched: bool = True) -> None:
    """Predict, embed and search a group of jobs of one index snapshot; results (or per-job errors)
    land in the jobs. ``batched=False`` (a handler's batch of one) records no batch statistics."""
    served = jobs[0].served
    t0 = time.monotonic()
    if batched:
        for j in jobs:
            j.timing["queue"] = (t0 - j.enqueued) * 1e3
    counted = metrics if batched else None  # drops of queued requests are a batching statistic
    live = _drop_dead(jobs, "gradient", counted)
    if not live:
        return
    groups: dict[tuple, list[Job]] = {}
    for j in live:
        groups.setdefault(j.embed_key(), []).append(j)
    with served.index.lock:  # the index's one lock: its engines hold per-call hook state
        t1 = time.monotonic()
        live = _drop_dead(live, "gradient", counted)  # the lock may have been held by an explainer
        for group in groups.values():
            group = [j for j in group if j.alive]
            if group:
                _isolating(lambda g: _embed(served, g, embed_chunk), group)
    t2 = time.monotonic()
    live = _drop_dead([j for j in live if j.Q is not None], "search", counted)
    if live and batched:
        n_ex = sum(len(j.X) for j in live)
        metrics.batch_requests.observe(len(live))
        metrics.batch_examples.observe(n_ex)
        metrics.batched_examples.inc(n_ex)
    sgroups: dict[tuple, list[Job]] = {}
    for j in live:
        sgroups.setdefault(j.search_key(served.index.exact), []).append(j)
    for group in sgroups.values():
        _isolating(lambda g: _search(served, g), group)
    t3 = time.monotonic()
    _fetch(served, [j for j in live if j.hits is not None])
    t4 = time.monotonic()
    for j in live:
        predict = j.timing.pop("predict", 0.0)
        if batched:
            j.timing.update(wait_engine=(t1 - t0) * 1e3, gradient=(t2 - t1) * 1e3, search=(t3 - t2) * 1e3,
                            fetch=(t4 - t3) * 1e3, batch=float(len(live)))
        else:  # the stages a lone request reports: targets predicted (if any), gradient, search, fetch
            if predict:
                j.timing["predict"] = predict
            j.timing.update(gradient=(t2 - t0) * 1e3 - predict, search=(t3 - t2) * 1e3, fetch=(t4 - t3) * 1e3)


def _drop_dead(jobs: list[Job], stage: str, metrics: Metrics | None) -> list[Job]:
    """The jobs still alive; the others fail with DEADLINE_EXCEEDED / CANCELLED (counted in
    ``metrics`` when given)."""
    live = []
    for j in jobs:
        if j.alive:
            live.append(j)
            continue
        if j.error is None:
            reason = "cancelled" if j.cancelled and not j.expired else "expired"
            if metrics is not None:
                metrics.batch_dropped.labels(reason).inc()
            code = SC.DEADLINE_EXCEEDED if reason == "expired" else SC.CANCELLED
            j.fail(RpcError(code, f"the query was dropped before its {stage} stage ({reason}); give the call "
                                  "a longer deadline"))
        j.done.set()
    return live


def _isolating(fn: Any, group: list[Job]) -> None:
    """Run ``fn`` on the group; if it fails, run each job alone so that only the bad one fails."""
    try:
        fn(group)
        return
    except Exception as exc:  # noqa: BLE001 - attributed per request below
        if len(group) == 1:
            group[0].fail(exc)
            return
    for j in group:
        try:
            fn([j])
        except Exception as exc:  # noqa: BLE001 - this request's own error
            j.fail(exc)


def _embed(served: Any, group: list[Job], embed_chunk: int) -> None:
    """Targets (predicted where missing, one forward pass) and query vectors, one engine call per
    ``embed_chunk`` examples; stops early when every job of the group has gone."""
    X = np.concatenate([j.X for j in group]) if len(group) > 1 else group[0].X
    bounds = np.cumsum([0] + [len(j.X) for j in group])
    Y = None
    if group[0].Y is not None:
        Y = np.concatenate([j.Y for j in group]) if len(group) > 1 else group[0].Y
    else:
        t = time.monotonic()
        Y = served.index.predict_targets(X)
        if Y is not None:
            for j in group:
                j.timing["predict"] = (time.monotonic() - t) * 1e3
    parts, exact = [], []
    for s in range(0, len(X), embed_chunk):
        if not any(j.alive for j in group):
            return
        q, e = served.index.embed(X[s:s + embed_chunk], None if Y is None else Y[s:s + embed_chunk], exact=True)
        parts.append(q)
        exact.append(e)
    Q = np.concatenate(parts) if len(parts) > 1 else parts[0]
    E = None if exact[0] is None else type(exact[0]).concat(exact)
    for j, a, b in zip(group, bounds[:-1], bounds[1:]):
        j.Q = Q[a:b]
        j.exact = None if E is None else E.rows(a, b)
        j.targets = None if Y is None else Y[a:b]


def _search(served: Any, group: list[Job]) -> None:
    """One search for the group at the largest k (and the union of directions), sliced per job."""
    Q = np.concatenate([j.Q for j in group]) if len(group) > 1 else group[0].Q
    kmax = max(j.k for j in group)
    modes = {j.direction for j in group}
    mode = modes.pop() if len(modes) == 1 else "both"
    E = None if group[0].exact is None else type(group[0].exact).concat([j.exact for j in group])
    found = search_hits(served.index, Q, kmax, mode, group[0].labels, group[0].split, exact=E)
    a = 0
    for j in group:
        b = a + len(j.Q)
        want = ("most", "least") if j.direction == "both" else (j.direction,)
        j.hits = {d: (found[d][0][a:b, :j.k], found[d][1][a:b, :j.k]) for d in want}
        j.exact_scores = served.index.scores_exact(E is not None)
        a = b


def _fetch(served: Any, jobs: list[Job]) -> None:
    """Read the catalog records of every hit of the batch in one query (per include_data), instead
    of one query per request; a failure leaves ``records`` unset and each handler reads its own."""
    for with_data in (False, True):
        group = [j for j in jobs if j.include_data == with_data]
        ids = sorted({int(i) for j in group for _, I in j.hits.values() for i in I.ravel() if i >= 0})
        if not ids:
            continue
        try:
            recs = {int(r["id"]): r for r in served.index.get_examples(ids, payload=with_data)}
        except Exception:  # noqa: BLE001 - the handlers fetch (and report) on their own
            continue
        for j in group:
            j.records = recs


__all__ = ["Job", "run_jobs", "search_hits"]
