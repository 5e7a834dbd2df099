"""Lattice transforms F_latt of a finite mosaic domain (nanoBragg's shapes) and their reach.

Every shape is a function of dh = h - h0 (fractional minus nearest integer Miller index) and
N = Ncells_abc; the peak value at dh = 0 is Na*Nb*Nc (times 0.7236 for ``round``, as nanoBragg).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LATTICE_SHAPES", "cutoff_radius", "lattice_factor", "lattice_factor_and_gradient", "lattice_factor_components"]

LATTICE_SHAPES = ("gauss", "square", "round", "tophat")
_ROUND_NORM = 0.723601254558268  # nanoBragg's normalisation of the round (sphere) transform
_GAUSS_ARG_LIMIT = 35.0  # cctbx Gauss_argchk: F_latt = 0 where hrad / 0.63 >= 35
_TOPHAT_HRAD = 0.3969  # nanoBragg: F_latt = Na Nb Nc inside hrad < 0.63^2


def _sincg(x: Tensor, n: Tensor) -> Tensor:
    """sin(n x) / sin(x) with the limit n at sin(x) = 0 (x is pi*dh, |dh| <= 1/2)."""
    tiny = x.abs() < 1e-6
    x_safe = torch.where(tiny, torch.ones_like(x), x)
    return torch.where(tiny, n * torch.ones_like(x), torch.sin(n * x_safe) / torch.sin(x_safe))


def _sinc3(x: Tensor) -> Tensor:
    """3 (sin x - x cos x) / x^3 with the limit 1 at x = 0."""
    tiny = x.abs() < 1e-3
    x_safe = torch.where(tiny, torch.ones_like(x), x)
    return torch.where(tiny, 1.0 - x * x / 10.0, 3.0 * (torch.sin(x_safe) - x_safe * torch.cos(x_safe)) / x_safe**3)


def lattice_factor(dh: Tensor, ncells_abc: Tensor, shape: str) -> Tensor:
    """F_latt for fractional offsets ``dh`` (..., 3) from the nearest lattice point.

    Args:
        dh: (..., 3) h - round(h) (Miller-index units).
        ncells_abc: (3,) cells per domain along a, b, c (may be fractional and require grad).
        shape: one of LATTICE_SHAPES.
    Returns:
        (...) F_latt (amplitude; the intensity uses its square).
    """
    return lattice_factor_components(list(dh.unbind(-1)), ncells_abc, shape)


def lattice_factor_components(dh: list[Tensor], ncells_abc: Tensor, shape: str) -> Tensor:
    """``lattice_factor`` with the three offsets as separate tensors (fusion-friendly)."""
    n = [ncells_abc[i] for i in range(3)]
    n_total = n[0] * n[1] * n[2]
    if shape == "square":
        return _sincg(math.pi * dh[0], n[0]) * _sincg(math.pi * dh[1], n[1]) * _sincg(math.pi * dh[2], n[2])
    hrad = (dh[0] * n[0]) ** 2 + (dh[1] * n[1]) ** 2 + (dh[2] * n[2]) ** 2
    if shape == "gauss":
        arg = hrad / 0.63
        return torch.where(arg < _GAUSS_ARG_LIMIT, n_total * torch.exp(-arg), torch.zeros_like(arg))
    if shape == "round":
        hrad_safe = torch.where(hrad > 0, hrad, torch.ones_like(hrad))
        radius = torch.where(hrad > 0, hrad_safe.sqrt(), torch.zeros_like(hrad))
        return n_total * _ROUND_NORM * _sinc3(math.pi * radius)
    if shape == "tophat":
        return torch.where(hrad < _TOPHAT_HRAD, n_total * torch.ones_like(hrad), torch.zeros_like(hrad))
    raise ValueError(f"unknown lattice shape {shape!r}; choose one of {', '.join(LATTICE_SHAPES)}")


def _sincg_slope(x: Tensor, n: Tensor) -> Tensor:
    """d/dx sin(n x) / sin(x), with its series -n (n^2 - 1) x / 3 near sin(x) = 0."""
    tiny = x.abs() < 1e-6
    x_safe = torch.where(tiny, torch.ones_like(x), x)
    sin_x = torch.sin(x_safe)
    slope = (n * torch.cos(n * x_safe) * sin_x - torch.sin(n * x_safe) * torch.cos(x_safe)) / (sin_x * sin_x)
    return torch.where(tiny, -n * (n * n - 1.0) * x / 3.0, slope)


def _sinc3_slope_over_x(x: Tensor) -> Tensor:
    """(d/dx 3 (sin x - x cos x) / x^3) / x = 3 (x^2 sin x - 3 (sin x - x cos x)) / x^5, with its
    series -1/5 + x^2/70 - x^4/2520 for |x| < 0.1 (where the difference loses digits)."""
    tiny = x.abs() < 0.1
    x_safe = torch.where(tiny, torch.ones_like(x), x)
    x2 = x * x
    direct = 3.0 * (x_safe * x_safe * torch.sin(x_safe) - 3.0 * (torch.sin(x_safe) - x_safe * torch.cos(x_safe))) / x_safe**5
    return torch.where(tiny, -0.2 + x2 / 70.0 - x2 * x2 / 2520.0, direct)


def lattice_factor_and_gradient(dh: list[Tensor], ncells_abc: Tensor, shape: str) -> tuple[Tensor, list[Tensor]]:
    """F_latt of :func:`lattice_factor_components` and its three derivatives dF_latt / d dh_i
    in closed form (per Miller-index unit), for a kernel's Jacobian without autograd.

    Args and shapes as :func:`lattice_factor_components`; ``tophat`` is piecewise constant
    (derivatives 0), ``gauss`` is 0 with derivative 0 beyond its cut-off (Gauss_argchk).
    Returns:
        (F_latt, [dF/d dh_0, dF/d dh_1, dF/d dh_2]), each broadcast like the offsets.
    """
    n = [ncells_abc[i] for i in range(3)]
    f = lattice_factor_components(dh, ncells_abc, shape)
    if shape == "square":
        s = [_sincg(math.pi * dh[i], n[i]) for i in range(3)]
        slope = [math.pi * _sincg_slope(math.pi * dh[i], n[i]) for i in range(3)]
        return f, [slope[0] * s[1] * s[2], s[0] * slope[1] * s[2], s[0] * s[1] * slope[2]]
    if shape == "gauss":
        return f, [f * (-2.0 / 0.63) * n[i] * n[i] * dh[i] for i in range(3)]
    if shape == "round":
        hrad = (dh[0] * n[0]) ** 2 + (dh[1] * n[1]) ** 2 + (dh[2] * n[2]) ** 2
        hrad_safe = torch.where(hrad > 0, hrad, torch.ones_like(hrad))
        radius = torch.where(hrad > 0, hrad_safe.sqrt(), torch.zeros_like(hrad))
        # dF/d dh_i = Nabc norm sinc3'(pi r) pi N_i^2 dh_i / r
        common = n[0] * n[1] * n[2] * _ROUND_NORM * math.pi**2 * _sinc3_slope_over_x(math.pi * radius)
        return f, [common * n[i] * n[i] * dh[i] for i in range(3)]
    if shape == "tophat":
        zero = torch.zeros_like(f)
        return f, [zero, zero, zero]
    raise ValueError(f"unknown lattice shape {shape!r}; choose one of {', '.join(LATTICE_SHAPES)}")


def cutoff_radius(shape: str, tolerance: float) -> float:
    """Radius r in units of sqrt(hrad) = |N * dh| beyond which F_latt^2 / peak^2 <= tolerance.

    Bounds used (each an upper bound on F_latt^2 / peak^2 at |N dh| = r):
      gauss: exp(-2 r^2 / 0.63), and exactly 0 beyond r^2 = 0.63 * 35;
      tophat: 0 beyond r^2 = 0.3969;
      round: (3 (1 + x) / x^3)^2 with x = pi r (from |sin x - x cos x| <= 1 + x);
      square: 3 / (4 r^2) (the largest of the three |N_i dh_i| is >= r / sqrt 3 and
              |sin(N pi d) / (N sin(pi d))| <= 1 / (2 N |d|) for |d| <= 1/2).
    """
    if not 0.0 < tolerance < 1.0:
        raise ValueError("the sparse-kernel tolerance must lie strictly between 0 and 1")
    if shape == "gauss":
        return math.sqrt(min(-0.315 * math.log(tolerance), 0.63 * _GAUSS_ARG_LIMIT))
    if shape == "tophat":
        return math.sqrt(_TOPHAT_HRAD)
    if shape == "square":
        return math.sqrt(3.0 / (4.0 * tolerance))
    if shape == "round":
        lo, hi = 1.0, 1e7  # bisection on x for 3 (1 + x) / x^3 = sqrt(tolerance)
        target = math.sqrt(tolerance)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if 3.0 * (1.0 + mid) / mid**3 > target:
                lo = mid
            else:
                hi = mid
        return hi / math.pi
    raise ValueError(f"unknown lattice shape {shape!r}; choose one of {', '.join(LATTICE_SHAPES)}")
