"""Reference curves for edge shifts and oxidation-state calls (pure torch).

An edge shift is measured against one reference curve per site.  Each oxidation state's curve
is placed on the same axis by its best rigid shift against that reference: the Delta_E that
minimises sum over the band of (f'_state(E) - f'_ref(E - Delta_E))^2 + (f''_state(E) -
f''_ref(E - Delta_E))^2 on a 1 eV grid (for the measured rubredoxin pair, Fe(III) against
Fe(II): about +1.85 eV, SPREAD_NOTES).  A site whose refined shift is close to a state's shift
is in that state (:func:`spread_dials.refine.uncertainty.state_probabilities`).
"""

from __future__ import annotations

import torch

from spread_dials.physics.anomalous import TabulatedCurve

__all__ = ["rigid_shift_eV", "curve_distance"]


def curve_distance(curve: TabulatedCurve, reference: TabulatedCurve, shift_eV: float | torch.Tensor, grid_eV: torch.Tensor) -> torch.Tensor:
    """Mean squared difference (e^2) of f' and f'' between ``curve`` and ``reference`` moved by ``shift_eV``."""
    a = curve.at(grid_eV)
    b = reference.at(grid_eV, shift_eV)
    return ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2).mean()


def rigid_shift_eV(curve: TabulatedCurve, reference: TabulatedCurve, low_eV: float, high_eV: float,
                   search_eV: float = 10.0) -> float:  # fmt: skip
    """The edge shift (eV) that best moves ``reference`` onto ``curve`` over [low_eV, high_eV]
    (1 eV grid): a 0.01 eV grid search over +-``search_eV`` refined by a parabola."""
    grid = torch.arange(low_eV, high_eV + 0.5, 1.0, dtype=torch.float64)
    shifts = torch.arange(-search_eV, search_eV + 1e-9, 0.01, dtype=torch.float64)
    curve64, reference64 = curve.to(dtype=torch.float64), reference.to(dtype=torch.float64)
    a = curve64.at(grid)
    fp, fdp = reference64.at(grid.unsqueeze(0), shifts.unsqueeze(-1))
    cost = ((fp - a[0]) ** 2 + (fdp - a[1]) ** 2).mean(-1)
    i = int(torch.argmin(cost))
    if 0 < i < shifts.numel() - 1:
        c0, c1, c2 = (float(v) for v in cost[i - 1 : i + 2])
        denom = c0 - 2 * c1 + c2
        if denom > 0:
            return float(shifts[i]) + 0.5 * (c0 - c2) / denom * 0.01
    return float(shifts[i])
