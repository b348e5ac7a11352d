"""The ``gradindex.v1.GradIndex`` servicer: validation, status codes, deadlines, stage timing.

Every RPC runs through :func:`_rpc`, which turns exceptions into the status codes of DESIGN §6
(each message says what to fix), counts and times the call, and writes one JSON log line. Query
RPCs check the client's deadline between stages (decode, gradient, search, fetch, encode) and
abandon the work once it has passed.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2

from server.batching import Batcher, BatchError, Job
from server.observability import LOGGER_NAME, Metrics, StageTimer
from server.protos import service_pb2 as pb
from server.protos import service_pb2_grpc as pb_grpc
from server.protos import types_pb2 as tpb
from server.registry import NotServed, Registry, Served
from server.tensors import from_tensor, to_tensor

log = logging.getLogger(LOGGER_NAME)
SC = grpc.StatusCode

# indexer.errors class names -> status codes (matched along the MRO, so subclasses map too).
_ERROR_CODES = {
    "NotFound": SC.NOT_FOUND,
    "InvalidArgument": SC.INVALID_ARGUMENT,
    "FailedPrecondition": SC.FAILED_PRECONDITION,
    "ResourceExhausted": SC.RESOURCE_EXHAUSTED,
    "NotServed": SC.NOT_FOUND,
    "ValueError": SC.INVALID_ARGUMENT,
    "TypeError": SC.INVALID_ARGUMENT,
    "MemoryError": SC.RESOURCE_EXHAUSTED,
}


class RpcError(Exception):
    """Raised inside handlers to end the RPC with ``code`` and a message saying what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: RpcError's own, else by class name along the MRO."""
    if isinstance(exc, (RpcError, BatchError)):
        return exc.code
    for klass in type(exc).__mro__:
        if klass.__name__ in _ERROR_CODES:
            return _ERROR_CODES[klass.__name__]
    return SC.INTERNAL


def _rpc(method: Callable) -> Callable:
    """Wrap a handler: status mapping, metrics, one structured log line per call."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: "GradIndexServicer", request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        code, message, response = SC.OK, "", None
        self.metrics.inflight.inc()
        try:
            response = method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status code
            code = status_for(exc)
            message = str(exc) if code != SC.INTERNAL else (
                f"internal error ({type(exc).__name__}); the server log has the details")
            if code == SC.INTERNAL:
                log.exception("rpc failed", extra={"fields": {"method": name}})
        finally:
            self.metrics.inflight.dec()
            dt = time.perf_counter() - t0
            self.metrics.requests.labels(name, code.name).inc()
            self.metrics.latency.labels(name).observe(dt)
            fields = {"event": "rpc", "method": name, "code": code.name, "ms": round(dt * 1e3, 3),
                      "peer": context.peer()}
            idx = getattr(request, "index", None)
            if idx:
                fields["index"] = idx
            if message:
                fields["error"] = message
            log.info("rpc", extra={"fields": fields})
        if code != SC.OK:
            context.abort(code, message)
        return response

    return wrapper


def _alive(context: grpc.ServicerContext, stage: str) -> None:
    """Abandon the request when the client has gone or its deadline has passed."""
    remaining = context.time_remaining()
    if not context.is_active() or (remaining is not None and remaining <= 0):
        raise RpcError(SC.DEADLINE_EXCEEDED,
                       f"the deadline passed before the {stage} stage; give the call a longer deadline "
                       "or send fewer queries per call")


def _struct(d: dict | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if d:
        json_format.ParseDict(_jsonable(d), s)
    return s


def _jsonable(x: Any) -> Any:
    """numpy scalars/arrays and other odd values -> JSON-friendly Python values."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def _params(msg: struct_pb2.Struct) -> dict:
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


_DIRECTIONS = {pb.DIRECTION_UNSPECIFIED: "most", pb.MOST_SIMILAR: "most", pb.LEAST_SIMILAR: "least",
               pb.BOTH: "both"}


class GradIndexServicer(pb_grpc.GradIndexServicer):
    """Answers the gradindex.v1 RPCs from a :class:`Registry` of opened indexes."""

    def __init__(self, registry: Registry, metrics: Metrics, *, max_batch: int = 256, max_k: int = 1000,
                 embed_chunk: int = 64, batch_window_ms: float = 2.0, batch_max_examples: int = 64) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_k = max_k
        self.embed_chunk = embed_chunk
        # Micro-batching of concurrent FindSimilar requests (server/batching.py); 0 examples = off.
        self.batcher: Batcher | None = Batcher(metrics, window_ms=batch_window_ms, max_examples=batch_max_examples,
                                               embed_chunk=embed_chunk) if batch_max_examples > 0 else None

    def close(self) -> None:
        """Stop the batch workers (after the gRPC server has drained)."""
        if self.batcher is not None:
            self.batcher.close()

    # ---- helpers ---------------------------------------------------------------------------
    def _served(self, name: str) -> Served:
        if not name:
            raise RpcError(SC.INVALID_ARGUMENT, "index is empty; name the index to query (see ListIndexes)")
        try:
            return self.registry.get(name)
        except NotServed as exc:
            raise RpcError(SC.NOT_FOUND, str(exc)) from None

    def _check_k(self, k: int, served: Served) -> int:
        count = int(served.info.get("count", 0))
        if k <= 0:
            raise RpcError(SC.INVALID_ARGUMENT, f"k must be >= 1, got {k}")
        limit = min(count, self.max_k)
        if k > limit:
            why = f"the index {served.name!r} holds {count} examples" if count <= self.max_k else \
                f"the server's max_k is {self.max_k}"
            raise RpcError(SC.INVALID_ARGUMENT, f"k={k} is too large: {why}; ask for k <= {limit}")
        return k

    def _check_batch(self, n: int, what: str) -> None:
        if n == 0:
            raise RpcError(SC.INVALID_ARGUMENT, f"{what} is an empty batch; send at least one example")
        if n > self.max_batch:
            raise RpcError(SC.RESOURCE_EXHAUSTED,
                           f"{what} has {n} examples, more than max_batch={self.max_batch}; split it into "
                           f"calls of at most {self.max_batch}")

    def _example_pb(self, rec: dict, include_data: bool) -> tpb.Example:
        """A catalog record (indexer.query.GradIndex.get_examples) as an Example message."""
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
            ex.metadata[str(k)] = v if isinstance(v, str) else str(_jsonable(v))
        if include_data and rec.get("payload") is not None:
            payload = np.asarray(rec["payload"])
            if payload.dtype.kind in "US":
                ex.metadata["text"] = str(payload)
            else:
                ex.data.CopyFrom(to_tensor(payload))
        return ex

    def _records(self, served: Served, ids: np.ndarray, include_data: bool,
                 fetched: dict[int, dict] | None = None) -> dict[int, tpb.Example]:
        """Example messages for ``ids`` (-1 = no hit); ``fetched`` holds records already read (a batch's)."""
        uniq = sorted({int(i) for i in np.asarray(ids).ravel() if i >= 0})
        if not uniq:
            return {}
        if fetched is not None and all(i in fetched for i in uniq):
            recs = [fetched[i] for i in uniq]
        else:
            recs = served.index.get_examples(uniq, payload=include_data)
        return {int(r["id"]): self._example_pb(r, include_data) for r in recs}

    def _filters(self, f: pb.Filter) -> dict:
        return {"labels": [int(v) for v in f.labels] or None, "split": list(f.splits) or None}

    def _search_and_respond(self, served: Served, Q: np.ndarray, k: int, direction: str, filt: dict,
                            include_data: bool, context: grpc.ServicerContext, timer: StageTimer,
                            targets: np.ndarray | None = None) -> pb.FindSimilarResponse:
        """Search most and/or least similar, fetch the records, build the response."""
        _alive(context, "search")
        res = served.index.search(Q, k, mode=direction, **filt)
        hits = {}
        if direction == "least":
            hits["least"] = (res.scores, res.ids)
        else:
            hits["most"] = (res.scores, res.ids)
            if direction == "both":
                hits["least"] = (res.least_scores, res.least_ids)
        timer.mark("search")
        return self._respond(served, hits, len(Q), include_data, context, timer, targets)

    def _respond(self, served: Served, hits: dict[str, tuple[np.ndarray, np.ndarray]], n: int, include_data: bool,
                 context: grpc.ServicerContext, timer: StageTimer, targets: np.ndarray | None = None,
                 fetched: dict[int, dict] | None = None) -> pb.FindSimilarResponse:
        """Fetch the hits' records (unless the batch did) and build the response for ``n`` queries."""
        _alive(context, "fetch")
        all_ids = np.concatenate([ids.ravel() for _, ids in hits.values()])
        records = self._records(served, all_ids, include_data, fetched)
        timer.mark("fetch")
        resp = pb.FindSimilarResponse(index=served.name, generation=served.generation)
        for q in range(n):
            r = resp.results.add()
            if targets is not None:
                r.target = int(targets[q])
            for d, (scores, ids) in hits.items():
                out = r.most_similar if d == "most" else r.least_similar
                for sc, i in zip(scores[q].tolist(), ids[q].tolist()):
                    if i < 0:  # fewer candidates than k (filters)
                        continue
                    out.add(score=sc, example=records[i])
        timer.mark("encode")
        context.set_trailing_metadata((("server-timing", timer.header()),))
        return resp

    def _decode_inputs(self, request: pb.FindSimilarRequest, served: Served) -> tuple[np.ndarray, np.ndarray | None]:
        if not request.HasField("inputs"):
            raise RpcError(SC.INVALID_ARGUMENT, "inputs is missing; send the query examples as a Tensor")
        X = from_tensor(request.inputs, "inputs", finite=True, min_ndim=1,
                        dtypes=("float32", "float64", "float16"))
        self._check_batch(X.shape[0], "inputs")
        shape = served.info.get("input_shape")
        if shape and tuple(X.shape[1:]) != tuple(shape):
            raise RpcError(SC.INVALID_ARGUMENT,
                           f"inputs has shape {list(X.shape)}; the index {served.name!r} expects "
                           f"(batch, {', '.join(map(str, shape))})")
        Y = None
        if request.HasField("targets"):
            Y = from_tensor(request.targets, "targets", finite=True, ndim=1)
            if len(Y) != len(X):
                raise RpcError(SC.INVALID_ARGUMENT,
                               f"targets has {len(Y)} entries for {len(X)} inputs; send one target per input")
            n_cls = len(served.info.get("class_names") or [])
            if n_cls and Y.dtype.kind in "iu" and ((Y < 0).any() or (Y >= n_cls).any()):
                raise RpcError(SC.INVALID_ARGUMENT, f"targets must be class ids in [0, {n_cls}), got {Y.tolist()}")
        return X, Y

    def _embed(self, served: Served, X: np.ndarray, Y: np.ndarray | None, context: grpc.ServicerContext,
               timer: StageTimer) -> np.ndarray:
        """Query vectors for a batch, chunk by chunk, checking the deadline between chunks."""
        parts = []
        for s in range(0, len(X), self.embed_chunk):
            _alive(context, "gradient")
            with served.engine_lock:  # one engine per index: its layer hooks hold per-call state
                parts.append(served.index.embed(X[s:s + self.embed_chunk],
                                                None if Y is None else Y[s:s + self.embed_chunk]))
        timer.mark("gradient")
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    # ---- models and indexes -------------------------------------------------------------------
    def _index_pb(self, s: Served) -> tpb.IndexInfo:
        """IndexInfo from ``GradIndex.info()``; keys without a field of their own go to ``details``."""
        i = s.info
        proj = i.get("projection") or {}
        known = {"name", "model", "kernel", "count", "dim", "gradient_dim", "faiss", "fingerprint", "recall_at_10"}
        msg = tpb.IndexInfo(
            name=s.name, model=str(i.get("model", "")), kernel=str(i.get("kernel", "")),
            count=int(i.get("count", 0)), dim=int(i.get("dim", 0)), gradient_dim=int(i.get("gradient_dim", 0)),
            projection=str(proj.get("kind", "none") if isinstance(proj, dict) else proj),
            faiss_kind=str(i.get("faiss", "")), status="ready", model_fingerprint=str(i.get("fingerprint", "")),
            generation=s.generation)
        if i.get("recall_at_10") is not None:
            msg.recall = float(i["recall_at_10"])
        msg.details.CopyFrom(_struct({k: v for k, v in i.items() if k not in known}))
        return msg

    def _models(self) -> dict[str, tpb.ModelInfo]:
        """Registered models, as the served indexes record them (one entry per model name)."""
        models: dict[str, tpb.ModelInfo] = {}
        for s in self.registry.all():
            i = s.info
            name = str(i.get("model", ""))
            if name not in models:
                models[name] = tpb.ModelInfo(
                    name=name, framework=str(i.get("framework", "")), fingerprint=str(i.get("fingerprint", "")),
                    task=str(i.get("task", "")), loss=str(i.get("loss", "")),
                    class_names=[str(c) for c in i.get("class_names") or []],
                    num_parameters=int(i.get("gradient_dim", 0)),
                    input_shape=[int(v) for v in i.get("input_shape") or []],
                    input_dtype=str(i.get("input_dtype", "")))
            models[name].indexes.append(s.name)
        return models

    @_rpc
    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=list(self._models().values()))

    @_rpc
    def DescribeModel(self, request, context):
        models = self._models()
        if request.name not in models:
            raise RpcError(SC.NOT_FOUND, f"model {request.name!r} is not served; served models: "
                           f"{', '.join(sorted(models)) or 'none'} (see ListModels)")
        return models[request.name]

    @_rpc
    def ListIndexes(self, request, context):
        return pb.ListIndexesResponse(indexes=[self._index_pb(s) for s in self.registry.all()
                                               if not request.model or s.info.get("model") == request.model])

    @_rpc
    def DescribeIndex(self, request, context):
        return self._index_pb(self._served(request.name))

    # ---- queries ----------------------------------------------------------------------------
    @_rpc
    def FindSimilar(self, request, context):
        if self.batcher is not None:
            return self._find_similar_batched(request, context)
        timer = StageTimer(self.metrics)
        served = self._served(request.index)
        k = self._check_k(request.k, served)
        X, Y = self._decode_inputs(request, served)
        timer.mark("decode")
        if Y is None and served.info.get("task", "classification") == "classification":
            _alive(context, "predict")
            with served.engine_lock:
                Y = served.index.embedder().engines[-1].resolve_targets(X)
            timer.mark("predict")
        Q = self._embed(served, X, Y, context, timer)
        return self._search_and_respond(served, Q, k, _DIRECTIONS[request.direction],
                                        self._filters(request.filter), request.include_data, context, timer,
                                        targets=Y if Y is not None and Y.ndim == 1 else None)

    def _find_similar_batched(self, request: pb.FindSimilarRequest,
                              context: grpc.ServicerContext) -> pb.FindSimilarResponse:
        """FindSimilar through the micro-batcher: validate and decode here (a bad request fails alone,
        before it can reach a batch), embed + search in the index's batch, fetch + encode here."""
        timer = StageTimer(self.metrics)
        with self.batcher.arrive() as arrival:
            served = self._served(request.index)
            k = self._check_k(request.k, served)
            X, Y = self._decode_inputs(request, served)
            direction = _DIRECTIONS[request.direction]
            filt = self._filters(request.filter)
            timer.mark("decode")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                _alive(context, "gradient")
            deadline = None if remaining is None else time.monotonic() + remaining
            job = self.batcher.submit(Job(served, X, Y, k, direction, filt["labels"], filt["split"], deadline,
                                          include_data=request.include_data), arrival)
        self.batcher.wait(job, context)
        for stage in ("queue", "wait_engine", "gradient", "search", "fetch", "batch"):
            if stage in job.timing:
                timer.add(stage, job.timing[stage])
        targets = job.targets if job.targets is not None and job.targets.ndim == 1 else None
        return self._respond(served, job.hits, len(X), request.include_data, context, timer, targets, job.records)

    @_rpc
    def SearchByGradient(self, request, context):
        timer = StageTimer(self.metrics)
        served = self._served(request.index)
        k = self._check_k(request.k, served)
        if not request.HasField("gradients"):
            raise RpcError(SC.INVALID_ARGUMENT, "gradients is missing; send a (batch, dim) Tensor")
        G = from_tensor(request.gradients, "gradients", finite=True, ndim=2,
                        dtypes=("float32", "float64", "float16"))
        self._check_batch(G.shape[0], "gradients")
        want = served.info.get("dim") if request.projected else served.info.get("gradient_dim")
        if want and G.shape[1] != want:
            raise RpcError(SC.INVALID_ARGUMENT,
                           f"gradients has {G.shape[1]} columns; the index {served.name!r} expects {want} "
                           f"({'projected' if request.projected else 'raw gradient'} dimension"
                           f"{'' if request.projected else ', or set projected=true for projected vectors'})")
        timer.mark("decode")
        Q = self._project(served, G, request.projected)
        timer.mark("projection")
        return self._search_and_respond(served, Q, k, _DIRECTIONS[request.direction],
                                        self._filters(request.filter), request.include_data, context, timer)

    def _project(self, served: Served, G: np.ndarray, projected: bool) -> np.ndarray:
        """Client gradients -> query vectors: the index's projection (unless already projected), then
        the kernel's query scaling."""
        from indexer.kernels import scale_query

        emb = served.index.embedder()
        V = np.asarray(G, dtype=np.float32)
        if not projected:
            kind = emb.projector.spec.kind
            if len(emb.engines) > 1:
                raise RpcError(SC.FAILED_PRECONDITION,
                               f"index {served.name!r} concatenates {len(emb.engines)} checkpoints; raw gradients "
                               "are ambiguous there: send projected vectors (projected=true) or use FindSimilar")
            if kind == "dense":
                V = emb.projector.project_flat(V)
            elif kind != "none":
                raise RpcError(SC.FAILED_PRECONDITION,
                               f"index {served.name!r} uses a {kind!r} projection, which is applied to per-layer "
                               "gradient factors, not to flat gradients: send projected vectors (projected=true, "
                               f"shape (batch, {served.info.get('dim')})) or use FindSimilar")
        return scale_query(V, served.info["kernel"])

    @_rpc
    def GetExamples(self, request, context):
        served = self._served(request.index)
        ids = list(request.ids)
        if not ids:
            raise RpcError(SC.INVALID_ARGUMENT, "ids is empty; name at least one example id")
        count = int(served.info.get("count", 0))
        bad = [i for i in ids if not 0 <= i < count]
        if bad:
            raise RpcError(SC.NOT_FOUND, f"no example with id(s) {bad[:10]} in index {served.name!r} "
                           f"(ids run from 0 to {count - 1})")
        if len(ids) > self.max_k:
            raise RpcError(SC.RESOURCE_EXHAUSTED, f"{len(ids)} ids requested, more than max_k={self.max_k}")
        recs = self._records(served, np.asarray(ids), request.include_data)
        return pb.GetExamplesResponse(examples=[recs[i] for i in ids])

    @_rpc
    def SelfInfluence(self, request, context):
        served = self._served(request.index)
        k = self._check_k(request.k, served)
        recs = served.index.self_influence_top(k, payload=request.include_data, lowest=request.lowest)
        return pb.SelfInfluenceResponse(examples=[
            tpb.Neighbor(score=float(r["self_influence"]), example=self._example_pb(r, request.include_data))
            for r in recs])

    @_rpc
    def ReloadIndex(self, request, context):
        if not request.index:
            raise RpcError(SC.INVALID_ARGUMENT, "index is empty; name the served index to reload")
        served = self.registry.reload(request.index, request.from_index or None)
        return self._index_pb(served)

    # ---- explainers (hooks owned by explainers/) -----------------------------------------------
    def _served_for_model(self, model: str) -> Served:
        for s in self.registry.all():
            if s.info.get("model") == model:
                return s
        have = sorted({str(s.info.get("model")) for s in self.registry.all()})
        raise RpcError(SC.NOT_FOUND, f"model {model!r} is not served; served models: {', '.join(have) or 'none'}")

    @_rpc
    def ExplainAnchors(self, request, context):
        try:
            from explainers.anchors.serve import explain_anchors, model_predict_fn
            from indexer.config import load_entry
        except ImportError as exc:
            raise RpcError(SC.UNIMPLEMENTED, f"anchors are not installed on this server ({exc})") from None
        served = self._served_for_model(request.model)
        which = request.WhichOneof("instance")
        if which is None:
            raise RpcError(SC.INVALID_ARGUMENT, "send the instance to explain: row (tabular), text or image")
        kind = request.kind or {"row": "tabular", "text": "text", "image": "image"}[which]
        params = _params(request.params) if request.HasField("params") else {}
        if which == "text":
            params["text"] = request.text
        else:
            x = from_tensor(getattr(request, which), which, finite=True)
            params["instance" if which == "row" else "image"] = x
            if which == "image":
                params.setdefault("image_shape", list(x.shape))
        shape = served.info.get("input_shape") or []
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
                hwc = (shape[1], shape[2], shape[0]) if served.info.get("framework") == "pytorch" else tuple(shape)
            elif len(shape) == 2:
                hwc = (*shape, 1)
            else:
                raise RpcError(SC.INVALID_ARGUMENT, f"model {request.model!r} takes inputs of shape {list(shape)}, "
                               "not images; send a row")
            if tuple(x.shape) != hwc and not (x.ndim == 2 and hwc[2] == 1 and tuple(x.shape) == hwc[:2]):
                raise RpcError(SC.INVALID_ARGUMENT, f"image has shape {list(x.shape)}; model {request.model!r} "
                               f"takes channel-last images of shape {list(hwc)}")
        engine = served.index.embedder().engines[-1]

        def predict_scores(X):
            with served.engine_lock:
                return engine.predict(X)

        # the model's own text preprocessing (its build config's data.preprocess), channel order for images
        pre = served.index.config.data.get("preprocess")
        predict_fn = model_predict_fn(predict_scores, kind, input_shape=shape, framework=served.info.get("framework"),
                                      preprocess=load_entry(pre, "data.preprocess") if pre else None,
                                      model=request.model)
        out = explain_anchors(predict_fn, kind, params)
        resp = pb.ExplainAnchorsResponse(anchor=[str(a) for a in out.get("anchor", [])],
                                         precision=float(out.get("precision", 0.0)),
                                         coverage=float(out.get("coverage", 0.0)))
        resp.raw.CopyFrom(_struct(out.get("raw") or {}))
        resp.meta.CopyFrom(_struct(out.get("meta") or {}))
        if out.get("segments") is not None:
            resp.segments.CopyFrom(to_tensor(np.asarray(out["segments"]).astype(np.int64)))
        if out.get("masked_image") is not None:
            resp.anchor_image.CopyFrom(to_tensor(np.asarray(out["masked_image"]).astype(np.int64)))
        return resp

    @_rpc
    def ExplainPair(self, request, context):
        try:
            from explainers.bilrp import explain_pair, penultimate_embedding
        except ImportError as exc:
            raise RpcError(SC.UNIMPLEMENTED, f"BiLRP is not installed on this server ({exc})") from None
        served = self._served(request.index)
        if not request.HasField("query"):
            raise RpcError(SC.INVALID_ARGUMENT, "query is missing; send one input (no batch axis) as a Tensor")
        x = from_tensor(request.query, "query", finite=True)
        which = request.WhichOneof("other")
        if which is None:
            raise RpcError(SC.INVALID_ARGUMENT, "send training_id (a stored example) or other_input")
        if which == "training_id":
            count = int(served.info.get("count", 0))
            if not 0 <= request.training_id < count:
                raise RpcError(SC.NOT_FOUND, f"no example with id {request.training_id} in index {served.name!r} "
                               f"(ids run from 0 to {count - 1})")
            other = served.index.get_examples([request.training_id], payload=True)[0]["payload"]
            if other is None:
                raise RpcError(SC.FAILED_PRECONDITION, f"index {served.name!r} does not store its examples; "
                               "send other_input instead")
        else:
            other = from_tensor(request.other_input, "other_input", finite=True)
        model = served.index.embedder().engines[-1].model
        try:
            embedding = penultimate_embedding(model)
        except (TypeError, ValueError) as exc:
            raise RpcError(SC.FAILED_PRECONDITION, f"BiLRP needs an nn.Sequential classifier ending in a Linear "
                           f"layer: {exc}") from None
        opts = _params(request.options) if request.HasField("options") else {}
        if isinstance(opts.get("bounds"), list):
            opts["bounds"] = tuple(opts["bounds"])
        with served.engine_lock:
            res = explain_pair(embedding, x, np.asarray(other), **opts)
        details = res.to_dict()
        details.pop("pooled", None)
        return pb.ExplainPairResponse(relevances=to_tensor(np.asarray(res.pooled, dtype=np.float32)),
                                      score=float(res.similarity), details=_struct(details))
