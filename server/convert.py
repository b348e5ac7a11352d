"""Protobuf <-> Python/numpy conversion for the servicer: records, index and model descriptions,
request parameters and filters. (Tensors: :mod:`server.tensors`, shared with the client.)"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2

from indexer.query import IndexDescription
from server.protos import service_pb2 as pb
from server.protos import types_pb2 as tpb
from server.tensors import to_tensor

#: Request direction enum -> the index's search mode.
DIRECTIONS = {pb.DIRECTION_UNSPECIFIED: "most", pb.MOST_SIMILAR: "most", pb.LEAST_SIMILAR: "least",
              pb.BOTH: "both"}


def jsonable(x: Any) -> Any:
    """numpy scalars/arrays and other odd values -> JSON-friendly Python values."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def to_struct(d: dict | None) -> struct_pb2.Struct:
    """A dict (numpy values allowed) as a protobuf Struct."""
    s = struct_pb2.Struct()
    if d:
        json_format.ParseDict(jsonable(d), s)
    return s


def params_of(msg: struct_pb2.Struct) -> dict:
    """A Struct of request parameters as a dict; protobuf numbers are doubles, so whole numbers
    become ints again (k=4, batch_size=100, patch sizes) and lists of them tuples-ready lists."""
    def fix(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return fix(json_format.MessageToDict(msg))


def filters_of(f: pb.Filter) -> dict:
    """A request Filter as the index's search keywords (None = unfiltered)."""
    return {"labels": [int(v) for v in f.labels] or None, "split": list(f.splits) or None}


def example_pb(rec: dict, include_data: bool) -> tpb.Example:
    """A catalog record (:meth:`indexer.query.GradIndex.get_examples`) as an Example message."""
    ex = tpb.Example(id=int(rec["id"]), external_id=str(rec.get("external_id") or ""),
                     split=str(rec.get("split") or ""), source=str(rec.get("source") or ""))
    label = rec.get("label")
    if label is not None:
        ex.label_name = str(label)
        try:
            ex.label = int(label)
        except (TypeError, ValueError):
            pass
    if rec.get("grad_norm") is not None:
        ex.gradient_norm = float(rec["grad_norm"])
    if rec.get("self_influence") is not None:
        ex.self_influence = float(rec["self_influence"])
    for k, v in (rec.get("metadata") or {}).items():
        ex.metadata[str(k)] = v if isinstance(v, str) else str(jsonable(v))
    if include_data and rec.get("payload") is not None:
        payload = np.asarray(rec["payload"])
        if payload.dtype.kind in "US":
            ex.metadata["text"] = str(payload)
        else:
            ex.data.CopyFrom(to_tensor(payload))
    return ex


_INDEX_FIELDS = {"name", "model", "kernel", "count", "dim", "gradient_dim", "faiss", "fingerprint", "recall_at_10",
                 "parameter_rules", "rules_verified", "exact_rerank"}


def index_pb(name: str, d: IndexDescription, generation: int) -> tpb.IndexInfo:
    """IndexInfo of a served index; description fields without a message field go to ``details``."""
    proj = d.projection or {}
    msg = tpb.IndexInfo(
        name=name, model=d.model, kernel=d.kernel, count=d.count, dim=d.dim, gradient_dim=int(d.gradient_dim or 0),
        projection=str(proj.get("kind", "none") if isinstance(proj, dict) else proj),
        faiss_kind=d.faiss, status="ready", model_fingerprint=d.fingerprint, generation=generation)
    if d.recall_at_10 is not None:
        msg.recall = float(d.recall_at_10)
    msg.parameter_rules.update({str(k): str(v) for k, v in (d.parameter_rules or {}).items()})
    if d.rules_verified is not None:
        msg.rules_verified = bool(d.rules_verified)
    msg.exact_rerank = bool(d.exact_rerank)
    msg.details.CopyFrom(to_struct(_no_host_paths({k: v for k, v in d.to_dict().items() if k not in _INDEX_FIELDS})))
    return msg


def _no_host_paths(x: Any) -> Any:
    """Absolute file-system paths (checkpoint weights, index files) cut to their file names: clients
    learn which file, not where the server keeps it."""
    if isinstance(x, dict):
        return {k: _no_host_paths(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_host_paths(v) for v in x]
    if isinstance(x, str) and (x.startswith("/") or (len(x) > 2 and x[1] == ":" and x[2] in "\\/")):
        return x.replace("\\", "/").rsplit("/", 1)[-1]
    return x


def model_pb(d: IndexDescription) -> tpb.ModelInfo:
    """ModelInfo of the model an index was built with (its ``indexes`` list left to the caller)."""
    return tpb.ModelInfo(name=d.model, framework=d.framework, fingerprint=d.fingerprint, task=d.task, loss=d.loss,
                         class_names=[str(c) for c in d.class_names or []], num_parameters=int(d.gradient_dim or 0),
                         input_shape=[int(v) for v in d.input_shape or []], input_dtype="")


__all__ = ["DIRECTIONS", "jsonable", "to_struct", "params_of", "filters_of", "example_pb", "index_pb", "model_pb"]
