"""--engine ray on a local Ray cluster (ray.init(num_cpus=2)): the index equals the local engine's."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.build import build_index
from indexer.catalog import Catalog, Example
from indexer.query import open_index
from test_build_support import write_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _examples(wd):
    cat = Catalog(wd)
    with cat.session() as s:
        out = [(e.row_id, e.external_id, e.label, e.self_influence) for e in s.query(Example).order_by(Example.row_id)]
    cat.close()
    return out


def test_ray_engine_equals_local(ray_cluster, tmp_path):
    cfg = write_config(tmp_path, n=120, chunk_size=20, kernel="grad_cos", projection='kind = "factored"\ndim = 64')
    local = build_index(cfg, tmp_path / "local", progress=False)
    dist = build_index(cfg, tmp_path / "ray", engine="ray", progress=False)
    assert dist.chunks_computed == 6 and dist.count == local.count == 120
    a, ia = open_index(tmp_path / "local", "tiny", load_model=False).vectors()
    b, ib = open_index(tmp_path / "ray", "tiny", load_model=False).vectors()
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(a, b)
    assert _examples(tmp_path / "local") == _examples(tmp_path / "ray")
