"""Structure factors per Miller index and spectral channel, F(h, c) = F0 + sum_s (f'_s + i f''_s) G_s.

One container serves every use: a plain per-channel table F[h, c] (G absent), a
channel-independent F0[h], or the anomalous-site form where f'_s(c), f''_s(c) of each site s
are tensors that refinement differentiates.  Miller indices missing from the table scatter
with ``default_F`` (nanoBragg's convention).  Lookup of integer h goes through a dense index
volume, so it runs on the GPU as a single gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from spread_dials.physics.tensors import TensorFields

__all__ = ["StructureFactors", "constant_structure_factors"]


@dataclass(frozen=True)
class StructureFactors(TensorFields):
    """F(h, channel) for a list of Miller indices.

    Attributes:
        miller_index: (H, 3) long; Friedel mates are distinct entries.
        F0: complex (H,) or (H, C): the non-anomalous part (electrons).
        G: complex (H, S) basis of each anomalous site (sum over its atoms of
           occupancy * exp(2 pi i h.r) * Debye-Waller), or None.
        f_prime, f_double_prime: (S, C) anomalous corrections of each site per channel (e).
        default_F: |F| of every Miller index not in the table.
    """

    miller_index: Tensor
    F0: Tensor
    G: Tensor | None = None
    f_prime: Tensor | None = None
    f_double_prime: Tensor | None = None
    default_F: float = 0.0
    _volume: Tensor = field(default=None, repr=False)
    _volume_min: Tensor = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._volume is None:
            lo, volume = _index_volume(self.miller_index)
            object.__setattr__(self, "_volume_min", lo)
            object.__setattr__(self, "_volume", volume)

    @property
    def n_reflections(self) -> int:
        return int(self.miller_index.shape[0])

    def index_of(self, h: Tensor) -> Tensor:
        """Row of integer Miller indices ``h`` (..., 3) in the table; H (the default row) if absent."""
        shape = self._volume.shape
        rel = h.long() - self._volume_min
        inside = ((rel >= 0) & (rel < torch.tensor(shape, device=h.device))).all(-1)
        rel = torch.where(inside.unsqueeze(-1), rel, torch.zeros_like(rel))
        idx = self._volume[rel[..., 0], rel[..., 1], rel[..., 2]]
        return torch.where(inside, idx, torch.full_like(idx, self.n_reflections))

    def amplitude(self, row: Tensor, channel: Tensor) -> Tensor:
        """Complex F at table rows ``row`` (H means default_F) and spectral channels ``channel``."""
        inside = row < self.n_reflections
        safe = torch.where(inside, row, torch.zeros_like(row))  # gathers without copying the table
        if self.n_reflections == 0:
            F = torch.zeros(row.shape, dtype=self.F0.dtype, device=self.F0.device)
        else:
            F = self.F0[safe] if self.F0.dim() == 1 else self.F0[safe, channel]
        F = torch.where(inside, F, torch.full_like(F, self.default_F))
        if self.G is not None and self.n_reflections > 0:
            g = self.G[safe]  # (..., S)
            g = torch.where(inside.unsqueeze(-1), g, torch.zeros_like(g))
            fp = self.f_prime[:, channel]  # (S, ...)
            fdp = self.f_double_prime[:, channel]
            anomalous = torch.complex(fp, fdp).to(g.dtype)
            F = F + (g * anomalous.movedim(0, -1)).sum(-1)
        return F

    def intensity(self, row: Tensor, channel: Tensor) -> Tensor:
        """|F|^2 (electrons^2) at rows ``row`` and channels ``channel`` (broadcast together)."""
        row, channel = torch.broadcast_tensors(row, channel)
        F = self.amplitude(row, channel)
        return F.real * F.real + F.imag * F.imag


def _index_volume(miller_index: Tensor) -> tuple[Tensor, Tensor]:
    """Dense (nh, nk, nl) volume of table rows (H where absent) and its lowest index."""
    H = miller_index.shape[0]
    if H == 0:
        lo = torch.zeros(3, dtype=torch.long, device=miller_index.device)
        return lo, torch.zeros((1, 1, 1), dtype=torch.long, device=miller_index.device)
    lo = miller_index.min(0).values
    hi = miller_index.max(0).values
    shape = tuple(int(x) for x in (hi - lo + 1))
    volume = torch.full(shape, H, dtype=torch.long, device=miller_index.device)
    rel = miller_index - lo
    volume[rel[:, 0], rel[:, 1], rel[:, 2]] = torch.arange(H, device=miller_index.device)
    return lo, volume


def constant_structure_factors(default_F: float, dtype: torch.dtype = torch.complex64) -> StructureFactors:
    """No table: every Miller index scatters with |F| = default_F (nanoBragg's default_F)."""
    return StructureFactors(
        miller_index=torch.zeros((0, 3), dtype=torch.long), F0=torch.zeros(0, dtype=dtype), default_F=default_F
    )
