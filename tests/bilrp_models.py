"""Networks for the BiLRP tests and the benchmark: torchvision's models as shipped, and the
gradient x input reference that LRP-0 equals on bias-free ReLU networks.

torchvision from PyPI beside a CPU-only torch build cannot load its compiled ops; see
``indexer.compat`` for how its model classes stay importable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from indexer.compat import ensure_torchvision_importable


def torchvision_models() -> Any:
    """``torchvision.models``, importable even where torchvision's compiled ops are missing."""
    ensure_torchvision_importable()
    import torchvision.models as tvm
    return tvm


def zero_biases(model: nn.Module) -> nn.Module:
    """Set every bias (Linear, Conv, BatchNorm shift and running mean) to zero: a bias-free network, on
    which LRP-0 is conservative. BatchNorm keeps a random positive scale (running variance, weight)."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


def grad_x_input_bilrp(model: nn.Module, x: np.ndarray, x_other: np.ndarray,
                       dtype: torch.dtype = torch.float64) -> np.ndarray:
    """BiLRP with LRP-0 on a bias-free ReLU network, computed without any LRP code (turns ``model`` to
    ``dtype`` in place).

    There LRP-0 of phi_m equals x * d phi_m / dx: layer by layer the z-rule keeps R_i = a_i dphi_m/da_i
    on linear maps, residual sums and average pooling, and ReLU (pass) and max pooling (winner takes
    all) keep it too. So R_{ii'} = sum_m (x * grad phi_m(x))_i (x' * grad phi_m(x'))_i'.
    """
    def rows(v: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(v, dtype=dtype)[None]
        jac = torch.func.jacrev(lambda inp: model(inp).reshape(-1))(t)  # (D, 1, *shape)
        return (jac[:, 0] * t[0]).reshape(jac.shape[0], -1)

    model.to(dtype).eval()
    ra, rb = rows(x), rows(x_other)
    return (ra.T @ rb).detach().numpy()
