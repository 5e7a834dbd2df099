"""PNG plot of dials.spread_plan: each site's and site pair's predicted edge-shift sigma
against the number of stills (log-log), with the targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spread_dials.plots.figures import pyplot, save_figure

__all__ = ["plot_plan", "plot_ladder"]


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


def plot_ladder(ladder: dict[int, dict], path: str | Path, predicted: dict[int, float] | None = None,
                title: str = "") -> Path:  # fmt: skip
    """A precision ladder (log-log): per N the measured spread of the estimates over replicates
    (68 % chi-square interval of a standard deviation from R replicates), the mean reported
    Fisher sigma and, when given, the planned Cramer-Rao sigma (``predicted`` {N: sigma eV})
    with the 1.5x band of issue 12's goal.

    ``ladder``: {N: {"spread": eV, "fisher": eV, "replicates": R}} for one site or pair.
    """
    from scipy import stats

    plt = pyplot()
    n = np.array(sorted(ladder))
    spread = np.array([ladder[k]["spread"] for k in n])
    fisher = np.array([ladder[k]["fisher"] for k in n])
    r = np.array([ladder[k]["replicates"] for k in n])
    lo = spread * np.sqrt((r - 1) / stats.chi2.ppf(0.84, r - 1))
    hi = spread * np.sqrt((r - 1) / stats.chi2.ppf(0.16, r - 1))
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    if predicted:
        grid = np.geomspace(min(min(predicted), n.min()) / 1.5, max(max(predicted), n.max()) * 1.5, 100)
        k0 = min(predicted)
        one = predicted[k0] * np.sqrt(k0)
        ax.plot(grid, one / np.sqrt(grid), "k-", lw=1.5, label="planned Cramer-Rao sigma (probe stills' Fisher information)")
        ax.fill_between(grid, one / np.sqrt(grid), 1.5 * one / np.sqrt(grid), color="0.88", label="up to 1.5x the bound")
    ax.errorbar(n, spread, yerr=[spread - lo, hi - spread], fmt="o", color="C3", capsize=3,
                label="measured spread over replicates (68 %)")  # fmt: skip
    ax.plot(n, fisher, "s", mfc="none", color="C0", label="mean reported Fisher sigma")
    for k, rr, top in zip(n, r, hi):
        ax.annotate(f"{rr}", (k, top), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stills per data set (replicates annotated)")
    ax.set_ylabel("edge-shift sigma (eV)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
