"""gradindex explainers: GradientSimilarity, Anchors (tabular, text, image) and BiLRP.

Names are resolved lazily, so ``from explainers import GradientSimilarity`` does not import spaCy,
transformers or scikit-image, and ``from explainers import AnchorText`` does not import torch's
engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "GradientSimilarity": "explainers.similarity",
    "Explanation": "explainers.explanation",
    "AnchorTabular": "explainers.anchors",
    "AnchorText": "explainers.anchors",
    "AnchorImage": "explainers.anchors",
    "BiLRP": "explainers.bilrp",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'explainers' has no attribute {name!r}")
