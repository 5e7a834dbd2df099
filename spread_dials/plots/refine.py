"""PNG plots of dials.spread_refine: f'/f'' per site with bands, edge shifts, NLL per macrocycle,
standardized residuals per panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spread_dials.plots.figures import pyplot, save_figure

__all__ = ["plot_site_curves", "plot_edge_shifts", "plot_nll", "plot_panel_residuals"]


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


def plot_panel_residuals(panels: dict, path: str | Path, flag_sigma_z: float | None = None) -> Path:
    """Standardized residuals z = (k - lambda) / sqrt(v) of the valid shoebox pixels per panel:
    mean and rms of z per panel (0 and 1 for a right model), each panel's histogram of z, and
    all pixels' histogram against the standard normal.

    ``panels``: {"n", "mean_z", "rms_z" (P,), "histogram" (P, bins), "bin_edges" (bins + 1,)}
    (:func:`~spread_dials.refine.residuals.gather_residuals`); panels without pixels are left out.
    """
    plt = pyplot()
    n = np.asarray(panels["n"])
    used = np.flatnonzero(n > 0)
    edges = np.asarray(panels["bin_edges"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    width = edges[1] - edges[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(used, np.asarray(panels["mean_z"])[used], "o", ms=4, label="mean z")
    ax.plot(used, np.asarray(panels["rms_z"])[used], "s", ms=4, label="rms z")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    if flag_sigma_z is not None:
        ax.axhline(flag_sigma_z, color="C3", lw=0.8, ls=":", label=f"flag_sigma_z {flag_sigma_z:g} (per shoebox)")
    ax.set_yscale("symlog", linthresh=2.0)
    ax.set_xticks(used[:: max(1, used.size // 16)])
    ax.set_xlabel("panel")
    ax.set_ylabel("standardized residual (symlog)")
    ax.set_title("per panel (valid shoebox pixels)")
    ax.legend(fontsize=7)
    ax = axes[1]
    hist = np.asarray(panels["histogram"])[used]
    density = hist / np.maximum(hist.sum(1, keepdims=True), 1.0) / width
    image = ax.imshow(np.log10(np.maximum(density, 1e-6)), aspect="auto", origin="lower", interpolation="nearest",
                      extent=(edges[0], edges[-1], -0.5, used.size - 0.5), vmin=-6, vmax=0)  # fmt: skip
    ax.set_yticks(range(used.size)[:: max(1, used.size // 16)], [str(p) for p in used[:: max(1, used.size // 16)]])
    ax.set_xlabel("z (end bins hold everything beyond)")
    ax.set_ylabel("panel")
    ax.set_title("histogram of z per panel")
    fig.colorbar(image, ax=ax, label="log10 density")
    ax = axes[2]
    total = np.asarray(panels["histogram"]).sum(0)
    ax.step(centres, total / max(total.sum(), 1.0) / width, where="mid", label=f"{int(n.sum())} pixels")
    ax.plot(centres, np.exp(-0.5 * centres**2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, 1.0)
    ax.set_xlabel("z")
    ax.set_ylabel("density")
    ax.set_title("all panels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
