"""One build per index name at a time: an advisory file lock in the workdir, with a clear error.

Two builds of the same name would race on the catalog rows (both see no pending build and both
create one) and on the index files. :func:`build_lock` takes ``<workdir>/locks/<name>.lock`` with
``flock`` (non-blocking); the kernel releases it when the holder exits, even by SIGKILL, so a
killed build never leaves a stale lock and ``--resume`` works at once. The file records who holds
it (pid, host, start) for the error message. The lock covers processes sharing the workdir's
filesystem; builds on other machines writing to one catalog URL need the catalog's own locking.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from indexer.errors import FailedPrecondition


class BuildLocked(FailedPrecondition):
    """Another process is building this index name (gRPC FAILED_PRECONDITION)."""


@contextlib.contextmanager
def build_lock(workdir: str | os.PathLike, name: str) -> Iterator[Path]:
    """Hold the build lock of index ``name`` in ``workdir`` for the ``with`` block, or raise BuildLocked."""
    d = Path(workdir) / "locks"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (OSError, ValueError):
                who = {}
            raise BuildLocked(f"index {name!r} is being built by another process (pid {who.get('pid', '?')} on "
                              f"{who.get('host', '?')}, since {who.get('since', '?')}): wait for it to finish, or "
                              "stop it and resume with --resume.") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


__all__ = ["build_lock", "BuildLocked"]
