"""Oxidation-state references: f'/f'' curves for Fe(II)/Fe(III) and Mn(II)/Mn(III)/Mn(IV).

- Fe: the measured *Pyrococcus furiosus* rubredoxin pair (oxidized = Fe(III), reduced =
  Fe(II)); the files are passed in (shared/data/anomalous/pf-rd-{ox,red}_fftkk.out).  Their
  f'' rising edges sit ~1 eV apart (:func:`edge_energy`).
- Mn: no measured per-state Mn tables are public (shared/data/MANIFEST.md), so each state is
  the free-atom Mn curve (Sasaki; edge 6539 eV, the metal K edge) moved so that its edge lies
  at a state-specific energy, :data:`DEFAULT_MN_EDGE_EV`:

      Mn(II) 6548.7 eV, Mn(III) 6550.7 eV, Mn(IV) 6552.7 eV.

  How these numbers come about (docs/anomalous.md has the details):
  * anchor — Roelofs et al., PNAS 93, 3335 (1996), doi:10.1073/pnas.93.8.3335: Mn K-edge
    inflection energies of the pure S states of PSII, 6550.1 (S0), 6551.7 (S1), 6553.5 (S2)
    and 6553.8 eV (S3).  S1 is Mn(III,III,IV,IV), mean valence 3.5 -> 6551.7 eV.
  * step — a K-edge shift of about 1–2 eV per unit change of Mn oxidation state for
    complexes with similar ligands (Yachandra, Sauer & Klein, Chem. Rev. 96, 2927 (1996),
    doi:10.1021/cr950052k; Visser et al., JACS 123, 7031 (2001), doi:10.1021/ja004306h);
    the upper value, 2.0 eV, is used: :data:`MN_EDGE_SHIFT_EV_PER_OXIDATION_STATE`.
  The same rule puts S0 (mean valence 3.25) at 6550.2 eV (measured 6550.1).  They are model
  defaults for simulation, not measurements of single Mn sites; pass other energies to
  :func:`mn_oxidation_state_curves` to change them.
- :data:`DEFAULT_OEC_S1_STATES`: the dark-stable S1 assignment Mn1(III) Mn2(IV) Mn3(IV)
  Mn4(III) of the Mn4CaO5 cluster (atom names MN1–MN4 of residue OEC as in PDB 3WU2,
  Umena et al., Nature 473, 55 (2011); assignment e.g. Krewald et al., Chem. Sci. 6, 1676
  (2015), doi:10.1039/C4SC03720K).
"""

from __future__ import annotations

import math

import torch

from spread_dials.physics.anomalous import TabulatedCurve, interpolate_linear

__all__ = [
    "DEFAULT_MN_EDGE_EV",
    "MN_EDGE_SHIFT_EV_PER_OXIDATION_STATE",
    "MN_S1_EDGE_EV",
    "DEFAULT_OEC_S1_STATES",
    "ROMAN",
    "edge_energy",
    "mn_oxidation_state_curves",
    "mn_edge_shifts_eV",
    "fe_rubredoxin_states",
]

#: Mean Mn K-edge inflection energy of PSII in S1 (mean valence 3.5), Roelofs et al. 1996 (eV).
MN_S1_EDGE_EV: float = 6551.7
#: Edge shift per unit change of Mn oxidation state (eV), upper end of the 1-2 eV range.
MN_EDGE_SHIFT_EV_PER_OXIDATION_STATE: float = 2.0
#: Default Mn K-edge energy (eV) per oxidation state: 6551.7 + 2.0 * (state - 3.5).
DEFAULT_MN_EDGE_EV: dict[int, float] = {
    state: round(MN_S1_EDGE_EV + MN_EDGE_SHIFT_EV_PER_OXIDATION_STATE * (state - 3.5), 3) for state in (2, 3, 4)
}
#: S1-state oxidation states of the OEC Mn atoms by PDB atom name.
DEFAULT_OEC_S1_STATES: dict[str, int] = {"MN1": 3, "MN2": 4, "MN3": 4, "MN4": 3}
ROMAN = {0: "0", 1: "I", 2: "II", 3: "III", 4: "IV", 5: "V"}


def edge_energy(
    curve: TabulatedCurve,
    low_eV: float | None = None,
    high_eV: float | None = None,
    smoothing_eV: float = 0.0,
    step_eV: float | None = None,
) -> float:
    """Energy (eV) of the steepest rise of f'' (the maximum of d f''/dE), to sub-step precision.

    Arguments:
        curve: the f'' table.
        low_eV, high_eV: search window (default: the whole table).
        smoothing_eV: Gaussian sigma (eV) applied before differentiating (measured curves are
            noisy at 1 eV; 0 = none).
        step_eV: resampling step (default: the smallest spacing of the table in the window,
            at least 0.01 eV).

    Returns:
        The edge energy; a parabola through the derivative's maximum and its neighbours
        refines it below the step.
    """
    e = curve.energy_eV.double()
    lo = float(e[0]) if low_eV is None else low_eV
    hi = float(e[-1]) if high_eV is None else high_eV
    inside = (e >= lo) & (e <= hi)
    if step_eV is None:
        spacing = torch.diff(e[inside]) if int(inside.sum()) > 1 else torch.diff(e)
        step_eV = max(float(spacing.min()), 0.01)
    grid = torch.arange(lo, hi + 0.5 * step_eV, step_eV, dtype=torch.float64)
    y = interpolate_linear(grid, e, curve.f_double_prime.double())
    if smoothing_eV > 0:
        half = int(math.ceil(4 * smoothing_eV / step_eV))
        k = torch.arange(-half, half + 1, dtype=torch.float64) * step_eV
        kernel = torch.exp(-0.5 * (k / smoothing_eV) ** 2)
        kernel = kernel / kernel.sum()
        padded = torch.cat([y[:1].expand(half), y, y[-1:].expand(half)])
        y = torch.nn.functional.conv1d(padded.view(1, 1, -1), kernel.view(1, 1, -1)).view(-1)
    slope = (y[1:] - y[:-1]) / step_eV
    centres = 0.5 * (grid[1:] + grid[:-1])
    i = int(torch.argmax(slope))
    if 0 < i < slope.numel() - 1:
        a, b, c = (float(v) for v in slope[i - 1 : i + 2])
        denom = a - 2 * b + c
        offset = 0.5 * (a - c) / denom if denom != 0 else 0.0
        return float(centres[i]) + offset * step_eV
    return float(centres[i])


def mn_edge_shifts_eV(
    free_atom: TabulatedCurve, states: tuple[int, ...] = (2, 3, 4), edge_eV: dict[int, float] | None = None
) -> dict[int, float]:
    """Edge shift (eV) that moves the free-atom Mn curve's edge to each state's edge energy."""
    edge_eV = DEFAULT_MN_EDGE_EV if edge_eV is None else edge_eV
    reference = edge_energy(free_atom, 6500.0, 6600.0) if float(free_atom.energy_eV[0]) < 6500 else edge_energy(free_atom)
    missing = [s for s in states if s not in edge_eV]
    if missing:
        raise ValueError(f"no Mn edge energy for oxidation state(s) {missing}; known: {sorted(edge_eV)}")
    return {s: edge_eV[s] - reference for s in states}


def mn_oxidation_state_curves(
    free_atom: TabulatedCurve, states: tuple[int, ...] = (2, 3, 4), edge_eV: dict[int, float] | None = None
) -> dict[int, TabulatedCurve]:
    """Mn(II), Mn(III), Mn(IV) references: the free-atom curve moved to each state's edge energy.

    Arguments:
        free_atom: free-atom Mn f'/f'' (e.g. ``spread_dials.adapters.free_atom.free_atom_curve("Mn", ...)``),
            covering at least 6500-6600 eV.
        states: oxidation states wanted.
        edge_eV: edge energy (eV) per state; default :data:`DEFAULT_MN_EDGE_EV`.

    Returns:
        {state: curve labelled "Mn(III)" etc.}.
    """
    shifts = mn_edge_shifts_eV(free_atom, states, edge_eV)
    return {s: free_atom.shifted(shifts[s], label=f"Mn({ROMAN.get(s, s)})") for s in states}


def fe_rubredoxin_states(oxidized: TabulatedCurve, reduced: TabulatedCurve) -> dict[int, TabulatedCurve]:
    """{2: reduced rubredoxin curve as "Fe(II)", 3: oxidized as "Fe(III)"} (measured pair, Fe K edge)."""
    return {
        2: TabulatedCurve(reduced.energy_eV, reduced.f_prime, reduced.f_double_prime, label="Fe(II)"),
        3: TabulatedCurve(oxidized.energy_eV, oxidized.f_prime, oxidized.f_double_prime, label="Fe(III)"),
    }


