"""Adapters between the explainer RPCs and the explainers in ``explainers/``.

Each adapter turns a request into the explainer's arguments (checking them against the served
model, so that a mismatch is INVALID_ARGUMENT saying what to send, not INTERNAL from deep inside
the model), runs the explainer with the index's model under the index's lock, and turns the
result into the response message. The explainers are imported when first used: a server without
them answers UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np

from server import limits
from server.config import ServerConfig
from server.convert import params_of, to_struct
from server.limits import clip
from server.protos import service_pb2 as pb
from server.registry import Served
from server.rpc import RpcError, alive
from server.tensors import from_tensor, to_tensor

SC = grpc.StatusCode


@contextmanager
def _installed(what: str) -> Iterator[None]:
    """Around an explainer's import on first use: a server without it answers UNIMPLEMENTED
    ("{what} not installed on this server", with the ImportError's words), not INTERNAL."""
    try:
        yield
    except ImportError as exc:
        raise RpcError(SC.UNIMPLEMENTED, f"{what} not installed on this server ({exc})") from None


def _named_resources(params: dict, cfg: ServerConfig) -> None:
    """Replace ``language_model`` / ``nlp`` names by what the server config names them to.

    A request only chooses among the operator's names: a path or package name the config does
    not list is refused with the same message whether or not it exists (no file-system probing).
    """
    for key, table, builtin in (("language_model", cfg.language_models, ()),
                                ("nlp", cfg.spacy_pipelines, ("en",))):
        if key not in params:
            continue
        name = params[key]
        if isinstance(name, str) and name in builtin and name not in table:
            continue
        if not isinstance(name, str) or name not in table:
            have = sorted(set(table) | set(builtin))
            raise RpcError(SC.INVALID_ARGUMENT, f"{key} must be one of the names this server configures: "
                           f"{', '.join(have) or 'none'} (got {clip(name)}); paths and package names are not "
                           "accepted")
        params[key] = table[name]


def anchors(served: Served, request: pb.ExplainAnchorsRequest, cfg: ServerConfig | None = None,
            context=None) -> pb.ExplainAnchorsResponse:
    """ExplainAnchors for the model of ``served``: an anchor (rule) that locks its prediction.

    The knobs are capped by ``cfg``'s memory budget before any work; the model runs in chunks of
    ``cfg.explain_chunk`` rows with the deadline and cancellation checked before every chunk.
    """
    cfg = cfg or ServerConfig()
    with _installed("anchors are"):
        from explainers.anchors.serve import explain_anchors, model_predict_fn
    d = served.description
    which = request.WhichOneof("instance")
    if which is None:
        raise RpcError(SC.INVALID_ARGUMENT, "send the instance to explain: row (tabular), text or image")
    kind = request.kind or {"row": "tabular", "text": "text", "image": "image"}[which]
    if kind not in ("tabular", "text", "image"):
        raise RpcError(SC.INVALID_ARGUMENT, f"kind must be tabular, text or image, got {clip(kind)}")
    params = params_of(request.params) if request.HasField("params") else {}
    _named_resources(params, cfg)
    if which == "text":
        if len(request.text) > cfg.max_text_chars:
            raise RpcError(SC.INVALID_ARGUMENT, f"text has {len(request.text)} characters; this server explains "
                           f"at most {cfg.max_text_chars}")
        params["text"] = request.text
    else:
        x = from_tensor(getattr(request, which), which, finite=True)
        params["instance" if which == "row" else "image"] = x
        if which == "image":
            params.setdefault("image_shape", list(x.shape))
    shape = d.input_shape or []
    # Checked here against the registered model's input shape: otherwise the model itself fails
    # on the first prediction and the client gets INTERNAL instead of what to fix.
    if which == "row" and shape:
        if len(shape) != 1:
            raise RpcError(SC.INVALID_ARGUMENT, f"model {request.model!r} takes inputs of shape {list(shape)}, "
                           "not tabular rows; send an image")
        if np.ndim(params["instance"]) == 1 and len(params["instance"]) != shape[0]:
            raise RpcError(SC.INVALID_ARGUMENT, f"row has {len(params['instance'])} features; model "
                           f"{request.model!r} takes {shape[0]} features")
    if which == "image" and shape:
        x = params["image"]
        if len(shape) == 3:
            hwc = (shape[1], shape[2], shape[0]) if d.framework == "pytorch" else tuple(shape)
        elif len(shape) == 2:
            hwc = (*shape, 1)
        else:
            raise RpcError(SC.INVALID_ARGUMENT, f"model {request.model!r} takes inputs of shape {list(shape)}, "
                           "not images; send a row")
        if tuple(x.shape) != hwc and not (x.ndim == 2 and hwc[2] == 1 and tuple(x.shape) == hwc[:2]):
            raise RpcError(SC.INVALID_ARGUMENT, f"image has shape {list(x.shape)}; model {request.model!r} "
                           f"takes channel-last images of shape {list(hwc)}")
    limits.check_anchor_knobs(cfg, params, shape, request.text if which == "text" else None)
    index = served.index
    run_model = limits.chunked(index.predict, cfg.explain_chunk, context, "anchors batch")
    # the model's own text preprocessing; channel-first images for a PyTorch model
    try:
        predict_fn = model_predict_fn(run_model, kind, input_shape=shape, framework=d.framework,
                                      preprocess=index.preprocess(), model=request.model)
    except ValueError as exc:
        raise RpcError(SC.INVALID_ARGUMENT, str(exc)) from None
    out = explain_anchors(predict_fn, kind, params)
    resp = pb.ExplainAnchorsResponse(anchor=[str(a) for a in out.get("anchor", [])],
                                     precision=float(out.get("precision", 0.0)),
                                     coverage=float(out.get("coverage", 0.0)))
    resp.raw.CopyFrom(to_struct(out.get("raw") or {}))
    resp.meta.CopyFrom(to_struct(out.get("meta") or {}))
    if out.get("segments") is not None:
        resp.segments.CopyFrom(to_tensor(np.asarray(out["segments"]).astype(np.int64)))
    if out.get("masked_image") is not None:
        resp.anchor_image.CopyFrom(to_tensor(np.asarray(out["masked_image"]).astype(np.int64)))
    return resp


def pair(served: Served, request: pb.ExplainPairRequest, cfg: ServerConfig | None = None,
         context=None) -> pb.ExplainPairResponse:
    """ExplainPair: BiLRP relevances of a query against a stored example or a second input.

    The inputs must have the model's input shape (which bounds their size) and the BiLRP batch
    knob is capped by ``cfg``'s memory budget; the deadline is checked before the model runs.
    """
    cfg = cfg or ServerConfig()
    with _installed("BiLRP is"):
        from explainers.bilrp import explain_pair, penultimate_embedding
    if not request.HasField("query"):
        raise RpcError(SC.INVALID_ARGUMENT, "query is missing; send one input (no batch axis) as a Tensor")
    x = from_tensor(request.query, "query", finite=True)
    shape = served.description.input_shape
    if shape and tuple(x.shape) != tuple(shape):
        raise RpcError(SC.INVALID_ARGUMENT, f"query has shape {list(x.shape)}; the model of index {served.name!r} "
                       f"takes one input of shape {list(shape)} (no batch axis)")
    which = request.WhichOneof("other")
    if which is None:
        raise RpcError(SC.INVALID_ARGUMENT, "send training_id (a stored example) or other_input")
    if which == "training_id":
        count = served.description.count
        if not 0 <= request.training_id < count:
            raise RpcError(SC.NOT_FOUND, f"no example with id {request.training_id} in index {served.name!r} "
                           f"(ids run from 0 to {count - 1})")
        other = served.index.get_examples([request.training_id], payload=True)[0]["payload"]
        if other is None:
            raise RpcError(SC.FAILED_PRECONDITION, f"index {served.name!r} does not store its examples; "
                           "send other_input instead")
    else:
        other = from_tensor(request.other_input, "other_input", finite=True)
        if tuple(other.shape) != tuple(x.shape):
            raise RpcError(SC.INVALID_ARGUMENT, f"other_input has shape {list(other.shape)}; send the query's "
                           f"shape {list(x.shape)}")
    try:
        embedding = penultimate_embedding(served.index.model())
    except (TypeError, ValueError) as exc:
        raise RpcError(SC.FAILED_PRECONDITION, f"BiLRP needs a PyTorch classifier whose output is a Linear "
                       f"layer and whose forward torch.fx can trace: {exc}") from None
    opts = params_of(request.options) if request.HasField("options") else {}
    if isinstance(opts.get("bounds"), list):
        opts["bounds"] = tuple(opts["bounds"])
    limits.check_bilrp_knobs(cfg, opts, x)
    if context is not None:
        alive(context, "BiLRP")
    with served.index.lock:
        res = explain_pair(embedding, x, np.asarray(other), **opts)
    details = res.to_dict()
    details.pop("pooled", None)
    return pb.ExplainPairResponse(relevances=to_tensor(np.asarray(res.pooled, dtype=np.float32)),
                                  score=float(res.similarity), details=to_struct(details))


__all__ = ["anchors", "pair"]
