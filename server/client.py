"""Python client for the gradindex gRPC service: numpy arrays in, numpy arrays out.

    from server.client import GradIndexClient
    with GradIndexClient("127.0.0.1:50051", token="...") as c:
        res = c.find_similar("digits", X, k=5)          # X: (n, 1, 28, 28) float32
        res.scores, res.ids, res.labels                   # (n, 5) each, best first

Errors surface as ``grpc.RpcError`` with ``.code()`` and ``.details()`` (the server's message says
what to fix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.protos import service_pb2 as pb
from server.protos import service_pb2_grpc as pb_grpc
from server.tensors import from_tensor, to_tensor

_DIRECTIONS = {"most": pb.MOST_SIMILAR, "least": pb.LEAST_SIMILAR, "both": pb.BOTH}


@dataclass
class Hits:
    """Top-k neighbours of a batch of queries as (n, k) arrays; rows with fewer hits are padded.

    Padding: id -1, score NaN, label -1, external id "" (happens only when filters leave fewer
    than k candidates). ``data`` is (n, k, *example_shape) when the stored examples were requested.
    """

    scores: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    external_ids: np.ndarray
    splits: np.ndarray
    metadata: list[list[dict[str, str]]]
    data: np.ndarray | None = None

    @property
    def texts(self) -> list[list[str]]:
        """The neighbours' stored texts (text indexes, when the stored examples were requested), else ""."""
        return [[m.get("text", "") for m in row] for row in self.metadata]


@dataclass
class SimilarityResult:
    """What FindSimilar / SearchByGradient return, as numpy."""

    most: Hits | None
    least: Hits | None
    targets: np.ndarray | None
    index: str
    generation: int
    server_timing: dict[str, float] = field(default_factory=dict)
    exact_scores: bool = False  # the scores are exact kernel values of the unprojected gradients

    # The common case reads like alibi's explanation: result.scores, result.ids.
    @property
    def scores(self) -> np.ndarray:
        return (self.most or self.least).scores

    @property
    def ids(self) -> np.ndarray:
        return (self.most or self.least).ids

    @property
    def labels(self) -> np.ndarray:
        return (self.most or self.least).labels


def _hits(rows: Sequence[Any], k: int) -> Hits:
    n = len(rows)
    scores = np.full((n, k), np.nan)
    ids = np.full((n, k), -1, dtype=np.int64)
    labels = np.full((n, k), -1, dtype=np.int64)
    ext = np.full((n, k), "", dtype=object)
    splits = np.full((n, k), "", dtype=object)
    meta: list[list[dict[str, str]]] = []
    data = None
    for q, row in enumerate(rows):
        meta.append([])
        for j, nb in enumerate(row):
            ex = nb.example
            scores[q, j] = nb.score
            ids[q, j] = ex.id
            labels[q, j] = ex.label if ex.HasField("label") else -1
            ext[q, j] = ex.external_id
            splits[q, j] = ex.split
            meta[q].append(dict(ex.metadata))
            if ex.HasField("data"):
                arr = from_tensor(ex.data, "example data")
                if data is None:
                    data = np.zeros((n, k, *arr.shape), dtype=arr.dtype)
                data[q, j] = arr
    return Hits(scores, ids, labels, ext, splits, meta, data)


def _examples(examples: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ids": np.array([e.id for e in examples], dtype=np.int64),
        "labels": np.array([e.label if e.HasField("label") else -1 for e in examples], dtype=np.int64),
        "external_ids": [e.external_id for e in examples],
        "splits": [e.split for e in examples],
        "metadata": [dict(e.metadata) for e in examples],
        "texts": [e.metadata.get("text", "") for e in examples],
        "self_influence": np.array([e.self_influence if e.HasField("self_influence") else np.nan
                                    for e in examples]),
    }
    if examples and examples[0].HasField("data"):
        out["data"] = np.stack([from_tensor(e.data, "example data") for e in examples])
    return out


class GradIndexClient:
    """A channel to one server with typed, numpy-friendly calls."""

    def __init__(self, target: str, token: str | None = None, *, tls_root_cert: str | bytes | None = None,
                 tls: bool = False, timeout: float | None = 30.0, max_message_mb: float = 64.0,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        """``target`` is ``host:port``; ``tls``/``tls_root_cert`` (PEM path or bytes) switch to TLS;
        ``timeout`` is the default deadline of each call in seconds (None: no deadline)."""
        opts = [("grpc.max_receive_message_length", int(max_message_mb * 2**20)),
                ("grpc.max_send_message_length", int(max_message_mb * 2**20)), *options]
        if tls or tls_root_cert is not None:
            root = tls_root_cert
            if isinstance(root, str):
                root = Path(root).read_bytes()
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.GradIndexStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self) -> "GradIndexClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, rpc: Any, request: Any, timeout: float | None, with_call: bool = False) -> Any:
        t = self.timeout if timeout is None else timeout
        if with_call:
            return rpc.with_call(request, timeout=t, metadata=self.metadata)
        return rpc(request, timeout=t, metadata=self.metadata)

    # ---- health and listing ----------------------------------------------------------------
    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """'SERVING' / 'NOT_SERVING' / ...: the standard grpc.health.v1 check (no token needed)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (raises grpc.FutureTimeoutError otherwise)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def list_models(self, timeout: float | None = None) -> list[Any]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def describe_model(self, name: str, timeout: float | None = None) -> Any:
        return self._call(self.stub.DescribeModel, pb.DescribeModelRequest(name=name), timeout)

    def list_indexes(self, model: str = "", timeout: float | None = None) -> list[Any]:
        return list(self._call(self.stub.ListIndexes, pb.ListIndexesRequest(model=model), timeout).indexes)

    def describe_index(self, name: str, timeout: float | None = None) -> Any:
        return self._call(self.stub.DescribeIndex, pb.DescribeIndexRequest(name=name), timeout)

    # ---- queries ----------------------------------------------------------------------------
    def _result(self, resp: Any, call: Any, k: int, direction: str) -> SimilarityResult:
        timing: dict[str, float] = {}
        for key, value in call.trailing_metadata() or ():
            if key == "server-timing" and value:
                timing = {a: float(b) for a, b in (kv.split("=") for kv in value.split(","))}
        most = _hits([r.most_similar for r in resp.results], k) if direction in ("most", "both") else None
        least = _hits([r.least_similar for r in resp.results], k) if direction in ("least", "both") else None
        targets = None
        if resp.results and resp.results[0].HasField("target"):
            targets = np.array([r.target for r in resp.results], dtype=np.int64)
        return SimilarityResult(most, least, targets, resp.index, resp.generation, timing, resp.exact_scores)

    def find_similar(self, index: str, X: np.ndarray | None = None, targets: np.ndarray | None = None, k: int = 5,
                     direction: str = "most", labels: Sequence[int] = (), splits: Sequence[str] = (),
                     include_data: bool = False, timeout: float | None = None, *, texts: Sequence[str] | None = None,
                     completions: Sequence[str] | None = None,
                     named_inputs: dict[str, np.ndarray] | None = None) -> SimilarityResult:
        """Top-k most (``direction='most'``), least, or both similar training examples per query.

        The queries are one of: ``X``, a batch (n, *input_shape); ``texts``, raw strings the server
        tokenizes with the model's own tokenizer (for a causal LM with ``completions``: prompts, and
        only the completions' tokens count); ``named_inputs``, e.g. ``{"input_ids": ..,
        "attention_mask": ..}`` (n, max_length) each. ``targets`` (n,) default to the model's
        predicted class; ``labels``/``splits`` restrict the candidates.
        """
        if sum(v is not None for v in (X, texts, named_inputs)) != 1:
            raise ValueError("give exactly one of X, texts or named_inputs.")
        if isinstance(texts, str) or isinstance(completions, str):
            raise ValueError("texts and completions are lists of strings: wrap one string in a list.")
        req = pb.FindSimilarRequest(index=index, k=k,
                                    direction=_DIRECTIONS[direction], include_data=include_data,
                                    filter=pb.Filter(labels=list(labels), splits=list(splits)))
        if X is not None:
            req.inputs.CopyFrom(to_tensor(np.asarray(X)))
        elif texts is not None:
            req.texts.extend(list(texts))
            req.completions.extend(list(completions or []))
        else:
            for name, arr in named_inputs.items():
                req.named_inputs[name].CopyFrom(to_tensor(np.asarray(arr)))
        if targets is not None:
            req.targets.CopyFrom(to_tensor(np.asarray(targets)))
        resp, call = self._call(self.stub.FindSimilar, req, timeout, with_call=True)
        return self._result(resp, call, k, direction)

    def search_by_gradient(self, index: str, G: np.ndarray, k: int = 5, direction: str = "most",
                           projected: bool = False, labels: Sequence[int] = (), splits: Sequence[str] = (),
                           include_data: bool = False, timeout: float | None = None) -> SimilarityResult:
        """Top-k for client-computed gradients (n, gradient_dim), or (n, dim) with ``projected=True``."""
        req = pb.SearchByGradientRequest(index=index, gradients=to_tensor(np.asarray(G)), k=k,
                                         direction=_DIRECTIONS[direction], projected=projected,
                                         include_data=include_data,
                                         filter=pb.Filter(labels=list(labels), splits=list(splits)))
        resp, call = self._call(self.stub.SearchByGradient, req, timeout, with_call=True)
        return self._result(resp, call, k, direction)

    def get_examples(self, index: str, ids: Sequence[int], include_data: bool = False,
                     timeout: float | None = None) -> dict[str, Any]:
        """Stored records (and optionally the examples) of the given ids, in order."""
        req = pb.GetExamplesRequest(index=index, ids=[int(i) for i in ids], include_data=include_data)
        return _examples(self._call(self.stub.GetExamples, req, timeout).examples)

    def self_influence(self, index: str, k: int = 10, lowest: bool = False, include_data: bool = False,
                       timeout: float | None = None) -> dict[str, Any]:
        """The k training examples with the highest (or lowest) self-influence; ``scores`` included."""
        req = pb.SelfInfluenceRequest(index=index, k=k, lowest=lowest, include_data=include_data)
        resp = self._call(self.stub.SelfInfluence, req, timeout)
        out = _examples([n.example for n in resp.examples])
        out["scores"] = np.array([n.score for n in resp.examples])
        return out

    def reload_index(self, index: str, from_index: str = "", timeout: float | None = None) -> Any:
        """Swap in a fresh load of ``from_index`` (default: ``index``) under the name ``index``."""
        return self._call(self.stub.ReloadIndex, pb.ReloadIndexRequest(index=index, from_index=from_index),
                          timeout)
