"""numpy arrays <-> ``gradindex.v1.Tensor`` (raw bytes + dtype + shape), with validation.

Both the server and the client use these functions, so an array survives the round trip
bit-for-bit. Decoding never trusts the sender: the dtype must be on the allow-list, the shape
non-negative and consistent with the byte count, and (where asked) the values finite.
"""

from __future__ import annotations

import numpy as np

from server.protos import types_pb2

#: dtypes a Tensor may carry (numpy names).
DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "bool")


def to_tensor(arr: np.ndarray) -> types_pb2.Tensor:
    """Encode an array as a Tensor (C order, little-endian)."""
    a = np.asarray(arr)
    name = a.dtype.name
    if name not in DTYPES:
        raise TypeError(f"dtype {name} cannot travel as a Tensor; use one of {', '.join(DTYPES)}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return types_pb2.Tensor(dtype=name, shape=list(a.shape), data=a.tobytes())


def from_tensor(t: types_pb2.Tensor, what: str = "tensor", *, finite: bool = False,
                ndim: int | None = None, min_ndim: int | None = None,
                dtypes: tuple[str, ...] | None = None) -> np.ndarray:
    """Decode a Tensor into a numpy array; raise ValueError saying what to fix.

    ``what`` names the field in error messages; ``finite`` rejects NaN/inf; ``ndim``/``min_ndim``
    check the rank; ``dtypes`` restricts the allowed dtypes further.
    """
    allowed = dtypes or DTYPES
    if not t.dtype:
        raise ValueError(f"{what}: dtype is empty; set it to one of {', '.join(allowed)}")
    if t.dtype not in allowed:
        raise ValueError(f"{what}: dtype {t.dtype!r} is not accepted here; send one of {', '.join(allowed)}")
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{what}: shape {list(shape)} has a negative dimension")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {list(shape)}")
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(f"{what}: expected at least {min_ndim} dimensions, got shape {list(shape)}")
    dt = np.dtype(t.dtype).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(t.data) != expected:
        raise ValueError(f"{what}: {len(t.data)} bytes of data do not match shape {list(shape)} of "
                         f"{t.dtype} ({expected} bytes expected)")
    # A writable copy: frameworks (torch.as_tensor) refuse or warn on read-only buffers.
    a = np.frombuffer(t.data, dtype=dt).reshape(shape).copy()
    if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{what}: contains {bad} NaN or infinite value(s); send finite numbers only")
    return a
