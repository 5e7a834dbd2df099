"""PNG plots of f'(E), f''(E) (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.plots.figures import pyplot, save_figure

__all__ = ["plot_anomalous", "curves_from_model"]


def curves_from_model(model, energy_eV: Tensor, labels: Sequence[str]) -> list[TabulatedCurve]:
    """Per-site curves of an anomalous model (anything returning (f', f'') (S, C)) on ``energy_eV``."""
    with torch.no_grad():
        fp, fdp = model(energy_eV)
    e = energy_eV.detach().cpu().double()
    return [TabulatedCurve(e, fp[s].detach().cpu().double(), fdp[s].detach().cpu().double(), str(labels[s])) for s in range(len(labels))]


def plot_anomalous(
    path: str | Path,
    curves: Sequence[TabulatedCurve],
    band_eV: tuple[float, float] | None = None,
    energy_range_eV: tuple[float, float] | None = None,
    spectrum: tuple[Tensor, Tensor] | None = None,
    title: str = "",
) -> Path:
    """Draw f' (top) and f'' (bottom) of ``curves`` versus energy and save a PNG.

    Arguments:
        path: output PNG.
        curves: one per site or oxidation state; their labels make the legend.
        band_eV: the spectrum's band (eV), shaded on both panels.
        energy_range_eV: x limits (default: the band +- 50 eV, else the curves' extent).
        spectrum: optional (energy_eV, weight) drawn, scaled, on the f'' panel.
        title: figure title.

    Returns:
        The path written.
    """
    plt = pyplot()
    if energy_range_eV is None:
        if band_eV is not None:
            energy_range_eV = (band_eV[0] - 50.0, band_eV[1] + 50.0)
        else:
            energy_range_eV = (min(float(c.energy_eV[0]) for c in curves), max(float(c.energy_eV[-1]) for c in curves))
    lo, hi = energy_range_eV
    fig, (ax_fp, ax_fdp) = plt.subplots(2, 1, sharex=True, figsize=(7, 6), constrained_layout=True)
    for curve in curves:
        inside = curve.window(lo, hi)
        e = inside.energy_eV.detach().cpu().numpy()
        (line,) = ax_fp.plot(e, inside.f_prime.detach().cpu().numpy(), label=curve.label or None)
        ax_fdp.plot(e, inside.f_double_prime.detach().cpu().numpy(), color=line.get_color())
    for ax in (ax_fp, ax_fdp):
        if band_eV is not None:
            ax.axvspan(band_eV[0], band_eV[1], color="0.85", zorder=0, label=None)
        ax.grid(alpha=0.3)
    if spectrum is not None:
        energy, weight = (t.detach().cpu().double().numpy() for t in spectrum)
        top = max(float(c.f_double_prime.max()) for c in curves)
        ax_fdp.fill_between(energy, 0, weight / max(weight.max(), 1e-30) * 0.3 * top, color="tab:gray", alpha=0.4, label="spectrum")
    ax_fp.set_ylabel("f' (electrons)")
    ax_fdp.set_ylabel("f'' (electrons)")
    ax_fdp.set_xlabel("photon energy (eV)")
    ax_fdp.set_xlim(lo, hi)
    if any(c.label for c in curves):
        ax_fp.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=100)
