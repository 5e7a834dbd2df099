"""Pictures of processed stills (matplotlib, Agg backend): spots and shoeboxes over a still,
a zoom on single shoeboxes, pulse spectra, and the validation against the truth.

All functions take plain numpy arrays (no DIALS objects) and write one PNG each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from spread_dials.plots.detector_image import assemble_panels
from spread_dials.plots.figures import pyplot, save_figure

__all__ = [
    "Overlay",
    "lab_xy",
    "plot_intensity_agreement",
    "plot_misorientation",
    "plot_shoeboxes",
    "plot_spectra",
    "plot_still_overlay",
]


def lab_xy(panel: np.ndarray, xy_px: np.ndarray, origin_mm: np.ndarray, fast_axis: np.ndarray, slow_axis: np.ndarray,
           pixel_mm: np.ndarray) -> np.ndarray:  # fmt: skip
    """Lab (x, y) in mm of points (fast, slow) in pixel units on their panels (no parallax).

    Arguments:
        panel: (n,) panel numbers.
        xy_px: (n, 2) DIALS pixel coordinates (pixel i spans [i, i + 1)).
        origin_mm, fast_axis, slow_axis: (P, 3) panel frames; pixel_mm: (P, 2).
    Returns:
        (n, 2) lab x, y (mm).
    """
    panel = np.asarray(panel, dtype=np.int64)
    xy_px = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    pos = (
        origin_mm[panel]
        + (xy_px[:, :1] * pixel_mm[panel, :1]) * fast_axis[panel]
        + (xy_px[:, 1:2] * pixel_mm[panel, 1:]) * slow_axis[panel]
    )
    return pos[:, :2]


class Overlay:
    """Points and boxes to draw over a still, in pixel coordinates of their panels.

    Arguments:
        true_spots: (panel (n,), xy (n, 2)) true spot centroids, or None.
        found: (panel, xy) spots found by the spot finder, or None.
        predicted: (panel, xy) predicted centroids of the integrated reflections, or None.
        shoeboxes: (panel (m,), bbox (m, 4): x0, x1, y0, y1) integration shoeboxes, or None.
    """

    def __init__(self, true_spots=None, found=None, predicted=None, shoeboxes=None) -> None:
        self.true_spots = true_spots
        self.found = found
        self.predicted = predicted
        self.shoeboxes = shoeboxes

    STYLE = {
        "true_spots": {"marker": ".", "color": "deepskyblue", "s": 6, "label": "true spots"},
        "found": {"marker": "o", "facecolors": "none", "edgecolors": "lime", "s": 40, "linewidths": 0.8,
                  "label": "found (spot finder)"},
        "predicted": {"marker": "+", "color": "red", "s": 25, "linewidths": 0.8, "label": "predicted (integrated)"},
    }  # fmt: skip


def _log_norm(values: np.ndarray):
    from matplotlib.colors import LogNorm

    finite = values[np.isfinite(values)]
    vmax = max(float(np.percentile(finite, 99.95)), 2.0) if finite.size else 2.0
    return LogNorm(vmin=1.0, vmax=vmax + 1.0)


def plot_still_overlay(
    image: np.ndarray, origin_mm: np.ndarray, fast_axis: np.ndarray, slow_axis: np.ndarray, pixel_mm: np.ndarray,
    overlay: Overlay, path: str | Path, title: str = "", zoom_panel: int | None = None, canvas_px: int = 1400,
) -> Path:  # fmt: skip
    """A still with its spots: left every panel at its lab position, right one panel in pixels.

    Log colour scale (counts + 1).  Found spots are circles, predictions of integrated reflections
    crosses, integration shoeboxes boxes, and true spot centroids dots.

    Arguments:
        image: (P, S, F) counts.
        origin_mm, fast_axis, slow_axis, pixel_mm: panel frames (P, 3), (P, 3), (P, 3), (P, 2).
        overlay: what to draw.
        path: the PNG.
        title: figure title.
        zoom_panel: the panel of the right-hand view (default: the one with most shoeboxes).
    """
    plt = pyplot()
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Rectangle

    frames = (origin_mm, fast_axis, slow_axis, pixel_mm)
    canvas, extent = assemble_panels(image, *frames, canvas_px=canvas_px)
    if zoom_panel is None:
        boxes = overlay.shoeboxes
        if boxes is not None and len(boxes[0]):
            zoom_panel = int(np.bincount(np.asarray(boxes[0], dtype=np.int64)).argmax())
        else:
            zoom_panel = int(np.argmax(image.reshape(image.shape[0], -1).sum(1)))
    fig, (ax, az) = plt.subplots(1, 2, figsize=(15, 7.5), dpi=110, gridspec_kw={"width_ratios": [1, 1]})
    for a in (ax, az):
        a.set_facecolor("black")
    norm = _log_norm(canvas)
    shown = ax.imshow(np.clip(canvas, 0, None) + 1.0, origin="lower", extent=extent, cmap="inferno", norm=norm,
                      interpolation="nearest")  # fmt: skip
    panel_image = image[zoom_panel].astype(np.float64)
    az.imshow(np.clip(panel_image, 0, None) + 1.0, origin="upper", cmap="inferno", norm=norm, interpolation="nearest",
              extent=(0, panel_image.shape[1], panel_image.shape[0], 0))  # fmt: skip
    if overlay.shoeboxes is not None and len(overlay.shoeboxes[0]):
        panel, bbox = np.asarray(overlay.shoeboxes[0], dtype=np.int64), np.asarray(overlay.shoeboxes[1], float)
        corners = np.stack([bbox[:, [0, 2]], bbox[:, [1, 2]], bbox[:, [1, 3]], bbox[:, [0, 3]]], axis=1)
        lab = lab_xy(np.repeat(panel, 4), corners.reshape(-1, 2), *frames).reshape(-1, 4, 2)
        ax.add_collection(PolyCollection(lab, facecolors="none", edgecolors="white", linewidths=0.4))
        for b in bbox[panel == zoom_panel]:
            az.add_patch(Rectangle((b[0], b[2]), b[1] - b[0], b[3] - b[2], fill=False, edgecolor="white", lw=0.8))
        ax.plot([], [], color="gray", lw=1.2, label="integration shoeboxes (white)")
    for name in ("true_spots", "found", "predicted"):
        points = getattr(overlay, name)
        if points is None or len(points[0]) == 0:
            continue
        panel, xy = np.asarray(points[0], dtype=np.int64), np.asarray(points[1], float).reshape(-1, 2)
        style = dict(Overlay.STYLE[name])
        lab = lab_xy(panel, xy, *frames)
        small = dict(style, s=style["s"] * 0.35)
        ax.scatter(lab[:, 0], lab[:, 1], **small)
        sel = panel == zoom_panel
        style.pop("label")
        az.scatter(xy[sel, 0], xy[sel, 1], **style)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xlabel("lab x (mm)")
    ax.set_ylabel("lab y (mm)")
    ax.set_title("all panels at their lab positions")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=4, fontsize="small", markerscale=2)
    # outline the zoomed panel on the left
    n_slow, n_fast = image.shape[1:]
    outline = lab_xy(np.full(5, zoom_panel), np.array([[0, 0], [n_fast, 0], [n_fast, n_slow], [0, n_slow], [0, 0]]),
                     *frames)  # fmt: skip
    ax.plot(outline[:, 0], outline[:, 1], color="cyan", lw=1.0)
    az.set_xlim(0, n_fast)
    az.set_ylim(n_slow, 0)
    az.set_xlabel("fast (px)")
    az.set_ylabel("slow (px)")
    az.set_title(f"panel {zoom_panel} (outlined in cyan on the left)")
    fig.colorbar(shown, ax=[ax, az], fraction=0.025, pad=0.02, label="counts + 1")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, bbox_inches="tight")


def plot_shoeboxes(shoeboxes: Sequence[dict], path: str | Path, title: str = "", columns: int = 4) -> Path:
    """A grid of integration shoeboxes: pixel counts, the foreground outline, centroids.

    Arguments:
        shoeboxes: dicts with ``data`` (ny, nx) counts, ``foreground`` (ny, nx) bool, ``bbox``
            (x0, x1, y0, y1), ``panel``, ``miller_index``, ``predicted`` (x, y) px, optional
            ``observed`` and ``true`` (x, y) px, ``intensity`` and optional ``true_intensity``.
        path: the PNG.
    """
    plt = pyplot()
    n = max(len(shoeboxes), 1)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel()[len(shoeboxes):]:
        ax.axis("off")
    for ax, sb in zip(axes.ravel(), shoeboxes):
        x0, x1, y0, y1 = sb["bbox"]
        data = np.asarray(sb["data"], dtype=np.float64)
        shown = ax.imshow(data, origin="upper", cmap="viridis", extent=(x0, x1, y1, y0), interpolation="nearest")
        fg = np.asarray(sb["foreground"], dtype=float)
        if fg.any() and not fg.all():
            ys, xs = np.mgrid[y0 : y1, x0 : x1] + 0.5
            ax.contour(xs, ys, fg, levels=[0.5], colors="white", linewidths=0.8)
        ax.plot(*sb["predicted"], "r+", ms=10, mew=1.5, label="predicted")
        if sb.get("observed") is not None:
            ax.plot(*sb["observed"], "x", color="orange", ms=8, mew=1.5, label="observed")
        if sb.get("true") is not None:
            ax.plot(*sb["true"], "o", mfc="none", mec="deepskyblue", ms=9, mew=1.5, label="true")
        h, k, l = (int(v) for v in sb["miller_index"])
        text = f"({h} {k} {l}) panel {sb['panel']}\nI = {sb['intensity']:.0f}"
        if sb.get("true_intensity") is not None:
            text += f", true {sb['true_intensity']:.0f}"
        ax.set_title(text, fontsize="small")
        ax.tick_params(labelsize="x-small")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize="x-small")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize="small")
    if title:
        fig.suptitle(title + "\n(white: foreground mask; counts, background not subtracted)", fontsize="medium")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return save_figure(fig, path)


def plot_spectra(energies_eV: np.ndarray, weights: np.ndarray, path: str | Path, highlight: int | None = 0,
                 labels: Sequence[str] | None = None, title: str = "") -> Path:  # fmt: skip
    """Pulse spectra (one line per shot, weights normalised to sum 1) and their mean.

    Arguments:
        energies_eV, weights: (n, C) channel energies and weights of n shots.
        highlight: the shot drawn thick (None: none).
    """
    plt = pyplot()
    energies_eV = np.atleast_2d(energies_eV)
    weights = np.atleast_2d(weights)
    weights = weights / weights.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100, constrained_layout=True)
    for i, (e, w) in enumerate(zip(energies_eV, weights)):
        if i != highlight:
            ax.plot(e, w, color="0.7", lw=0.8, label="other shots" if i == (1 if highlight == 0 else 0) else None)
    if highlight is not None and 0 <= highlight < len(weights):
        label = labels[highlight] if labels else f"shot {highlight}"
        ax.plot(energies_eV[highlight], weights[highlight], color="tab:red", lw=1.8, drawstyle="steps-mid", label=label)
    ax.plot(energies_eV.mean(axis=0), weights.mean(axis=0), color="k", lw=1.5, ls="--", label=f"mean of {len(weights)}")
    ax.set_xlabel("photon energy (eV)")
    ax.set_ylabel("fraction of the pulse per channel")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_misorientation(angles_deg: Sequence[float | None], labels: Sequence[str], path: str | Path,
                        target_deg: float | None = None, title: str = "") -> Path:  # fmt: skip
    """Misorientation per still (bars; stills not indexed marked with a cross at 0)."""
    plt = pyplot()
    x = np.arange(len(angles_deg))
    values = np.array([np.nan if a is None else a for a in angles_deg], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(x) + 2), 4), dpi=100, constrained_layout=True)
    ax.bar(x[np.isfinite(values)], values[np.isfinite(values)], color="tab:blue", label="indexed")
    missing = ~np.isfinite(values)
    if missing.any():
        ax.plot(x[missing], np.zeros(missing.sum()), "x", color="tab:red", ms=10, mew=2, label="not indexed")
    if np.isfinite(values).any():
        ax.axhline(float(np.nanmedian(values)), color="k", ls="--", lw=1, label=f"median {np.nanmedian(values):.4f} deg")
    if target_deg is not None:
        ax.axhline(target_deg, color="tab:red", ls=":", lw=1, label=f"target {target_deg:g} deg")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize="x-small")
    ax.set_ylabel("misorientation to the truth (deg)")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_intensity_agreement(true_photons: np.ndarray, integrated: np.ndarray, path: str | Path,
                             title: str = "") -> Path:  # fmt: skip
    """Integrated (summation) intensity against the true expected photons, log-log."""
    plt = pyplot()
    true_photons = np.asarray(true_photons, dtype=float)
    integrated = np.asarray(integrated, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100, constrained_layout=True)
    positive = (true_photons > 0) & (integrated > 0)
    ax.scatter(true_photons[positive], integrated[positive], s=6, alpha=0.6, label=f"{positive.sum()} matched")
    if (~positive).any():
        ax.scatter(np.clip(true_photons[~positive], 0.5, None), np.full((~positive).sum(), 0.5), s=6, marker="v",
                   color="tab:red", alpha=0.6, label=f"{(~positive).sum()} with I <= 0 (at the bottom)")  # fmt: skip
    if positive.any():
        lo = max(0.5, min(true_photons[positive].min(), integrated[positive].min()))
        hi = max(true_photons[positive].max(), integrated[positive].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true expected photons (simulation)")
    ax.set_ylabel("integrated intensity (stills_process, summation)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
