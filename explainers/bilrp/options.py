"""Validation of the BiLRP options, shared by the explainer and the independent reference in the tests
(which computes BiLRP its own way but must accept and refuse the same options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

RULES = ("zero", "epsilon", "gamma", "zb")


@dataclass
class Options:
    """Checked BiLRP options: one rule per Linear/Conv call (input side first) and the rest as given,
    plus the alibi-style ``meta`` dict the explanations carry."""

    rules: list[str]
    bounds: tuple[Any, Any] | None
    epsilon: float
    gamma: float
    pool: Any
    batch_size: int
    projection: torch.Tensor | None
    meta: dict[str, Any]


def check_options(n_linear: int, rule: str | Sequence[str], input_rule: str | None, bounds: tuple[Any, Any] | None,
                  epsilon: float, gamma: float, projection: np.ndarray | torch.Tensor | None, pool: Any,
                  batch_size: int, dtype: torch.dtype) -> Options:
    """Check the BiLRP constructor options for a model with ``n_linear`` Linear/Conv calls; raises
    ValueError saying what to fix."""
    rules = [rule] * n_linear if isinstance(rule, str) else list(rule)
    if len(rules) != n_linear:
        raise ValueError(f"rule list has {len(rules)} entries but the model has {n_linear} Linear/Conv layers")
    if input_rule is not None:
        rules[0] = input_rule
    for r in rules:
        if r not in RULES:
            raise ValueError(f"unknown LRP rule {r!r}; choose from {RULES}")
    if "zb" in rules[1:]:
        raise ValueError("the z^B rule applies to the input layer only (input_rule='zb')")
    if rules[0] == "zb" and bounds is None:
        raise ValueError("the z^B rule needs input bounds: bounds=(low, high), e.g. (0, 1) for pixels")
    if epsilon < 0 or gamma < 0:
        raise ValueError(f"epsilon and gamma must be >= 0, got epsilon={epsilon}, gamma={gamma}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    P = None if projection is None else torch.as_tensor(np.asarray(projection), dtype=dtype)
    if P is not None and P.dim() != 2:
        raise ValueError(f"projection must be a (dim(phi), k) matrix, got shape {tuple(P.shape)}")
    meta: dict[str, Any] = {
        "name": "BiLRP", "type": ["whitebox"], "explanations": ["local"],
        "params": {"rules": list(rules), "bounds": bounds, "epsilon": float(epsilon), "gamma": float(gamma),
                   "projection_rank": None if P is None else int(P.shape[1]),
                   "pool": pool, "batch_size": int(batch_size), "dtype": str(dtype).replace("torch.", "")},
    }
    return Options(rules=rules, bounds=bounds, epsilon=float(epsilon), gamma=float(gamma), pool=pool,
                   batch_size=int(batch_size), projection=P, meta=meta)
