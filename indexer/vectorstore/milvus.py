"""Milvus backend through ``pymilvus``: Milvus Lite (a local file) embedded, or a Milvus cluster by URI.

The same build and query API as the FAISS stores: the catalog (SQLite, or any SQLAlchemy URL)
keeps the metadata, Milvus keeps the vectors in one collection per index version with two fields,
``id`` (INT64 primary key = the catalog's row id) and ``vector`` (FLOAT_VECTOR). The default
Milvus index is ``FLAT`` with the inner-product metric, i.e. exact search: the same ids as the
FAISS flat index and the same scores within float32 tolerance. ``IVF_FLAT`` / ``IVF_SQ8`` / ``HNSW``
are options whose recall@10 is measured at build time; on raw inner products (grad_dot,
grad_asym_dot) they lose recall (milvus #51821), so those combinations are refused.

Connection: ``index.milvus_uri`` empty means the Milvus Lite file ``milvus.db`` in the workdir;
a relative path is relative to the workdir; ``http(s)://host:19530`` is a cluster, with the token
read from the environment variable named by ``index.milvus_token_env`` (never written to the
catalog). With a cluster, servers hold no vectors: any number of stateless replicas answer.

Builds write in batches of ``index.milvus_batch`` rows with ``upsert`` (idempotent on the primary
key) and record the rows written in ``milvus-progress.json`` after each batch; a build killed at
any moment resumes from there, and re-sending a batch that had landed cannot duplicate rows, so
the resumed collection equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import FailedPrecondition, InvalidArgument
from indexer.store import RAW_IP_KERNELS, IndexSpec
from indexer.vectorstore.base import ShardSource, check_query, iter_batches

MILVUS_INDEXES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW")
LITE_FILE = "milvus.db"
STORE_FILE = "store.json"
MAX_FILTER_IDS = 100_000  # ids per "id in [...]" filter expression; larger allowed sets are split


def resolve_uri(spec: IndexSpec, workdir: str | os.PathLike) -> str:
    """The URI pymilvus connects to: a cluster URL as given, a Lite file path made absolute."""
    uri = spec.milvus_uri or LITE_FILE
    if re.match(r"^[a-z]+://", uri):
        return uri
    p = Path(uri)
    return str(p if p.is_absolute() else Path(workdir).resolve() / p)


def connect(spec: IndexSpec, workdir: str | os.PathLike) -> Any:
    """A ``MilvusClient`` for the spec's URI (token from the environment variable it names)."""
    from pymilvus import MilvusClient

    uri = resolve_uri(spec, workdir)
    token = os.environ.get(spec.milvus_token_env or "", "") if "://" in uri else ""
    try:
        return MilvusClient(uri=uri, token=token) if token else MilvusClient(uri=uri)
    except Exception as exc:  # noqa: BLE001 - connection failures are a precondition, say where
        raise FailedPrecondition(f"cannot connect to Milvus at {uri}: {exc}") from exc


def collection_name(name: str, version: int) -> str:
    """A valid, unique Milvus collection name for an index version (letters, digits, underscores)."""
    clean = re.sub(r"[^A-Za-z0-9_]", "_", name)[:100]
    return f"gradindex_{clean}_v{int(version)}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _index_params(client: Any, spec: IndexSpec) -> Any:
    ip = client.prepare_index_params()
    params: dict[str, Any] = {}
    if spec.milvus_index.startswith("IVF"):
        params = {"nlist": int(spec.nlist or 1024)}
    elif spec.milvus_index == "HNSW":
        params = {"M": int(spec.hnsw_m), "efConstruction": int(spec.ef_construction)}
    ip.add_index(field_name="vector", index_type=spec.milvus_index, metric_type="IP", params=params)
    return ip


def check_spec(spec: IndexSpec, kernel: str) -> None:
    """Refuse Milvus settings that cannot work; say what to change."""
    if spec.milvus_index not in MILVUS_INDEXES:
        raise InvalidArgument(f"index.milvus_index {spec.milvus_index!r} is unknown: use one of "
                              f"{', '.join(MILVUS_INDEXES)}.")
    if spec.milvus_index != "FLAT" and kernel in RAW_IP_KERNELS:
        raise InvalidArgument(f"index.milvus_index={spec.milvus_index!r} with kernel={kernel!r}: approximate "
                              "indexes lose recall on raw inner products; use kernel='grad_cos' or "
                              "milvus_index='FLAT'.")


def _read_progress(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_progress(path: Path, d: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(d))
    os.replace(tmp, path)


def write_collection(spec: IndexSpec, kernel: str, dim: int, n: int, shards: ShardSource,
                     workdir: str | os.PathLike, directory: str | os.PathLike, name: str, version: int,
                     progress: bool = False) -> Path:
    """Write (or resume writing) the index version's collection from the shards; returns ``store.json``.

    Resumable: the rows already written (``milvus-progress.json`` in ``directory``, recorded after
    each acknowledged upsert) are skipped; a batch in flight at a kill is re-sent as an upsert.
    """
    from pymilvus import DataType, MilvusClient
    from tqdm import tqdm

    check_spec(spec, kernel)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    coll = collection_name(name, version)
    prog_path = directory / "milvus-progress.json"
    prog = _read_progress(prog_path)
    client = connect(spec, workdir)
    try:
        if prog.get("collection") != coll or not client.has_collection(coll):
            if client.has_collection(coll):  # a collection without our progress record: start it over
                client.drop_collection(coll)
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
            client.create_collection(coll, schema=schema, index_params=_index_params(client, spec))
            prog = {"collection": coll, "rows": 0}
            _write_progress(prog_path, prog)
        done = int(prog.get("rows", 0))
        pos = 0
        with tqdm(total=n, initial=done, unit="vec", desc=f"milvus {coll}", disable=not progress) as bar:
            for V, ids in iter_batches(shards, int(spec.milvus_batch)):
                if pos + len(V) <= done:
                    pos += len(V)
                    continue
                V32 = np.ascontiguousarray(V, dtype=np.float32)
                client.upsert(coll, [{"id": int(i), "vector": v} for i, v in zip(ids.tolist(), V32)])
                pos += len(V)
                _write_progress(prog_path, {"collection": coll, "rows": pos})
                bar.update(pos - max(done, pos - len(V)))
        client.flush(coll)
        client.load_collection(coll)
        stats = int(client.get_collection_stats(coll)["row_count"])
        if stats != n:
            raise FailedPrecondition(f"Milvus collection {coll} holds {stats} rows after the build, expected {n}.")
    finally:
        client.close()
    meta = {"backend": "milvus", "collection": coll, "count": n, "dim": dim, "uri": spec.milvus_uri,
            "milvus_index": spec.milvus_index, "kernel": kernel}
    out = directory / STORE_FILE
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    prog_path.unlink(missing_ok=True)
    return out


class MilvusStore:
    """Search an index version's Milvus collection with the FAISS stores' conventions."""

    def __init__(self, directory: str | os.PathLike, spec: IndexSpec, kernel: str, dim: int,
                 workdir: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        # meta (collection, count) from the catalog lets a server open a cluster collection without the
        # build's store.json (stateless replicas); else it is read from the index version's directory.
        meta = meta if meta is not None else json.loads((Path(directory) / STORE_FILE).read_text())
        self.spec, self.kernel, self.dim = spec, kernel, dim
        self.collection: str = meta["collection"]
        self.n = int(meta["count"])
        self.client = connect(spec, workdir)
        if not self.client.has_collection(self.collection):
            raise FailedPrecondition(f"Milvus collection {self.collection} is missing at "
                                     f"{resolve_uri(spec, workdir)}: rebuild the index with --replace.")
        self.client.load_collection(self.collection)

    @property
    def ntotal(self) -> int:
        return self.n

    def close(self) -> None:
        self.client.close()

    def _search_params(self, nprobe: int | None, ef_search: int | None, k: int) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.spec.milvus_index.startswith("IVF"):
            params = {"nprobe": int(nprobe or self.spec.nprobe)}
        elif self.spec.milvus_index == "HNSW":
            params = {"ef": int(max(ef_search or self.spec.ef_search, k))}
        return {"metric_type": "IP", "params": params}

    def search(self, Q: np.ndarray, k: int, allowed_ids: np.ndarray | None = None, use_faiss: bool | None = None,
               nprobe: int | None = None, ef_search: int | None = None,
               **_: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products (m, k) and ids (m, k) from Milvus; missing hits score -inf, id -1."""
        Q, k = check_query(Q, k, self.dim)
        m = len(Q)
        S = np.full((m, k), -np.inf, dtype=np.float32)
        I = np.full((m, k), -1, dtype=np.int64)
        if m == 0:
            return S, I
        filters = [""]
        if allowed_ids is not None:
            a = np.unique(np.asarray(allowed_ids, dtype=np.int64))
            if len(a) == 0:
                return S, I
            filters = [f"id in [{','.join(map(str, a[s:s + MAX_FILTER_IDS].tolist()))}]"
                       for s in range(0, len(a), MAX_FILTER_IDS)]
        parts = []
        for flt in filters:
            res = self.client.search(self.collection, data=[q for q in Q], limit=k, anns_field="vector",
                                     filter=flt, output_fields=["id"],
                                     search_params=self._search_params(nprobe, ef_search, k))
            s_ = np.full((m, k), -np.inf, dtype=np.float32)
            i_ = np.full((m, k), -1, dtype=np.int64)
            for r, hits in enumerate(res):
                for j, h in enumerate(hits[:k]):
                    s_[r, j], i_[r, j] = h["distance"], h["id"]
            parts.append((s_, i_))
        if len(parts) == 1:
            S, I = parts[0]
        else:
            Sa, Ia = np.hstack([p[0] for p in parts]), np.hstack([p[1] for p in parts])
            order = np.lexsort((Ia, -Sa), axis=1)[:, :k]
            S, I = np.take_along_axis(Sa, order, 1), np.take_along_axis(Ia, order, 1)
        I[~np.isfinite(S)] = -1
        return S, I

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All (vectors, ids) of the collection, ordered by id (reads the whole collection: small indexes)."""
        X = np.zeros((self.n, self.dim), np.float32)
        ids = np.zeros(self.n, np.int64)
        got = 0
        it = self.client.query_iterator(self.collection, batch_size=1000, filter="", output_fields=["id", "vector"])
        try:
            while True:
                batch = it.next()
                if not batch:
                    break
                for r in batch:
                    if got >= self.n:
                        raise FailedPrecondition(f"Milvus collection {self.collection} holds more than {self.n} rows.")
                    ids[got], X[got] = r["id"], r["vector"]
                    got += 1
        finally:
            it.close()
        order = np.argsort(ids[:got], kind="stable")
        return X[:got][order], ids[:got][order]


__all__ = ["MilvusStore", "write_collection", "connect", "collection_name", "resolve_uri", "check_spec",
           "MILVUS_INDEXES"]
