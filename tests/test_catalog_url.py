"""The catalog behind a SQLAlchemy URL: a second real SQLite file at another path, config errors that
name their field, SQLite PRAGMAs only on SQLite, and credentials masked wherever a URL is shown."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sqlalchemy import create_mock_engine, text

from indexer.build import build_index
from indexer.catalog import Base, Catalog, _sqlite_pragmas, check_catalog_url, mask_url
from indexer.config import parse_config
from indexer.errors import ConfigError, FailedPrecondition, NotFound
from indexer.query import list_indexes, open_index
from server.config import ServerConfig
from test_build_support import write_config

PG = "postgresql+psycopg://gradindex:hunter2@db.internal:5432/catalog"


def _with_index_keys(cfg_path, lines: str):
    """The test config with extra [index] keys."""
    s = cfg_path.read_text().replace("[index]\n", "[index]\n" + lines + "\n", 1)
    cfg_path.write_text(s)
    return cfg_path


def test_build_and_query_through_a_second_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'shared.db'}"
    cfg = write_config(tmp_path, n=60, chunk_size=32, kernel="grad_cos", extra_index=f'catalog_url = "{url}"')
    r = build_index(cfg, tmp_path / "wd", progress=False)
    assert not (tmp_path / "wd" / "catalog.db").exists()  # nothing in the workdir's default place
    assert (tmp_path / "elsewhere" / "shared.db").exists() and (tmp_path / "wd" / r.path).exists()
    assert list_indexes(tmp_path / "wd") == []  # the workdir file catalog does not exist
    with pytest.raises(NotFound, match="no catalog"):
        open_index(tmp_path / "wd", "tiny", load_model=False)
    assert [d.name for d in list_indexes(tmp_path / "wd", url)] == ["tiny"]
    idx = open_index(tmp_path / "wd", "tiny", catalog_url=url)
    try:
        V, ids = idx.vectors()
        res = idx.search(V[:5], 3)
        np.testing.assert_array_equal(res.ids[:, 0], ids[:5])  # each stored vector finds itself first (grad_cos)
        assert len(idx.get_examples([0, 59], payload=False)) == 2
    finally:
        idx.close()
    cat = Catalog(tmp_path / "wd", create=False, url=url)
    with cat.engine.connect() as c:  # SQLite at a URL still gets its PRAGMAs
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
    cat.close()


def test_cli_reads_the_catalog_url_from_the_environment(tmp_path, monkeypatch, capsys):
    import json

    from server.cli import main

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = write_config(tmp_path, n=30, chunk_size=32, extra_index=f'catalog_url = "{url}"')
    build_index(cfg, tmp_path / "wd", progress=False)
    monkeypatch.setenv("GI_CLI_CATALOG", url)
    capsys.readouterr()
    assert main(["self-influence", "tiny", "--top", "3", "--workdir", str(tmp_path / "wd"), "--json",
                 "--catalog-url-env", "GI_CLI_CATALOG"]) == 0
    rows = json.loads(capsys.readouterr().out)
    idx = open_index(tmp_path / "wd", "tiny", load_model=False, catalog_url=url)
    try:
        assert [r["id"] for r in rows] == [r["id"] for r in idx.self_influence_top(3)]
    finally:
        idx.close()
    assert main(["self-influence", "tiny", "--workdir", str(tmp_path / "wd")]) == 2  # no catalog.db there
    monkeypatch.delenv("GI_CLI_CATALOG")
    assert main(["self-influence", "tiny", "--workdir", str(tmp_path / "wd"), "--catalog-url-env",
                 "GI_CLI_CATALOG"]) == 2
    assert "catalog_url_env" in capsys.readouterr().err


def test_missing_catalog_at_a_url_is_not_found_and_creates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'none.db'}"
    with pytest.raises(NotFound, match="no catalog"):
        Catalog(tmp_path / "wd", create=False, url=url)
    assert not (tmp_path / "db").exists() and not (tmp_path / "wd").exists()
    assert list_indexes(tmp_path / "wd", url) == []


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_schema_on_server_databases_has_no_sqlite_statements(dialect):
    """The DDL SQLAlchemy emits for the catalog on PostgreSQL/MySQL: every table, nothing SQLite-only."""
    stmts: list[str] = []
    engine = create_mock_engine(f"{dialect}://", lambda sql, *a, **kw: stmts.append(str(sql.compile(dialect=engine.dialect))))
    Base.metadata.create_all(engine, checkfirst=False)
    ddl = "\n".join(stmts)
    for table in Base.metadata.tables:
        assert f"CREATE TABLE {table}" in ddl
    assert "PRAGMA" not in ddl.upper() and "AUTOINCREMENT" not in ddl.upper()
    if dialect == "mysql":  # MySQL needs a length on every VARCHAR
        assert "VARCHAR," not in ddl and "VARCHAR\n" not in ddl


def test_sqlite_pragmas_are_hooked_on_sqlite_only(tmp_path):
    from sqlalchemy import event

    cat = Catalog(tmp_path)
    assert cat.dialect == "sqlite" and event.contains(cat.engine, "connect", _sqlite_pragmas)
    cat.close()
    # a server database URL never reaches the PRAGMA hook: without its driver it is refused at the
    # config check, before any engine exists, with the field named and the password masked
    with pytest.raises(ConfigError) as e:
        Catalog(tmp_path, url=PG)
    assert "catalog_url" in str(e.value) and "hunter2" not in str(e.value) and "***" in str(e.value)


@pytest.mark.parametrize("value,match", [
    ("", "non-empty"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("hunter2", "not a SQLAlchemy database URL"),
    ("nosuchdb://u:hunter2@h/x", "unknown database dialect"),
    (PG, "driver"),
])
def test_bad_urls_fail_closed_naming_the_field_without_the_password(value, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_catalog_url(value, "index.catalog_url")
    assert e.value.field == "index.catalog_url" and "hunter2" not in str(e.value)


def test_build_config_catalog_url_and_env(tmp_path, monkeypatch):
    cfg = write_config(tmp_path, n=20)
    assert parse_config(cfg).catalog_url is None  # default: the workdir's SQLite file
    _with_index_keys(cfg, 'catalog_url = "sqlite:///rel/cat.db"')
    pc = parse_config(cfg)
    assert pc.catalog_url == f"sqlite:///{tmp_path / 'rel' / 'cat.db'}"  # relative to the config file
    assert "catalog_url" not in pc.to_json()["index"]  # never stored in the catalog
    _with_index_keys(cfg, 'catalog_url_env = "GI_TEST_CATALOG"')
    with pytest.raises(ConfigError, match="set only one") as e:
        parse_config(cfg)
    assert e.value.field == "index.catalog_url"
    (tmp_path / "b").mkdir()
    cfg2 = write_config(tmp_path / "b", n=20, extra_index='catalog_url_env = "GI_TEST_CATALOG"')
    monkeypatch.delenv("GI_TEST_CATALOG", raising=False)
    with pytest.raises(ConfigError, match="unset or empty") as e:
        parse_config(cfg2)
    assert e.value.field == "index.catalog_url_env"
    monkeypatch.setenv("GI_TEST_CATALOG", f"sqlite:///{tmp_path / 'env.db'}")
    assert parse_config(cfg2).catalog_url == f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("GI_TEST_CATALOG", "sqlite://")
    with pytest.raises(ConfigError, match="in-memory") as e:
        parse_config(cfg2)
    assert e.value.field == "index.catalog_url_env"
    monkeypatch.setenv("GI_TEST_CATALOG", PG)
    with pytest.raises(ConfigError) as e:
        parse_config(cfg2)
    assert e.value.field == "index.catalog_url_env" and "hunter2" not in str(e.value)


def test_server_config_catalog_url(tmp_path, monkeypatch):
    toml = tmp_path / "server.toml"
    toml.write_text('workdir = "wd"\ncatalog_url = "sqlite:///cat/shared.db"\n')
    cfg = ServerConfig.from_toml(toml)
    assert cfg.catalog_url == f"sqlite:///{tmp_path / 'cat' / 'shared.db'}"
    toml.write_text('catalog_url_env = "GI_TEST_SERVER_CATALOG"\n')
    monkeypatch.delenv("GI_TEST_SERVER_CATALOG", raising=False)
    with pytest.raises(ValueError, match="catalog_url_env"):
        ServerConfig.from_toml(toml)
    monkeypatch.setenv("GI_TEST_SERVER_CATALOG", PG)
    with pytest.raises(ValueError) as e:  # no driver: refused at start, password masked
        ServerConfig.from_toml(toml)
    assert "catalog_url" in str(e.value) and "hunter2" not in str(e.value)
    toml.write_text('catalog_url = "sqlite://"\n')
    with pytest.raises(ValueError, match="catalog_url: an in-memory"):
        ServerConfig.from_toml(toml)
    assert "hunter2" not in repr(ServerConfig(catalog_url=f"sqlite:///{tmp_path}/x.db?password=hunter2"))


def test_mask_url():
    assert mask_url(PG) == "postgresql+psycopg://gradindex:***@db.internal:5432/catalog"
    masked = mask_url("mysql+pymysql://u@h/db?ssl_key=/k.pem&charset=utf8mb4&password=hunter2")
    assert "hunter2" not in masked and "charset=utf8mb4" in masked
    assert mask_url("hunter2") == "<not a database URL>"


def test_a_served_catalog_url_password_never_reaches_logs_or_replies(tmp_path, caplog, capfd):
    """A SQLite URI filename ignores unknown query parameters: a real catalog whose URL carries a
    password-like value, served; logs, DescribeIndex, ListIndexes and error replies never show it."""
    import grpc

    from server.app import GradIndexServer
    from server.client import GradIndexClient

    url = f"sqlite:///file:{tmp_path / 'cat.db'}?mode=rwc&password=hunter2&uri=true"
    cfg = write_config(tmp_path, n=40, chunk_size=32, extra_index=f'catalog_url = "{url}"')
    build_index(cfg, tmp_path / "wd", progress=False)
    assert (tmp_path / "cat.db").exists()
    caplog.set_level(logging.DEBUG)
    srv = GradIndexServer(ServerConfig(workdir=str(tmp_path / "wd"), catalog_url=url, port=0, log_level="DEBUG",
                                       reload_without_admin_token=True)).start()
    try:
        with GradIndexClient(f"127.0.0.1:{srv.port}", timeout=30) as c:
            seen = [str(c.describe_index("tiny")), str(c.list_indexes())]
            with pytest.raises(grpc.RpcError) as e:
                c.reload_index("nope")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            seen.append(e.value.details())
    finally:
        srv.stop(0)
    assert "password=***" in seen[-1]  # the error names the catalog, masked
    # The server's JSON log lines go to stderr, or to the stream an earlier test's server set up; the
    # records' structured fields are what those lines print, so read them from the records too.
    fields = " ".join(json.dumps(getattr(r, "fields", {}), default=str) for r in caplog.records)
    logs = capfd.readouterr().err + caplog.text + fields
    assert "ReloadIndex" in logs and "password=***" in logs  # the failed reload was logged, masked
    for s in seen + [logs]:
        assert "hunter2" not in s


def test_unreachable_catalog_database_is_failed_precondition_with_masked_url(tmp_path):
    """An existing path that is not a database: the error names the catalog (masked), not a traceback."""
    bad = tmp_path / "not-a-db.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FailedPrecondition, match="cannot open the catalog") as e:
        Catalog(tmp_path / "wd", create=False, url=f"sqlite:///file:{bad}?password=hunter2&uri=true")
    assert "hunter2" not in str(e.value)


def test_serve_with_an_unreadable_catalog_stops_with_one_masked_line(tmp_path, capsys):
    from server.cli import main

    bad = tmp_path / "not-a-db.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    toml = tmp_path / "server.toml"
    toml.write_text(f'workdir = "wd"\ncatalog_url = "sqlite:///file:{bad}?password=hunter2&uri=true"\nport = 0\n')
    assert main(["serve", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradindex serve: error: cannot open the catalog at") and err.count("\n") == 1
    assert "hunter2" not in err and "password=***" in err
