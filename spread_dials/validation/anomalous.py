"""Refined f'(E), f''(E) against a simulation's truth: the metric of Sauter et al. 2020, Figure 9.

Sauter et al. (Acta Cryst D76:176, 2020) judged the refined curves of each site by the
correlation coefficient (CC) and the root-mean-square deviation (RMSD) of f' and of f''
against the simulated truth over an edge window of 31 energies 1 eV apart, 7105-7135 eV for the
Fe K edge (nksauter/LS49, ML_push/replot_Figure9.py).  :func:`figure9_window_eV` gives that
window for Fe and, for other elements, the 31 eV centred on the reference curve's edge (the
energy where df''/dE is largest, rounded to 1 eV); :func:`curve_agreement` gives CC and RMSD,
:func:`figure9_site` both for one site and :func:`figure9_report` for every site of a
refinement (dials.spread_refine with truth=).

Pure numpy/torch, no cctbx.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from spread_dials.physics.anomalous import TabulatedCurve

__all__ = [
    "FE_WINDOW_EV",
    "WINDOW_POINTS",
    "curve_agreement",
    "edge_energy_eV",
    "figure9_window_eV",
    "figure9_site",
    "window_energies",
    "figure9_report",
]

#: Sauter 2020 Figure 9's window for the Fe K edge (eV)
FE_WINDOW_EV = (7105.0, 7135.0)
#: energies in the window (1 eV apart)
WINDOW_POINTS = 31


def curve_agreement(refined: Sequence[float], truth: Sequence[float]) -> tuple[float | None, float | None]:
    """(Pearson CC, RMSD) of ``refined`` against ``truth`` (same length, same units).

    CC is None with fewer than two points or where either curve is constant over them; RMSD
    is sqrt(mean((refined - truth)^2)) (None without points).
    """
    a = np.asarray(refined, dtype=np.float64)
    b = np.asarray(truth, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("refined and truth must be 1-D of the same length")
    if a.size == 0:
        return None, None
    rmsd = float(np.sqrt(np.mean((a - b) ** 2)))
    da, db = a - a.mean(), b - b.mean()
    norm = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    cc = float(np.dot(da, db)) / norm if a.size >= 2 and norm > 0 else None
    return cc, rmsd


def edge_energy_eV(curve: TabulatedCurve) -> float:
    """The energy (eV) of the largest slope df''/dE of a tabulated curve (central differences
    on its own grid)."""
    e = curve.energy_eV.to(torch.float64)
    y = curve.f_double_prime.to(torch.float64)
    if e.numel() < 3:
        raise ValueError("an edge needs at least three tabulated energies")
    slope = (y[2:] - y[:-2]) / (e[2:] - e[:-2])
    return float(e[1:-1][int(torch.argmax(slope))])


def figure9_window_eV(element: str, reference: TabulatedCurve) -> tuple[float, float]:
    """The Figure 9 window (low, high) (eV, 31 points 1 eV apart) for a site of ``element``:
    7105-7135 eV for Fe, else the 31 eV centred on ``reference``'s edge (:func:`edge_energy_eV`)."""
    if element.strip().capitalize() == "Fe":
        return FE_WINDOW_EV
    centre = round(edge_energy_eV(reference))
    half = (WINDOW_POINTS - 1) // 2
    return float(centre - half), float(centre + half)


def figure9_site(refined_f_prime, refined_f_double_prime, truth: TabulatedCurve, window_eV: tuple[float, float],
                 energy_eV: Sequence[float]) -> dict:  # fmt: skip
    """CC and RMSD of one site's refined f', f'' against its truth over ``window_eV``.

    Arguments:
        refined_f_prime, refined_f_double_prime: the refined curves at ``energy_eV`` (e).
        truth: the simulated curve (its table's energies bound the comparison).
        window_eV: (low, high) (eV); the energies are low, low + 1, ... high.
        energy_eV: the energies the refined values are given at (the window's energies that
            lie inside the truth's table, in order: :func:`window_energies`).

    Returns:
        {"window_eV", "points", "cc_f_prime", "rmsd_f_prime_e", "cc_f_double_prime",
        "rmsd_f_double_prime_e"}.
    """
    e = torch.as_tensor(np.asarray(energy_eV, dtype=np.float64))
    true_fp, true_fdp = truth.to(dtype=torch.float64).at(e)
    cc_fp, rmsd_fp = curve_agreement(np.asarray(refined_f_prime, dtype=np.float64), true_fp.numpy())
    cc_fdp, rmsd_fdp = curve_agreement(np.asarray(refined_f_double_prime, dtype=np.float64), true_fdp.numpy())
    return {"window_eV": [float(window_eV[0]), float(window_eV[1])], "points": int(e.numel()), "cc_f_prime": cc_fp,
            "rmsd_f_prime_e": rmsd_fp, "cc_f_double_prime": cc_fdp, "rmsd_f_double_prime_e": rmsd_fdp}  # fmt: skip


def window_energies(window_eV: tuple[float, float], truth: TabulatedCurve) -> np.ndarray:
    """The window's energies (1 eV apart from its low end) that lie inside the truth's table."""
    grid = np.arange(window_eV[0], window_eV[1] + 0.5, 1.0)
    lo, hi = float(truth.energy_eV[0]), float(truth.energy_eV[-1])
    return grid[(grid >= lo - 1e-9) & (grid <= hi + 1e-9)]


def figure9_report(sites, theta: torch.Tensor, truth_curves: Sequence[TabulatedCurve], site_labels: Sequence[str],
                   elements: Sequence[str], references: Sequence[TabulatedCurve],
                   window_eV: Sequence[float] | None = None) -> dict[str, dict]:  # fmt: skip
    """Per site, keyed by its label, :func:`figure9_site` of a refinement's curves.

    Arguments:
        sites: the refinement's :class:`~spread_dials.refine.sites.SiteModel`; theta its parameters.
        truth_curves, site_labels, elements, references: per site, the simulated curve, label,
            element symbol and reference curve.
        window_eV: (low, high) (eV) for every site, or None for each site's default
            (:func:`figure9_window_eV`).

    Returns:
        {site label: figure9_site's dict plus "group" (the site's parameter group)}; only the
        window's energies inside the truth's table count (``points``).
    """
    out: dict[str, dict] = {}
    for s, truth in enumerate(truth_curves):
        window = tuple(float(x) for x in window_eV) if window_eV else figure9_window_eV(elements[s], references[s])
        energy = window_energies(window, truth)
        if energy.size:
            with torch.no_grad():
                fp, fdp = sites.curves(theta.detach(), torch.as_tensor(energy, dtype=torch.float64))
            row = figure9_site(fp[s].numpy(), fdp[s].numpy(), truth, window, energy)
        else:
            row = figure9_site([], [], truth, window, energy)
        row["group"] = sites.group_labels[int(sites.group[s])]
        key = site_labels[s] if site_labels[s] not in out else f"{site_labels[s]} #{s}"
        out[key] = row
    return out
