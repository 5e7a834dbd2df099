"""PNG plots of interval calibration over replicate data sets (issue 12, experiment 2): the
coverage curve and the SBC rank histograms (spread_dials.validation.calibration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spread_dials.plots.figures import pyplot, save_figure
from spread_dials.validation.calibration import coverage, coverage_band

__all__ = ["plot_coverage", "plot_rank_histograms"]


def plot_coverage(pits: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Empirical against nominal coverage of central intervals (levels 0.02-0.98), one line per
    method in ``pits`` ({label: (R,) PIT}), with the binomial 95 % range of a calibrated method
    and the +-5 % tolerance of issue 12."""
    plt = pyplot()
    levels = np.linspace(0.02, 0.98, 49)
    n = max(len(p) for p in pits.values())
    band = np.array([coverage_band(n, lv) for lv in levels])
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.fill_between(levels, band[:, 0], band[:, 1], color="0.85", label=f"calibrated, 95 % of {n} replicates")
    ax.plot(levels, levels, "k-", lw=1)
    ax.plot(levels, levels - 0.05, "k:", lw=1, label="+-5 % tolerance")
    ax.plot(levels, levels + 0.05, "k:", lw=1)
    for k, (label, pit) in enumerate(pits.items()):
        ax.plot(levels, coverage(pit, levels), color=f"C{k}", lw=2, label=f"{label} ({len(pit)})")
    ax.set_xlabel("nominal probability of the central interval")
    ax.set_ylabel("fraction of replicates whose interval holds the truth")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_rank_histograms(pits: dict[str, np.ndarray], path: str | Path, bins: int = 10, title: str = "") -> Path:
    """SBC rank histogram (the PIT in ``bins`` equal bins) per method in ``pits``, with the
    binomial 95 % range of a bin's count when the ranks are uniform."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pits), figsize=(4.2 * len(pits), 3.4), squeeze=False)
    for ax, (label, pit) in zip(axes[0], pits.items()):
        lo, hi = coverage_band(len(pit), 1.0 / bins)
        ax.axhspan(lo * len(pit), hi * len(pit), color="0.85")
        ax.axhline(len(pit) / bins, color="k", lw=1)
        ax.hist(pit, bins=bins, range=(0, 1), color="C0", edgecolor="k")
        ax.set_xlabel("rank of the truth (PIT)")
        ax.set_ylabel("replicates")
        ax.set_title(f"{label} ({len(pit)} replicates)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
