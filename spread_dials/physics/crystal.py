"""Crystal orientation, unit cell and mosaic domains as differentiable tensors.

Conventions: ``real_space`` is a (3, 3) matrix whose rows are the real-space cell vectors a, b, c
(A, lab frame), so the fractional Miller index of a scattering vector S (1/A) is
``real_space @ S`` and the reciprocal-lattice vector of an integer h is ``inverse(real_space) @ h``
(dxtbx's A = U B).  A mosaic domain is a rotation U_m about the lab origin: its real-space
matrix is ``real_space @ U_m.T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.physics.tensors import TensorFields

__all__ = [
    "Crystal",
    "real_space_from_cell",
    "rotation_from_vector",
    "mosaic_domain_rotations",
    "domain_rotations_from_unit_vectors",
    "max_rotation_angle_rad",
]


def rotation_from_vector(rotvec: Tensor) -> Tensor:
    """Rotation matrices from rotation vectors (axis * angle in radians), Rodrigues' formula.

    Smooth (and exact to float precision) through zero angle, so gradients exist at rotvec = 0.

    Args:
        rotvec: (..., 3) rotation vectors (rad).
    Returns:
        (..., 3, 3) rotation matrices.
    """
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True).unsqueeze(-1)  # (..., 1, 1)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2_safe)
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def real_space_from_cell(cell: Tensor, orientation: Tensor | None = None) -> Tensor:
    """Real-space matrix (rows a, b, c in A) of a unit cell in the PDB/cctbx setting, rotated.

    The unrotated setting puts a along x and b in the xy plane (cctbx's orthogonalization).

    Args:
        cell: (6,) a, b, c (A), alpha, beta, gamma (degrees).
        orientation: optional (3, 3) rotation U applied to the cell vectors.
    Returns:
        (3, 3) matrix with rows a, b, c.
    """
    a, b, c = cell[0], cell[1], cell[2]
    al, be, ga = (cell[3:6] * (math.pi / 180.0)).unbind(-1)
    cos_al, cos_be, cos_ga = torch.cos(al), torch.cos(be), torch.cos(ga)
    sin_ga = torch.sin(ga)
    cx = c * cos_be
    cy = c * (cos_al - cos_be * cos_ga) / sin_ga
    cz = torch.sqrt(c * c - cx * cx - cy * cy)
    zero = torch.zeros_like(a)
    rows = torch.stack(
        [torch.stack([a, zero, zero]), torch.stack([b * cos_ga, b * sin_ga, zero]), torch.stack([cx, cy, cz])]
    )
    if orientation is not None:
        rows = rows @ orientation.transpose(-1, -2)
    return rows


def mosaic_domain_rotations(
    spread_deg: Tensor | float,
    n_domains: int,
    seed: int,
    real_space: Tensor | None = None,
    anisotropic_spread_deg: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Rotations of ``n_domains`` mosaic domains: each a rotation about a uniformly random axis
    by an angle drawn from N(0, spread), so the rms rotation angle is the spread itself.

    This is the seed's mosaic model (LS49 / ExaFEL scripts over simtbx: a random point on the
    sphere as the axis, a normal variate of sigma ``mosaic_spread_deg`` as the angle).  The
    rocking component about any one fixed axis then has rms spread / sqrt(3).  Axis u and
    angle factor g ~ N(0, 1) are drawn on the CPU from ``seed`` (so the draw is identical on
    every device); the rotation vector is spread * g * u, linear in the spread, so the result
    is differentiable in it.  Draws come in antithetic pairs (g u, -g u), which keeps the mean
    orientation.  An anisotropic spread scales the components of g u along the crystal's unit
    a, b, c axes by one spread each (equal spreads give the isotropic draw; with a
    non-orthogonal cell the axes are not orthogonal and the scaling is approximate); it needs
    ``real_space`` to find those axes.

    Args:
        spread_deg: rms rotation angle of the domains (degrees).
        n_domains: number of domains (1 gives the identity).
        seed: random seed.
        real_space: (3, 3) rows a, b, c; required with ``anisotropic_spread_deg``.
        anisotropic_spread_deg: optional (3,) spreads along the a, b, c axes (degrees) instead.
        dtype: dtype of the draw (the result follows the spread tensor's dtype if it has one).
    Returns:
        (n_domains, 3, 3) rotation matrices.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n_half = (n_domains + 1) // 2
    axis = torch.randn(n_half, 3, generator=gen, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)  # uniform on the unit sphere
    angle = torch.randn(n_half, 1, generator=gen, dtype=torch.float64)
    z = axis * angle
    z = torch.cat([z, -z], 0)[:n_domains] if n_domains > 1 else torch.zeros(1, 3, dtype=torch.float64)
    return domain_rotations_from_unit_vectors(z, spread_deg, real_space, anisotropic_spread_deg, dtype)


def domain_rotations_from_unit_vectors(
    z: Tensor,
    spread_deg: Tensor | float,
    real_space: Tensor | None = None,
    anisotropic_spread_deg: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """(n, 3, 3) domain rotations from rotation vectors ``z`` (n, 3) of unit rms angle: scaled by
    the spread (degrees), or with ``anisotropic_spread_deg`` (3,) by one spread along each of
    the crystal's unit a, b, c axes (rows of ``real_space``).  Differentiable in the spreads."""
    ref = anisotropic_spread_deg if anisotropic_spread_deg is not None else spread_deg
    if isinstance(ref, Tensor):
        z = z.to(device=ref.device, dtype=ref.dtype)
    else:
        z = z.to(dtype)
    deg = math.pi / 180.0
    if anisotropic_spread_deg is not None:
        if real_space is None:
            raise ValueError("an anisotropic mosaic spread needs the crystal's real_space axes")
        axes = (real_space / real_space.norm(dim=-1, keepdim=True)).to(z.dtype)  # rows: unit a, b, c
        rotvec = ((z @ axes.transpose(-1, -2)) * anisotropic_spread_deg * deg) @ axes
    else:
        rotvec = z * (spread_deg * deg)
    return rotation_from_vector(rotvec)


def max_rotation_angle_rad(rotations: Tensor) -> float:
    """Largest rotation angle (rad) among (M, 3, 3) rotation matrices."""
    trace = rotations.detach().diagonal(dim1=-2, dim2=-1).sum(-1)
    cos = ((trace - 1.0) / 2.0).clamp(-1.0, 1.0)
    return float(torch.acos(cos).max()) if rotations.shape[0] else 0.0


@dataclass(frozen=True)
class Crystal(TensorFields):
    """A mosaic crystal for the forward model.

    Attributes:
        real_space: (3, 3) rows a, b, c (A, lab frame).
        ncells_abc: (3,) number of unit cells along a, b, c of one mosaic domain.
        domain_rotations: (M, 3, 3) rotations of the mosaic domains.
        shape: lattice shape, one of ``square``, ``round``, ``gauss``, ``tophat``.
        spot_scale: dimensionless scale of the Bragg intensity (number of such crystals).
    """

    real_space: Tensor
    ncells_abc: Tensor
    domain_rotations: Tensor
    shape: str = "gauss"
    spot_scale: Tensor | float = 1.0

    @property
    def n_domains(self) -> int:
        return int(self.domain_rotations.shape[0])

    def domain_real_space(self) -> Tensor:
        """(M, 3, 3) real-space matrices of the mosaic domains."""
        return self.real_space @ self.domain_rotations.transpose(-1, -2)

