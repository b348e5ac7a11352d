"""The served indexes (and through them the registered models), swappable while queries run.

Each served index is an immutable :class:`Served` snapshot (the opened index object, its
description, its generation). Queries take the snapshot once at their start and use it to the
end; :meth:`Registry.reload` opens the new index *outside* the lock and then swaps one dict entry,
so a reload never blocks or breaks a running query, and the old index is freed when its last
query finishes (copy-on-write, like RCU). Listeners registered with :meth:`Registry.subscribe`
hear about every (re)load (the server updates its metrics that way).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from indexer.defaults import MAX_K
from indexer.query import GradIndex, IndexDescription, list_indexes, open_index
from server.observability import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)


class NotServed(LookupError):
    """An index or model name the server does not serve (maps to NOT_FOUND)."""


@dataclass(frozen=True)
class Served:
    """One load of an index: what a query holds on to for its whole duration."""

    name: str                      # served name
    source: str                    # catalog name it was opened from
    index: GradIndex               # the opened index (model loaded, warmed up)
    description: IndexDescription  # read once at load
    generation: int
    loaded_at: float

    @property
    def engine_lock(self) -> Any:
        """The index's one lock (held while its model runs)."""
        return self.index.lock


def index_names(workdir: str, catalog_url: str | None = None) -> list[str]:
    """Names of the ready indexes in ``workdir``'s catalog or the one at ``catalog_url`` ([] when there is none)."""
    return [d.name for d in list_indexes(workdir, catalog_url)]


class Registry:
    """Name -> :class:`Served`; thread-safe reads without locks, reloads under a lock.

    ``max_k`` is the server's k limit, handed to every opened index so that the index enforces
    the same limit the server announces (and never a smaller one of its own).
    """

    def __init__(self, workdir: str, names: list[str] | None = None, *, max_k: int = MAX_K,
                 opener: Callable[..., GradIndex] = open_index,
                 lister: Callable[[str], list[str]] = index_names,
                 on_change: Callable[[Served], None] | None = None, catalog_url: str | None = None) -> None:
        self.workdir = workdir
        self.catalog_url = catalog_url  # operator configuration only: the catalog database (None: workdir file)
        self.max_k = int(max_k)
        self._open = opener
        self._listeners: list[Callable[[Served], None]] = [on_change] if on_change is not None else []
        self._lock = threading.Lock()
        self._served: dict[str, Served] = {}
        self._generation = 0
        if catalog_url is not None:  # the default opener/lister read the catalog database at the URL
            if opener is open_index:
                self._open = functools.partial(open_index, catalog_url=catalog_url)
            if lister is index_names:
                lister = functools.partial(index_names, catalog_url=catalog_url)
        for name in (names if names else lister(workdir)):
            self.reload(name)

    def subscribe(self, listener: Callable[[Served], None]) -> None:
        """Call ``listener(served)`` for every index served now and on every later (re)load."""
        self._listeners.append(listener)
        for s in self.all():
            listener(s)

    def _load(self, name: str, source: str) -> Served:
        t0 = time.perf_counter()
        idx = self._open(self.workdir, source, max_k=self.max_k)
        idx.warm_up()  # loads the model now (not on the first query) and checks its fingerprint
        desc = idx.describe()
        with self._lock:
            self._generation += 1
            served = Served(name=name, source=source, index=idx, description=desc,
                            generation=self._generation, loaded_at=time.time())
            self._served = {**self._served, name: served}
        log.info("index loaded", extra={"fields": {
            "event": "index_loaded", "index": name, "source": source, "generation": served.generation,
            "count": desc.count, "ms": round((time.perf_counter() - t0) * 1e3, 1)}})
        for listener in list(self._listeners):
            listener(served)
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


__all__ = ["Registry", "Served", "NotServed", "index_names"]
