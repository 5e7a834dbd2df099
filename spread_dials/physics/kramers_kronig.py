"""Kramers-Kronig transform f''(E) -> f'(E) for a tabulated f'' (pure torch).

The crystallographic form of the dispersion relation is

    f'(E) = (2 / pi) P int_0^inf E' f''(E') / (E^2 - E'^2) dE'
          = (1 / pi) P int f''(E') [1 / (E - E') - 1 / (E + E')] dE'.

Here f'' is taken as the piecewise-linear function through the tabulated points
(x_0 < ... < x_N, values y_j) and zero outside [x_0, x_N].  For such a function the
principal-value integral has a closed form, so the transform is exact for the interpolant
(no FFT, no windowing, any non-uniform grid):

    pi f'(E) = - sum_k A_k(E) (y_{k+1} - y_k) + y_0 (ln|E^2 - x_0^2| + 2) - y_N (ln|E^2 - x_N^2| + 2),
    A_k(E)   = (psi(E, x_{k+1}) - psi(E, x_k)) / (x_{k+1} - x_k),
    psi(E, x) = (E - x) ln|E - x| - (E + x) ln(E + x),   with 0 ln 0 = 0.

The singular 1/(E - E') kernel appears only through (E - x) ln|E - x|, which is finite at a
node, so E may sit on a grid point.  The two end terms diverge logarithmically at E = x_0 and
E = x_N (the jump of f'' to zero outside the table): evaluate inside the tabulated range.

A finite table leaves out f'' below x_0 and above x_N.  For E well inside the range the
missing parts add a slowly varying function: a constant plus c_2 E^2 + ... from energies
far above E, and c_{-2} / E^2 + ... from energies far below.  :func:`fit_tail_correction`
fits such a correction to known f' values away from the region of interest (for tables
spliced onto free-atom values, the free-atom f' there); docs/anomalous.md gives the
measured accuracy.

The transform is linear in f'': :func:`kramers_kronig_matrix` returns the matrix K with
f'(at) = K @ f''(nodes), used by the per-channel model's consistency penalty.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "kramers_kronig",
    "kramers_kronig_matrix",
    "fit_tail_correction",
    "tail_basis",
]


def _psi(E: Tensor, x: Tensor) -> Tensor:
    """psi(E, x) = (E - x) ln|E - x| - (E + x) ln(E + x), broadcast; 0 ln 0 = 0 (E, x > 0)."""
    u = E - x
    au = u.abs()
    first = torch.where(au > 0, u * torch.log(torch.where(au > 0, au, torch.ones_like(au))), torch.zeros_like(u))
    v = E + x
    return first - v * torch.log(v)


def _segment_weights(energy_eV: Tensor, at_eV: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A (M, N) of the closed form and the end terms ln|E^2 - x_0^2| + 2, ln|E^2 - x_N^2| + 2 (M,)."""
    E = at_eV.unsqueeze(-1)
    psi = _psi(E, energy_eV)  # (M, N + 1)
    h = energy_eV[1:] - energy_eV[:-1]
    A = (psi[:, 1:] - psi[:, :-1]) / h
    tiny = torch.finfo(at_eV.dtype).tiny
    low = torch.log((at_eV**2 - energy_eV[0] ** 2).abs().clamp_min(tiny)) + 2.0
    high = torch.log((at_eV**2 - energy_eV[-1] ** 2).abs().clamp_min(tiny)) + 2.0
    return A, low, high


def _check_grid(energy_eV: Tensor) -> None:
    if energy_eV.dim() != 1 or energy_eV.numel() < 2:
        raise ValueError("energy_eV must be a 1-D grid of at least two energies")
    if not bool((energy_eV[1:] > energy_eV[:-1]).all()):
        raise ValueError("energy_eV must increase strictly")
    if not bool((energy_eV > 0).all()):
        raise ValueError("energies must be positive (eV)")


def kramers_kronig(
    energy_eV: Tensor, f_double_prime: Tensor, at_eV: Tensor | None = None, chunk_size: int = 256
) -> Tensor:
    """f'(E) (electrons) from f'' tabulated on ``energy_eV``, by the exact piecewise-linear transform.

    Arguments:
        energy_eV: (N,) strictly increasing positive energies (eV) of the f'' table.
        f_double_prime: (..., N) f'' values (electrons); batch dimensions are kept.
        at_eV: (M,) energies (eV) at which to evaluate f' (default: ``energy_eV``); keep them
            inside (x_0, x_N), where the result is finite.
        chunk_size: energies per block (memory ~ chunk_size * N * 8 bytes * a few).

    Returns:
        (..., M) f' without any correction for f'' outside the table (see
        :func:`fit_tail_correction`).  Differentiable in ``f_double_prime``.  Use float64:
        the closed form sums terms of size ~E ln E.

    Example:
        >>> E = torch.linspace(1000.0, 20000.0, 2000, dtype=torch.float64)
        >>> fdp = torch.ones_like(E)  # a box: f' = ln(|E^2 - a^2| / |E^2 - b^2|) / pi
        >>> fp = kramers_kronig(E, fdp, torch.tensor([5000.0], dtype=torch.float64))
        >>> round(float(fp), 6) == round(math.log((5000**2 - 1000**2) / (20000**2 - 5000**2)) / math.pi, 6)
        True
    """
    _check_grid(energy_eV)
    if at_eV is None:
        at_eV = energy_eV
    at_eV = at_eV.to(energy_eV.dtype).reshape(-1)
    dy = f_double_prime[..., 1:] - f_double_prime[..., :-1]  # (..., N)
    y0 = f_double_prime[..., :1]
    yN = f_double_prime[..., -1:]
    out = []
    for start in range(0, at_eV.numel(), chunk_size):
        A, low, high = _segment_weights(energy_eV, at_eV[start : start + chunk_size])
        out.append(-(dy @ A.transpose(0, 1).to(dy.dtype)) + y0 * low - yN * high)
    return torch.cat(out, -1) / math.pi


def kramers_kronig_matrix(energy_eV: Tensor, at_eV: Tensor) -> Tensor:
    """The (M, N) matrix K with f'(at_eV) = K @ f''(energy_eV) (same transform as :func:`kramers_kronig`).

    Useful when the same grids are used many times (a penalty inside an optimisation loop):
    build K once, then every evaluation is one matrix product.
    """
    _check_grid(energy_eV)
    at_eV = at_eV.to(energy_eV.dtype).reshape(-1)
    A, low, high = _segment_weights(energy_eV, at_eV)
    K = torch.zeros(at_eV.numel(), energy_eV.numel(), dtype=energy_eV.dtype, device=energy_eV.device)
    K[:, 1:] -= A  # -A_k y_{k+1}
    K[:, :-1] += A  # +A_k y_k
    K[:, 0] += low
    K[:, -1] -= high
    return K / math.pi


def tail_basis(at_eV: Tensor, terms: tuple[str, ...] = ("constant",), reference_eV: float = 7000.0) -> Tensor:
    """Columns (M, T) of a slowly varying correction for f'' missing outside a finite table.

    Terms: ``"constant"`` (1), ``"inverse_square"`` ((reference/E)^2, from f'' below the
    table), ``"square"`` ((E/reference)^2, from f'' above the table), ``"linear"``
    (E/reference - 1, a local first-order term).  ``reference_eV`` only scales the columns.
    """
    columns = []
    x = at_eV / reference_eV
    for term in terms:
        if term == "constant":
            columns.append(torch.ones_like(at_eV))
        elif term == "inverse_square":
            columns.append(1.0 / x**2)
        elif term == "square":
            columns.append(x**2)
        elif term == "linear":
            columns.append(x - 1.0)
        else:
            raise ValueError(f"unknown tail term {term!r}")
    return torch.stack(columns, -1)


def fit_tail_correction(
    at_eV: Tensor,
    f_prime_kk: Tensor,
    f_prime_known: Tensor,
    fit_mask: Tensor,
    terms: tuple[str, ...] = ("constant",),
    reference_eV: float = 7000.0,
) -> tuple[Tensor, Tensor]:
    """Least-squares tail correction: f' = f'_KK + basis @ c, fitted where ``fit_mask`` is true.

    Arguments:
        at_eV: (M,) energies (eV).
        f_prime_kk: (M,) the transform of the finite table at ``at_eV``.
        f_prime_known: (M,) trusted f' values (only the masked ones are used).
        fit_mask: (M,) bool, the energies used for the fit (keep the region you want to
            predict out of it).
        terms, reference_eV: see :func:`tail_basis`.

    Returns:
        (corrected f' at every ``at_eV`` (M,), coefficients (T,)).
    """
    basis = tail_basis(at_eV, terms, reference_eV)
    residual = (f_prime_known - f_prime_kk)[fit_mask]
    coef = torch.linalg.lstsq(basis[fit_mask], residual.unsqueeze(-1)).solution.squeeze(-1)
    return f_prime_kk + basis @ coef, coef
