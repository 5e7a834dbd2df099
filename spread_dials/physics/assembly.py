"""Batched assembly F[h, c] = F0[h] + sum_s G[h, s] (f'_s(E_c) + i f''_s(E_c)) (electrons).

The kernels do not need the dense (H, C) table (StructureFactors combines F0 and G on the
fly at the rows and channels a pixel needs); this is the same sum for all rows and channels
at once, for validation, plots and small jobs.  It is one complex matrix product,
differentiable in f' and f'' (and F0, G).
"""

from __future__ import annotations

import torch
from torch import Tensor

from spread_dials.physics.structure_factors import StructureFactors

__all__ = ["assemble_structure_factors", "dense_table"]


def assemble_structure_factors(F0: Tensor, G: Tensor, f_prime: Tensor, f_double_prime: Tensor) -> Tensor:
    """F (H, C) complex from F0 (H,) or (H, C), G (H, S) and f', f'' (S, C) (electrons).

    Example:
        >>> F0 = torch.tensor([10 + 0j, 0j]); G = torch.tensor([[1 + 0j], [1j]])
        >>> fp = torch.tensor([[-2.0, -3.0]]); fdp = torch.tensor([[1.0, 4.0]])
        >>> assemble_structure_factors(F0, G, fp, fdp)
        tensor([[ 8.+1.j,  7.+4.j],
                [-1.-2.j, -4.-3.j]])
    """
    anomalous = torch.complex(f_prime, f_double_prime).to(G.dtype)  # (S, C)
    F = G @ anomalous  # (H, C)
    return F + (F0.unsqueeze(-1) if F0.dim() == 1 else F0)


def dense_table(sf: StructureFactors) -> Tensor:
    """F (H, C) of a :class:`StructureFactors` with anomalous sites, for every row and channel."""
    if sf.G is None:
        raise ValueError("the structure factors have no anomalous sites (G is None)")
    return assemble_structure_factors(sf.F0, sf.G, sf.f_prime, sf.f_double_prime)
