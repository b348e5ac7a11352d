"""Property-based fuzzing of every request message against a real server on a small index.

Hypothesis draws every field of each request message, valid and not (right and wrong dtypes,
shapes, byte counts, enum values, huge and negative numbers, long and odd strings, random
explainer parameters), plus raw random bytes for every method. Each call must end OK or with one
of the documented statuses (docs/server.md), never UNKNOWN or INTERNAL, and the server must still
answer afterwards. The number of requests tried is printed (``-s``) and checked.
"""

from __future__ import annotations

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from server.app import GradIndexServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.protos import service_pb2 as pb  # noqa: E402
from server.protos import service_pb2_grpc as pb_grpc  # noqa: E402
from server.protos import types_pb2  # noqa: E402
from server.tensors import to_tensor  # noqa: E402

SC = grpc.StatusCode
#: The statuses docs/server.md documents for client mistakes and limits (plus OK).
DOCUMENTED = {SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.RESOURCE_EXHAUSTED, SC.FAILED_PRECONDITION,
              SC.PERMISSION_DENIED, SC.DEADLINE_EXCEEDED, SC.UNIMPLEMENTED}
N_EXAMPLES = 30  # per message kind
TRIED: list[tuple[str, SC]] = []


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    from indexer.demo import load_digits_28
    from server.demo import ensure_digits_index

    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("fuzz")
    name = ensure_digits_index(wd, n=120, progress=False)
    srv = GradIndexServer(ServerConfig(workdir=str(wd), indexes=[name], port=0, log_level="ERROR",
                                       request_memory_mb=16.0, explain_chunk=64)).start()
    ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    stub = pb_grpc.GradIndexStub(ch)
    model = stub.DescribeIndex(pb.DescribeIndexRequest(name=name), timeout=30).model
    X = load_digits_28()[0][:4].astype(np.float32)
    yield {"srv": srv, "ch": ch, "stub": stub, "name": name, "model": model, "X": X}
    ch.close()
    srv.stop(0)
    print(f"\nfuzz: {len(TRIED)} requests tried; codes: "
          f"{ {c.name: sum(1 for _, x in TRIED if x == c) for c in sorted({x for _, x in TRIED}, key=str)} }")


def _call(env, method: str, request, timeout: float = 5.0) -> SC:
    fn = getattr(env["stub"], method)
    try:
        fn(request, timeout=timeout)
        code = SC.OK
    except grpc.RpcError as e:
        code = e.code()
        assert code in DOCUMENTED, f"{method} -> {code}: {e.details()[:500]}"
        assert len(e.details() or "") <= 1100, f"{method}: status message of {len(e.details())} chars"
    TRIED.append((method, code))
    return code


names = st.one_of(st.text(max_size=12), st.sampled_from(["digits", "", "x" * 300]))
ints64 = st.one_of(st.integers(-3, 300), st.integers(-(2**63), 2**63 - 1))
ints32 = st.one_of(st.integers(-3, 300), st.integers(-(2**31), 2**31 - 1))
dtypes = st.sampled_from(["float32", "float64", "float16", "int64", "int32", "uint8", "bool", "", "complex64",
                          "object"])


@st.composite
def tensors(draw, valid_shape=None):
    """A Tensor: consistent (right bytes for dtype x shape) or not; sometimes of the index's input shape."""
    if valid_shape is not None and draw(st.booleans()):
        n = draw(st.integers(0, 6))
        shape = [n, *valid_shape]
        dt = draw(st.sampled_from(["float32", "float64", "float16", "int64"]))
        arr = draw(st.sampled_from([np.zeros, np.ones]))(shape).astype(dt)
        if draw(st.booleans()) and arr.size and arr.dtype.kind == "f":
            arr.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -7.0]))
        return to_tensor(arr)
    shape = draw(st.lists(st.integers(-2, 40), max_size=4))
    dt = draw(dtypes)
    nbytes = draw(st.one_of(st.just(None), st.integers(0, 64)))
    if nbytes is None:
        try:
            size = int(np.prod(shape)) * np.dtype(dt or "float32").itemsize if all(s >= 0 for s in shape) else 3
        except TypeError:
            size = 3
        nbytes = min(max(size, 0), 1 << 16)
    return types_pb2.Tensor(dtype=dt, shape=shape, data=draw(st.binary(min_size=nbytes, max_size=nbytes)))


filters = st.builds(lambda labels, splits: pb.Filter(labels=labels, splits=splits),
                    st.lists(ints64, max_size=5), st.lists(st.text(max_size=8), max_size=3))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, width=32),
                                     st.integers(-5, 2000), st.text(max_size=8)),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)
KNOBS = ["batch_size", "coverage_samples", "threshold", "delta", "tau", "beam_size", "max_anchor_size", "seed",
         "p_sample", "predictor_type", "sampling_strategy", "nlp", "language_model", "segmentation_fn",
         "segmentation_kwargs", "rule", "epsilon", "gamma", "pool", "projection", "bounds", "unknown_key"]


@st.composite
def structs(draw):
    d = draw(st.dictionaries(st.sampled_from(KNOBS), json_values, max_size=4))
    for k in ("batch_size", "coverage_samples"):  # keep a valid search short
        if isinstance(d.get(k), int) and d[k] > 50:
            d[k] = 50
    d.setdefault("coverage_samples", 20)
    d.setdefault("batch_size", 20)
    s = struct_pb2.Struct()
    s.update(d)
    return s


SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _shape(env):
    return list(env["X"].shape[1:])


@SETTINGS
@given(data=st.data())
def test_fuzz_find_similar_and_search_by_gradient(env, data):
    idx = data.draw(st.one_of(st.just(env["name"]), names))
    req = pb.FindSimilarRequest(index=idx, k=data.draw(ints32), direction=data.draw(st.integers(-2, 6)),
                                filter=data.draw(filters), include_data=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        req.inputs.CopyFrom(data.draw(tensors(_shape(env))))
    if data.draw(st.booleans()):
        req.targets.CopyFrom(data.draw(tensors()))
    _call(env, "FindSimilar", req)
    g = pb.SearchByGradientRequest(index=idx, k=data.draw(ints32), direction=data.draw(st.integers(-2, 6)),
                                   filter=data.draw(filters), include_data=data.draw(st.booleans()),
                                   projected=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        g.gradients.CopyFrom(data.draw(tensors()))
    _call(env, "SearchByGradient", g)


@SETTINGS
@given(data=st.data())
def test_fuzz_catalog_rpcs(env, data):
    idx = data.draw(st.one_of(st.just(env["name"]), names))
    _call(env, "ListModels", pb.ListModelsRequest())
    _call(env, "DescribeModel", pb.DescribeModelRequest(name=data.draw(names)))
    _call(env, "ListIndexes", pb.ListIndexesRequest(model=data.draw(names)))
    _call(env, "DescribeIndex", pb.DescribeIndexRequest(name=idx))
    _call(env, "GetExamples", pb.GetExamplesRequest(index=idx, ids=data.draw(st.lists(ints64, max_size=6)),
                                                    include_data=data.draw(st.booleans())))
    _call(env, "SelfInfluence", pb.SelfInfluenceRequest(index=idx, k=data.draw(ints32),
                                                        lowest=data.draw(st.booleans()),
                                                        include_data=data.draw(st.booleans())))
    _call(env, "ReloadIndex", pb.ReloadIndexRequest(index=data.draw(names), from_index=data.draw(names)))


@SETTINGS
@given(data=st.data())
def test_fuzz_explainers(env, data):
    req = pb.ExplainAnchorsRequest(model=data.draw(st.one_of(st.just(env["model"]), names)),
                                   kind=data.draw(st.sampled_from(["", "tabular", "text", "image", "video"])),
                                   params=data.draw(structs()))
    which = data.draw(st.sampled_from(["row", "text", "image", None]))
    if which == "text":
        req.text = data.draw(st.text(max_size=30))
    elif which is not None:
        getattr(req, which).CopyFrom(data.draw(tensors([28, 28, 1] if which == "image" else None)))
    _call(env, "ExplainAnchors", req, timeout=3.0)
    pair = pb.ExplainPairRequest(index=data.draw(st.one_of(st.just(env["name"]), names)),
                                 options=data.draw(structs()))
    if data.draw(st.booleans()):
        pair.query.CopyFrom(data.draw(tensors()))
    other = data.draw(st.sampled_from(["training_id", "other_input", None]))
    if other == "training_id":
        pair.training_id = data.draw(ints64)
    elif other == "other_input":
        pair.other_input.CopyFrom(data.draw(tensors()))
    _call(env, "ExplainPair", pair, timeout=3.0)


@SETTINGS
@given(method=st.sampled_from([m.name for m in pb.DESCRIPTOR.services_by_name["GradIndex"].methods]),
       raw=st.binary(max_size=64))
def test_fuzz_raw_bytes(env, method, raw):
    call = env["ch"].unary_unary(f"/gradindex.v1.GradIndex/{method}")
    try:
        call(raw, timeout=5.0)
        code = SC.OK
    except grpc.RpcError as e:
        code = e.code()
        assert code in DOCUMENTED, f"{method} raw {raw!r} -> {code}: {e.details()[:300]}"
    TRIED.append((method, code))


def test_server_still_answers_after_the_fuzzing(env):
    r = env["stub"].FindSimilar(pb.FindSimilarRequest(index=env["name"], inputs=to_tensor(env["X"]), k=3), timeout=30)
    assert len(r.results) == len(env["X"]) and all(len(q.most_similar) == 3 for q in r.results)
    assert len(TRIED) >= 4 * N_EXAMPLES * 2, len(TRIED)
