"""The catalog (SQLAlchemy 2.x): models, checkpoints, indexes, examples, builds.

The catalog records everything needed to reproduce an embedding (model fingerprint, parameter
selection, loss, projection, kernel, FAISS kind and parameters, block layout) and the metadata of
every indexed example. Every write is one transaction, so a build killed at any moment leaves the
catalog at its last committed chunk, and an index row only points at a file once that file has
been renamed into place.

Where it lives: by default the SQLite file ``catalog.db`` in the index workdir. A
``catalog_url`` (any SQLAlchemy URL: ``postgresql+psycopg://user:pw@host/db``,
``mysql+pymysql://...``, or ``sqlite:////abs/path.db``) puts it in a database that several
servers share, which is what makes stateless replicas possible (docs/server.md). SQLite gets WAL
mode, foreign keys and a busy timeout through PRAGMAs issued on SQLite connections only; server
databases get connection pre-ping (a replica survives a database restart) and nothing
SQLite-specific. Index file paths in the catalog stay relative to the workdir.

URLs carry credentials: every message and log line shows them through :func:`mask_url`
(password and secret-looking query values as ``***``), never as given.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, BigInteger, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        event, inspect, select)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

CATALOG_FILE = "catalog.db"
#: Query parameters of a URL whose values are masked like the password (libpq's ``password``,
#: ``sslpassword``, driver tokens and keys).
SECRET_QUERY = re.compile(r"pass|secret|token|key|cred|auth", re.IGNORECASE)


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


# ---- URLs ----------------------------------------------------------------------------------------
def mask_url(url: str | URL | None) -> str:
    """``url`` safe to print: password and secret-looking query values replaced by ``***``.

    An unparseable string is never echoed (it may be a password pasted in the wrong place)."""
    if url is None:
        return "<none>"
    try:
        u = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError, TypeError):
        return "<not a database URL>"
    out = u.set(query={}).render_as_string(hide_password=True)
    pairs = [(k, v) for k, vals in u.query.items() for v in (vals if isinstance(vals, tuple) else (vals,))]
    if pairs:
        out += "?" + "&".join(f"{k}={'***' if SECRET_QUERY.search(k) else v}" for k, v in pairs)
    return out


def _scrub(text: str, url: URL) -> str:
    """``text`` (e.g. a driver's error message) with the URL's secrets cut out, should it quote them."""
    secrets = [url.password] if url.password else []
    secrets += [v for k, v in url.query.items() if SECRET_QUERY.search(k) and isinstance(v, str)]
    for sec in secrets:
        if sec:
            text = text.replace(str(sec), "***")
    return text.replace(url.render_as_string(hide_password=False), mask_url(url))


def check_catalog_url(value: Any, field: str, base: str | os.PathLike | None = None) -> str:
    """Validate a ``catalog_url`` setting and return it normalized; ConfigError naming ``field`` otherwise.

    Fails closed: an empty or unparseable value, an in-memory SQLite database (each connection
    would see its own empty catalog), an unknown dialect or a missing database driver is refused
    with what to fix. A relative SQLite path is made absolute against ``base`` (the config file's
    directory) or the working directory. The returned string still carries the password: keep it
    out of logs (:func:`mask_url`).
    """
    from indexer.errors import ConfigError

    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, "must be a non-empty SQLAlchemy database URL such as "
                                 "'postgresql+psycopg://user@host/gradindex' or 'sqlite:////abs/path/catalog.db'; "
                                 "remove the setting to use the SQLite file in the workdir.")
    try:
        u = make_url(value.strip())
    except (ArgumentError, ValueError):
        raise ConfigError(field, "is not a SQLAlchemy database URL (dialect+driver://user:password@host:port/"
                                 "database, or sqlite:////abs/path.db).") from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        db = u.database or ""
        if db in ("", ":memory:") or db.startswith("file::memory:") or u.query.get("mode") == "memory":
            raise ConfigError(field, "an in-memory SQLite database is private to one connection and lost at "
                                     "exit: give a file, sqlite:////abs/path/catalog.db.")
        if not db.startswith("file:") and not os.path.isabs(db):
            u = u.set(database=str(Path(base or os.getcwd()).resolve() / db))
        return u.render_as_string(hide_password=False)
    try:
        dialect = u.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(field, f"unknown database dialect in {mask_url(u)}: use postgresql, mysql, sqlite or "
                                 "another SQLAlchemy dialect that is installed.") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise ConfigError(field, f"the database driver for {mask_url(u)} is not installed ({exc.name or exc}): "
                                 "install it (e.g. pip install 'psycopg[binary]' for postgresql+psycopg, "
                                 "pymysql for mysql+pymysql) or name an installed driver in the URL.") from None
    return u.render_as_string(hide_password=False)


def catalog_url_setting(table: dict[str, Any], prefix: str, base: str | os.PathLike | None = None) -> str | None:
    """Pop ``catalog_url`` / ``catalog_url_env`` from a config table and return the checked URL (None: not set).

    ``catalog_url_env`` names an environment variable holding the URL, so that a password need not
    be written into a config file. At most one of the two; a named variable that is unset or empty
    is an error naming the field (never a silent fall-back to the workdir's SQLite file).
    """
    from indexer.errors import ConfigError

    url, env = table.pop("catalog_url", None), table.pop("catalog_url_env", None)
    if url is not None and env is not None:
        raise ConfigError(f"{prefix}catalog_url", f"set only one of {prefix}catalog_url and {prefix}catalog_url_env.")
    if env is not None:
        if not isinstance(env, str) or not env:
            raise ConfigError(f"{prefix}catalog_url_env", "must name an environment variable.")
        url = os.environ.get(env, "").strip()
        if not url:
            raise ConfigError(f"{prefix}catalog_url_env", f"names the environment variable {env!r}, which is unset "
                                                          "or empty: export it with the database URL, or remove the "
                                                          "setting.")
        return check_catalog_url(url, f"{prefix}catalog_url_env", base)
    if url is None:
        return None
    return check_catalog_url(url, f"{prefix}catalog_url", base)


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL (plain path or ``file:`` URI filename); None for other dialects."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    db = url.database
    if db.startswith("file:"):
        db = db[len("file:"):].split("?", 1)[0]
        if db.startswith("//"):  # file://host/path: only an empty host or localhost is allowed by SQLite
            db = "/" + db[2:].split("/", 1)[1] if "/" in db[2:] else db
    return Path(db).resolve()


class Catalog:
    """The catalog of ``workdir``: its ``catalog.db`` file, or the database at ``url``; sessions via :meth:`session`.

    ``create=False`` opens an existing catalog only (NotFound when there is none, without creating
    anything: servers may run on a read-only workdir). Index files are always under ``workdir``.
    """

    def __init__(self, workdir: str | os.PathLike, create: bool = True, url: str | None = None) -> None:
        from indexer.errors import FailedPrecondition, NotFound

        self.workdir = Path(workdir).resolve()
        if url:
            url = check_catalog_url(url, "catalog_url")  # callers normally pass a checked URL; fail clearly if not
        self.url: URL = make_url(url) if url else make_url(f"sqlite:///{self.workdir / CATALOG_FILE}")
        self.where = mask_url(self.url)  # for messages: never the password
        self.dialect = self.url.get_backend_name()
        sqlite_path = _sqlite_file(self.url)
        if not create and sqlite_path is not None and not sqlite_path.exists():
            raise NotFound(f"no catalog at {sqlite_path}: build an index there first (gradindex build --workdir"
                           f"{' and index.catalog_url' if url else ''}).")
        if create:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if sqlite_path is not None:
                sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        if self.dialect == "sqlite":
            self.engine: Engine = create_engine(self.url, future=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)  # SQLite only: PRAGMAs are not SQL elsewhere
        else:
            # A shared server database: replicas keep pooled connections across database restarts.
            self.engine = create_engine(self.url, future=True, pool_pre_ping=True)
        try:
            # SQLite, creating: the first connection (its WAL switch) and the schema under the file lock.
            with self._schema_lock(sqlite_path if create else None):
                missing = self._missing_tables()
                if missing and not create and len(missing) == len(Base.metadata.tables):
                    raise NotFound(f"no catalog at {self.where}: build an index into it first (gradindex build "
                                   "with index.catalog_url).")
                if missing:  # new catalog, or one from a version without a newer table
                    self._create_schema(sqlite_path, locked=create)
        except SQLAlchemyError as exc:
            self.engine.dispose()
            cause = getattr(exc, "orig", None) or exc  # the driver's own error, without SQLAlchemy's footer
            detail = (str(cause).strip().splitlines() or [""])[0]
            raise FailedPrecondition(f"cannot open the catalog at {self.where}: "
                                     f"{_scrub(f'{type(cause).__name__}: {detail}', self.url)[:500]}") from None
        except BaseException:
            self.engine.dispose()
            raise
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    @staticmethod
    @contextlib.contextmanager
    def _schema_lock(sqlite_path: Path | None) -> Iterator[None]:
        """An exclusive flock beside a SQLite database (nothing for None). Two processes opening a new
        SQLite catalog at once race on the WAL switch and the CREATE TABLEs ("database is locked",
        "table already exists"); under the lock the second one finds the first's tables."""
        if sqlite_path is None:
            yield
            return
        with open(sqlite_path.parent / ".catalog.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _missing_tables(self) -> list[str]:
        have = set(inspect(self.engine).get_table_names())
        return [t for t in Base.metadata.tables if t not in have]

    def _create_schema(self, sqlite_path: Path | None, locked: bool) -> None:
        """CREATE the missing tables, safe against a second process doing the same at the same moment."""
        if sqlite_path is not None:
            if locked:
                Base.metadata.create_all(self.engine)
            else:
                with self._schema_lock(sqlite_path):
                    Base.metadata.create_all(self.engine)
            return
        # A server database: no shared file to lock. create_all checks first; a concurrent creator
        # can still win between check and CREATE, so one failure is retried (the retry finds the tables).
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError:
            Base.metadata.create_all(self.engine)

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


__all__ = ["Catalog", "Model", "Checkpoint", "IndexRow", "Example", "Build", "BuildChunk", "CATALOG_FILE",
           "check_catalog_url", "catalog_url_setting", "mask_url"]
