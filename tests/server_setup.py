"""Setup shared by the server test modules: a real digits index built by the indexer, and the
(status code, details) of a gRPC call that must fail. A module imports it (pytest puts tests/ on the
path) and wraps the index in its own module-scoped fixture, so each module keeps a private workdir."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import grpc
import pytest


def digits_index(tmp_path_factory: pytest.TempPathFactory, label: str, queries: int, n: int = 200) -> SimpleNamespace:
    """A real ``n``-example digits index (the shipped config) in a fresh temp dir named ``label``.

    ``X``/``y`` are the last ``queries`` digits (float32 images, int64 labels), for query requests.
    """
    import torch

    from indexer.demo import load_digits_28
    from server.demo import ensure_digits_index

    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp(label)
    name = ensure_digits_index(wd, n=n, progress=False)
    X, y = load_digits_28()
    return SimpleNamespace(workdir=wd, name=name, X=X[-queries:], y=y[-queries:], count=n, input_shape=X.shape[1:])


def rpc_error(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """Call ``fn``, which must raise a gRPC error; return its status code and details."""
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()
