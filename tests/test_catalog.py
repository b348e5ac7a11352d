"""The SQLite catalog through SQLAlchemy: WAL, foreign keys, unique versions, transactions."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from indexer.catalog import Catalog, Example, IndexRow, Model
from indexer.errors import NotFound


def _index(model, name="a", version=1):
    return IndexRow(name=name, version=version, model=model, kernel="grad_dot", loss="cross_entropy",
                    projection={"kind": "none"}, faiss_kind="flat", faiss_params={}, dim=4, fingerprint="f")


def test_pragmas_and_constraints(tmp_path):
    cat = Catalog(tmp_path)
    with cat.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
    with cat.session() as s, s.begin():
        m = Model(name="m", framework="pytorch", fingerprint="f", task="classification", loss="ce", spec={})
        s.add(_index(m))
    with pytest.raises(IntegrityError):  # same name and version twice
        with cat.session() as s, s.begin():
            s.add(_index(s.query(Model).one()))
    with pytest.raises(IntegrityError):  # example of a non-existent index: foreign key enforced
        with cat.session() as s, s.begin():
            s.add(Example(index_id=999, row_id=0, grad_norm=1.0, self_influence=1.0))
    cat.close()


def test_transaction_rolls_back_as_a_whole(tmp_path):
    cat = Catalog(tmp_path)
    with cat.session() as s, s.begin():
        m = Model(name="m", framework="pytorch", fingerprint="f", task="classification", loss="ce", spec={})
        row = _index(m)
        s.add(row)
    with pytest.raises(RuntimeError):
        with cat.session() as s, s.begin():
            for i in range(5):
                s.add(Example(index_id=row.id, row_id=i, grad_norm=1.0, self_influence=float(i)))
            s.flush()
            raise RuntimeError("killed mid-transaction")
    with cat.session() as s:
        assert s.query(Example).count() == 0
        assert cat.index(s, "a") is None  # status 'building' is not served
        assert cat.index(s, "a", ready_only=False).version == 1
    cat.close()
    reopened = Catalog(tmp_path, create=False)  # persists on disk
    with reopened.session() as s:
        assert s.query(IndexRow).count() == 1
    reopened.close()


def test_missing_catalog_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no catalog"):
        Catalog(tmp_path / "nowhere", create=False)
