"""The offline build pipeline: config → gradients → projection → kernel scaling → shards → FAISS + catalog.

Nothing is lost:

* the data is split into fixed chunks (``build.chunk_size``), each embedded and written to a shard
  file, then committed to the catalog in one transaction (:mod:`indexer.chunks`);
* a build killed at any moment (kill -9) resumes with ``resume=True`` from its committed chunks;
  chunk boundaries and the computation are deterministic, so the resumed index equals an
  uninterrupted one bit for bit (same machine and thread count);
* the FAISS file is written under a temporary name and renamed into place before the index row
  points at it; the row only becomes ``ready`` after that, so the catalog never points at a
  missing or half-written file;
* an existing index name is refused unless ``replace`` (new version, old one removed after the
  new one is ready) or ``new_version`` (old versions kept) is asked for.

Vectors come from :class:`indexer.embedder.Embedder`, the same object that embeds queries, so a
query is embedded exactly as the training set was. ``engine='ray'`` hands the chunk loop to
:mod:`indexer.ray_build`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select

from indexer.catalog import Build, BuildChunk, Catalog, Checkpoint, Example, IndexRow, Model
from indexer.chunks import commit_chunk, compute_chunk, iter_factor_shards, iter_shards, progress, set_threads
from indexer.config import BuildConfig, parse_config
from indexer.data import ArrayDataset, IterableDataset, validate_arrays
from indexer.text_data import open_build_dataset
from indexer.defaults import RECALL_SAMPLE
from indexer.embedder import Embedder, load_engines, probe_layout
from indexer.build_lock import build_lock
from indexer.errors import ConfigError, FailedPrecondition, InvalidArgument
from indexer.projection import layout_to_json
from indexer.store import ExactSearcher, IndexSpec, VectorStore, recall_at_k
from indexer import vectorstore  # two-stage / Milvus stores (hooks marked "vectorstore hook")


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


def _config_key(cfg: BuildConfig, fingerprint: str) -> dict[str, Any]:
    """What must be identical for a resume to continue an interrupted build."""
    key = {"projection": cfg.projection.to_dict(), "kernel": cfg.kernel, "faiss": cfg.faiss.kind,
           "chunk_size": cfg.build["chunk_size"], "data": {k: cfg.data.get(k) for k in sorted(cfg.data)},
           "params": cfg.model.get("params"), "loss": cfg.model["loss"], "fingerprint": fingerprint,
           "checkpoints": cfg.checkpoints}
    if cfg.faiss.exact_rerank:  # the shards then hold the exact gradient factors too
        key["exact_rerank"] = True
    return key


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
    cat = Catalog(workdir, url=cfg.catalog_url)  # index.catalog_url, else <workdir>/catalog.db
    try:
        with build_lock(cat.workdir, cfg.name):  # one build per index name at a time (--replace included)
            return _build(cfg, cat, dataset, resume, replace, new_version, engine, progress, ray_address, t0)
    finally:
        cat.close()


def _open_data(cfg: BuildConfig, dataset: Any) -> ArrayDataset | IterableDataset:
    if dataset is None:
        return open_build_dataset(cfg.data, cfg.model["task"], cfg.model.get("class_names"), cfg.model)
    if isinstance(dataset, (ArrayDataset, IterableDataset)):
        return dataset
    if isinstance(dataset, tuple) and len(dataset) == 2:
        return ArrayDataset(np.asarray(dataset[0]), None if dataset[1] is None else np.asarray(dataset[1]))
    return IterableDataset(dataset)


def _validate(cfg: BuildConfig, engine: Any, ds: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Dry forward on two examples, then scan the data; returns the probe batch for the layout."""
    cs = cfg.build["chunk_size"]
    try:
        _, probe = next(iter(ds.iter_batches(2)))
    except StopIteration:
        raise ConfigError("data.path", "the dataset is empty.") from None
    X = probe.X
    try:
        out = np.asarray(engine.predict(X))
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
           engine: str, show_progress: bool, ray_address: str | None, t0: float) -> BuildResult:
    ds = _open_data(cfg, dataset)
    engines = load_engines(cfg)
    Xp, Yp = _validate(cfg, engines[0], ds)
    fp = engines[-1].fingerprint()  # the weights queries are checked against
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
        for i, (ck, e) in enumerate(zip(cfg.checkpoints, engines)):
            model_row.checkpoints.append(Checkpoint(ordinal=i, path=str(ck["weights"]), fingerprint=e.fingerprint(),
                                                    learning_rate=ck["learning_rate"]))
        if pending is None:
            layout = layout_to_json(probe_layout(engines[0], Xp, Yp))
            emb = Embedder.from_config(cfg, layout, engines)
            version = (s.scalar(select(func.max(IndexRow.version)).where(IndexRow.name == name)) or 0) + 1
            row = IndexRow(name=name, version=version, model=model_row, kernel=cfg.kernel,
                           params=cfg.model.get("params"), loss=cfg.model["loss"], projection=cfg.projection.to_dict(),
                           layout=layout, faiss_kind=cfg.faiss.kind, faiss_params=cfg.faiss.to_dict(),
                           dim=emb.dim, status="building", fingerprint=fp,
                           config={"build": cfg.to_json(), "key": json.loads(json.dumps(key)),
                                   "replace": bool(replace),
                                   "input_shape": [int(v) for v in np.asarray(Xp).shape[1:]],
                                   **engine_rules(engines[0])})
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
            emb = Embedder.from_config(cfg, row.layout, engines)
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

            computed = ray_compute(cfg, cat, build_id, index_id, chunk_dir, ds, done, show_progress, ray_address)
        else:
            computed = 0
            total = len(ds) if isinstance(ds, ArrayDataset) else ds.n
            with progress(total, rows_done, show_progress, f"build {name}") as bar:
                for c, batch in ds.iter_batches(cs, skip=done):
                    path = compute_chunk(emb, batch, c, c * cs, chunk_dir)
                    bar.update(commit_chunk(cat, build_id, index_id, c, path))
                    computed += 1
        t_compute = time.perf_counter() - t_compute
        _record_rules(cat, index_id, emb.engines[0])
        result = _finalize(cfg, cat, index_id, build_id, chunk_dir, replace_flag)
    except BaseException as exc:
        with cat.session() as s, s.begin():
            bb = s.get(Build, build_id)
            if bb is not None:
                bb.status, bb.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    return BuildResult(name, version, index_id, result[0], emb.dim, result[1], result[2], time.perf_counter() - t0,
                       computed, len(done), t_compute)


def engine_rules(engine: Any) -> dict[str, Any]:
    """The catalog's record of how the engine computes each parameter's per-example gradient:
    ``parameter_rules`` (name -> rule, e.g. 'linear', 'embedding', 'tied', 'vmap', 'loop') and
    ``rules_verified`` (whether the engine's numeric check against one batched backward passed)."""
    return {"parameter_rules": {str(k): str(v) for k, v in engine.rules.items()},
            "rules_verified": bool(engine.verified)}


def _record_rules(cat: Catalog, index_id: int, engine: Any) -> None:
    """Refresh the recorded rules after the chunk loop when this process's engine ran the check
    (the guard may have moved a parameter to an exact fallback on the first real chunk)."""
    if not engine.verified:
        return  # e.g. a resumed or Ray build: the rules recorded when the build started stay
    with cat.session() as s, s.begin():
        row = s.get(IndexRow, index_id)
        row.config = {**row.config, **engine_rules(engine)}


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
        factors = (lambda: iter_factor_shards(chunk_dir, chunks)) if spec.exact_rerank else None
        rel, recall, spec = vectorstore.build_store(spec, kernel, dim, n, lambda: iter_shards(chunk_dir, chunks),
                                                    cat.workdir, name, version, cfg.build.get("recall_sample", 200),
                                                    factor_shards=factors)
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
    recall = _measure_recall(store, chunk_dir, chunks, n, cfg.build.get("recall_sample", RECALL_SAMPLE))
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


__all__ = ["build_index", "BuildResult", "set_threads"]
