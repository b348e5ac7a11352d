"""The Explanation container every gradindex explainer returns (alibi-compatible access).

Like alibi's ``Explanation``: ``meta`` (explainer name, type, parameters) and ``data`` (results),
with every key of ``data`` also readable as an attribute (``exp.scores``, ``exp.anchor``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Explanation:
    """An explanation: ``meta`` and ``data``; data keys double as attributes."""

    meta: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name in ("meta", "data"):  # guard the dataclass fields against recursion
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute or data key {name!r}") from None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_dict(self) -> dict:
        """Plain ``{'meta': ..., 'data': ...}`` (arrays stay arrays)."""
        return {"meta": self.meta, "data": self.data}
