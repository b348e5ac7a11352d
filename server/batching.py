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

This module only queues and groups; what a batch computes is :func:`server.pipeline.run_jobs`,
the same code a request runs alone when batching is off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import grpc

from server.config import EMBED_CHUNK, ServerConfig
from server.observability import LOGGER_NAME, Metrics
from server.pipeline import Job, run_jobs
from server.rpc import RpcError

log = logging.getLogger(LOGGER_NAME)
SC = grpc.StatusCode


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

    def __init__(self, metrics: Metrics, *, window_ms: float = ServerConfig.batch_window_ms,
                 max_examples: int = ServerConfig.batch_max_examples, embed_chunk: int = EMBED_CHUNK) -> None:
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
                raise RpcError(SC.UNAVAILABLE, "the server is shutting down; retry on another replica")
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
            job.watch(context)
        timeout = None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
        finished = job.done.wait(timeout)
        return job.result(finished)

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
            j.fail(RpcError(SC.UNAVAILABLE, "the server shut down before the query ran; retry"))
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

    def _run(self, batch: list[Job]) -> None:
        """Answer one batch through the query pipeline (shared with unbatched requests)."""
        run_jobs(batch, self.metrics, self.embed_chunk, batched=True)


__all__ = ["Batcher", "Job", "Arrival"]
