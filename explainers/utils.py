"""Helpers under the names alibi's ``alibi.utils`` gives them, so alibi snippets run with one import changed.

* :func:`gen_category_map`: the ``categorical_names`` map of :class:`~explainers.anchors.AnchorTabular`
  from a DataFrame (object columns) or an array (columns named).
* :func:`spacy_model`: make sure a spaCy pipeline is available before ``spacy.load``; unlike alibi it
  never downloads, it says how to install a missing one.
* ``LanguageModel``, ``DistilbertBaseUncased``, ``BertBaseUncased``, ``RobertaBase``: the masked
  language models of AnchorText (imported lazily: torch and transformers load only when used).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_LAZY = {name: "explainers.anchors.language_model"
         for name in ("LanguageModel", "DistilbertBaseUncased", "BertBaseUncased", "RobertaBase")}


def gen_category_map(data: Any, categorical_columns: Sequence[int] | Sequence[str] | None = None
                     ) -> dict[int, list]:
    """``{column index: sorted categories}`` for the categorical columns of ``data``, as alibi's.

    ``data`` is a 2-D pandas DataFrame or numpy array. With a DataFrame and no
    ``categorical_columns``, the columns of dtype object are categorical (alibi's inference), and
    so are pandas string columns (the default for text from pandas 3 on). With an array, ``categorical_columns`` (integer indices) is required. Categories are
    the column's sorted distinct values (scikit-learn's ``LabelEncoder().classes_``), so category
    ``i`` is the code ``LabelEncoder`` gives it.
    """
    from sklearn.preprocessing import LabelEncoder

    if getattr(data, "ndim", None) != 2:
        raise TypeError("Expected a 2-dimensional dataframe or array")
    is_frame = hasattr(data, "iloc") and hasattr(data, "columns")
    if not is_frame:
        data = np.asarray(data)
        if categorical_columns is None:
            raise ValueError("If passing a numpy array, `categorical_columns` is required")
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in categorical_columns):
            raise ValueError("If passing a numpy array, `categorical_columns` must be a list of integers")
    n_features = data.shape[1]
    if categorical_columns is None:
        import pandas as pd  # data is a DataFrame here, so pandas is installed

        # object columns, as alibi; also pandas' string dtype, which pandas >= 3 gives text columns by
        # default (alibi, written for object columns, would silently find no categorical column there)
        categorical_columns = [i for i in range(n_features) if data.iloc[:, i].dtype == "O"
                               or isinstance(data.iloc[:, i].dtype, pd.StringDtype)]
    out: dict[int, list] = {}
    for col in categorical_columns:
        if isinstance(col, (int, np.integer)) and not isinstance(col, bool):
            idx = int(col)
            if not 0 <= idx < n_features:
                raise IndexError(f"categorical column {idx} is out of range for {n_features} columns")
        elif is_frame:
            if col not in data.columns:
                raise KeyError(f"no column named {col!r}; columns: {list(data.columns)}")
            idx = int(data.columns.get_loc(col))
        else:
            raise ValueError(f"categorical column {col!r} must be an integer index")
        values = data.iloc[:, idx] if is_frame else data[:, idx]
        out[idx] = list(LabelEncoder().fit(values).classes_)
    return out


def spacy_model(model: str = "en_core_web_md") -> None:
    """Check that the spaCy pipeline ``model`` (installed package name or directory) can be loaded.

    alibi downloads a missing package here; this project never downloads at run time, so a missing
    pipeline raises ``OSError`` saying how to install it. Afterwards ``spacy.load(model)`` works (or
    pass the name as ``AnchorText(nlp=model)``).
    """
    import spacy

    if Path(model).is_dir() or spacy.util.is_package(model):
        return None
    raise OSError(
        f"spaCy pipeline {model!r} is not installed and is not a directory; nothing is downloaded at run "
        f"time. Install it into this environment (`python -m spacy download {model}`, or `pip install` its "
        f"wheel copied from a machine with network), or pass the path of a pipeline saved with "
        f"nlp.to_disk(path).")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["gen_category_map", "spacy_model", *_LAZY]
