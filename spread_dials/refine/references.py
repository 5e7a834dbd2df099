"""Reference curves for edge shifts and oxidation-state calls (pure torch).

An edge shift is measured against one reference curve per site.  Each oxidation state's curve
is placed on the same axis by its best rigid shift against that reference: the Delta_E that
minimises sum over the band of (f'_state(E) - f'_ref(E - Delta_E))^2 + (f''_state(E) -
f''_ref(E - Delta_E))^2 on a 1 eV grid (for the measured rubredoxin pair, Fe(III) against
Fe(II): about +1.85 eV, SPREAD_NOTES).  A site whose refined shift is close to a state's shift
is in that state (:func:`spread_dials.refine.uncertainty.state_probabilities`).

Models with curves rather than a shift as parameters (``spline_kk``) report the same quantity
of their refined curves: :func:`matched_edge_shifts` gives, per site group, the rigid shift
of the reference that best matches the group's refined f' and f'' (the same least-squares
criterion), and its Jacobian in the parameters, through which the parameters' covariance is
propagated (implicit differentiation of the criterion's stationarity).
"""

from __future__ import annotations

import torch

from spread_dials.physics.anomalous import TabulatedCurve

__all__ = ["rigid_shift_eV", "curve_distance", "matched_edge_shifts"]


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


def matched_edge_shifts(sites, theta: torch.Tensor, references: list[TabulatedCurve], low_eV: float, high_eV: float,
                        jacobian: bool = True, newton_steps: int = 3) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Per site group, the rigid shift (eV) of its first site's reference that best matches its
    refined curves over [low_eV, high_eV] (1 eV grid; :func:`rigid_shift_eV`, then Newton steps
    on the same criterion), and d shift / d theta.

    Arguments:
        sites: a :class:`~spread_dials.refine.sites.SiteModel`.
        theta: (P,) its parameters.
        references: the reference curve of every site.
        low_eV, high_eV: the energy range (eV) compared.
        jacobian: also return the (G, P) Jacobian (else None).

    Returns:
        (shifts (G,), Jacobian (G, P) or None), float64.  The Jacobian is the implicit
        derivative -(d^2 c / d shift d theta) / (d^2 c / d shift^2) of the criterion c.
    """
    grid = torch.arange(low_eV, high_eV + 0.5, 1.0, dtype=torch.float64)
    theta = theta.detach().to(torch.float64)
    shifts, rows = [], []
    for g in range(sites.n_groups):
        s = int((sites.group == g).nonzero()[0])
        reference = references[s].to(dtype=torch.float64)

        def cost(shift: torch.Tensor, t: torch.Tensor, s: int = s, reference: TabulatedCurve = reference):
            fp, fdp = sites.curves(t, grid)
            ref_fp, ref_fdp = reference.at(grid, shift)
            return ((fp[s] - ref_fp) ** 2 + (fdp[s] - ref_fdp) ** 2).mean()

        with torch.no_grad():
            fp, fdp = sites.curves(theta, grid)
        start = rigid_shift_eV(TabulatedCurve(grid, fp[s], fdp[s]), reference, low_eV, high_eV)
        shift = torch.tensor(start, dtype=torch.float64)
        t = theta.clone().requires_grad_(True)
        for step in range(newton_steps + 1):
            d = shift.clone().requires_grad_(True)
            (g_d,) = torch.autograd.grad(cost(d, t), d, create_graph=True)
            h_dd, h_dt = torch.autograd.grad(g_d, [d, t], allow_unused=True)
            if step == newton_steps or not float(h_dd) > 0:
                break
            move = float(g_d.detach()) / float(h_dd)
            if abs(move) > 0.05:  # the grid search is already within 0.01 eV: refuse a far jump
                break
            shift = shift - move
        shifts.append(float(shift))
        if jacobian:
            flat = h_dt is None or not float(h_dd) > 0
            rows.append(torch.zeros_like(theta) if flat else -h_dt.detach() / h_dd.detach())
    return torch.tensor(shifts, dtype=torch.float64), torch.stack(rows) if jacobian else None
