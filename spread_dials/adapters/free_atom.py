"""Free-atom f'(E), f''(E) from cctbx.eltbx (Sasaki 1989 or Henke 1993 tables) on any energy grid.

Sasaki tables cover 4.3-124 keV with a fine step at absorption edges; Henke tables cover
10 eV-30 keV on a ~1.6 % logarithmic mesh (coarse near edges, so f' there is unreliable).
cctbx interpolates both linearly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from spread_dials.physics.anomalous import TabulatedCurve

__all__ = ["FREE_ATOM_TABLES", "absorption_edges_eV", "free_atom_curve", "free_atom_fp_fdp", "energy_range_eV"]

FREE_ATOM_TABLES = ("sasaki", "henke")
_INVALID = -9999.0


def _table(element: str, table: str):
    if table == "sasaki":
        from cctbx.eltbx import sasaki

        return sasaki.table(element)
    if table == "henke":
        from cctbx.eltbx import henke

        return henke.table(element)
    raise ValueError(f"unknown free-atom table {table!r}; choose one of {FREE_ATOM_TABLES}")


def energy_range_eV(table: str) -> tuple[float, float]:
    """Energies (eV) a table covers: Sasaki 4300-123980, Henke 10-30000."""
    return {"sasaki": (4300.0, 123980.0), "henke": (10.0, 30000.0)}[table]


def free_atom_fp_fdp(element: str, energy_eV: np.ndarray | Tensor | list[float], table: str = "sasaki") -> tuple[np.ndarray, np.ndarray]:
    """Free-atom (f', f'') (electrons) of ``element`` at each energy (eV), as float64 arrays.

    Raises:
        ValueError: an unknown element or table, or an energy outside the table's range.
    """
    energies = np.asarray(energy_eV.detach().cpu() if torch.is_tensor(energy_eV) else energy_eV, dtype=np.float64)
    if table not in FREE_ATOM_TABLES:
        raise ValueError(f"unknown free-atom table {table!r}; choose one of {FREE_ATOM_TABLES}")
    try:
        t = _table(element, table)
    except (RuntimeError, ValueError) as error:  # cctbx: "Unknown scattering type label"
        raise ValueError(f"no {table} table for element {element!r}") from error
    values = np.array([(f.fp(), f.fdp()) for f in (t.at_ev(float(e)) for e in energies.reshape(-1))], dtype=np.float64)
    values = values.reshape(energies.shape + (2,))
    bad = (values == _INVALID).any(-1)
    if bad.any():
        lo, hi = energy_range_eV(table)
        raise ValueError(
            f"{table} table for {element} has no f'/f'' at {energies[bad].ravel()[:3].tolist()} eV "
            f"(it covers {lo:g}-{hi:g} eV)"
        )
    return values[..., 0], values[..., 1]


def absorption_edges_eV(element: str, lo_eV: float, hi_eV: float, table: str = "sasaki") -> list[float]:
    """Absorption edges (eV) of ``element`` between ``lo_eV`` and ``hi_eV`` (clipped to the table).

    An edge is where the free-atom f'' jumps by more than 2 % within 1 eV (away from edges it
    changes by ~0.03 % per eV; K edges jump ~8-fold, L edges ~1.2-2-fold); the first energy of
    each jump is reported.
    """
    t_lo, t_hi = energy_range_eV(table)
    grid = np.arange(math.ceil(max(lo_eV, t_lo)), math.floor(min(hi_eV, t_hi)) + 1.0, 1.0)
    if grid.size < 2:
        return []
    _, fdp = free_atom_fp_fdp(element, grid, table)
    jump = fdp[1:] > 1.02 * np.maximum(fdp[:-1], 1e-6)
    starts = jump & ~np.concatenate([[False], jump[:-1]])
    return [float(e) for e in grid[1:][starts]]


def free_atom_curve(
    element: str, energy_eV: np.ndarray | Tensor | list[float], table: str = "sasaki", dtype: torch.dtype = torch.float64
) -> TabulatedCurve:
    """A :class:`TabulatedCurve` of free-atom f', f'' of ``element`` on the grid ``energy_eV`` (eV).

    The grid must hold at least two increasing energies (use :func:`free_atom_fp_fdp` for one).

    Example:
        >>> c = free_atom_curve("Mn", [6500.0, 6550.0])
        >>> round(float(c.f_prime[1]), 2), round(float(c.f_double_prime[1]), 2)
        (-6.29, 3.95)
    """
    energies = np.asarray(energy_eV.detach().cpu() if torch.is_tensor(energy_eV) else energy_eV, dtype=np.float64)
    fp, fdp = free_atom_fp_fdp(element, energies, table)
    return TabulatedCurve(
        energy_eV=torch.tensor(energies, dtype=dtype),
        f_prime=torch.tensor(fp, dtype=dtype),
        f_double_prime=torch.tensor(fdp, dtype=dtype),
        label=f"{element} ({table})",
    )
