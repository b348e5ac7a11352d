"""Bad configs and bad data fail before any work, with a message naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.build import build_index
from indexer.catalog import Catalog, IndexRow
from indexer.errors import ConfigError
from test_build_support import digits8, write_config


def _no_work(wd):
    cat = Catalog(wd)
    with cat.session() as s:
        assert s.query(IndexRow).count() == 0
    cat.close()
    assert not (wd / "builds").exists() and not (wd / "indexes").exists()


def _npz(tmp, X, y):
    np.savez(tmp / "bad.npz", X=X, y=y)
    return '[data]\npath = "bad.npz"\n'


@pytest.mark.parametrize("case,field", [
    ("missing_data", "data.path"), ("missing_weights", "model.weights"), ("unknown_loss", "model.loss"),
    ("label_range", "data.y"), ("nan", "data.x"), ("shape", "data.x"), ("typo_key", "index.kernal"),
    ("kernel", "index.kernel"), ("proj_dim", "projection"), ("refused_mips", "index.faiss"),
    ("class_names", "model.class_names"), ("entry", "model.entry"), ("task", "model.task"),
    ("chunk", "build.chunk_size"), ("bad_toml", "config"), ("lr", "model.checkpoints[0].learning_rate"),
])
def test_bad_config_fails_before_work_naming_the_field(tmp_path, case, field):
    X, y = digits8(40)
    kw = {}
    if case == "missing_data":
        kw["data"] = '[data]\npath = "nowhere.npz"\n'
    elif case == "missing_weights":
        kw["model"] = '[model]\nname = "m"\nentry = "model.py:build_model"\nweights = "gone.pt"\n'
    elif case == "unknown_loss":
        kw["model"] = '[model]\nname = "m"\nentry = "model.py:build_model"\nweights = "weights.pt"\nloss = "hinge2"\n'
    elif case == "label_range":
        y = y.copy()
        y[17] = 10
        kw["data"] = _npz(tmp_path, X, y)
    elif case == "nan":
        X = X.copy()
        X[23, 0, 3, 3] = np.nan
        kw["data"] = _npz(tmp_path, X, y)
    elif case == "shape":
        kw["data"] = _npz(tmp_path, np.zeros((40, 1, 9, 9), np.float32), y)
    elif case == "typo_key":
        kw["extra_index"] = 'kernal = "grad_cos"'
    elif case == "kernel":
        kw["kernel"] = "grad_sin"
    elif case == "proj_dim":
        kw["projection"] = 'kind = "dense"\ndim = -3'
    elif case == "refused_mips":
        kw["faiss"], kw["extra_index"] = "hnsw", 'mips = "refuse"'
    elif case == "class_names":
        kw["extra_model"] = 'class_names = ["a", "b"]'
    elif case == "entry":
        kw["model"] = '[model]\nname = "m"\nentry = "model.py:no_such_factory"\nweights = "weights.pt"\n'
    elif case == "task":
        kw["extra_model"] = 'task = "ranking"'
    elif case == "chunk":
        pass
    elif case == "lr":
        kw["extra_model"] = '[[model.checkpoints]]\nweights = "weights.pt"\nlearning_rate = -1.0'
    cfg = write_config(tmp_path, n=40, **kw)
    if case == "chunk":
        cfg.write_text(cfg.read_text().replace("chunk_size = 64", "chunk_size = 0"))
    if case == "bad_toml":
        cfg.write_text(cfg.read_text() + "\n[index\n")
    with pytest.raises(ConfigError) as ei:
        build_index(cfg, tmp_path / "wd", progress=False)
    assert ei.value.field == field, str(ei.value)
    assert str(ei.value).startswith(field)
    _no_work(tmp_path / "wd")
