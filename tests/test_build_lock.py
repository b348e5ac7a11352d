"""One build per index name at a time: a second build of a name being built (``--replace`` too)
gets a clear FAILED_PRECONDITION-class error and touches none of the running build's rows or files;
two builds racing on a first build no longer both create the model row."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from indexer.build import build_index
from indexer.build_lock import BuildLocked, build_lock
from indexer.catalog import Catalog, IndexRow
from indexer.errors import FailedPrecondition
from test_build_support import write_config


def _rows(wd):
    cat = Catalog(wd)
    try:
        with cat.session() as s:
            return [(r.version, r.status, r.path) for r in s.scalars(select(IndexRow).order_by(IndexRow.id))]
    finally:
        cat.close()


def test_second_build_of_a_name_being_built_is_refused_and_changes_nothing(tmp_path):
    cfg = write_config(tmp_path, n=64)
    wd = tmp_path / "wd"
    build_index(cfg, wd, progress=False)
    before = _rows(wd)
    files = sorted(p.relative_to(wd) for p in wd.rglob("*") if p.is_file() and "locks" not in p.parts)
    with build_lock(wd, "tiny"):  # a running build of "tiny" (another process would hold it the same way)
        for kw in ({"replace": True}, {"resume": True}, {"new_version": True}):
            with pytest.raises(BuildLocked, match="being built by another process") as e:
                build_index(cfg, wd, progress=False, **kw)
            assert isinstance(e.value, FailedPrecondition)
    assert _rows(wd) == before
    assert sorted(p.relative_to(wd) for p in wd.rglob("*") if p.is_file() and "locks" not in p.parts) == files
    # once the lock is released the replace goes through
    build_index(cfg, wd, progress=False, replace=True)
    assert [r[0] for r in _rows(wd)] == [2]


def test_two_concurrent_first_builds_one_wins_one_is_told_why(tmp_path):
    cfg = write_config(tmp_path, n=64)
    wd = tmp_path / "wd"
    out: list = []

    def run():
        try:
            out.append(build_index(cfg, wd, progress=False).count)
        except Exception as exc:  # noqa: BLE001 - collected and checked below
            out.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in out if isinstance(o, Exception)]
    assert all(isinstance(e, FailedPrecondition) for e in errors), errors  # never a raw IntegrityError
    assert 64 in out
    cat = Catalog(wd)
    with cat.session() as s:
        assert s.scalar(select(func.count()).select_from(IndexRow).where(IndexRow.status == "ready")) == 1
    cat.close()
