"""Micro-batching of concurrent ``FindSimilar`` requests: one engine call and one search per batch.

Why: a query's gradient is computed by the index's engine, which is serialized per index (its layer
hooks keep per-call state). Served one request at a time, throughput under concurrency is bound by
per-call overhead (one small forward/backward and one memory scan of the index per query). Like the
dynamic batchers of production vector databases and model servers, the handler threads here only
validate and decode their request (so a bad request fails alone, with its own status code), then
hand it to the index's *lane*: one worker thread that gathers what is queued (same index snapshot,
at most ``max_examples`` query examples), predicts the missing targets, embeds all examples in one
engine call and searches them with one GEMM, then splits the hits back per request. Fetching the
records and encoding the response happen back in each handler thread, in parallel.

Latency: a lone request never waits. The worker only holds a batch open (for at most ``window_ms``)
while more requests are known to be coming: some are being decoded in handler threads, or the
previous batch held several requests (the server is under concurrent load).

Deadlines: each request carries its absolute deadline; a request whose deadline passed (or whose
client cancelled) while queued is dropped without computing it, and its handler answers
DEADLINE_EXCEEDED (CANCELLED) as soon as the deadline passes, whatever the batch is doing.

Index swaps: a request holds the :class:`~server.registry.Served` snapshot it started with and a
batch only groups requests of one snapshot, so ReloadIndex never mixes generations in a batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from server.observability import LOGGER_NAME, Metrics

log = logging.getLogger(LOGGER_NAME)
SC = grpc.StatusCode


class BatchError(Exception):
    """A request ended inside the batcher with a status code (deadline, shutdown)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    done: threading.Event = field(default_factory=threading.Event)
    # results
    targets: np.ndarray | None = None
    Q: np.ndarray | None = None
    hits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    error: BaseException | None = None
    records: dict[int, dict] | None = None  # catalog records of the hits, read once for the whole batch
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def alive(self) -> bool:
        return not self.cancelled and not self.expired and self.error is None

    def fail(self, exc: BaseException) -> None:
        if self.error is None and self.hits is None:
            self.error = exc
        self.done.set()

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


class Arrival:
    """Marks one request as 'coming' (being decoded) until it is queued or fails validation."""

    def __init__(self, batcher: "Batcher") -> None:
        self._b = batcher
        self._open = True
        with batcher._cond:
            batcher._arriving += 1

    def close(self) -> None:
        """Called with the batcher's lock held (on enqueue) or not (on failure): idempotent."""
        if self._open:
            self._open = False
            self._b._arriving -= 1

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._open:
            with self._b._cond:
                self.close()


class Batcher:
    """Per-index lanes (one worker thread each) that embed and search queued requests in batches."""

    def __init__(self, metrics: Metrics, *, window_ms: float = 2.0, max_examples: int = 64,
                 embed_chunk: int = 64) -> None:
        self.metrics = metrics
        self.window = max(0.0, float(window_ms)) / 1e3
        self.max_examples = int(max_examples)
        self.embed_chunk = int(embed_chunk)
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Job]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._last_requests: dict[str, int] = {}
        self._arriving = 0
        self._closed = False

    # ---- handler side ------------------------------------------------------------------------
    def arrive(self) -> Arrival:
        """Announce a request being decoded (so a worker may wait briefly for it)."""
        return Arrival(self)

    def submit(self, job: Job, arrival: Arrival | None = None) -> Job:
        """Queue a validated request on its index's lane (starting the lane's worker if needed)."""
        name = job.served.name
        with self._cond:
            if self._closed:
                raise BatchError(SC.UNAVAILABLE, "the server is shutting down; retry on another replica")
            if arrival is not None:
                arrival.close()
            self._queues.setdefault(name, deque()).append(job)
            if name not in self._threads:
                t = threading.Thread(target=self._lane, args=(name,), name=f"batch-{name}", daemon=True)
                self._threads[name] = t
                t.start()
            self._cond.notify_all()
        return job

    def wait(self, job: Job, context: grpc.ServicerContext | None = None) -> Job:
        """Block until the job's batch answered it, its deadline passed or its client went away."""
        if context is not None:
            def gone() -> None:  # RPC terminated (cancelled by the client, or deadline): wake up
                job.cancelled = True
                job.done.set()
            if not context.add_callback(gone):  # already terminated
                gone()
        timeout = None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
        finished = job.done.wait(timeout)
        if job.hits is not None and job.error is None:
            return job
        if job.error is not None:
            raise job.error
        job.cancelled = True
        if not finished or job.expired:
            raise BatchError(SC.DEADLINE_EXCEEDED, "the deadline passed while the query waited for or ran in its "
                             "batch; give the call a longer deadline or send fewer queries per call")
        raise BatchError(SC.CANCELLED, "the client cancelled the call")

    @property
    def arriving(self) -> int:
        """Requests being decoded in handler threads (announced, not yet queued)."""
        return self._arriving

    def pending(self, name: str) -> int:
        """Requests queued on ``name``'s lane and not yet taken into a batch."""
        with self._cond:
            return len(self._queues.get(name, ()))

    def close(self) -> None:
        """Stop the workers; queued requests fail with UNAVAILABLE."""
        with self._cond:
            self._closed = True
            pending = [j for q in self._queues.values() for j in q]
            for q in self._queues.values():
                q.clear()
            self._cond.notify_all()
        for j in pending:
            j.fail(BatchError(SC.UNAVAILABLE, "the server shut down before the query ran; retry"))
        for t in list(self._threads.values()):
            if t is not threading.current_thread():
                t.join(timeout=5)

    # ---- worker side -------------------------------------------------------------------------
    def _take(self, name: str) -> list[Job]:
        """Pop the next batch of ``name``'s lane (lock held): the oldest job plus the queued jobs of
        the same index snapshot, FIFO, up to ``max_examples`` query examples (the first job always)."""
        q = self._queues[name]
        first = q[0]
        batch, rest, n = [], deque(), 0
        while q:
            j = q.popleft()
            if j.served is first.served and (not batch or n + len(j.X) <= self.max_examples):
                batch.append(j)
                n += len(j.X)
            else:
                rest.append(j)
                if j.served is first.served:  # full: keep FIFO order for the rest
                    rest.extend(q)
                    q.clear()
        q.extend(rest)
        return batch

    def _queued(self, name: str) -> tuple[int, int]:
        """(requests, examples) queued for the lane's next batch (the oldest job's snapshot)."""
        q = self._queues[name]
        if not q:
            return 0, 0
        first = q[0].served
        jobs = [j for j in q if j.served is first]
        return len(jobs), sum(len(j.X) for j in jobs)

    def _lane(self, name: str) -> None:
        while True:
            with self._cond:
                while not self._queues[name] and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if self.window > 0:
                    end = time.monotonic() + self.window
                    # Hold the batch open only while more requests are known to be coming: some are
                    # being decoded, or fewer are queued than the previous batch held (under load).
                    while True:
                        n_req, n_ex = self._queued(name)
                        if n_ex >= self.max_examples or (
                                self._arriving == 0 and n_req >= self._last_requests.get(name, 1)):
                            break
                        left = end - time.monotonic()
                        if left <= 0 or self._closed:
                            break
                        self._cond.wait(left)
                batch = self._take(name)
                self._last_requests[name] = len(batch)
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - never leave a handler waiting
                log.exception("batch failed", extra={"fields": {"index": name}})
                for j in batch:
                    j.fail(exc)
            finally:
                for j in batch:
                    j.done.set()

    def _drop_dead(self, jobs: list[Job], stage: str) -> list[Job]:
        live = []
        for j in jobs:
            if j.alive:
                live.append(j)
                continue
            if j.error is None:
                reason = "cancelled" if j.cancelled and not j.expired else "expired"
                self.metrics.batch_dropped.labels(reason).inc()
                code = SC.DEADLINE_EXCEEDED if reason == "expired" else SC.CANCELLED
                j.fail(BatchError(code, f"the query was dropped before its {stage} stage ({reason}); give the call "
                                        "a longer deadline"))
            j.done.set()
        return live

    def _run(self, batch: list[Job]) -> None:
        """Predict, embed and search one batch; results (or per-request errors) land in the jobs."""
        served = batch[0].served
        t0 = time.monotonic()
        for j in batch:
            j.timing["queue"] = (t0 - j.enqueued) * 1e3
        live = self._drop_dead(batch, "gradient")
        if not live:
            return
        groups: dict[tuple, list[Job]] = {}
        for j in live:
            groups.setdefault(j.embed_key(), []).append(j)
        with served.engine_lock:  # one engine per index: its layer hooks hold per-call state
            t1 = time.monotonic()
            live = self._drop_dead(live, "gradient")  # the lock may have been held by an explainer
            for group in groups.values():
                group = [j for j in group if j.alive]
                if group:
                    self._isolating(self._embed, served, group)
        t2 = time.monotonic()
        live = self._drop_dead([j for j in live if j.Q is not None], "search")
        if live:
            n_ex = sum(len(j.X) for j in live)
            self.metrics.batch_requests.observe(len(live))
            self.metrics.batch_examples.observe(n_ex)
            self.metrics.batched_examples.inc(n_ex)
        exact = served.info.get("faiss") == "flat"
        sgroups: dict[tuple, list[Job]] = {}
        for j in live:
            sgroups.setdefault(j.search_key(exact), []).append(j)
        for group in sgroups.values():
            self._isolating(self._search, served, group)
        t3 = time.monotonic()
        self._fetch(served, [j for j in live if j.hits is not None])
        t4 = time.monotonic()
        for j in live:
            j.timing.update(wait_engine=(t1 - t0) * 1e3, gradient=(t2 - t1) * 1e3, search=(t3 - t2) * 1e3,
                            fetch=(t4 - t3) * 1e3, batch=float(len(live)))

    @staticmethod
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

    @staticmethod
    def _isolating(fn: Any, served: Any, group: list[Job]) -> None:
        """Run ``fn`` on the group; if it fails, run each request alone so that only the bad one fails."""
        try:
            fn(served, group)
            return
        except Exception as exc:  # noqa: BLE001 - attributed per request below
            if len(group) == 1:
                group[0].fail(exc)
                return
        for j in group:
            try:
                fn(served, [j])
            except Exception as exc:  # noqa: BLE001 - this request's own error
                j.fail(exc)

    def _embed(self, served: Any, group: list[Job]) -> None:
        """Targets (predicted where missing, one forward pass) and query vectors, one engine call per
        ``embed_chunk`` examples; stops early when every request of the group has gone."""
        X = np.concatenate([j.X for j in group]) if len(group) > 1 else group[0].X
        bounds = np.cumsum([0] + [len(j.X) for j in group])
        Y = None
        if group[0].Y is not None:
            Y = np.concatenate([j.Y for j in group]) if len(group) > 1 else group[0].Y
        elif served.info.get("task", "classification") == "classification":
            Y = served.index.embedder().engines[-1].resolve_targets(X)
        parts = []
        for s in range(0, len(X), self.embed_chunk):
            if not any(j.alive for j in group):
                return
            parts.append(served.index.embed(X[s:s + self.embed_chunk],
                                            None if Y is None else Y[s:s + self.embed_chunk]))
        Q = np.concatenate(parts) if len(parts) > 1 else parts[0]
        for j, a, b in zip(group, bounds[:-1], bounds[1:]):
            j.Q = Q[a:b]
            j.targets = None if Y is None else Y[a:b]

    @staticmethod
    def _search(served: Any, group: list[Job]) -> None:
        """One search for the group at the largest k (and the union of directions), sliced per request."""
        Q = np.concatenate([j.Q for j in group]) if len(group) > 1 else group[0].Q
        kmax = max(j.k for j in group)
        modes = {j.direction for j in group}
        mode = modes.pop() if len(modes) == 1 else "both"
        j0 = group[0]
        res = served.index.search(Q, kmax, mode=mode, labels=j0.labels, split=j0.split)
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if mode == "least":
            found["least"] = (res.scores, res.ids)
        else:
            found["most"] = (res.scores, res.ids)
            if mode == "both":
                found["least"] = (res.least_scores, res.least_ids)
        a = 0
        for j in group:
            b = a + len(j.Q)
            want = ("most", "least") if j.direction == "both" else (j.direction,)
            j.hits = {d: (found[d][0][a:b, :j.k], found[d][1][a:b, :j.k]) for d in want}
            a = b


__all__ = ["Batcher", "BatchError", "Job", "Arrival"]
