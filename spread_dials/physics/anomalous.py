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
    "interpolate_cubic",
    "EdgeShiftModel",
    "FreeChannelModel",
    "second_difference_penalty",
    "band_kramers_kronig_matrix",
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


def interpolate_cubic(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Cubic Hermite (Catmull-Rom) interpolation y(x) through (xp, fp): continuous first
    derivative in ``x``, differentiable in ``x`` and ``fp``.

    Node slopes are central differences (f[i+1] - f[i-1]) / (x[i+1] - x[i-1]) (one-sided at the
    ends).  Used for tabulated f'/f'' because an edge shift moves the query points across the
    nodes: with linear interpolation the likelihood has a kink at every node, where L-BFGS stops
    and the curvature is undefined.

    Arguments:
        x: (..., M) query points (eV); beyond the ends the end values are held (flat).
        xp: (N,) strictly increasing grid (eV), N >= 2.
        fp: (..., N) values on the grid; leading dimensions broadcast with ``x``'s.

    Returns:
        (..., M) interpolated values (equal to ``fp`` at the nodes).
    """
    n = xp.shape[-1]
    slope = torch.empty_like(fp)
    slope[..., 1:-1] = (fp[..., 2:] - fp[..., :-2]) / (xp[2:] - xp[:-2])
    slope[..., 0] = (fp[..., 1] - fp[..., 0]) / (xp[1] - xp[0])
    slope[..., -1] = (fp[..., -1] - fp[..., -2]) / (xp[-1] - xp[-2])
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, n - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    h = x1 - x0
    t = ((x - x0) / h).clamp(0.0, 1.0)
    batch = torch.broadcast_shapes(fp.shape[:-1], x.shape[:-1])
    idxb = idx.expand(batch + idx.shape[-1:])
    tb, hb = t.expand(batch + t.shape[-1:]), h.expand(batch + h.shape[-1:])

    def take(v: Tensor, i: Tensor) -> Tensor:
        return torch.gather(v.expand(batch + v.shape[-1:]), -1, i)

    y0, y1 = take(fp, idxb - 1), take(fp, idxb)
    m0, m1 = take(slope, idxb - 1), take(slope, idxb)
    t2, t3 = tb * tb, tb * tb * tb
    return ((2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + tb) * hb * m0 + (-2 * t3 + 3 * t2) * y1
            + (t3 - t2) * hb * m1)  # fmt: skip


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

        f(E) = f_table(E - edge_shift_eV), cubic Hermite between the table's nodes
        (:func:`interpolate_cubic`: smooth in the shift); broadcasting ``edge_shift_eV`` (..., 1)
        against ``energy_eV`` (C,) gives (..., C).  Differentiable in both.
        """
        e = energy_eV - edge_shift_eV
        xp = self.energy_eV.to(e.dtype) if torch.is_tensor(e) else self.energy_eV
        return (
            interpolate_cubic(e, xp, self.f_prime.to(xp.dtype)),
            interpolate_cubic(e, xp, self.f_double_prime.to(xp.dtype)),
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


def _stack_if_common(references: Sequence[TabulatedCurve]) -> tuple[Tensor, Tensor, Tensor] | None:
    """(grid (N,), f' (S, N), f'' (S, N)) when every reference uses the same grid, else None."""
    first = references[0].energy_eV
    for curve in references[1:]:
        if curve.energy_eV.shape != first.shape or not torch.equal(curve.energy_eV, first):
            return None
    return (
        first,
        torch.stack([c.f_prime for c in references]),
        torch.stack([c.f_double_prime for c in references]),
    )


class EdgeShiftModel(nn.Module):
    """Each site follows its reference curve moved by an edge shift: f_s(E) = f_ref,s(E - Delta_E_s).

    Arguments:
        references: one :class:`TabulatedCurve` per site (the same curve may serve several).
        edge_shift_eV: (S,) initial shifts (eV); default zeros.
        refine: if true the shifts are an ``nn.Parameter`` (``requires_grad``), else a buffer.

    Calling the model with channel energies (C,) returns (f_prime, f_double_prime), each (S, C),
    differentiable in ``edge_shift_eV``.

    Example:
        >>> E = torch.tensor([7000.0, 7100.0, 7200.0], dtype=torch.float64)
        >>> ref = TabulatedCurve(E, torch.tensor([-2.0, -8.0, -4.0], dtype=torch.float64),
        ...                      torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64))
        >>> model = EdgeShiftModel([ref, ref], torch.tensor([0.0, 50.0], dtype=torch.float64))
        >>> fp, fdp = model(torch.tensor([7150.0], dtype=torch.float64))
        >>> fdp.squeeze(-1).tolist()
        [2.5, 1.0]
    """

    def __init__(
        self,
        references: Sequence[TabulatedCurve],
        edge_shift_eV: Tensor | None = None,
        refine: bool = True,
    ) -> None:
        super().__init__()
        if len(references) == 0:
            raise ValueError("EdgeShiftModel needs at least one site")
        self.labels = [c.label for c in references]
        dtype = references[0].energy_eV.dtype
        if edge_shift_eV is None:
            edge_shift_eV = torch.zeros(len(references), dtype=dtype)
        edge_shift_eV = torch.as_tensor(edge_shift_eV, dtype=dtype).reshape(len(references)).clone()
        if refine:
            self.edge_shift_eV = nn.Parameter(edge_shift_eV)
        else:
            self.register_buffer("edge_shift_eV", edge_shift_eV)
        common = _stack_if_common(references)
        self._common = common is not None
        if common is not None:
            self.register_buffer("grid_eV", common[0])
            self.register_buffer("table_f_prime", common[1])
            self.register_buffer("table_f_double_prime", common[2])
        else:
            for s, curve in enumerate(references):
                self.register_buffer(f"grid_eV_{s}", curve.energy_eV)
                self.register_buffer(f"table_f_prime_{s}", curve.f_prime)
                self.register_buffer(f"table_f_double_prime_{s}", curve.f_double_prime)

    @property
    def n_sites(self) -> int:
        return int(self.edge_shift_eV.shape[0])

    def forward(self, energy_eV: Tensor) -> tuple[Tensor, Tensor]:
        """(f', f'') of every site at channel energies ``energy_eV`` (C,) (eV): two (S, C) tensors."""
        e = energy_eV.to(self.edge_shift_eV.dtype).unsqueeze(0) - self.edge_shift_eV.unsqueeze(-1)  # (S, C)
        if self._common:
            return (
                interpolate_linear(e, self.grid_eV, self.table_f_prime),
                interpolate_linear(e, self.grid_eV, self.table_f_double_prime),
            )
        fp, fdp = [], []
        for s in range(self.n_sites):
            grid = getattr(self, f"grid_eV_{s}")
            fp.append(interpolate_linear(e[s], grid, getattr(self, f"table_f_prime_{s}")))
            fdp.append(interpolate_linear(e[s], grid, getattr(self, f"table_f_double_prime_{s}")))
        return torch.stack(fp), torch.stack(fdp)


def second_difference_penalty(values: Tensor, energy_eV: Tensor) -> Tensor:
    """Sum over rows of squared second derivatives (e / eV^2)^2 on a (possibly uneven) energy grid.

    Arguments:
        values: (S, C) values on the grid.
        energy_eV: (C,) increasing energies (eV), C >= 3.

    Returns:
        Scalar sum of (d^2 values / d E^2)^2 * (mean spacing)^4, i.e. squared second
        differences in electrons^2 on a uniform grid.
    """
    h = energy_eV[1:] - energy_eV[:-1]
    slope = (values[..., 1:] - values[..., :-1]) / h
    curvature = 2.0 * (slope[..., 1:] - slope[..., :-1]) / (h[1:] + h[:-1])
    scale = h.mean() ** 2
    return ((curvature * scale) ** 2).sum()


def band_kramers_kronig_matrix(energy_eV: Tensor) -> Tensor:
    """(C, C) matrix K: the f' change at the channels caused by an f'' change at the channels.

    The f'' change is the piecewise-linear function through the channel values that falls to
    zero one channel spacing beyond each end of the band (and is zero outside), so the
    transform needs no data outside the band.
    """
    e = energy_eV.to(torch.float64)
    below = e[:1] - (e[1] - e[0])
    above = e[-1:] + (e[-1] - e[-2])
    nodes = torch.cat([below, e, above])
    return kramers_kronig_matrix(nodes, e)[:, 1:-1].to(energy_eV.dtype)


class FreeChannelModel(nn.Module):
    """Free f'_s(E_c), f''_s(E_c) for every site and channel, with priors tying them to physics.

    Arguments:
        energy_eV: (C,) channel energies (eV), increasing (C >= 3).
        references: one :class:`TabulatedCurve` per site; the initial values and the anchor of
            the Kramers-Kronig penalty (the reference supplies f'' outside the band).

    ``forward()`` returns the (S, C) parameters (f_prime, f_double_prime).  Two penalties:

    - :meth:`smoothness_penalty`: squared second differences of f' and f'' over the channels.
    - :meth:`kramers_kronig_penalty`: sum over sites and channels of
      (Delta f' - K Delta f'')^2 with Delta = value - reference, K from
      :func:`band_kramers_kronig_matrix`: zero when the change of f'' and the change of f'
      are a Kramers-Kronig pair (given the reference is one).
    - :meth:`negative_log_prior` combines them as Gaussian terms with widths in electrons.
    """

    def __init__(self, energy_eV: Tensor, references: Sequence[TabulatedCurve]) -> None:
        super().__init__()
        if energy_eV.dim() != 1 or energy_eV.numel() < 3:
            raise ValueError("FreeChannelModel needs at least three channel energies")
        self.labels = [c.label for c in references]
        self.register_buffer("energy_eV", energy_eV.clone())
        ref = [c.at(energy_eV.to(c.energy_eV.dtype)) for c in references]
        fp0 = torch.stack([r[0] for r in ref]).to(energy_eV.dtype)
        fdp0 = torch.stack([r[1] for r in ref]).to(energy_eV.dtype)
        self.register_buffer("reference_f_prime", fp0.clone())
        self.register_buffer("reference_f_double_prime", fdp0.clone())
        self.register_buffer("kk_matrix", band_kramers_kronig_matrix(energy_eV))
        self.f_prime = nn.Parameter(fp0.clone())
        self.f_double_prime = nn.Parameter(fdp0.clone())

    @property
    def n_sites(self) -> int:
        return int(self.f_prime.shape[0])

    def forward(self, energy_eV: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(f', f'') (S, C); ``energy_eV``, if given, must be the model's channel energies."""
        if energy_eV is not None and (
            energy_eV.shape != self.energy_eV.shape or not torch.allclose(energy_eV.to(self.energy_eV), self.energy_eV)
        ):
            raise ValueError("FreeChannelModel is defined on its own channel energies only")
        return self.f_prime, self.f_double_prime

    def smoothness_penalty(self) -> Tensor:
        """Squared second differences (e^2) of f' and f'' summed over sites and channels."""
        return second_difference_penalty(self.f_prime, self.energy_eV) + second_difference_penalty(
            self.f_double_prime, self.energy_eV
        )

    def kramers_kronig_residual(self) -> Tensor:
        """(S, C) Delta f' - K Delta f'' (electrons)."""
        d_fdp = self.f_double_prime - self.reference_f_double_prime
        d_fp = self.f_prime - self.reference_f_prime
        return d_fp - d_fdp @ self.kk_matrix.transpose(0, 1)

    def kramers_kronig_penalty(self) -> Tensor:
        """Sum of squared :meth:`kramers_kronig_residual` (e^2)."""
        return self.kramers_kronig_residual().pow(2).sum()

    def negative_log_prior(self, smoothness_sigma_e: float = 0.05, kramers_kronig_sigma_e: float = 0.05) -> Tensor:
        """0.5 * (smoothness / sigma_s^2 + KK penalty / sigma_kk^2): Gaussian priors, widths in electrons."""
        return 0.5 * (
            self.smoothness_penalty() / smoothness_sigma_e**2 + self.kramers_kronig_penalty() / kramers_kronig_sigma_e**2
        )
