"""Anchors explainers (Ribeiro et al. 2018): drop-ins for alibi 0.9.6's AnchorTabular, AnchorText, AnchorImage.

Submodules are imported lazily so that ``from explainers.anchors import AnchorTabular`` does not
pull in spaCy, transformers or scikit-image.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AnchorTabular": ".tabular",
    "AnchorText": ".text",
    "LanguageModel": ".language_model",
    "DistilbertBaseUncased": ".language_model",
    "BertBaseUncased": ".language_model",
    "RobertaBase": ".language_model",
    "AnchorImage": ".image",
    "Explanation": ".base",  # re-export of explainers.explanation.Explanation
    "Predictor": ".base",
    "explain_anchors": ".serve",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
