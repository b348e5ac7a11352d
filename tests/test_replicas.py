"""Stateless replicas: two real gRPC servers on loopback answer the same index from a shared catalog.

One replica runs in the test process, the other is ``gradindex serve --config server.toml`` in its
own process. The catalog lives in a SQLite file outside the index workdir, reached through
``catalog_url`` (``sqlite:///...``: the same code path as a PostgreSQL/MySQL URL). Two indexes of the same digits
data are served: one with its vectors in the FAISS workdir (both servers read the same files, and
write nothing there), one with its vectors in Milvus reached by URI: a Milvus Lite gRPC server
started as its own process (``python -m milvus_lite server``), which is how a Milvus cluster is
reached. A Milvus Lite *file* cannot be shared: a second process opening it fails with
``DataDirLockedError`` (the file is locked by the first), so replicas need a Milvus server.

Both replicas must return identical FindSimilar answers (ids and scores, most and least similar)
and GetExamples payloads, equal to brute force over the stored vectors; a new index version built
into the shared catalog is served by both after ReloadIndex.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.demo import load_digits_28
from indexer.query import list_indexes, open_index
from server.app import GradIndexServer
from server.client import GradIndexClient
from server.config import ServerConfig
from server.demo import ensure_digits_index

N = 200
REPO = Path(__file__).resolve().parent.parent
PASSWORD = "s3cr3t-pw"  # in the Milvus URI: must never come back in a reply


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_milvus(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """A Milvus Lite gRPC server in its own process; returns it and its URI once it answers."""
    from pymilvus import MilvusClient

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus_lite server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            MilvusClient(uri=uri, timeout=2).close()
            return proc, uri
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.5)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("replicas")
    wd, shared = root / "workdir", root / "shared"
    shared.mkdir()
    url = f"sqlite:///{shared / 'catalog.db'}"
    milvus, muri = _start_milvus(root / "milvus-data")
    servers, clients, proc = [], [], None
    try:
        cluster_uri = muri.replace("http://", f"http://root:{PASSWORD}@")
        ensure_digits_index(wd, "digits", n=N, progress=False, overrides={"index": {"catalog_url": url}})
        ensure_digits_index(wd, "digits_mv", n=N, progress=False, overrides={
            "index": {"catalog_url": url, "backend": "milvus", "milvus_uri": cluster_uri}})
        assert not (wd / "catalog.db").exists()  # the catalog went to the URL, not into the workdir
        before = _files(wd)
        # replica 1: in this process; replica 2: `gradindex serve --config` in its own process, the
        # catalog URL from the environment variable its server.toml names
        srv = GradIndexServer(ServerConfig(workdir=str(wd), catalog_url=url, port=0, log_level="WARNING",
                                           reload_without_admin_token=True)).start()
        servers.append(srv)
        clients.append(GradIndexClient(f"127.0.0.1:{srv.port}", timeout=60))
        port = _free_port()
        toml = root / "server.toml"
        toml.write_text(f'workdir = "{wd}"\ncatalog_url_env = "GI_REPLICA_CATALOG"\nport = {port}\n'
                        'log_level = "WARNING"\nreload_without_admin_token = true\ngrace_s = 1\n')
        env = {**os.environ, "GI_REPLICA_CATALOG": url,
               "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(toml)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        clients.append(GradIndexClient(f"127.0.0.1:{port}", timeout=60))
        try:
            clients[-1].wait_ready(timeout=300)
        except Exception:
            proc.kill()
            raise RuntimeError(f"gradindex serve did not start: {proc.communicate()[1].decode()[-3000:]}") from None
        X, y = load_digits_28()
        yield {"wd": wd, "url": url, "clients": clients, "X": X[:N], "Xq": X[-8:], "yq": y[-8:], "before": before,
               "root": root}
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.stop(0)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        milvus.terminate()
        try:
            milvus.wait(20)
        except subprocess.TimeoutExpired:
            milvus.kill()


def _brute_force(wd: Path, url: str, Xq: np.ndarray, yq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by a plain matrix product over the FAISS index's stored vectors (in-process)."""
    idx = open_index(wd, "digits", catalog_url=url)
    try:
        Q = idx.embed(Xq, yq)
        V, ids = idx.vectors()
        S = Q @ np.asarray(V).T
        order = np.argsort(-S, axis=1, kind="stable")[:, :k]
        return ids[order], np.take_along_axis(S, order, 1)
    finally:
        idx.close()


@pytest.mark.parametrize("index", ["digits", "digits_mv"])
def test_two_replicas_answer_identically_and_exactly(replicas, index):
    a, b = replicas["clients"]
    Xq, yq, k = replicas["Xq"], replicas["yq"], 10
    ra = a.find_similar(index, Xq, yq, k=k, direction="both")
    rb = b.find_similar(index, Xq, yq, k=k, direction="both")
    for side in ("most", "least"):
        np.testing.assert_array_equal(getattr(ra, side).ids, getattr(rb, side).ids)
        np.testing.assert_array_equal(getattr(ra, side).scores, getattr(rb, side).scores)
    ids, scores = _brute_force(replicas["wd"], replicas["url"], Xq, yq, k)
    np.testing.assert_array_equal(ra.most.ids, ids)
    np.testing.assert_allclose(ra.most.scores, scores, rtol=1e-5, atol=1e-6)
    # GetExamples: same records and stored examples from both, equal to the data the index was built from
    want = np.unique(np.concatenate([ra.most.ids.ravel(), ra.least.ids.ravel()]))
    ea = a.get_examples(index, want.tolist(), include_data=True)
    eb = b.get_examples(index, want.tolist(), include_data=True)
    assert ea.keys() == eb.keys()
    for key in ea:
        if isinstance(ea[key], np.ndarray):
            np.testing.assert_array_equal(ea[key], eb[key])
        else:
            assert ea[key] == eb[key]
    np.testing.assert_array_equal(ea["ids"], want)
    np.testing.assert_array_equal(ea["data"], replicas["X"][want])
    assert ea["external_ids"] == [f"digit-{i:05d}" for i in want]


def test_servers_write_nothing_to_the_workdir_and_replies_hold_no_credentials(replicas):
    a, b = replicas["clients"]
    for c in (a, b):
        for name in ("digits", "digits_mv"):
            info = c.describe_index(name)
            assert PASSWORD not in str(info)
            assert "catalog.db" not in str(info) and str(replicas["root"]) not in str(info)
        params = dict(a.describe_index("digits_mv").details["faiss_params"])
        assert params["milvus_uri"].startswith("http://***@127.0.0.1:")
    assert _files(replicas["wd"]) == replicas["before"]  # read-only use: same files, sizes and times


def test_vectors_in_milvus_need_no_workdir_files(replicas, tmp_path):
    """With the vectors in a Milvus server, an empty workdir and the catalog URL are enough."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [d.name for d in list_indexes(empty, replicas["url"])] == ["digits", "digits_mv"]
    idx = open_index(empty, "digits_mv", catalog_url=replicas["url"])
    try:
        res = idx.find_similar(replicas["Xq"], replicas["yq"], k=10)
        ids, scores = _brute_force(replicas["wd"], replicas["url"], replicas["Xq"], replicas["yq"], 10)
        np.testing.assert_array_equal(res.ids, ids)
        np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-6)
    finally:
        idx.close()
    assert list(empty.iterdir()) == []


def test_a_new_version_is_served_by_both_after_reload(replicas):
    """Runs last (it changes the served index): build version 2 into the shared catalog, reload both."""
    from indexer.build import build_index
    from server.demo import CONFIG
    import tomllib

    a, b = replicas["clients"]
    wd, url = replicas["wd"], replicas["url"]
    raw = tomllib.loads(CONFIG.read_text())
    raw["index"].update({"name": "digits", "catalog_url": url})
    raw["data"].update({"path": str(wd / f"digits_{N}.npz"), "limit": 120})
    r = build_index(raw, wd, base_dir=CONFIG.parent, new_version=True, progress=False)
    assert (r.version, r.count) == (2, 120)
    for c in (a, b):  # still the loaded version until reloaded
        assert c.describe_index("digits").count == N
    gens = [c.reload_index("digits").generation for c in (a, b)]
    for c in (a, b):
        info = c.describe_index("digits")
        assert info.count == 120 and dict(info.details)["version"] == 2
    assert all(g > 0 for g in gens)
    Xq, yq = replicas["Xq"], replicas["yq"]
    ra, rb = (c.find_similar("digits", Xq, yq, k=10) for c in (a, b))
    np.testing.assert_array_equal(ra.most.ids, rb.most.ids)
    np.testing.assert_array_equal(ra.most.scores, rb.most.scores)
    assert ra.most.ids.max() < 120
    ids, scores = _brute_force(wd, url, Xq, yq, 10)  # brute force over version 2's stored vectors
    np.testing.assert_array_equal(ra.most.ids, ids)
    np.testing.assert_allclose(ra.most.scores, scores, rtol=1e-5, atol=1e-6)
