"""PNG plot of dials.spread_plan: each site's and site pair's predicted edge-shift sigma
against the number of stills (log-log), with the targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spread_dials.plots.figures import pyplot, save_figure

__all__ = ["plot_plan"]


def plot_plan(result: dict, path: str | Path) -> Path:
    """sigma (eV) against N for every site (solid) and pair (dashed) of a dials.spread_plan
    ``result``; the band is +-1 standard error of the prediction (from the probe stills' spread);
    the horizontal lines are plan.target.sigma_eV and difference_eV / z."""
    plt = pyplot()
    n = np.geomspace(1, max(int(k) for k in result["predicted"]) * 2, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for k, site in enumerate(result["sites"]):
        sigma = site["sigma_one_still_eV"] / np.sqrt(n)
        ax.plot(n, sigma, color=f"C{k}", lw=2, label=f"{site['label']} ({site['state'] or '-'})")
        se = site["information_relative_standard_error"]
        if se:
            ax.fill_between(n, sigma * (1 - se / 2), sigma * (1 + se / 2), color=f"C{k}", alpha=0.2)
    for k, pair in enumerate(result["pairs"], start=len(result["sites"])):
        ax.plot(n, pair["sigma_one_still_eV"] / np.sqrt(n), "--", color=f"C{k % 10}", lw=1.5, label=" - ".join(pair["sites"]))
    t = result["target"]
    ax.axhline(t["sigma_eV"], color="k", lw=1, ls=":", label=f"target sigma {t['sigma_eV']:g} eV")
    if result["pairs"]:
        ax.axhline(t["difference_eV"] / t["z"], color="0.4", lw=1, ls="-.",
                   label=f"{t['difference_eV']:g} eV at {t['z']:g} sigma")  # fmt: skip
    for k in result["predicted"]:
        ax.axvline(int(k), color="0.9", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stills")
    ax.set_ylabel("edge-shift sigma, Cramer-Rao (eV)")
    ax.set_title(f"dials.spread_plan: {result['probe_stills']} probe stills, {result['detector']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
