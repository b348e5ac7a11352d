"""Build configs (TOML): parsing, validation, and loading the model and loss they name.

A config has the tables ``[model]``, ``[data]``, ``[index]``, ``[projection]`` and ``[build]``
(docs/indexer.md lists every key). Paths inside a config are relative to the config file. Every
mistake is reported as a :class:`~indexer.errors.ConfigError` naming the field (``data.path``,
``model.loss`` ...) before any gradient is computed; unknown keys are refused, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.defaults import CHUNK_SIZE, RECALL_SAMPLE, TASKS
from indexer.entries import load_entry
from indexer.errors import ConfigError
from indexer.projection import ProjectionSpec
from indexer.store import IndexSpec

MODEL_KEYS = {"name", "framework", "entry", "weights", "keras_model", "loss", "task", "params", "class_names",
              "checkpoints", "device", "hf_dir", "hf_kind", "text"}
DATA_KEYS = {"format", "path", "x", "y", "ids", "labels", "split", "limit", "size", "mode", "layout", "label",
             "features", "text_field", "label_field", "id_field", "preprocess", "dtype", "scale", "block_size",
             "tokens_field"}
INDEX_KEYS = {"name", "kernel", "faiss", "nlist", "nprobe", "pq_m", "pq_bits", "hnsw_m", "ef_construction",
              "ef_search", "mips", "factory", "rerank", "train_sample", "backend", "milvus_uri", "milvus_token_env",
              "milvus_index", "milvus_batch", "exact_rerank",
              "catalog_url", "catalog_url_env"}
PROJ_KEYS = {"kind", "dim", "dist", "seed", "block_rows"}
BUILD_KEYS = {"chunk_size", "threads", "recall_sample", "keep_shards"}
TOP_KEYS = {"model", "data", "index", "projection", "build", "setup"}
TORCH_LOSSES = {"cross_entropy": "CrossEntropyLoss", "nll": "NLLLoss", "mse": "MSELoss", "l1": "L1Loss",
                "bce_with_logits": "BCEWithLogitsLoss", "bce": "BCELoss", "huber": "HuberLoss"}
SEQUENCE_LOSSES = {"sequence_classification": "", "token_classification": "", "causal_lm": ""}  # indexer.text
KERAS_LOSSES = ("cross_entropy", "mse", "l1", "bce_with_logits", "bce", "huber")


@dataclass
class BuildConfig:
    """A parsed, validated build config; all paths absolute."""

    base_dir: Path
    model: dict[str, Any]
    data: dict[str, Any]
    index: dict[str, Any]
    projection: ProjectionSpec
    faiss: IndexSpec
    build: dict[str, Any] = field(default_factory=dict)
    setup: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    #: ``index.catalog_url`` (checked; None = the SQLite file in the workdir). Never stored in the
    #: catalog (it may carry a password), so an index reopened from the catalog has None here.
    catalog_url: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.index["name"]

    @property
    def kernel(self) -> str:
        return self.index["kernel"]

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """[{weights, learning_rate}] — the model's own weights with lr 1 when none are listed."""
        cks = self.model.get("checkpoints") or []
        if cks:
            return cks
        return [{"weights": self.model.get("weights") or self.model.get("keras_model") or self.model.get("hf_dir"),
                 "learning_rate": 1.0}]

    def to_json(self) -> dict[str, Any]:
        """JSON-able form stored in the catalog (reopening an index needs the model section)."""
        return {"base_dir": str(self.base_dir), "model": self.model, "data": self.data, "index": self.index,
                "projection": self.projection.to_dict(), "faiss": self.faiss.to_dict(), "build": self.build,
                "setup": self.setup}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BuildConfig":
        return cls(Path(d["base_dir"]), d["model"], d["data"], d["index"], ProjectionSpec.from_dict(d["projection"]),
                   IndexSpec.from_dict(d["faiss"]), d.get("build", {}), d.get("setup"))


def _unknown(table: str, d: dict[str, Any], allowed: set[str]) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{table}.{k}" if table else k,
                              f"unknown key; allowed: {', '.join(sorted(allowed))}.")


def _path(base: Path, field_name: str, value: Any, must_exist: bool = True) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(field_name, "must be a non-empty path string.")
    p = (base / value).resolve()
    if must_exist and not p.exists():
        raise ConfigError(field_name, f"file not found: {p}")
    return str(p)


def _entry_file(base: Path, field_name: str, entry: str) -> str:
    """Resolve ``file.py:func`` relative to the config; leave ``package.module:func`` alone."""
    if not isinstance(entry, str) or ":" not in entry:
        raise ConfigError(field_name, f"must be 'module:function' or 'file.py:function', got {entry!r}.")
    mod, func = entry.rsplit(":", 1)
    if mod.endswith(".py"):
        return _path(base, field_name, mod) + ":" + func
    return entry


def parse_config(source: str | Path | dict[str, Any], base_dir: str | Path | None = None,
                 run_setup: bool = True) -> BuildConfig:
    """Parse and check a TOML file (or an equivalent dict, with ``base_dir`` for relative paths).

    ``setup = "file.py:function"`` (top level, optional) is called with the config directory before
    the files are checked, so an example can create its data and weights on first use.
    """
    if isinstance(source, dict):
        raw = source
        base = Path(base_dir or ".").resolve()
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError("config", f"file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc
        base = path.resolve().parent
    _unknown("", raw, TOP_KEYS)
    setup = raw.get("setup")
    if setup and run_setup:
        fn = load_entry(_entry_file(base, "setup", setup), "setup")
        fn(base)
    for t in ("model", "data", "index"):
        if not isinstance(raw.get(t), dict):
            raise ConfigError(t, f"the [{t}] table is required.")
    model, data, index = dict(raw["model"]), dict(raw["data"]), dict(raw["index"])
    proj, build = dict(raw.get("projection", {})), dict(raw.get("build", {}))
    _unknown("model", model, MODEL_KEYS)
    _unknown("data", data, DATA_KEYS)
    _unknown("index", index, INDEX_KEYS)
    _unknown("projection", proj, PROJ_KEYS)
    _unknown("build", build, BUILD_KEYS)

    # [model]
    if not isinstance(model.get("name"), str) or not model["name"]:
        raise ConfigError("model.name", "a model name is required.")
    if "hf_dir" in model:  # a local Hugging Face directory: sets framework, the task of an LM, the default loss
        from indexer.text import check_text_section

        check_text_section(model, base)
    elif "hf_kind" in model or "text" in model:
        raise ConfigError("model.hf_kind", "hf_kind and text apply to a Hugging Face model: give model.hf_dir.")
    fw = model.get("framework", "pytorch")
    if fw not in ("pytorch", "tensorflow"):
        raise ConfigError("model.framework", f"{fw!r} is unknown: use 'pytorch' or 'tensorflow'.")
    model["framework"] = fw
    task = model.get("task", "classification")
    if task not in TASKS:
        raise ConfigError("model.task", f"{task!r} is unknown: use one of {', '.join(TASKS)}.")
    model["task"] = task
    if "keras_model" in model:
        if fw != "tensorflow":
            raise ConfigError("model.keras_model", "a saved Keras model needs framework = 'tensorflow'.")
        model["keras_model"] = _path(base, "model.keras_model", model["keras_model"])
    elif "hf_dir" not in model:
        if "entry" not in model:
            raise ConfigError("model.entry", "give the code entry point 'file.py:factory' (or model.keras_model).")
        model["entry"] = _entry_file(base, "model.entry", model["entry"])
        if "weights" in model:
            model["weights"] = _path(base, "model.weights", model["weights"])
    cks = model.get("checkpoints") or []
    if not isinstance(cks, list):
        raise ConfigError("model.checkpoints", "must be an array of tables [[model.checkpoints]].")
    out_cks = []
    for i, c in enumerate(cks):
        if not isinstance(c, dict) or "weights" not in c:
            raise ConfigError(f"model.checkpoints[{i}].weights", "each checkpoint needs a weights path.")
        _unknown(f"model.checkpoints[{i}]", c, {"weights", "learning_rate"})
        lr = c.get("learning_rate", 1.0)
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"model.checkpoints[{i}].learning_rate", f"must be a positive number, got {lr!r}.")
        out_cks.append({"weights": _path(base, f"model.checkpoints[{i}].weights", c["weights"]),
                        "learning_rate": float(lr)})
    model["checkpoints"] = out_cks
    if "weights" not in model and "keras_model" not in model and "hf_dir" not in model and not out_cks:
        raise ConfigError("model.weights", "give a weights file (or [[model.checkpoints]]).")
    loss = model.get("loss", "cross_entropy" if task == "classification" else ("mse" if task == "regression" else "none"))
    model["loss"] = loss
    if ":" in str(loss):
        model["loss"] = _entry_file(base, "model.loss", loss)
    elif loss != "none" and loss not in (TORCH_LOSSES | SEQUENCE_LOSSES if fw == "pytorch" else KERAS_LOSSES):
        names = sorted(TORCH_LOSSES | SEQUENCE_LOSSES) if fw == "pytorch" else list(KERAS_LOSSES)
        raise ConfigError("model.loss", f"unknown loss {loss!r}: use one of {', '.join(names)}, 'none' (the model "
                                        "returns per-example losses) or 'file.py:function'.")
    params = model.get("params") or None
    if params is not None:
        if isinstance(params, str):
            params = [params]
        import re

        for p in params:
            try:
                re.compile(p)
            except re.error as exc:
                raise ConfigError("model.params", f"bad regex {p!r}: {exc}") from exc
    model["params"] = params
    cn = model.get("class_names")
    if cn is not None and (not isinstance(cn, list) or not all(isinstance(c, str) for c in cn)):
        raise ConfigError("model.class_names", "must be a list of strings.")

    if "hf_dir" in model and "projection" not in raw:
        from indexer.defaults import TEXT_PROJECTION

        proj = dict(TEXT_PROJECTION)  # the measured default for text models (indexer/defaults.py)

    # [data]
    from indexer.data import check_data_section

    data = check_data_section(data, base)
    text_data = data["format"] == "text" or data["format"] == "jsonl" or (data["format"] == "csv" and "text_field" in data)
    if text_data and "preprocess" not in data and "hf_dir" not in model:
        raise ConfigError("data.preprocess", "text data needs the model's tokenizer (model.hf_dir) or "
                                             "'file.py:function' turning a list of texts into model inputs.")
    if data["format"] == "text" and model.get("hf_kind") != "causal_lm":
        raise ConfigError("data.format", "format 'text' (documents cut into token blocks) is for a causal LM "
                                         "(model.hf_kind = 'causal_lm').")

    # [index]
    if not isinstance(index.get("name"), str) or not index["name"].replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError("index.name", "a name of letters, digits, '-', '_' or '.' is required.")
    from indexer.kernels import KERNELS

    index.setdefault("kernel", "grad_dot")
    if index["kernel"] not in KERNELS:
        raise ConfigError("index.kernel", f"{index['kernel']!r} is unknown: use one of {', '.join(KERNELS)}.")
    from indexer.catalog import catalog_url_setting

    catalog_url = catalog_url_setting(index, "index.", base)  # popped: never stored in the catalog
    fspec = {k: v for k, v in index.items() if k not in ("name", "kernel")}
    if "faiss" in fspec:
        fspec["kind"] = fspec.pop("faiss")
    try:
        faiss_spec = IndexSpec(**fspec)
    except (ValueError, TypeError) as exc:
        raise ConfigError("index.faiss", str(exc)) from exc
    try:
        pspec = ProjectionSpec(**proj)
    except (ValueError, TypeError) as exc:
        raise ConfigError("projection", str(exc)) from exc
    if faiss_spec.exact_rerank and len(out_cks) > 1:
        raise ConfigError("index.exact_rerank", "exact re-ranking scores one model's gradients; an index over "
                                                "several checkpoints cannot use it (drop one or the option).")
    dim_hint = pspec.dim * max(1, len(out_cks)) if pspec.kind != "none" else 0
    if faiss_spec.augmented(index["kernel"]) and faiss_spec.mips == "refuse":
        try:
            faiss_spec.check_kernel(index["kernel"], dim_hint)
        except ValueError as exc:
            raise ConfigError("index.faiss", str(exc)) from exc

    # [build]
    cs = build.setdefault("chunk_size", CHUNK_SIZE)
    if not isinstance(cs, int) or cs <= 0:
        raise ConfigError("build.chunk_size", f"must be a positive integer, got {cs!r}.")
    th = build.setdefault("threads", 0)
    if not isinstance(th, int) or th < 0:
        raise ConfigError("build.threads", "must be a non-negative integer (0 = library default).")
    rs = build.setdefault("recall_sample", RECALL_SAMPLE)
    if not isinstance(rs, int) or rs < 0:
        raise ConfigError("build.recall_sample", "must be a non-negative integer.")
    build.setdefault("keep_shards", False)
    return BuildConfig(base, model, data, index, pspec, faiss_spec, build, setup, raw, catalog_url)


def make_loss(model_cfg: dict[str, Any]) -> Any:
    """The loss callable the config names (framework convention as users write it), or None."""
    loss, fw = model_cfg["loss"], model_cfg["framework"]
    if loss == "none":
        return None
    if loss in SEQUENCE_LOSSES:
        from indexer.text import make_hf_loss

        return make_hf_loss(loss)
    if ":" in loss:
        return load_entry(loss, "model.loss")
    if fw == "pytorch":
        import torch

        return getattr(torch.nn, TORCH_LOSSES[loss])()
    import tensorflow as tf

    K = tf.keras.losses
    return {"cross_entropy": lambda: K.SparseCategoricalCrossentropy(from_logits=True),
            "mse": K.MeanSquaredError, "l1": K.MeanAbsoluteError,
            "bce_with_logits": lambda: K.BinaryCrossentropy(from_logits=True), "bce": K.BinaryCrossentropy,
            "huber": K.Huber}[loss]()


def load_model(model_cfg: dict[str, Any], weights: str | None = None) -> Any:
    """Instantiate the model and load ``weights`` (default: the config's weights) safely.

    PyTorch weights go through ``torch.load(weights_only=True)`` (no arbitrary unpickling); Keras
    models load from ``.keras`` files or SavedModel folders.
    """
    fw = model_cfg["framework"]
    if "hf_dir" in model_cfg:
        from indexer.text import load_hf_model

        return load_hf_model({**model_cfg, "hf_dir": weights or model_cfg["hf_dir"]})
    if fw == "pytorch":
        import torch

        model = load_entry(model_cfg["entry"], "model.entry")()
        w = weights or model_cfg.get("weights")
        if w:
            try:
                state = torch.load(w, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
            except Exception as exc:  # noqa: BLE001 - any load failure is a config problem
                raise ConfigError("model.weights", f"cannot load weights {w}: {exc}") from exc
        model.eval()
        return model
    import tensorflow as tf

    if "keras_model" in model_cfg:
        path = weights if weights and (weights.endswith(".keras") or Path(weights).is_dir()) else model_cfg["keras_model"]
        model = tf.keras.models.load_model(path, compile=False)
        if weights and weights != path:
            model.load_weights(weights)
        return model
    model = load_entry(model_cfg["entry"], "model.entry")()
    w = weights or model_cfg.get("weights")
    if w:
        model.load_weights(w)
    return model


__all__ = ["BuildConfig", "parse_config", "load_entry", "load_model", "make_loss"]
