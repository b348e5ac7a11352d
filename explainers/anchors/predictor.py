"""The predictor wrapper of the anchors explainers: labels from the user's function, kind declared or inferred.

:class:`Predictor` calls the user's predictor and turns its output into class labels (counting calls
and rows); :func:`resolve_predictor` builds it from a declared kind or infers the kind as alibi does
(:func:`infer_predictor_type`: one call on a zero input).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

PREDICTOR_TYPES = ("class", "proba")


def infer_predictor_type(fn: Callable[[Any], Any], probe: Any) -> str:
    """``'class'`` or ``'proba'`` from the predictor's output on ``probe`` (one zero input), as alibi infers it.

    alibi calls the predictor once on a zero input at construction and keeps it as is when the
    output's longest axis is the batch axis (``np.argmax(shape) == 0``: labels ``(1,)`` or
    ``(1, 1)``), else wraps it in an argmax (scores ``(1, n_classes)``). The same rule here, with a
    clear error when the probe call fails or returns something that is neither.
    """
    try:
        out = np.asarray(fn(probe))
    except Exception as e:  # the user's predictor: any failure means we cannot infer
        raise ValueError(
            f"could not infer predictor_type: calling the predictor on a zero input raised "
            f"{type(e).__name__}: {e}. Pass predictor_type='class' (it returns labels) or 'proba' "
            f"(it returns class scores)") from e
    if out.ndim == 0 or out.ndim > 2 or out.shape[0] != 1:
        raise ValueError(
            f"could not infer predictor_type: on one zero input the predictor returned shape {out.shape}, "
            f"expected (1,) labels or (1, n_classes) scores. Pass predictor_type='class' or 'proba'")
    return "class" if int(np.argmax(out.shape)) == 0 else "proba"


def resolve_predictor(fn: Callable[[Any], Any], predictor_type: str | None, probe: Callable[[], Any]
                      ) -> tuple["Predictor", dict]:
    """The label-returning :class:`Predictor` and the ``meta['params']`` entries saying how its kind was set.

    ``predictor_type=None`` infers the kind as alibi does (:func:`infer_predictor_type` on
    ``probe()``); a declared kind always wins and nothing is probed.
    """
    if not callable(fn):
        raise TypeError(f"predictor must be callable, got {type(fn).__name__}")
    inferred = predictor_type is None
    if inferred:
        predictor_type = infer_predictor_type(fn, probe())
    return Predictor(fn, predictor_type), {"predictor_type": predictor_type, "predictor_type_inferred": inferred}


class Predictor:
    """Calls the user's predictor and turns its output into class labels, as declared or inferred.

    ``predictor_type='class'``: the predictor returns one label per row (shape ``(n,)``).
    ``predictor_type='proba'``: it returns scores of shape ``(n, n_classes)``; the label is the argmax.
    A later output of the other shape raises ``ValueError`` instead of being guessed again.
    It also counts calls and rows, thread-safely, for benchmarks.
    """

    def __init__(self, fn: Callable[[Any], Any], predictor_type: str = "class") -> None:
        if not callable(fn):
            raise TypeError(f"predictor must be callable, got {type(fn).__name__}")
        if predictor_type not in PREDICTOR_TYPES:
            raise ValueError(f"predictor_type must be one of {PREDICTOR_TYPES}, got {predictor_type!r}")
        self.fn = fn
        self.predictor_type = predictor_type
        self.calls = 0
        self.rows = 0
        self._lock = threading.Lock()

    def __call__(self, x: Any) -> np.ndarray:
        n = len(x)
        out = np.asarray(self.fn(x))
        with self._lock:
            self.calls += 1
            self.rows += n
        if self.predictor_type == "class":
            if out.ndim == 2 and out.shape[1] == 1:
                out = out[:, 0]
            if out.ndim != 1 or out.shape[0] != n:
                raise ValueError(
                    f"predictor_type='class' expects the predictor to return {n} labels of shape ({n},), "
                    f"got shape {out.shape}; pass predictor_type='proba' if it returns class scores")
            return out
        if out.ndim != 2 or out.shape[0] != n:
            raise ValueError(
                f"predictor_type='proba' expects the predictor to return scores of shape ({n}, n_classes), "
                f"got shape {out.shape}; pass predictor_type='class' if it returns labels")
        return out.argmax(axis=1)


__all__ = ["PREDICTOR_TYPES", "Predictor", "infer_predictor_type", "resolve_predictor"]
