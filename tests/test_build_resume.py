"""Nothing lost: a build SIGKILLed mid-way resumes from its last committed chunk and equals an
uninterrupted build bit for bit; the catalog never points at a missing file meanwhile."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from indexer.build import build_index
from indexer.catalog import Catalog, Example, IndexRow
from indexer.errors import FailedPrecondition
from indexer.query import open_index
from test_build_support import write_config


def _committed(db) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("select count(*) from build_chunks").fetchone()[0]
    except sqlite3.Error:
        return 0


def _examples(wd):
    cat = Catalog(wd)
    with cat.session() as s:
        out = [(e.row_id, e.external_id, e.label, e.payload_ref, round(e.self_influence, 9))
               for e in s.query(Example).order_by(Example.row_id)]
    cat.close()
    return out


def test_kill_9_mid_build_then_resume_equals_uninterrupted(tmp_path):
    cfg = write_config(tmp_path, n=480, chunk_size=4, kernel="grad_cos",
                       projection='kind = "factored"\ndim = 64\nseed = 4')
    wd = tmp_path / "killed"
    code = f"from indexer.build import build_index; build_index({str(cfg)!r}, {str(wd)!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = wd / "catalog.db"
    deadline = time.time() + 120
    while _committed(db) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = _committed(db)
    assert 6 <= done_before < 120, "the build must be killed mid-way"

    # the catalog is consistent: the index is not served, no file is pointed at
    cat = Catalog(wd)
    with cat.session() as s:
        row = s.query(IndexRow).one()
        assert row.status == "building" and row.path is None
        assert s.query(Example).count() == done_before * 4
    cat.close()
    with pytest.raises(FailedPrecondition, match="not built"):
        open_index(wd, "tiny")
    with pytest.raises(FailedPrecondition, match="--resume"):
        build_index(cfg, wd, progress=False)

    r = build_index(cfg, wd, resume=True, progress=False)
    assert r.chunks_resumed >= done_before and r.chunks_resumed + r.chunks_computed == 120
    ref = build_index(cfg, tmp_path / "clean", progress=False)
    a, ia = open_index(wd, "tiny", load_model=False).vectors()
    b, ib = open_index(tmp_path / "clean", "tiny", load_model=False).vectors()
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(a, b)  # bit for bit
    assert _examples(wd) == _examples(tmp_path / "clean")
    assert r.count == ref.count == 480
    assert not (wd / "builds").exists() or not any((wd / "builds").iterdir())
    leftovers = [p for p in (wd / "indexes").rglob("*") if p.is_file() and p.name != "index.faiss"]
    assert leftovers == []


def test_resume_refuses_a_changed_config(tmp_path):
    from indexer.data import ArrayDataset

    cfg = write_config(tmp_path, n=64, chunk_size=16)
    wd = tmp_path / "wd"
    z = np.load(tmp_path / "digits.npz")
    calls = []

    def flaky(X):  # the process dies while reading chunk 2 of the build (after 1 probe + 4 validation reads)
        calls.append(1)
        if len(calls) == 1 + 4 + 3:
            raise KeyboardInterrupt
        return np.asarray(X)

    with pytest.raises(KeyboardInterrupt):
        build_index(cfg, wd, dataset=ArrayDataset(z["X"], z["y"], transform=flaky), progress=False)
    cfg2 = write_config(tmp_path, n=64, chunk_size=32, fname="other.toml")
    with pytest.raises(FailedPrecondition, match="chunk_size"):
        build_index(cfg2, wd, resume=True, progress=False)
    r = build_index(cfg, wd, resume=True, progress=False)
    assert r.count == 64 and r.chunks_resumed == 2 and r.chunks_computed == 2
    build_index(cfg, tmp_path / "clean", progress=False)
    np.testing.assert_array_equal(open_index(wd, "tiny").vectors()[0], open_index(tmp_path / "clean", "tiny").vectors()[0])
