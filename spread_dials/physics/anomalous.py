"""Anomalous scattering f'(E), f''(E) of each site: tabulated curves, edge shifts, free channels.

Three models produce the (S, C) tables of f' and f'' (electrons) that
:class:`~spread_dials.physics.structure_factors.StructureFactors` consumes, for S anomalous
sites and C spectral channels of energies ``energy_eV`` (C,):

- :class:`TabulatedCurve` — one measured or free-atom curve, linearly interpolated in torch.
- :class:`EdgeShiftModel` — site s follows a reference curve moved by an edge shift Delta_E_s
  (eV): f_s(E) = f_ref(E - Delta_E_s) for f' and f'' alike.  Moving both together keeps the
  pair Kramers-Kronig consistent up to O(Delta_E / E) (docs/anomalous.md).  Differentiable
  in Delta_E through the linear interpolation (the gradient is the local slope of the table).
- :class:`FreeChannelModel` — every f'_s(E_c), f''_s(E_c) is a free value, with a smoothness
  prior (squared second differences over the channel grid) and a Kramers-Kronig consistency
  penalty that ties the change of f' to the transform of the change of f'' (relative to a
  reference curve, so the f'' outside the band is the reference's).

Everything is pure torch: device and dtype follow the inputs (use float64 for the
Kramers-Kronig pieces).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from spread_dials.physics.kramers_kronig import kramers_kronig_matrix

__all__ = [
    "TabulatedCurve",
    "interpolate_linear",
    "EdgeShiftModel",
    "FreeChannelModel",
    "second_difference_penalty",
]


def interpolate_linear(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation y(x) through (xp, fp), differentiable in ``x`` and ``fp``.

    Arguments:
        x: (..., M) query points (eV); beyond the ends the end values are held (flat).
        xp: (N,) strictly increasing grid (eV).
        fp: (..., N) values on the grid; leading dimensions broadcast with ``x``'s.

    Returns:
        (..., M) interpolated values.  d y / d x is the slope of the segment x falls in
        (zero outside the grid).
    """
    n = xp.shape[-1]
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, n - 1)
    x0 = xp[idx - 1]
    x1 = xp[idx]
    t = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    batch = torch.broadcast_shapes(fp.shape[:-1], x.shape[:-1])
    fpb = fp.expand(batch + fp.shape[-1:])
    idxb = idx.expand(batch + idx.shape[-1:])
    tb = t.expand(batch + t.shape[-1:])
    y0 = torch.gather(fpb, -1, idxb - 1)
    y1 = torch.gather(fpb, -1, idxb)
    return y0 + (y1 - y0) * tb


@dataclass(frozen=True)
class TabulatedCurve:
    """f'(E) and f''(E) (electrons) tabulated on an energy grid (eV).

    Attributes:
        energy_eV: (N,) strictly increasing energies (eV); any spacing.
        f_prime: (N,) f' (e).
        f_double_prime: (N,) f'' (e).
        label: a name for plots and logs (e.g. "Fe3+ rubredoxin", "Mn(IV)").
    """

    energy_eV: Tensor
    f_prime: Tensor
    f_double_prime: Tensor
    label: str = ""

    def __post_init__(self) -> None:
        n = self.energy_eV.shape
        if self.energy_eV.dim() != 1 or self.f_prime.shape != n or self.f_double_prime.shape != n:
            raise ValueError("energy_eV, f_prime, f_double_prime must be 1-D of the same length")
        if n[0] < 2 or not bool((self.energy_eV[1:] > self.energy_eV[:-1]).all()):
            raise ValueError("energy_eV must hold at least two strictly increasing energies")

    def at(self, energy_eV: Tensor, edge_shift_eV: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
        """(f', f'') at ``energy_eV`` of this curve moved up in energy by ``edge_shift_eV``.

        f(E) = f_table(E - edge_shift_eV); broadcasting ``edge_shift_eV`` (..., 1) against
        ``energy_eV`` (C,) gives (..., C).  Differentiable in both.
        """
        e = energy_eV - edge_shift_eV
        xp = self.energy_eV.to(e.dtype) if torch.is_tensor(e) else self.energy_eV
        return (
            interpolate_linear(e, xp, self.f_prime.to(xp.dtype)),
            interpolate_linear(e, xp, self.f_double_prime.to(xp.dtype)),
        )

    def shifted(self, edge_shift_eV: float, label: str | None = None) -> "TabulatedCurve":
        """The same table moved up in energy by ``edge_shift_eV`` (exact: only the grid moves)."""
        return replace(self, energy_eV=self.energy_eV + edge_shift_eV, label=self.label if label is None else label)

    def window(self, low_eV: float, high_eV: float) -> "TabulatedCurve":
        """Rows inside [low_eV, high_eV] plus one neighbour each side (so interpolation there is exact)."""
        e = self.energy_eV
        lo = max(int(torch.searchsorted(e, torch.tensor(low_eV, dtype=e.dtype))) - 1, 0)
        hi = min(int(torch.searchsorted(e, torch.tensor(high_eV, dtype=e.dtype), right=True)) + 1, e.numel())
        return replace(self, energy_eV=e[lo:hi], f_prime=self.f_prime[lo:hi], f_double_prime=self.f_double_prime[lo:hi])

    def to(self, device=None, dtype=None) -> "TabulatedCurve":
        return replace(
            self,
            energy_eV=self.energy_eV.to(device=device, dtype=dtype),
            f_prime=self.f_prime.to(device=device, dtype=dtype),
            f_double_prime=self.f_double_prime.to(device=device, dtype=dtype),
        )
