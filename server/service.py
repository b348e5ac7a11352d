"""The ``gradindex.v1.GradIndex`` servicer: request validation and the RPC handlers.

Every handler runs through :func:`server.rpc.rpc` (status codes by exception class, metrics, one
log line). FindSimilar validates and decodes its request here (a bad request fails alone, with
its own status code), then runs the query pipeline (:mod:`server.pipeline`): through the
micro-batcher when batching is on, as a batch of one in the handler's thread when it is off.
Fetching the records and encoding the response happen back here. Explainer RPCs are adapted in
:mod:`server.explain`; protobuf conversion lives in :mod:`server.convert`.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext

import grpc
import numpy as np

from server import explain, limits
from indexer.errors import FailedPrecondition, InvalidArgument, NotFound
from server.batching import Batcher
from server.config import EMBED_CHUNK, ServerConfig
from server.convert import DIRECTIONS, example_pb, index_pb, model_pb
from server.observability import Metrics, StageTimer
from server.pipeline import Job, run_jobs, search_hits
from server.protos import service_pb2 as pb
from server.protos import service_pb2_grpc as pb_grpc
from server.protos import types_pb2 as tpb
from server.registry import NotServed, Registry, Served
from server.rpc import RpcError, alive, rpc
from server.limits import clip
from server.tensors import from_tensor

SC = grpc.StatusCode


class GradIndexServicer(pb_grpc.GradIndexServicer):
    """Answers the gradindex.v1 RPCs from a :class:`Registry` of opened indexes.

    Limits (``max_batch``, ``max_k``) and batching settings come from ``config`` (defaults: a
    default :class:`ServerConfig`).
    """

    def __init__(self, registry: Registry, metrics: Metrics, config: ServerConfig | None = None,
                 embed_chunk: int = EMBED_CHUNK) -> None:
        cfg = config or ServerConfig()
        self.config = cfg
        # Explanations run at most explain_concurrency at a time: the other handler threads stay free
        # for the query path however many slow explanations clients send.
        self._explain_slots = threading.BoundedSemaphore(cfg.explain_concurrency)
        self.registry = registry
        self.metrics = metrics
        self.max_batch = cfg.max_batch
        self.max_k = cfg.max_k
        self.embed_chunk = embed_chunk
        # Micro-batching of concurrent FindSimilar requests (server/batching.py); 0 examples = off.
        self.batcher: Batcher | None = Batcher(
            metrics, window_ms=cfg.batch_window_ms, max_examples=cfg.batch_max_examples,
            embed_chunk=embed_chunk) if cfg.batch_max_examples > 0 else None

    def close(self) -> None:
        """Stop the batch workers (after the gRPC server has drained)."""
        if self.batcher is not None:
            self.batcher.close()

    # ---- validation ----------------------------------------------------------------------------
    def _served(self, name: str) -> Served:
        if not name:
            raise RpcError(SC.INVALID_ARGUMENT, "index is empty; name the index to query (see ListIndexes)")
        limits.check_name(name, "index", self.config)
        try:
            return self.registry.get(name)
        except NotServed as exc:
            raise RpcError(SC.NOT_FOUND, str(exc)) from None

    def _check_k(self, k: int, served: Served) -> int:
        """The one k check of the server (the index is opened with the same max_k)."""
        count = served.description.count
        if k <= 0:
            raise RpcError(SC.INVALID_ARGUMENT, f"k must be >= 1, got {k}")
        limit = min(count, self.max_k)
        if k > limit:
            why = f"the index {served.name!r} holds {count} examples" if count <= self.max_k else \
                f"the server's max_k is {self.max_k}"
            raise RpcError(SC.INVALID_ARGUMENT, f"k={k} is too large: {why}; ask for k <= {limit}")
        return k

    def _direction(self, value: int) -> str:
        if value not in DIRECTIONS:
            raise RpcError(SC.INVALID_ARGUMENT, f"direction {value} is not a Direction; send MOST_SIMILAR (1), "
                           "LEAST_SIMILAR (2) or BOTH (3)")
        return DIRECTIONS[value]

    def _filters(self, f: pb.Filter) -> dict:
        """A request Filter as the index's search keywords (None = unfiltered), size-checked."""
        cfg = self.config
        if len(f.labels) > cfg.max_filter_labels:
            raise RpcError(SC.INVALID_ARGUMENT, f"filter.labels has {len(f.labels)} labels; send at most "
                           f"{cfg.max_filter_labels}")
        if len(f.splits) > cfg.max_filter_labels:
            raise RpcError(SC.INVALID_ARGUMENT, f"filter.splits has {len(f.splits)} names; send at most "
                           f"{cfg.max_filter_labels}")
        for sp in f.splits:
            limits.check_name(sp, "filter.splits entry", cfg)
        return {"labels": sorted({int(v) for v in f.labels}) or None, "split": list(f.splits) or None}

    def _check_batch(self, n: int, what: str) -> None:
        if n == 0:
            raise RpcError(SC.INVALID_ARGUMENT, f"{what} is an empty batch; send at least one example")
        if n > self.max_batch:
            raise RpcError(SC.RESOURCE_EXHAUSTED,
                           f"{what} has {n} examples, more than max_batch={self.max_batch}; split it into "
                           f"calls of at most {self.max_batch}")

    def _decode_inputs(self, request: pb.FindSimilarRequest, served: Served) -> tuple[np.ndarray, np.ndarray | None]:
        given = [f for f, on in (("inputs", request.HasField("inputs")), ("texts", len(request.texts) > 0),
                                 ("named_inputs", len(request.named_inputs) > 0)) if on]
        if len(given) > 1:
            raise RpcError(SC.INVALID_ARGUMENT, f"send the queries one way: {' and '.join(given)} are both set")
        if request.completions and not request.texts:
            raise RpcError(SC.INVALID_ARGUMENT, "completions need texts (the prompts), one per completion")
        if given and given[0] != "inputs":
            return self._decode_text(request, served)
        if not request.HasField("inputs"):
            raise RpcError(SC.INVALID_ARGUMENT, "inputs is missing; send the query examples as a Tensor")
        X = from_tensor(request.inputs, "inputs", finite=True, min_ndim=1,
                        dtypes=("float32", "float64", "float16"))
        self._check_batch(X.shape[0], "inputs")
        shape = served.description.input_shape
        if shape and tuple(X.shape[1:]) != tuple(shape):
            raise RpcError(SC.INVALID_ARGUMENT,
                           f"inputs has shape {list(X.shape)}; the index {served.name!r} expects "
                           f"(batch, {', '.join(map(str, shape))})")
        Y = None
        if request.HasField("targets"):
            d = served.description
            classify = d.task == "classification" or bool(d.class_names)
            Y = from_tensor(request.targets, "targets", finite=True, ndim=1,
                            dtypes=("int64", "int32") if classify else ("float32", "float64", "int64", "int32"))
            if len(Y) != len(X):
                raise RpcError(SC.INVALID_ARGUMENT,
                               f"targets has {len(Y)} entries for {len(X)} inputs; send one target per input")
            n_cls = len(served.description.class_names or [])
            if classify and (Y < 0).any() or n_cls and (Y >= n_cls).any():
                bad = Y[(Y < 0) | (Y >= (n_cls or np.iinfo(np.int64).max))]
                raise RpcError(SC.INVALID_ARGUMENT, f"targets must be class ids in [0, {n_cls or 'classes'}), "
                               f"got {clip(bad[:8].tolist())}")
        return X, Y

    def _decode_text(self, request: pb.FindSimilarRequest, served: Served) -> tuple[np.ndarray, np.ndarray | None]:
        """Texts (tokenized by the index's own tokenizer) or named tensors → the packed inputs and,
        for a causal LM, the token targets; INVALID_ARGUMENT for a model without a tokenizer."""
        from indexer.text import IGNORE

        index = served.index
        enc = index.text_encoder()
        if request.texts:
            self._check_batch(len(request.texts), "texts")
            X, Y = index.text_inputs(list(request.texts), list(request.completions) or None)
        else:
            if enc is None:
                raise RpcError(SC.INVALID_ARGUMENT, f"index {served.name!r} has a model of one numeric input: send "
                               "inputs, not named_inputs")
            names = enc.spec.inputs
            unknown = sorted(set(request.named_inputs) - set(names))
            missing = [n for n in names if n not in request.named_inputs and n != "token_type_ids"]
            if unknown or missing:
                raise RpcError(SC.INVALID_ARGUMENT, f"named_inputs must be {', '.join(names)} "
                               f"(unknown: {unknown or 'none'}, missing: {missing or 'none'})")
            cols = {n: from_tensor(t, f"named_inputs[{n}]", ndim=2, dtypes=("int64", "int32"))
                    for n, t in request.named_inputs.items()}
            shapes = {tuple(c.shape) for c in cols.values()}
            T = enc.max_length
            if len(shapes) != 1 or next(iter(shapes))[1] != T:
                raise RpcError(SC.INVALID_ARGUMENT, f"named_inputs must all be (batch, {T}) (the index's max_length, "
                               f"padded), got {sorted(shapes)}")
            n = next(iter(shapes))[0]
            self._check_batch(n, "named_inputs")
            X = np.stack([cols[nm].astype(np.int64) if nm in cols else np.zeros((n, T), np.int64) for nm in names], 1)
            Y = enc.lm_labels(X) if index.is_causal_lm else None
        if request.HasField("targets"):
            T_ = from_tensor(request.targets, "targets", ndim=Y.ndim if Y is not None else 1)
            if len(T_) != len(X):
                raise RpcError(SC.INVALID_ARGUMENT, f"targets has {len(T_)} entries for {len(X)} queries")
            if index.is_causal_lm and (T_.shape != Y.shape or ((T_ != IGNORE) & ((T_ < 0) | (T_ >= 2**31))).any()):
                raise RpcError(SC.INVALID_ARGUMENT, f"targets of a causal LM are token ids (batch, {Y.shape[1]}), "
                               "-100 for tokens that do not count")
            Y = T_
        return X, Y

    # ---- responses ---------------------------------------------------------------------------
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
        return {int(r["id"]): example_pb(r, include_data) for r in recs}

    def _respond(self, served: Served, hits: dict[str, tuple[np.ndarray, np.ndarray]], n: int, include_data: bool,
                 context: grpc.ServicerContext, timer: StageTimer, targets: np.ndarray | None = None,
                 fetched: dict[int, dict] | None = None, exact_scores: bool = False) -> pb.FindSimilarResponse:
        """Fetch the hits' records (unless the batch did) and build the response for ``n`` queries."""
        alive(context, "fetch")
        all_ids = np.concatenate([ids.ravel() for _, ids in hits.values()])
        records = self._records(served, all_ids, include_data, fetched)
        timer.mark("fetch")
        resp = pb.FindSimilarResponse(index=served.name, generation=served.generation, exact_scores=exact_scores)
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

    # ---- models and indexes -------------------------------------------------------------------
    def _models(self) -> dict[str, tpb.ModelInfo]:
        """Registered models, as the served indexes record them (one entry per model name)."""
        models: dict[str, tpb.ModelInfo] = {}
        for s in self.registry.all():
            name = s.description.model
            if name not in models:
                models[name] = model_pb(s.description)
            models[name].indexes.append(s.name)
        return models

    @rpc
    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=list(self._models().values()))

    @rpc
    def DescribeModel(self, request, context):
        models = self._models()
        if request.name not in models:
            raise RpcError(SC.NOT_FOUND, f"model {clip(request.name)} is not served; served models: "
                           f"{', '.join(sorted(models)) or 'none'} (see ListModels)")
        return models[request.name]

    @rpc
    def ListIndexes(self, request, context):
        return pb.ListIndexesResponse(indexes=[index_pb(s.name, s.description, s.generation)
                                               for s in self.registry.all()
                                               if not request.model or s.description.model == request.model])

    @rpc
    def DescribeIndex(self, request, context):
        s = self._served(request.name)
        return index_pb(s.name, s.description, s.generation)

    @rpc
    def ReloadIndex(self, request, context):
        """(Re)serve a catalog index under a name: admin only, allow-listed sources, bounded names.

        Disabled unless an admin token is configured (the auth interceptor then requires it) or
        the operator sets ``reload_without_admin_token``. The source must be in the ``indexes``
        allow-list when there is one; a new served name is refused beyond ``max_served``. An index
        that exists but cannot be opened (corrupt file, changed weights) is FAILED_PRECONDITION.
        """
        cfg = self.config
        if cfg.admin_token is None and not cfg.reload_without_admin_token:
            raise RpcError(SC.PERMISSION_DENIED, "ReloadIndex is disabled on this server: the operator enables it "
                           "by configuring admin_token (or reload_without_admin_token = true)")
        if not request.index:
            raise RpcError(SC.INVALID_ARGUMENT, "index is empty; name the served index to reload")
        name = limits.check_name(request.index, "index", cfg)
        source = limits.check_name(request.from_index, "from_index", cfg) or name
        if cfg.indexes and source not in cfg.indexes:
            raise RpcError(SC.PERMISSION_DENIED, f"index {source!r} is not in this server's allow-list (indexes): "
                           f"{', '.join(cfg.indexes)}")
        served = {s.name for s in self.registry.all()}
        if name not in served and len(served) >= cfg.max_served:
            raise RpcError(SC.RESOURCE_EXHAUSTED, f"the server already serves {len(served)} names (max_served="
                           f"{cfg.max_served}); reload one of {', '.join(sorted(served))} instead of adding {name!r}")
        try:
            s = self.registry.reload(name, source)
        except (NotFound, InvalidArgument, FailedPrecondition):
            raise
        except Exception as exc:  # noqa: BLE001 - the files are bad, not the server
            raise FailedPrecondition(f"index {source!r} cannot be opened ({type(exc).__name__}: "
                                     f"{clip(str(exc), 200)}); rebuild it, or reload another index") from None
        return index_pb(s.name, s.description, s.generation)

    # ---- queries ----------------------------------------------------------------------------
    @rpc
    def FindSimilar(self, request, context):
        """Validate and decode here, run the pipeline (batched or alone), fetch + encode here."""
        timer = StageTimer(self.metrics)
        # Batching on: the request counts as "coming" while it is decoded, so a lane may wait for it.
        with self.batcher.arrive() if self.batcher is not None else nullcontext() as arrival:
            served = self._served(request.index)
            k = self._check_k(request.k, served)
            direction = self._direction(request.direction)
            filt = self._filters(request.filter)
            X, Y = self._decode_inputs(request, served)
            limits.check_reply(self.config, len(X), k, 2 if direction == "both" else 1, request.include_data,
                               served.description.input_shape)
            timer.mark("decode")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                alive(context, "gradient")
            deadline = None if remaining is None else time.monotonic() + remaining
            job = Job(served, X, Y, k, direction, filt["labels"], filt["split"], deadline,
                      include_data=request.include_data)
            if self.batcher is not None:
                self.batcher.submit(job, arrival)
        if self.batcher is not None:
            self.batcher.wait(job, context)
        else:  # a batch of one, in this thread, through the same pipeline
            job.watch(context)
            run_jobs([job], self.metrics, self.embed_chunk, batched=False)
            job.result()
        for stage in ("queue", "wait_engine", "predict", "gradient", "search", "fetch", "batch"):
            if stage in job.timing:
                timer.add(stage, job.timing[stage])
        targets = job.targets if job.targets is not None and job.targets.ndim == 1 else None
        return self._respond(served, job.hits, len(X), request.include_data, context, timer, targets, job.records,
                             job.exact_scores)

    @rpc
    def SearchByGradient(self, request, context):
        timer = StageTimer(self.metrics)
        served = self._served(request.index)
        k = self._check_k(request.k, served)
        direction = self._direction(request.direction)
        filt = self._filters(request.filter)
        if not request.HasField("gradients"):
            raise RpcError(SC.INVALID_ARGUMENT, "gradients is missing; send a (batch, dim) Tensor")
        G = from_tensor(request.gradients, "gradients", finite=True, ndim=2,
                        dtypes=("float32", "float64", "float16"))
        self._check_batch(G.shape[0], "gradients")
        limits.check_reply(self.config, G.shape[0], k, 2 if direction == "both" else 1, request.include_data,
                           served.description.input_shape)
        d = served.description
        want = d.dim if request.projected else d.gradient_dim
        if want and G.shape[1] != want:
            raise RpcError(SC.INVALID_ARGUMENT,
                           f"gradients has {G.shape[1]} columns; the index {served.name!r} expects {want} "
                           f"({'projected' if request.projected else 'raw gradient'} dimension"
                           f"{'' if request.projected else ', or set projected=true for projected vectors'})")
        timer.mark("decode")
        Q = served.index.project_gradients(G, request.projected)
        timer.mark("projection")
        alive(context, "search")
        hits = search_hits(served.index, Q, k, direction, **filt)
        timer.mark("search")
        return self._respond(served, hits, len(Q), request.include_data, context, timer,
                             exact_scores=served.index.scores_exact(False))

    @rpc
    def GetExamples(self, request, context):
        served = self._served(request.index)
        ids = list(request.ids)
        if not ids:
            raise RpcError(SC.INVALID_ARGUMENT, "ids is empty; name at least one example id")
        count = served.description.count
        if len(ids) > self.max_k:
            raise RpcError(SC.RESOURCE_EXHAUSTED, f"{len(ids)} ids requested, more than max_k={self.max_k}")
        bad = [i for i in ids if not 0 <= i < count]
        if bad:
            raise RpcError(SC.NOT_FOUND, f"no example with id(s) {bad[:10]} in index {served.name!r} "
                           f"(ids run from 0 to {count - 1})")
        if len(ids) > self.max_k:
            raise RpcError(SC.RESOURCE_EXHAUSTED, f"{len(ids)} ids requested, more than max_k={self.max_k}")
        limits.check_reply(self.config, 1, len(ids), 1, request.include_data, served.description.input_shape)
        recs = self._records(served, np.asarray(ids), request.include_data)
        return pb.GetExamplesResponse(examples=[recs[i] for i in ids])

    @rpc
    def SelfInfluence(self, request, context):
        served = self._served(request.index)
        k = self._check_k(request.k, served)
        limits.check_reply(self.config, 1, k, 1, request.include_data, served.description.input_shape)
        alive(context, "self-influence")
        recs = served.index.self_influence_top(k, payload=request.include_data, lowest=request.lowest)
        alive(context, "encode")
        return pb.SelfInfluenceResponse(examples=[
            tpb.Neighbor(score=float(r["self_influence"]), example=example_pb(r, request.include_data))
            for r in recs])

    # ---- explainers (adapters in server/explain.py) ---------------------------------------------
    @contextmanager
    def _explain_slot(self, what: str):
        """One of ``explain_concurrency`` slots, or RESOURCE_EXHAUSTED at once (never a queue)."""
        if not self._explain_slots.acquire(blocking=False):
            raise RpcError(SC.RESOURCE_EXHAUSTED, f"{what}: the server runs at most {self.config.explain_concurrency} "
                           "explanation(s) at a time and is busy; retry later")
        try:
            yield
        finally:
            self._explain_slots.release()

    def _served_for_model(self, model: str) -> Served:
        if not model:
            raise RpcError(SC.INVALID_ARGUMENT, "model is empty; name a served model (see ListModels)")
        limits.check_name(model, "model", self.config)
        for s in self.registry.all():
            if s.description.model == model:
                return s
        have = sorted({s.description.model for s in self.registry.all()})
        raise RpcError(SC.NOT_FOUND, f"model {model!r} is not served; served models: {', '.join(have) or 'none'}")

    @rpc
    def ExplainAnchors(self, request, context):
        served = self._served_for_model(request.model)
        with self._explain_slot("ExplainAnchors"):
            return explain.anchors(served, request, self.config, context)

    @rpc
    def ExplainPair(self, request, context):
        served = self._served(request.index)
        with self._explain_slot("ExplainPair"):
            return explain.pair(served, request, self.config, context)


__all__ = ["GradIndexServicer"]
