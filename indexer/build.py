"""The offline build pipeline: config → gradients → projection → kernel scaling → shards → FAISS + catalog.

Nothing is lost (issue 4, point 5):

* the data is split into fixed chunks (``build.chunk_size``); each chunk's vectors and metadata are
  written to a shard file under ``<workdir>/builds/<build id>/`` (temporary name, fsync, rename),
  then committed to the catalog in one transaction (chunk row + example rows + progress);
* a build killed at any moment (kill -9) resumes with ``resume=True`` from its committed chunks;
  chunk boundaries and the computation are deterministic, so the resumed index equals an
  uninterrupted one bit for bit (same machine and thread count);
* the FAISS file is written under a temporary name and renamed into place before the index row
  points at it; the row only becomes ``ready`` after that, so the catalog never points at a
  missing or half-written file;
* an existing index name is refused unless ``replace`` (new version, old one removed after the
  new one is ready) or ``new_version`` (old versions kept) is asked for.

The same :class:`Embedder` computes query embeddings in :mod:`indexer.query`, so a query is embedded
exactly as the training set was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select

from indexer.catalog import Build, BuildChunk, Catalog, Checkpoint, Example, IndexRow, Model
from indexer.config import BuildConfig, load_model, make_loss, parse_config
from indexer.data import ArrayDataset, Batch, IterableDataset, open_dataset, validate_arrays
from indexer.errors import ConfigError, FailedPrecondition, InvalidArgument
from indexer.projection import Projector, layout_from_json, layout_of, layout_to_json
from indexer.store import ExactSearcher, IndexSpec, VectorStore, recall_at_k
from indexer import vectorstore  # two-stage / Milvus stores (hooks marked "vectorstore hook")
from indexer.vectorstore import build_lock


@dataclass
class BuildResult:
    """What a finished build produced."""

    name: str
    version: int
    index_id: int
    count: int
    dim: int
    recall_at_10: float | None
    path: str
    seconds: float
    chunks_computed: int
    chunks_resumed: int
    compute_seconds: float = 0.0  # time in the chunk loop (gradients, projection, shards, commits)


def set_threads(n: int) -> None:
    """Pin torch, BLAS and OpenMP (FAISS) thread pools to ``n`` threads (0 = leave as is)."""
    if not n:
        return
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass
    import faiss

    faiss.omp_set_num_threads(n)


class Embedder:
    """Per-example gradient embeddings as stored in an index: engines per checkpoint → projection → concat.

    For C checkpoints with learning rates lr_c the raw embedding is [√lr_1·P g_1, …, √lr_C·P g_C]
    (TracIn as one inner-product index); with one checkpoint and lr 1 it is just P g. The exact
    squared gradient norms Σ_c lr_c‖g_c‖² (self-influence) come from the blocks, not the projection.
    """

    def __init__(self, engines: list[Any], lrs: list[float], projector: Projector | None) -> None:
        self.engines, self.lrs, self.projector = engines, [float(x) for x in lrs], projector

    @classmethod
    def from_config(cls, cfg: BuildConfig, layout: list | None = None) -> "Embedder":
        """Load the model (once per checkpoint) and make the engines; the projector needs the layout."""
        from indexer.engine import make_engine

        loss = make_loss(cfg.model)
        engines = []
        for ck in cfg.checkpoints:
            w = ck["weights"]
            model = load_model(cfg.model, w) if w else load_model(cfg.model)
            engines.append(make_engine(model, loss, task=cfg.model["task"], params=cfg.model.get("params"),
                                       framework=cfg.model["framework"], chunk_size=cfg.build.get("chunk_size", 256)))
        emb = cls(engines, [ck["learning_rate"] for ck in cfg.checkpoints], None)
        if layout is not None:
            emb.projector = Projector(cfg.projection, layout_from_json(layout))
        return emb

    def layout_for(self, cfg: BuildConfig, X: np.ndarray, Y: np.ndarray | None) -> list[dict[str, Any]]:
        """Gradient block layout from a dry run on a couple of examples (also sets the projector)."""
        eng = self.engines[0]
        _, blocks = next(eng.iter_blocks(X, Y, chunk_size=len(X)))
        lay = layout_of(blocks, eng.offsets())
        self.projector = Projector(cfg.projection, lay)
        return layout_to_json(lay)

    @property
    def dim(self) -> int:
        return self.projector.dim * len(self.engines)

    def fingerprint(self) -> str:
        """Fingerprint of the weights queries are checked against (the last checkpoint's)."""
        return self.engines[-1].fingerprint()

    def raw(self, X: Any, Y: Any = None, norms: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(embeddings (n, dim) float32, self-influence Σ lr‖g‖² (n,), gradient norm of the last checkpoint (n,)).

        ``norms=False`` (the query path) skips the exact norms, which for conv layers under a
        sketch projection means forming gradients the projection itself never forms; the two
        norm outputs are then None.
        """
        parts, selfinf, last_sq = [], None, None
        for eng, lr in zip(self.engines, self.lrs):
            rows, sqs = [], []
            for _, blocks in eng.iter_blocks(X, Y):
                V, sq = self.projector.project_with_norms(blocks, norms=norms)
                rows.append(V)
                sqs.append(sq)
            V = np.concatenate(rows)
            if lr != 1.0:
                V *= np.float32(math.sqrt(lr))
            parts.append(V)
            if norms:
                sq = np.concatenate(sqs)
                selfinf = lr * sq if selfinf is None else selfinf + lr * sq
                last_sq = sq
        V = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return V, selfinf, None if last_sq is None else np.sqrt(last_sq)


def _shard_path(chunk_dir: Path, c: int) -> Path:
    return chunk_dir / f"chunk-{c:07d}.npz"


def write_shard(path: Path, **arrays: Any) -> None:
    """Write a shard atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def compute_chunk(emb: Embedder, kernel: str, batch: Batch, c: int, start: int, chunk_dir: Path) -> Path:
    """Embed one chunk and write its shard (vectors + metadata). Pure function of the chunk's data."""
    from indexer.kernels import scale_train

    V, selfinf, gnorm = emb.raw(batch.X, batch.Y)
    S = scale_train(V, kernel)
    n = len(S)
    labels = np.asarray(["" if batch.Y is None else str(v) for v in (batch.Y if batch.Y is not None else [None] * n)])
    path = _shard_path(chunk_dir, c)
    write_shard(path, vectors=S, self_influence=selfinf.astype(np.float64), grad_norm=gnorm.astype(np.float64),
                row_ids=np.arange(start, start + n, dtype=np.int64), labels=labels,
                has_labels=np.asarray(batch.Y is not None),
                ids=np.asarray(batch.ids if batch.ids is not None else [str(start + i) for i in range(n)]),
                refs=np.asarray([r or "" for r in (batch.payload_refs or [None] * n)]),
                split=np.asarray(batch.split or ""), source=np.asarray(batch.source or ""))
    return path


def commit_chunk(cat: Catalog, build_id: int, index_id: int, c: int, path: Path) -> int:
    """Record a written shard in one transaction: chunk row, example rows, progress. Returns its rows."""
    z = np.load(path)
    n = len(z["row_ids"])
    split, source = str(z["split"]) or None, str(z["source"]) or None
    has_labels = bool(z["has_labels"])
    rows = [{"index_id": index_id, "row_id": int(r), "external_id": str(e), "label": str(lb) if has_labels else None,
             "split": split, "source": source, "payload_ref": str(ref) or None, "grad_norm": float(g),
             "self_influence": float(si)}
            for r, e, lb, ref, g, si in zip(z["row_ids"], z["ids"], z["labels"], z["refs"], z["grad_norm"],
                                            z["self_influence"])]
    with cat.session() as s, s.begin():
        if s.get(BuildChunk, (build_id, c)) is not None:
            return n
        s.execute(delete(Example).where(Example.index_id == index_id, Example.row_id.in_([r["row_id"] for r in rows])))
        if rows:
            s.execute(insert(Example), rows)
        s.add(BuildChunk(build_id=build_id, chunk=c, rows=n, file=path.name))
        b = s.get(Build, build_id)
        b.rows_done = (b.rows_done or 0) + n
    return n


def _progress(total: int | None, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="ex", desc=desc, disable=not enabled, smoothing=0.1)


def _config_key(cfg: BuildConfig, fingerprint: str) -> dict[str, Any]:
    """What must be identical for a resume to continue an interrupted build."""
    return {"projection": cfg.projection.to_dict(), "kernel": cfg.kernel, "faiss": cfg.faiss.kind,
            "chunk_size": cfg.build["chunk_size"], "data": {k: cfg.data.get(k) for k in sorted(cfg.data)},
            "params": cfg.model.get("params"), "loss": cfg.model["loss"], "fingerprint": fingerprint,
            "checkpoints": cfg.checkpoints}


def build_index(config: str | Path | dict[str, Any] | BuildConfig, workdir: str | Path,
                dataset: Iterable[Any] | ArrayDataset | IterableDataset | None = None, *, resume: bool = False,
                replace: bool = False, new_version: bool = False, engine: str = "local", progress: bool = True,
                base_dir: str | Path | None = None, ray_address: str | None = None) -> BuildResult:
    """Build (or resume) the index a config describes into ``workdir``; return a :class:`BuildResult`.

    ``dataset`` overrides ``[data]`` with Python data: an :class:`ArrayDataset`, or any iterable of
    ``(X, Y)`` batches / dicts (re-iterable for resume). ``engine='ray'`` computes chunks on Ray
    (``ray_address`` or a local cluster). Raises ConfigError (bad config/data, before any work) or
    FailedPrecondition (name exists, interrupted build present, resume with a different config).
    """
    t0 = time.perf_counter()
    cfg = config if isinstance(config, BuildConfig) else parse_config(config, base_dir)
    if engine not in ("local", "ray"):
        raise InvalidArgument(f"engine must be 'local' or 'ray', got {engine!r}.")
    set_threads(cfg.build.get("threads", 0))
    cat = Catalog(workdir)
    try:
        with build_lock(cat.workdir, cfg.name):  # vectorstore hook: one build per index name at a time
            return _build(cfg, cat, dataset, resume, replace, new_version, engine, progress, ray_address, t0)
    finally:
        cat.close()


def _open_data(cfg: BuildConfig, dataset: Any) -> ArrayDataset | IterableDataset:
    if dataset is None:
        return open_dataset(cfg.data, cfg.model["task"], cfg.model.get("class_names"))
    if isinstance(dataset, (ArrayDataset, IterableDataset)):
        return dataset
    if isinstance(dataset, tuple) and len(dataset) == 2:
        return ArrayDataset(np.asarray(dataset[0]), None if dataset[1] is None else np.asarray(dataset[1]))
    return IterableDataset(dataset)


def _validate(cfg: BuildConfig, emb: Embedder, ds: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Dry forward on two examples, then scan the data; returns the probe batch for the layout."""
    cs = cfg.build["chunk_size"]
    try:
        _, probe = next(iter(ds.iter_batches(2)))
    except StopIteration:
        raise ConfigError("data.path", "the dataset is empty.") from None
    X = probe.X
    try:
        out = np.asarray(emb.engines[0].predict(X))
    except Exception as exc:  # noqa: BLE001 - report the model's complaint against the data field
        raise ConfigError("data.x", f"the model rejects inputs of shape {getattr(X, 'shape', None)} "
                                    f"(dtype {getattr(X, 'dtype', None)}): {exc}") from exc
    task = cfg.model["task"]
    n_classes = None
    if task == "classification":
        n_classes = 2 if out.ndim == 1 or out.shape[-1] == 1 else int(out.shape[-1])
        cn = cfg.model.get("class_names")
        if cn is not None and len(cn) != n_classes:
            raise ConfigError("model.class_names", f"{len(cn)} names for a model with {n_classes} outputs.")
    if task == "regression" and probe.Y is None:
        raise ConfigError("data.y", "task 'regression' needs targets in the data.")
    validate_arrays(ds, cs, n_classes, task)
    return X, probe.Y


def _build(cfg: BuildConfig, cat: Catalog, dataset: Any, resume: bool, replace: bool, new_version: bool,
           engine: str, progress: bool, ray_address: str | None, t0: float) -> BuildResult:
    ds = _open_data(cfg, dataset)
    emb = Embedder.from_config(cfg)
    Xp, Yp = _validate(cfg, emb, ds)
    fp = emb.fingerprint()
    key = _config_key(cfg, fp)
    name = cfg.name
    cs = cfg.build["chunk_size"]

    with cat.session() as s, s.begin():
        ready = cat.index(s, name)
        pending = s.scalars(select(IndexRow).where(IndexRow.name == name, IndexRow.status == "building")
                            .order_by(IndexRow.version.desc())).first()
        if pending is not None and not resume and not replace:
            raise FailedPrecondition(f"an interrupted build of index {name!r} exists: pass --resume to continue it "
                                     "or --replace to start over.")
        if pending is not None and resume and pending.config.get("key") != json.loads(json.dumps(key)):
            old, new = pending.config.get("key", {}), json.loads(json.dumps(key))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise FailedPrecondition(f"cannot resume {name!r}: the config or model changed ({', '.join(diff)}); "
                                     "pass --replace to start over.")
        if ready is not None and pending is None and not (replace or new_version):
            if resume:
                raise FailedPrecondition(f"index {name!r} (version {ready.version}) is already built; nothing to "
                                         "resume. Pass --replace to rebuild it.")
            raise FailedPrecondition(f"index {name!r} already exists (version {ready.version}): pass --replace to "
                                     "rebuild it or --new-version to add a version.")
        if pending is not None and not resume:  # replace: discard the interrupted build
            _drop_index(cat, s, pending)
            pending = None
        model_row = s.scalars(select(Model).where(Model.name == cfg.model["name"])).first()
        if model_row is None:
            model_row = Model(name=cfg.model["name"])
            s.add(model_row)
        model_row.framework, model_row.fingerprint = cfg.model["framework"], fp
        model_row.task, model_row.loss = cfg.model["task"], cfg.model["loss"]
        model_row.class_names, model_row.spec = cfg.model.get("class_names"), cfg.model
        model_row.checkpoints.clear()
        s.flush()
        for i, (ck, e) in enumerate(zip(cfg.checkpoints, emb.engines)):
            model_row.checkpoints.append(Checkpoint(ordinal=i, path=str(ck["weights"]), fingerprint=e.fingerprint(),
                                                    learning_rate=ck["learning_rate"]))
        if pending is None:
            layout = emb.layout_for(cfg, Xp, Yp)
            version = (s.scalar(select(func.max(IndexRow.version)).where(IndexRow.name == name)) or 0) + 1
            row = IndexRow(name=name, version=version, model=model_row, kernel=cfg.kernel,
                           params=cfg.model.get("params"), loss=cfg.model["loss"], projection=cfg.projection.to_dict(),
                           layout=layout, faiss_kind=cfg.faiss.kind, faiss_params=cfg.faiss.to_dict(),
                           dim=emb.dim, status="building", fingerprint=fp,
                           config={"build": cfg.to_json(), "key": json.loads(json.dumps(key)),
                                   "replace": bool(replace),
                                   "input_shape": [int(v) for v in np.asarray(Xp).shape[1:]]})
            s.add(row)
            s.flush()
            n_total = len(ds) if isinstance(ds, ArrayDataset) else (ds.n or 0)
            b = Build(index_id=row.id, status="running", rows_total=n_total, chunk_size=cs,
                      n_chunks=ds.n_chunks(cs) or 0, engine=engine, chunk_dir="")
            s.add(b)
            s.flush()
            b.chunk_dir = str(Path("builds") / f"{b.id}")
        else:
            row = pending
            emb.projector = Projector(cfg.projection, layout_from_json(row.layout))
            b = s.scalars(select(Build).where(Build.index_id == row.id).order_by(Build.id.desc())).first()
            b.status, b.error, b.engine = "running", None, engine
        index_id, build_id, version = row.id, b.id, row.version
        chunk_dir = cat.workdir / b.chunk_dir
        replace_flag = bool(row.config.get("replace")) or replace
    chunk_dir.mkdir(parents=True, exist_ok=True)

    with cat.session() as s:
        done = {c for (c,) in s.execute(select(BuildChunk.chunk).where(BuildChunk.build_id == build_id))}
        rows_done = s.get(Build, build_id).rows_done
    t_compute = time.perf_counter()
    try:
        if engine == "ray":
            from indexer.ray_build import ray_compute

            computed = ray_compute(cfg, cat, build_id, index_id, chunk_dir, ds, done, progress, ray_address)
        else:
            computed = 0
            total = len(ds) if isinstance(ds, ArrayDataset) else ds.n
            with _progress(total, rows_done, progress, f"build {name}") as bar:
                for c, batch in ds.iter_batches(cs, skip=done):
                    path = compute_chunk(emb, cfg.kernel, batch, c, c * cs, chunk_dir)
                    bar.update(commit_chunk(cat, build_id, index_id, c, path))
                    computed += 1
        t_compute = time.perf_counter() - t_compute
        result = _finalize(cfg, cat, index_id, build_id, chunk_dir, replace_flag)
    except BaseException as exc:
        with cat.session() as s, s.begin():
            bb = s.get(Build, build_id)
            if bb is not None:
                bb.status, bb.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    return BuildResult(name, version, index_id, result[0], emb.dim, result[1], result[2], time.perf_counter() - t0,
                       computed, len(done), t_compute)


def _drop_index(cat: Catalog, s: Any, row: IndexRow) -> None:
    """Delete an index row with its examples, builds, shards and file (inside the caller's transaction)."""
    for b in s.scalars(select(Build).where(Build.index_id == row.id)):
        shutil.rmtree(cat.workdir / b.chunk_dir, ignore_errors=True)
        s.execute(delete(BuildChunk).where(BuildChunk.build_id == b.id))
        s.delete(b)
    s.execute(delete(Example).where(Example.index_id == row.id))
    vectorstore.drop_store(cat.workdir, row.path, row.faiss_params, row.name, row.version)  # vectorstore hook
    if row.path:
        shutil.rmtree((cat.workdir / row.path).parent, ignore_errors=True)
    s.delete(row)


def iter_shards(chunk_dir: Path, chunks: Sequence[int]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(vectors, row ids) of each committed shard, in chunk order."""
    for c in chunks:
        z = np.load(_shard_path(chunk_dir, c))
        yield z["vectors"], z["row_ids"]


def _finalize(cfg: BuildConfig, cat: Catalog, index_id: int, build_id: int, chunk_dir: Path,
              replace: bool) -> tuple[int, float | None, str]:
    """Merge the shards into the FAISS index (atomic), measure recall, flip the catalog to ready."""
    with cat.session() as s:
        row = s.get(IndexRow, index_id)
        b = s.get(Build, build_id)
        chunks = sorted(c for (c,) in s.execute(select(BuildChunk.chunk).where(BuildChunk.build_id == build_id)))
        n = int(sum(r for (r,) in s.execute(select(BuildChunk.rows).where(BuildChunk.build_id == build_id))))
        if b.n_chunks and len(chunks) != b.n_chunks:
            raise FailedPrecondition(f"build {build_id} has {len(chunks)} of {b.n_chunks} chunks committed.")
        name, version, kernel, dim = row.name, row.version, row.kernel, row.dim
    spec = IndexSpec.from_dict(cfg.faiss.to_dict())
    if vectorstore.handles(spec):  # vectorstore hook: two-stage FAISS / Milvus stores stream the shards
        rel, recall, spec = vectorstore.build_store(spec, kernel, dim, n, lambda: iter_shards(chunk_dir, chunks),
                                                    cat.workdir, name, version, cfg.build.get("recall_sample", 200))
    else:
        rel, recall = _build_faiss_file(cfg, cat, spec, kernel, dim, n, chunk_dir, chunks, name, version)
    old_dirs = []
    with cat.session() as s, s.begin():
        row = s.get(IndexRow, index_id)
        row.path, row.count, row.recall_at_10, row.status = str(rel), n, recall, "ready"
        row.faiss_params = spec.to_dict()
        b = s.get(Build, build_id)
        b.status, b.finished = "done", __import__("datetime").datetime.utcnow()
        if replace:
            for old in s.scalars(select(IndexRow).where(IndexRow.name == name, IndexRow.id != index_id)):
                if old.path:
                    old_dirs.append((cat.workdir / old.path).parent)
                _drop_index(cat, s, old)
    for d in old_dirs:
        shutil.rmtree(d, ignore_errors=True)
    if not cfg.build.get("keep_shards"):
        shutil.rmtree(chunk_dir, ignore_errors=True)
    return n, recall, str(rel)


def _build_faiss_file(cfg: BuildConfig, cat: Catalog, spec: IndexSpec, kernel: str, dim: int, n: int,
                      chunk_dir: Path, chunks: Sequence[int], name: str, version: int) -> tuple[Path, float | None]:
    """The single FAISS file of the flat and single-stage approximate kinds (merged in memory)."""
    if spec.augmented(kernel):
        spec.max_norm = float(max((np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64)).max(initial=0.0)
                                   for V, _ in iter_shards(chunk_dir, chunks)), default=0.0)) * (1 + 1e-6)
    store = VectorStore.create(spec, dim, kernel, n)
    if store.needs_training:
        need = max(spec.nlist * 39, 2048)
        sample, got = [], 0
        for V, _ in iter_shards(chunk_dir, chunks):
            sample.append(V)
            got += len(V)
            if got >= need:
                break
        store.train(np.concatenate(sample))
    for V, ids in iter_shards(chunk_dir, chunks):
        store.add(V, ids)
    recall = _measure_recall(store, chunk_dir, chunks, n, cfg.build.get("recall_sample", 200))
    rel = Path("indexes") / name / f"v{version}" / "index.faiss"
    store.save(cat.workdir / rel)
    return rel, recall


def _measure_recall(store: VectorStore, chunk_dir: Path, chunks: Sequence[int], n: int, sample: int) -> float | None:
    """recall@10 of the index's own search against brute force over the shards, on a seeded sample of rows."""
    if sample <= 0 or n == 0:
        return None
    k = min(10, n)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    Q, pos = [], 0
    for V, ids in iter_shards(chunk_dir, chunks):
        sel = pick[(pick >= pos) & (pick < pos + len(V))] - pos
        Q.append(V[sel])
        pos += len(V)
    Q = np.concatenate(Q)
    best_s = np.full((len(Q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(Q), 0), np.int64)
    for V, ids in iter_shards(chunk_dir, chunks):  # exact top-k, merged shard by shard
        s_, i_ = ExactSearcher(V, ids).search(Q, k)
        best_s, best_i = np.hstack([best_s, s_]), np.hstack([best_i, i_])
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    _, approx = store.search(Q, k, use_faiss=True)
    return recall_at_k(approx, best_i, k)


__all__ = ["build_index", "BuildResult", "Embedder", "compute_chunk", "commit_chunk", "set_threads", "iter_shards"]
