"""A still as a picture: every panel drawn at its true position in the lab frame (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spread_dials.plots.figures import pyplot, save_figure

__all__ = ["assemble_panels", "plot_still"]


def assemble_panels(
    image: np.ndarray, origin_mm: np.ndarray, fast_axis: np.ndarray, slow_axis: np.ndarray, pixel_mm: np.ndarray,
    canvas_px: int = 1600,
) -> tuple[np.ndarray, tuple[float, float, float, float]]:  # fmt: skip
    """Project every pixel centre onto the lab x, y plane and max-pool into a square canvas.

    Args:
        image: (P, S, F) pixel values.
        origin_mm, fast_axis, slow_axis: (P, 3) panel frames (dxtbx lab frame).
        pixel_mm: (P, 2) pixel sizes.
        canvas_px: canvas edge in pixels.
    Returns:
        (canvas, extent) with NaN where no pixel lands; extent = (x_min, x_max, y_min, y_max) mm.
    """
    n_p, n_s, n_f = image.shape
    f = (np.arange(n_f) + 0.5)[None, None, :, None]
    s = (np.arange(n_s) + 0.5)[None, :, None, None]
    pos = (
        origin_mm[:, None, None, :]
        + f * pixel_mm[:, None, None, :1] * fast_axis[:, None, None, :]
        + s * pixel_mm[:, None, None, 1:] * slow_axis[:, None, None, :]
    )
    x, y = pos[..., 0].ravel(), pos[..., 1].ravel()
    extent = (float(x.min()), float(x.max()), float(y.min()), float(y.max()))
    span = max(extent[1] - extent[0], extent[3] - extent[2])
    col = np.clip(((x - extent[0]) / span * (canvas_px - 1)).astype(np.int64), 0, canvas_px - 1)
    row = np.clip(((y - extent[2]) / span * (canvas_px - 1)).astype(np.int64), 0, canvas_px - 1)
    canvas = np.full(canvas_px * canvas_px, -np.inf)
    np.maximum.at(canvas, row * canvas_px + col, image.ravel().astype(np.float64))
    canvas[np.isneginf(canvas)] = np.nan
    return canvas.reshape(canvas_px, canvas_px), (extent[0], extent[0] + span, extent[2], extent[2] + span)


def plot_still(
    image: np.ndarray, origin_mm: np.ndarray, fast_axis: np.ndarray, slow_axis: np.ndarray, pixel_mm: np.ndarray,
    path: str | Path, title: str = "", canvas_px: int = 1600,
) -> Path:  # fmt: skip
    """Write a PNG of a still on a log scale (counts + 1), panels at their lab positions."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    canvas, extent = assemble_panels(image, origin_mm, fast_axis, slow_axis, pixel_mm, canvas_px)
    finite = canvas[np.isfinite(canvas)]
    vmax = max(float(np.percentile(finite, 99.99)), 2.0) if finite.size else 2.0
    fig, ax = plt.subplots(figsize=(8, 8), dpi=150)
    ax.set_facecolor("black")
    shown = ax.imshow(np.clip(canvas, 0, None) + 1.0, origin="lower", extent=extent, cmap="inferno",
                      norm=LogNorm(vmin=1.0, vmax=vmax + 1.0), interpolation="nearest")  # fmt: skip
    ax.set_xlabel("lab x (mm)")
    ax.set_ylabel("lab y (mm)")
    ax.set_title(title)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="counts + 1 (max over merged pixels)")
    return save_figure(fig, path, bbox_inches="tight")
