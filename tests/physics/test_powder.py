"""Absolute scale without nanoBragg: averaged over all crystal orientations, the photons one
reflection puts on the detector equal its powder (Debye-Scherrer) integrated intensity,

    fluence * r_e^2 * P * |F|^2 * lambda^3 * N / (4 * V_cell * sin(theta))   (multiplicity one),

times the lattice shape's normalisation: the integral of F_latt^2 over one reciprocal cell is
Na Nb Nc exactly for the square shape and Na Nb Nc (0.63 pi / 2)^(3/2) = 0.98444 Na Nb Nc for
the gauss shape (exp(-2 N^2 dh^2 / 0.63) per axis).  P is the ring-averaged polarization
(1 + cos^2 2theta) / 2, the same for any polarization fraction.

The orientation average is a quadrature, not a random draw: the direction of the reciprocal
vector H is uniform on the sphere, so the average is 1/2 of the integral over u = cos(angle of H
to the beam) (midpoint rule on a grid that spans the reflecting range), times the mean over four
azimuths 0, 45, 90, 135 deg of H about the beam (which averages cos(2 azimuth) in the Kahn factor
to 0 exactly).  Each (u, azimuth) is one mosaic domain of one dense-kernel still, whose photons
are the mean over its domains.  With a cubic cell and equal N the gauss spot is a sphere, so
turning the crystal about H changes nothing.

Tolerances: the quadrature (midpoint rule in u over the reflecting range, pixels on the
detector) is exact to far below them, so what is left is the powder formula's point-like
reciprocal-lattice point (Lorentz, polarization and solid angle vary across the spot, a
second-order effect) and the sampling of the spot by the grids.  gauss (rms spot width 1 pixel, 5
steps of u): 0.1 % stated, 0.001 % measured.  square (tails fill the whole reciprocal cell, |dh|
up to 1/2, a quarter of |H|; fringes 1/N apart sampled by 5 pixels and 25 steps of u): 0.5 %
stated, 0.12 % measured (with 2.5 pixels to a fringe it was 1.4 %).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spread_dials.physics import Crystal, PanelArray, Scene, StructureFactors, make_sources, simulate_dense
from spread_dials.physics.constants import HC_EV_A, R_E_SQ_M2

D = torch.float64
CELL_A = 20.0  # cubic P1 cell
H = (2, 0, 0)  # the one reflection with F != 0 (d = 10 A)
F = 7.0
WAVELENGTH_A = 1.0
FLUENCE = 1e24  # photons / m^2
DISTANCE_MM = 50.0
PANEL_MM = 14.0  # one square panel centred on the beam: the whole ring (radius 5.0 mm) and its width


def _ring_panel(pixel_mm: float) -> PanelArray:
    n_pixels = int(round(PANEL_MM / pixel_mm))
    half = 0.5 * n_pixels * pixel_mm
    return PanelArray(
        origin_mm=torch.tensor([[-half, -half, -DISTANCE_MM]], dtype=D),
        fast_axis=torch.tensor([[1.0, 0.0, 0.0]], dtype=D),
        slow_axis=torch.tensor([[0.0, 1.0, 0.0]], dtype=D),
        pixel_size_mm=torch.full((1, 2), pixel_mm, dtype=D),
        image_size=(n_pixels, n_pixels),
        thickness_mm=torch.zeros(1, dtype=D),  # no sensor model: every photon on the panel counts
        attenuation_length_mm=torch.ones(1, dtype=D),
    )


def _domains(u: np.ndarray, azimuths_deg: np.ndarray) -> torch.Tensor:
    """Rotations U with U x = (sqrt(1 - u^2) cos az, sqrt(1 - u^2) sin az, -u): a* (along x in the
    unrotated cubic cell) at cos(angle to the beam (0, 0, -1)) = u and azimuth az."""
    beta = np.arcsin(u)[:, None]  # tilt about y: x -> (cos beta, 0, -sin beta)
    az = np.radians(azimuths_deg)[None, :]
    cb, sb, ca, sa = np.cos(beta), np.sin(beta), np.cos(az), np.sin(az)
    zero, one = np.zeros_like(cb * ca), np.ones_like(cb * ca)
    r_y = np.stack([np.stack([cb + 0 * az, zero, sb + 0 * az], -1), np.stack([zero, one, zero], -1),
                    np.stack([-sb + 0 * az, zero, cb + 0 * az], -1)], -2)  # fmt: skip
    r_z = np.stack([np.stack([ca + 0 * beta, -sa + 0 * beta, zero], -1), np.stack([sa + 0 * beta, ca + 0 * beta, zero], -1),
                    np.stack([zero, zero, one], -1)], -2)  # fmt: skip
    return torch.tensor((r_z @ r_y).reshape(-1, 3, 3), dtype=D)


@pytest.mark.parametrize("shape,normalisation,tolerance,pixel_mm,n_u", [
    ("gauss", (0.63 * math.pi / 2) ** 1.5, 0.001, 0.2, 75),  # rms spot width: 1 pixel, 5 steps of u
    ("square", 1.0, 0.005, 0.1, 150),  # fringes 1/N apart: 5 pixels and 25 steps of u to a fringe
])  # fmt: skip
def test_orientation_average_is_the_powder_intensity(shape, normalisation, tolerance, pixel_mm, n_u):
    ncells = 5.0
    sin_theta = WAVELENGTH_A * math.sqrt(sum(h * h for h in H)) / (2.0 * CELL_A)
    # the reflecting range: u = -sin(theta) +- 0.3 (7 rms widths of the gauss spot, and the
    # whole reciprocal cell of H for the square shape)
    half_width = 0.3
    du = 2.0 * half_width / n_u
    u = -sin_theta - half_width + (np.arange(n_u) + 0.5) * du
    crystal = Crystal(
        real_space=torch.eye(3, dtype=D) * CELL_A,
        ncells_abc=torch.full((3,), ncells, dtype=D),
        domain_rotations=_domains(u, np.array([0.0, 45.0, 90.0, 135.0])),
        shape=shape,
    )
    sources = make_sources(torch.tensor([HC_EV_A / WAVELENGTH_A], dtype=D), torch.ones(1, dtype=D), FLUENCE)
    sf = StructureFactors(miller_index=torch.tensor([H]), F0=torch.tensor([F], dtype=torch.complex128))
    photons_per_still = float(simulate_dense(Scene(_ring_panel(pixel_mm), sources, crystal, sf)).sum())
    orientation_average = photons_per_still * n_u * du / 2.0

    cos_2theta = 1.0 - 2.0 * sin_theta**2
    polarization = (1.0 + cos_2theta**2) / 2.0
    cells = ncells**3
    powder = (FLUENCE * R_E_SQ_M2 * polarization * F**2 * (WAVELENGTH_A * 1e-10) ** 3 * cells
              / (4.0 * (CELL_A * 1e-10) ** 3 * sin_theta))  # fmt: skip
    assert orientation_average / (powder * normalisation) == pytest.approx(1.0, abs=tolerance)
