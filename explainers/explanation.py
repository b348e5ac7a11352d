"""The Explanation container every gradindex explainer returns (alibi-compatible access and JSON).

Like alibi's ``Explanation``: ``meta`` (explainer name, type, parameters) and ``data`` (results),
with every key of ``meta`` and ``data`` also readable as an attribute (``exp.scores``,
``exp.anchor``, ``exp.name``; a key in both reads from ``meta``, as alibi's ``ChainMap(meta, data)``
does). :meth:`Explanation.to_json` writes alibi's JSON shape, ``{"meta": ..., "data": ...}`` with
numpy arrays as nested lists and numpy scalars as numbers, so an explanation made here can be read
by ``alibi.api.interfaces.Explanation.from_json`` and the reverse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class NumpyEncoder(json.JSONEncoder):
    """JSON encoder for numpy values, as alibi's: arrays → lists, numpy scalars → int/float/bool."""

    def default(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        return super().default(obj)


@dataclass
class Explanation:
    """An explanation: ``meta`` and ``data``; their keys double as attributes."""

    meta: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name in ("meta", "data") or name.startswith("__"):  # dataclass fields, pickling/copy probes
            raise AttributeError(name)
        for part in (self.meta, self.data):
            if name in part:
                return part[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or meta/data key {name!r}")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_dict(self) -> dict:
        """Plain ``{'meta': ..., 'data': ...}`` (arrays stay arrays)."""
        return {"meta": self.meta, "data": self.data}

    def to_json(self) -> str:
        """alibi's JSON: ``{"meta": ..., "data": ...}``, numpy arrays as nested lists."""
        return json.dumps({"meta": self.meta, "data": self.data}, cls=NumpyEncoder)

    @classmethod
    def from_json(cls, jsonrepr: str) -> "Explanation":
        """Read an explanation written by :meth:`to_json` or by alibi's ``Explanation.to_json``.

        As in alibi, arrays come back as (nested) lists. Raises ``ValueError`` when the text is not
        JSON or lacks the ``meta`` or ``data`` object.
        """
        try:
            d = json.loads(jsonrepr)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a JSON explanation: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("meta"), dict) or not isinstance(d.get("data"), dict):
            raise ValueError("a JSON explanation is an object with 'meta' and 'data' objects")
        return cls(meta=d["meta"], data=d["data"])
