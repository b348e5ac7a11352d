"""Gradient computation on Ray (``gradindex build --engine ray``): Ray Data ``map_batches`` with actors.

The dataset of *chunk numbers* still to compute is mapped by a pool of stateful actors
(:class:`ChunkWorker`): each loads the model, engines and dataset reader once, then embeds whole
chunks with exactly the code of the local build (:func:`indexer.chunks.compute_chunk`) and writes
the shard files. The driver commits each finished chunk to the catalog as results stream back, and
the usual finalize step merges the shards into the FAISS index. So the index equals the local
engine's (same chunks, same code, same thread count per actor), and an interrupted Ray build
resumes like a local one.

On a real cluster: start Ray there (``ray start --head`` / KubeRay), make the code importable on
the workers (install gradindex in their image, or a ``runtime_env``), put the config, model,
weights, data and the ``--workdir`` on storage every node mounts at the same path (NFS, EFS, a
Lustre/GPFS scratch), and run ``gradindex build CONFIG --workdir DIR --engine ray
--ray-address ray://HEAD:10001`` (or set ``RAY_ADDRESS``). Each actor takes one CPU
(``build.threads`` threads) by default; ``RAY_ACTORS`` sets the pool size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import InvalidArgument


class ChunkWorker:
    """Ray Data actor: loads the model once, then embeds the chunks it is given and writes their shards."""

    def __init__(self, cfg_json: dict[str, Any], layout: list[dict[str, Any]], chunk_dir: str) -> None:
        from indexer.chunks import set_threads
        from indexer.config import BuildConfig
        from indexer.text_data import open_build_dataset
        from indexer.embedder import Embedder

        self.cfg = BuildConfig.from_json(cfg_json)
        set_threads(self.cfg.build.get("threads") or 1)
        self.emb = Embedder.from_config(self.cfg, layout)
        self.ds = open_build_dataset(self.cfg.data, self.cfg.model["task"], self.cfg.model.get("class_names"),
                                     self.cfg.model)
        self.chunk_dir = Path(chunk_dir)
        self.cs = int(self.cfg.build["chunk_size"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from indexer.chunks import compute_chunk

        files = []
        for c in batch["chunk"]:
            c = int(c)
            b = self.ds.batch(c * self.cs, (c + 1) * self.cs)
            files.append(str(compute_chunk(self.emb, b, c, c * self.cs, self.chunk_dir)))
        return {"chunk": np.asarray(batch["chunk"], dtype=np.int64), "file": np.asarray(files)}


def ray_compute(cfg: Any, cat: Any, build_id: int, index_id: int, chunk_dir: Path, ds: Any, done: set[int],
                progress: bool, address: str | None = None, actors: int | None = None) -> int:
    """Compute the missing chunks on Ray and commit them as they finish; returns how many were computed."""
    import ray

    from indexer.catalog import Build, IndexRow
    from indexer.chunks import commit_chunk, progress as progress_bar
    from indexer.data import ArrayDataset

    if not isinstance(ds, ArrayDataset) or cfg.data.get("path") is None:
        raise InvalidArgument("engine='ray' needs a file dataset named in [data] (workers read it themselves), "
                              "not Python batches.")
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    cs = int(cfg.build["chunk_size"])
    todo = [c for c in range(ds.n_chunks(cs)) if c not in done]
    if not todo:
        return 0
    with cat.session() as s:
        layout = s.get(IndexRow, index_id).layout
    n_actors = actors or int(os.environ.get("RAY_ACTORS", 0)) or max(1, min(len(todo),
                                                                              int(ray.available_resources().get("CPU", 1))))
    rds = ray.data.from_items([{"chunk": c} for c in todo], override_num_blocks=len(todo))
    out = rds.map_batches(ChunkWorker, batch_size=1, fn_constructor_kwargs={
        "cfg_json": cfg.to_json(), "layout": layout, "chunk_dir": str(chunk_dir)},
        compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=max(1, cfg.build.get("threads") or 1))
    computed = 0
    with cat.session() as s:
        rows_done = s.get(Build, build_id).rows_done
    with progress_bar(len(ds), rows_done, progress, f"build {cfg.name} (ray)") as bar:
        for row in out.iter_rows():
            bar.update(commit_chunk(cat, build_id, index_id, int(row["chunk"]), Path(str(row["file"]))))
            computed += 1
    return computed


__all__ = ["ChunkWorker", "ray_compute"]
