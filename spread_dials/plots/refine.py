"""PNG plots of dials.spread_refine: f'/f'' per site with bands, edge shifts, NLL per macrocycle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spread_dials.plots.figures import pyplot, save_figure

__all__ = ["plot_site_curves", "plot_edge_shifts", "plot_nll"]


def plot_site_curves(energy_eV: np.ndarray, curves: list[dict], path: str | Path) -> Path:
    """f' and f'' per site: the refined curve with 68/95 % bands (from draws of the parameters),
    the oxidation-state references and (if known) the truth.

    ``curves``: per site {"label", "f_prime", "f_double_prime" (E,), "band68"/"band95": (2, 2, E)
    (f'/f'' x low/high), "states": {label: (f' (E,), f'' (E,))}, "truth": (f', f'') or None}.
    """
    plt = pyplot()
    fig, axes = plt.subplots(len(curves), 2, figsize=(10, 3.2 * len(curves)), squeeze=False)
    for row, site in zip(axes, curves):
        for k, (ax, what) in enumerate(zip(row, ("f'", "f''"))):
            for label, pair in site["states"].items():
                ax.plot(energy_eV, pair[k], "--", lw=1, label=label)
            ax.fill_between(energy_eV, site["band95"][k][0], site["band95"][k][1], color="C3", alpha=0.15, label="95 %")
            ax.fill_between(energy_eV, site["band68"][k][0], site["band68"][k][1], color="C3", alpha=0.3, label="68 %")
            ax.plot(energy_eV, site["f_prime" if k == 0 else "f_double_prime"], color="C3", lw=2, label="refined")
            if site.get("truth") is not None:
                ax.plot(site["truth"][0], site["truth"][1 + k], "k:", lw=2, label="truth")
            ax.set_xlabel("energy (eV)")
            ax.set_ylabel(f"{what} (e)")
            ax.set_title(f"{site['label']}: {what}")
        row[1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_edge_shifts(rows: list[dict], path: str | Path) -> Path:
    """Edge shift per site with 68/95 % intervals, the oxidation states' shifts and the truth."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.6 * len(rows)))
    for i, r in enumerate(rows):
        ax.plot(r["interval95_eV"], [i, i], color="C0", lw=2)
        ax.plot(r["interval68_eV"], [i, i], color="C0", lw=6)
        ax.plot([r["edge_shift_eV"]], [i], "o", color="k")
        for state, shift in r["state_shifts_eV"].items():
            ax.plot([shift], [i], "|", ms=20, color="C2")
            ax.annotate(f"({state})", (shift, i + 0.25), fontsize=8, color="C2", ha="center")
        if "truth_edge_shift_eV" in r:
            ax.plot([r["truth_edge_shift_eV"]], [i], "x", color="C3", ms=10)
    ax.set_yticks(range(len(rows)), [r["site"] for r in rows])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("edge shift against the reference (eV); bars 68/95 %, | oxidation states, x truth")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_nll(history: list[dict], path: str | Path) -> Path:
    """Total NLL after each macrocycle."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["macrocycle"] for h in history], [h["nll"] for h in history], "o-")
    ax.set_xlabel("macrocycle")
    ax.set_ylabel("NLL + prior")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
