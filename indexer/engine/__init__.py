"""The gradient engine: per-example loss gradients w.r.t. model parameters, for PyTorch and Keras.

``base`` holds what every framework shares (:class:`Block`, :class:`GradientEngine`, parameter
selection); ``pytorch`` and ``keras`` are the adapters; this module picks one for a model. The
adapters import only ``base``, never this factory, so the package has no import circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from indexer.defaults import CHUNK_SIZE
from indexer.engine.base import TASKS, Block, GradientEngine, WarnOnce, select_names


def detect_framework(model: Any) -> str:
    """'pytorch' or 'tensorflow' from the model's type, without importing a framework needlessly."""
    for klass in type(model).__mro__:
        m = klass.__module__
        if m.startswith("torch"):
            return "pytorch"
        if m.startswith(("keras", "tensorflow", "tf_keras")):
            return "tensorflow"
    raise TypeError(f"Cannot tell the framework of a {type(model).__module__}.{type(model).__name__}: pass a "
                    "torch.nn.Module or a tf.keras.Model, or set framework/backend to 'pytorch' or 'tensorflow'.")


def make_engine(model: Any, loss_fn: Any, task: str = "classification", params: Sequence[str] | str | None = None,
                framework: str | None = None, device: Any = None, chunk_size: int = CHUNK_SIZE) -> GradientEngine:
    """Build the engine for a PyTorch or Keras model (framework detected when not given)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: use one of {', '.join(TASKS)}.")
    if framework is None:
        framework = detect_framework(model)
    if framework in ("pytorch", "torch"):
        from indexer.engine.pytorch import TorchEngine

        return TorchEngine(model, loss_fn, task=task, params=params, device=device, chunk_size=chunk_size)
    if framework in ("tensorflow", "keras", "tf"):
        from indexer.engine.keras import KerasEngine

        return KerasEngine(model, loss_fn, task=task, params=params, chunk_size=chunk_size)
    raise ValueError(f"Unknown framework/backend {framework!r}: use 'pytorch' or 'tensorflow'.")


__all__ = ["Block", "GradientEngine", "WarnOnce", "make_engine", "select_names", "detect_framework", "TASKS"]
