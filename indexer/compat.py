"""Keeping torchvision importable beside the CPU-only torch build this project pins.

PyPI's torchvision wheels for Linux are CUDA builds. Beside a CPU-only torch their compiled operators
cannot load, and ``import torchvision`` then fails while registering fake kernels for
``torchvision::nms``/``qnms``. That failure spreads: ``transformers`` imports torchvision whenever
it is installed, and ``zennit`` (BiLRP's rules) imports it in its package ``__init__``. Nothing here
uses torchvision's compiled operators (detection ops); its models and everything else are plain
Python. So, when and only when the compiled operators are missing, their schemas are declared
(with no kernels: calling them still raises) so that the pure-Python parts import.
"""

from __future__ import annotations

import importlib.util
import threading

_lock = threading.Lock()
_library = None  # the declared schemas live as long as this object
_checked = False


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` succeed when it is installed but its compiled ops cannot load.

    Call before importing ``transformers``, ``zennit`` or ``torchvision``. A no-op when torchvision
    is absent or loads normally; idempotent and thread-safe.
    """
    global _library, _checked
    with _lock:
        if _checked:
            return
        _checked = True
        if importlib.util.find_spec("torchvision") is None:
            return
        import torch

        try:
            import torchvision  # noqa: F401
            return
        except RuntimeError as exc:
            if "torchvision::" not in str(exc):
                raise
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the half-imported package, so the retry runs its __init__ again
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            try:
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # declared already
        _library = lib
        import torchvision  # noqa: F401,F811
