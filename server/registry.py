"""The served indexes (and through them the registered models), swappable while queries run.

Each served index is an immutable :class:`Served` snapshot (the opened index object, its
generation, a lock for the gradient engine). Queries take the snapshot once at their start and
use it to the end; :meth:`Registry.reload` opens the new index *outside* the lock and then swaps
one dict entry, so a reload never blocks or breaks a running query, and the old index is freed
when its last query finishes (copy-on-write, like RCU).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from server.observability import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)


class NotServed(LookupError):
    """An index or model name the server does not serve (maps to NOT_FOUND)."""


@dataclass(frozen=True)
class Served:
    """One load of an index: what a query holds on to for its whole duration."""

    name: str            # served name
    source: str          # catalog name it was opened from
    index: Any           # indexer.query index object
    info: dict           # index.info(), read once at load
    generation: int
    loaded_at: float
    engine_lock: threading.Lock = field(default_factory=threading.Lock, compare=False)


def _default_opener(workdir: str, name: str) -> Any:
    from indexer.query import open_index

    return open_index(workdir, name)


def _default_lister(workdir: str) -> list[str]:
    from server.demo import served_index_names

    return served_index_names(workdir)


class Registry:
    """Name -> :class:`Served`; thread-safe reads without locks, reloads under a lock."""

    def __init__(self, workdir: str, names: list[str] | None = None,
                 opener: Callable[[str, str], Any] = _default_opener,
                 lister: Callable[[str], list[str]] = _default_lister,
                 on_change: Callable[[Served], None] | None = None) -> None:
        self.workdir = workdir
        self._open = opener
        self._lister = lister
        self._on_change = on_change
        self._lock = threading.Lock()
        self._served: dict[str, Served] = {}
        self._generation = 0
        for name in (names if names else self._lister(workdir)):
            self.reload(name)

    def _load(self, name: str, source: str) -> Served:
        t0 = time.perf_counter()
        idx = self._open(self.workdir, source)
        info = dict(idx.info())
        emb = idx.embedder()  # loads the model now (not on the first query) and checks its fingerprint
        info["gradient_dim"] = int(emb.projector.input_dim)
        if info.get("input_shape"):  # warm up (projection matrices, lazy kernels) before serving
            idx.embed(np.zeros((1, *info["input_shape"]), dtype=np.float32))
        with self._lock:
            self._generation += 1
            served = Served(name=name, source=source, index=idx, info=info,
                            generation=self._generation, loaded_at=time.time())
            self._served = {**self._served, name: served}
        log.info("index loaded", extra={"fields": {
            "event": "index_loaded", "index": name, "source": source, "generation": served.generation,
            "count": info.get("count"), "ms": round((time.perf_counter() - t0) * 1e3, 1)}})
        if self._on_change is not None:
            self._on_change(served)
        return served

    def reload(self, name: str, source: str | None = None) -> Served:
        """(Re)open ``source`` (default: ``name``) from the catalog and serve it as ``name``."""
        return self._load(name, source or name)

    def get(self, name: str) -> Served:
        """The current snapshot of ``name``; NotServed names what is served instead."""
        served = self._served.get(name)
        if served is None:
            have = ", ".join(sorted(self._served)) or "none"
            raise NotServed(f"index {name!r} is not served; served indexes: {have} (see ListIndexes)")
        return served

    def all(self) -> list[Served]:
        """Snapshots of every served index, by name."""
        cur = self._served
        return [cur[k] for k in sorted(cur)]
