"""The paper's pair figure: both inputs side by side, their strongest patch pairs joined by lines."""

from __future__ import annotations

from typing import Any

import numpy as np

from explainers.bilrp.result import BiLRPResult


def plot_pair(result: BiLRPResult, x: Any, x_other: Any, path: str | None = None, k: int = 20,
              title: str | None = None, negative: bool = True):
    """The paper's figure: both inputs side by side with lines joining their k strongest pooled pairs
    (red: positive relevance, blue: negative; width and opacity ∝ |R|). Images (C,H,W) or (H,W) only.
    Saves a PNG to ``path`` when given; returns the matplotlib figure (built without pyplot, so the
    caller's backend is left alone)."""
    from matplotlib.figure import Figure

    def img(v: Any) -> np.ndarray:
        a = np.asarray(v, dtype=np.float32)
        if a.ndim == 3:
            a = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
        if a.ndim not in (2, 3):
            raise ValueError(f"plot_pair draws images (C,H,W) or (H,W), got shape {np.shape(v)}")
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else a * 0

    if result.pool is None or not isinstance(result.pool, tuple):
        raise ValueError("plot_pair needs a result pooled to image patches (pool=(h, w))")
    A, B = img(x), img(x_other)
    H, W = A.shape[:2]
    gap = max(W // 3, 4)
    canvas_shape = (max(H, B.shape[0]), W + gap + B.shape[1]) + A.shape[2:]
    canvas = np.full(canvas_shape, 0.0 if A.ndim == 2 else 1.0, dtype=np.float32)  # white gap
    canvas[:H, :W] = A
    canvas[:B.shape[0], W + gap:] = B
    fig = Figure(figsize=(6, 3.2), dpi=120)
    ax = fig.subplots()
    ax.imshow(canvas, cmap="gray_r" if canvas.ndim == 2 else None, interpolation="nearest")
    ph, pw = result.pool
    gw_a, gw_b = result.pool_grid[1], result.pool_grid_other[1]
    pairs = result.top_pairs(k, "abs" if negative else "positive")
    vmax = max((abs(r) for _, _, r in pairs), default=1.0) or 1.0
    for i, j, r in pairs:
        if r == 0:
            continue
        ya, xa_ = (i // gw_a + 0.5) * ph - 0.5, (i % gw_a + 0.5) * pw - 0.5
        yb, xb_ = (j // gw_b + 0.5) * ph - 0.5, W + gap + (j % gw_b + 0.5) * pw - 0.5
        w = abs(r) / vmax
        ax.plot([xa_, xb_], [ya, yb], color="tab:red" if r > 0 else "tab:blue", lw=0.5 + 2.5 * w, alpha=0.25 + 0.7 * w)
    ax.set_axis_off()
    ax.set_title(title or f"BiLRP: y = {result.similarity:.3g}, top {len(pairs)} patch pairs", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
