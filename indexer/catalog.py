"""The SQLite catalog (SQLAlchemy 2.x): models, checkpoints, indexes, examples, builds.

The catalog records everything needed to reproduce an embedding (model fingerprint, parameter
selection, loss, projection, kernel, FAISS kind and parameters, block layout) and the metadata of
every indexed example. SQLite runs in WAL mode with foreign keys on; every write is one
transaction, so a build killed at any moment leaves the catalog at its last committed chunk, and
an index row only points at a file once that file has been renamed into place.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, BigInteger, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        event, select)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

CATALOG_FILE = "catalog.db"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Model(Base):
    """A registered model: framework, weights fingerprint, task, loss, classes."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    framework: Mapped[str] = mapped_column(String(20))
    fingerprint: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(20))
    loss: Mapped[str] = mapped_column(String(200))
    class_names: Mapped[list | None] = mapped_column(JSON, nullable=True)
    spec: Mapped[dict] = mapped_column(JSON, default=dict)  # the config's [model] table (paths absolute)
    created: Mapped[dt.datetime] = mapped_column(default=_now)
    checkpoints: Mapped[list["Checkpoint"]] = relationship(back_populates="model", cascade="all, delete-orphan",
                                                           order_by="Checkpoint.ordinal")


class Checkpoint(Base):
    """One TracIn checkpoint of a model (weights path, fingerprint, learning rate)."""

    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    learning_rate: Mapped[float] = mapped_column(Float)
    model: Mapped[Model] = relationship(back_populates="checkpoints")


class IndexRow(Base):
    """An index version: what it embeds and how, where its FAISS file is, its measured recall."""

    __tablename__ = "indexes"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer, default=1)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    kernel: Mapped[str] = mapped_column(String(20))
    params: Mapped[list | None] = mapped_column(JSON, nullable=True)  # parameter selection regexes
    loss: Mapped[str] = mapped_column(String(200))
    projection: Mapped[dict] = mapped_column(JSON)
    layout: Mapped[list | None] = mapped_column(JSON, nullable=True)  # gradient blocks (projection input)
    faiss_kind: Mapped[str] = mapped_column(String(20))
    faiss_params: Mapped[dict] = mapped_column(JSON)
    dim: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    recall_at_10: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="building")  # building | ready | replaced
    path: Mapped[str | None] = mapped_column(Text, nullable=True)  # relative to the workdir; set once renamed
    fingerprint: Mapped[str] = mapped_column(String(64))  # of the model weights used (last checkpoint)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    created: Mapped[dt.datetime] = mapped_column(default=_now)
    model: Mapped[Model] = relationship()


class Example(Base):
    """One indexed training example; ``row_id`` is its FAISS id."""

    __tablename__ = "examples"
    index_id: Mapped[int] = mapped_column(ForeignKey("indexes.id", ondelete="CASCADE"), primary_key=True)
    row_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(500), nullable=True)
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    split: Mapped[str | None] = mapped_column(String(50), nullable=True)
    source: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload_ref: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON, see indexer.data.load_payload
    grad_norm: Mapped[float] = mapped_column(Float)
    self_influence: Mapped[float] = mapped_column(Float, index=True)


class Build(Base):
    """A build run of an index: status, progress, error; chunks are committed one transaction each."""

    __tablename__ = "builds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    index_id: Mapped[int] = mapped_column(ForeignKey("indexes.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | done | failed
    rows_total: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0)
    chunk_size: Mapped[int] = mapped_column(Integer)
    n_chunks: Mapped[int] = mapped_column(Integer)
    engine: Mapped[str] = mapped_column(String(20), default="local")
    chunk_dir: Mapped[str] = mapped_column(Text)
    started: Mapped[dt.datetime] = mapped_column(default=_now)
    finished: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class BuildChunk(Base):
    """A committed chunk of a build: its shard file exists and its examples are in the catalog."""

    __tablename__ = "build_chunks"
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    file: Mapped[str] = mapped_column(Text)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # first: switching to WAL waits for a concurrent opener
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class Catalog:
    """A catalog database in ``workdir`` (``catalog.db``); sessions via :meth:`session`."""

    def __init__(self, workdir: str | os.PathLike, create: bool = True) -> None:
        self.workdir = Path(workdir).resolve()
        path = self.workdir / CATALOG_FILE
        if not create and not path.exists():
            from indexer.errors import NotFound

            raise NotFound(f"no catalog at {path}: build an index there first (gradindex build --workdir).")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(f"sqlite:///{path}", future=True)
        event.listen(self.engine, "connect", _sqlite_pragmas)
        # Two processes opening a new catalog at once race on the WAL switch and the CREATE TABLEs
        # ("database is locked", "table already exists"): the first connection and the schema are
        # made under an exclusive flock beside the database.
        with open(self.workdir / ".catalog.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                Base.metadata.create_all(self.engine)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self.Session()

    def close(self) -> None:
        self.engine.dispose()

    # ---- lookups ------------------------------------------------------------------------------
    def index(self, s: Session, name: str, version: int | None = None, ready_only: bool = True) -> IndexRow | None:
        """The newest (or given) version of an index by name; ready versions only unless told."""
        q = select(IndexRow).where(IndexRow.name == name)
        if version is not None:
            q = q.where(IndexRow.version == version)
        if ready_only:
            q = q.where(IndexRow.status == "ready")
        return s.scalars(q.order_by(IndexRow.version.desc())).first()

    def ready_indexes(self, s: Session) -> list[IndexRow]:
        """The current ready version of every index name."""
        rows = s.scalars(select(IndexRow).where(IndexRow.status == "ready").order_by(IndexRow.name,
                                                                                     IndexRow.version.desc())).all()
        seen, out = set(), []
        for r in rows:
            if r.name not in seen:
                seen.add(r.name)
                out.append(r)
        return out


__all__ = ["Catalog", "Model", "Checkpoint", "IndexRow", "Example", "Build", "BuildChunk", "CATALOG_FILE"]
