"""Structured JSON logs and Prometheus metrics for the server.

Metrics live in a registry per server (not prometheus-client's global one), so several servers in
one process (tests) never collide, and they are exported on an optional HTTP port.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LOGGER_NAME = "gradindex.server"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and every ``extra={"fields": {...}}`` key."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> logging.Logger:
    """Send the server's logger to stderr as JSON lines (idempotent)."""
    log = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(JsonFormatter())
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level.upper())
    return log


_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Request counts and latencies (per RPC method and status code), stage latencies, in-flight RPCs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gradindex_requests", "RPCs handled, by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("gradindex_request_seconds", "RPC latency in the handler, by method",
                                 ["method"], buckets=_BUCKETS, registry=self.registry)
        self.stages = Histogram("gradindex_stage_seconds", "Latency of one stage of a query",
                                ["stage"], buckets=_BUCKETS, registry=self.registry)
        self.inflight = Gauge("gradindex_inflight_requests", "RPCs being handled now", registry=self.registry)
        self.index_generation = Gauge("gradindex_index_generation", "Loads of each served index",
                                      ["index"], registry=self.registry)
        self.index_count = Gauge("gradindex_index_examples", "Examples in each served index",
                                 ["index"], registry=self.registry)
        size_buckets = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
        self.batch_requests = Histogram("gradindex_batch_requests", "FindSimilar requests per micro-batch",
                                        buckets=size_buckets, registry=self.registry)
        self.batch_examples = Histogram("gradindex_batch_examples", "Query examples per micro-batch",
                                        buckets=size_buckets, registry=self.registry)
        self.batched_examples = Counter("gradindex_batched_examples", "Query examples embedded by the batcher",
                                        registry=self.registry)
        self.batch_dropped = Counter("gradindex_batch_dropped", "Queued requests dropped before they were "
                                     "computed, by reason (expired deadline, cancelled)", ["reason"],
                                     registry=self.registry)
        self._http = None

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP endpoint; return the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if any."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class StageTimer:
    """Times the stages of one request; feeds the stage histogram and a ``server-timing`` trailer."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, stage: str) -> None:
        """Close the stage that started at the previous mark."""
        now = time.perf_counter()
        dt = now - self._t
        self._t = now
        self.ms[stage] = self.ms.get(stage, 0.0) + dt * 1e3
        if self.metrics is not None:
            self.metrics.stages.labels(stage).observe(dt)

    def add(self, stage: str, ms: float) -> None:
        """Record a stage measured elsewhere (the batch worker) and restart the clock."""
        self.ms[stage] = self.ms.get(stage, 0.0) + ms
        if self.metrics is not None and stage != "batch":
            self.metrics.stages.labels(stage).observe(ms / 1e3)
        self._t = time.perf_counter()

    def header(self) -> str:
        """``stage=ms,...`` for the ``server-timing`` trailing metadata."""
        return ",".join(f"{k}={v:.3f}" for k, v in self.ms.items())
