"""Server configuration: one dataclass, read from ``server.toml`` (stdlib ``tomllib``).

Example (docs/server.md lists every key)::

    workdir = "runs/digits"          # index files (and the catalog, unless catalog_url says elsewhere)
    catalog_url_env = "GRADINDEX_CATALOG_URL"  # or catalog_url = "postgresql+psycopg://..." /
                                     # catalog_url_file; absent = <workdir>/catalog.db (never set by clients)
    indexes = ["digits"]             # served indexes; [] or absent = every index in the catalog
    host = "127.0.0.1"
    port = 50051
    token_env = "GRADINDEX_TOKEN"    # or token = "..." / token_file = "..."; none = no auth
                                     # (a named setting that resolves to no secret refuses to start)
    admin_token_env = "GRADINDEX_ADMIN_TOKEN"  # or admin_token / admin_token_file; needs a token too
    metrics_port = 9100              # Prometheus /metrics; absent = off
    reflection = false
    max_message_mb = 16
    max_batch = 256
    max_k = 1000
    workers = 8
    batch_window_ms = 2              # FindSimilar micro-batching (0 = never hold a batch open)
    batch_max_examples = 64          # 0 = batching off

    request_memory_mb = 256          # per-request budget (reply estimate, explainer knobs)
    explain_concurrency = 1          # explanations at once; the query path keeps its threads

    [tls]                            # optional
    cert = "server.crt"
    key = "server.key"

    [language_models]                # text anchors: the only language models a request may name
    distil = "models/distilbert"

    [spacy_pipelines]                # text anchors: the only spaCy pipelines (besides "en", blank English)
    en_core = "en_core_web_sm"

Models are never read from client bytes: the indexer opens each index's model from the
operator-configured files recorded at build time (``torch.load(weights_only=True)`` or a Keras file).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path



#: Query examples per engine call on the query path (bounds the memory of one call and lets a
#: long request check its deadline between calls).
EMBED_CHUNK = 64


@dataclass
class ServerConfig:
    """Everything the server needs to start; defaults are safe for local use."""

    workdir: str = "runs/gradindex"
    # The catalog database (SQLAlchemy URL) when it is not <workdir>/catalog.db: a server database
    # shared by replicas. May carry a password: kept out of repr and logs (indexer.catalog.mask_url).
    catalog_url: str | None = field(default=None, repr=False)
    indexes: list[str] = field(default_factory=list)  # empty: all indexes in the catalog
    host: str = "127.0.0.1"
    port: int = 50051
    token: str | None = None           # bearer token for every RPC but health; None = no auth
    admin_token: str | None = None     # required for ReloadIndex when set (else `token` suffices)
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None    # Prometheus HTTP port; 0 = any free port; None = off
    metrics_host: str = "127.0.0.1"
    reflection: bool = False
    max_message_mb: float = 16.0       # gRPC receive/send limit
    max_batch: int = 256               # queries per FindSimilar/SearchByGradient
    max_k: int = 1000
    workers: int = 8                   # gRPC handler threads
    batch_window_ms: float = 2.0       # FindSimilar micro-batching: longest a batch is held open for
                                       # requests known to be coming (a lone request never waits); 0 = never wait
    batch_max_examples: int = 64       # query examples per micro-batch; 0 = batching off (one request at a time)
    max_concurrent_rpcs: int | None = 64  # beyond: RESOURCE_EXHAUSTED instead of an unbounded queue
    grace_s: float = 10.0              # SIGTERM: how long in-flight RPCs may take to finish
    drain_delay_s: float = 0.0         # SIGTERM: NOT_SERVING this long before refusing new RPCs
    log_level: str = "INFO"
    # ---- hardening: per-request budgets, explainer isolation, named resources, reload limits ----
    request_memory_mb: float = 256.0   # work/memory one request may take (reply estimate, explainer knobs)
    explain_concurrency: int = 1       # ExplainAnchors/ExplainPair running at once; beyond: RESOURCE_EXHAUSTED
    explain_chunk: int = 256           # most rows per model forward pass inside an explainer
    max_filter_labels: int = 1024      # labels in one request's Filter
    max_name_chars: int = 256          # index/model/kind/split names
    max_text_chars: int = 20000        # ExplainAnchors text
    language_models: dict[str, str] = field(default_factory=dict)   # name -> local HF model directory
    spacy_pipelines: dict[str, str] = field(default_factory=dict)   # name -> spaCy package or directory
    reload_without_admin_token: bool = False  # allow ReloadIndex when no admin_token is configured
    max_served: int = 16               # most served index names (ReloadIndex may add names up to this)

    @property
    def request_memory_bytes(self) -> int:
        """The per-request work/memory budget in bytes."""
        return int(self.request_memory_mb * 1024 * 1024)

    @property
    def max_message_bytes(self) -> int:
        """The gRPC message-size limit in bytes."""
        return int(self.max_message_mb * 1024 * 1024)

    def validate(self) -> "ServerConfig":
        """Raise ValueError naming the key to fix; return self.

        Auth fails closed: a token that is set must be a non-empty string, and an ``admin_token``
        without a ``token`` is refused (it would leave every RPC but ReloadIndex open).
        """
        for key in ("token", "admin_token"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{key} is set but empty: give it a non-empty secret, or remove it to run "
                                  "without auth")
        if self.admin_token is not None and self.token is None:
            raise ValueError("admin_token is set but token is not: set token (or token_env / token_file) "
                              "too, so that queries need a token as well; an admin token alone would leave "
                              "every other RPC unauthenticated")
        if self.token is not None and self.token == self.admin_token:
            raise ValueError("admin_token equals token: use a different secret for admin RPCs")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls.cert and tls.key (PEM files); set both or neither")
        for name in ("max_batch", "max_k", "workers", "explain_concurrency", "explain_chunk", "max_filter_labels",
                     "max_name_chars", "max_text_chars", "max_served"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0 or self.batch_window_ms > 1000:
            raise ValueError(f"batch_window_ms must be in 0..1000 (milliseconds), got {self.batch_window_ms}")
        if self.batch_max_examples < 0:
            raise ValueError(f"batch_max_examples must be >= 0 (0 turns batching off), got {self.batch_max_examples}")
        if self.max_message_mb <= 0:
            raise ValueError(f"max_message_mb must be > 0, got {self.max_message_mb}")
        if self.request_memory_mb <= 0:
            raise ValueError(f"request_memory_mb must be > 0, got {self.request_memory_mb}")
        for key in ("language_models", "spacy_pipelines"):
            table = getattr(self, key)
            if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                      for k, v in table.items()):
                raise ValueError(f"[{key}] must map names to non-empty paths or package names")
        if self.indexes and len(self.indexes) > self.max_served:
            raise ValueError(f"indexes lists {len(self.indexes)} names, more than max_served={self.max_served}")
        if self.catalog_url is not None:
            from indexer.catalog import check_catalog_url

            self.catalog_url = check_catalog_url(self.catalog_url, "catalog_url")  # ConfigError is a ValueError
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        return self

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "ServerConfig":
        """Read a ``server.toml``; relative paths in it are relative to the file's directory."""
        p = Path(path)
        with open(p, "rb") as f:
            raw = tomllib.load(f)
        base = p.resolve().parent
        raw = dict(raw.get("server", {}), **{k: v for k, v in raw.items() if k != "server"})
        tls = raw.pop("tls", None) or {}
        if tls:
            raw["tls_cert"], raw["tls_key"] = tls.get("cert"), tls.get("key")
        for key in ("token", "admin_token", "catalog_url"):
            _resolve_secret(raw, key, base)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{p}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        for key in ("workdir", "tls_cert", "tls_key"):
            if raw.get(key) is not None:
                raw[key] = str((base / raw[key]).resolve())
        if raw.get("catalog_url") is not None:  # a relative SQLite path is relative to this file too
            from indexer.catalog import check_catalog_url

            raw["catalog_url"] = check_catalog_url(raw["catalog_url"], "catalog_url", base)
        lms = raw.get("language_models")
        if isinstance(lms, dict):  # directories, relative to the config file
            raw["language_models"] = {k: str((base / v).resolve()) if isinstance(v, str) else v for k, v in lms.items()}
        return cls(**raw).validate()


def _resolve_secret(raw: dict, key: str, base: Path) -> None:
    """Resolve ``key`` / ``key_env`` / ``key_file`` of a config dict into ``raw[key]``, failing closed.

    At most one of the three may be set; a named environment variable that is unset or empty, or a
    file that is missing or empty, is a ValueError naming the setting (never "no auth").
    """
    env, file = raw.pop(f"{key}_env", None), raw.pop(f"{key}_file", None)
    given = [n for n, v in ((key, raw.get(key)), (f"{key}_env", env), (f"{key}_file", file)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"set only one of {', '.join(given)}")
    if env is not None:
        value = os.environ.get(str(env), "").strip()
        if not value:
            raise ValueError(f"{key}_env names the environment variable {env!r}, which is unset or empty: "
                              "export it with the secret, or remove the setting")
        raw[key] = value
    elif file is not None:
        path = base / str(file)
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"{key}_file {str(file)!r} cannot be read ({exc.strerror}): create it with the "
                              "secret, or remove the setting") from None
        if not value:
            raise ValueError(f"{key}_file {str(file)!r} is empty: write the secret into it, or remove the setting")
        raw[key] = value
