"""Keep ``import torchvision`` working where its compiled ops cannot load.

PyPI's torchvision wheel is built against a CUDA torch; beside a CPU-only torch build (this project's
pinned torch 2.13.0) its compiled ops (``torchvision/_C``) do not load, and ``import torchvision``
then fails while registering fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
("operator torchvision::nms does not exist"). That failure reaches everything that imports
torchvision: zennit (BiLRP's LRP rules) and transformers (the masked language model of AnchorText).
The model classes and transforms are plain Python, so when the compiled ops are missing this module
declares the two op schemas (with no kernels: calling the ops still raises a clear error) before
anything imports torchvision. Where the ops load, or torchvision is absent, it does nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_LIB: list[torch.library.Library] = []  # the declared schemas live as long as their library object


def ensure_torchvision_importable() -> bool:
    """Declare ``torchvision::nms`` / ``qnms`` if torchvision is installed without loadable ops.
    Returns whether it had to (idempotent)."""
    if _LIB:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C.*so")) + \
        glob.glob(os.path.join(spec.submodule_search_locations[0], "_C.pyd"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return False
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass  # declared already
    _LIB.append(lib)
    return True
