"""Ncells and spot scale from the crystal and the beam, against closed forms of the seed's recipe
(LS49 microcrystal: domains = (pi/4 d^2 L) / (pi/6 D^3), Ncells = round(cube root of the
domain's cells) on a cubic cell) and the precedence of explicit values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spread_dials.physics.microcrystal import brightness, cell_volume_A3

PSII = (117.585, 223.068, 309.977, 90.0, 90.0, 90.0)


def test_cubic_cell_follows_the_seed():
    """A cubic cell: Ncells is the seed's round(cube root(V_domain / V_cell)) on every axis and the
    domains in the beam its illuminated volume over the domain volume, up to that rounding."""
    a, domain_A, length_um, beam_um = 50.0, 4000.0, 4.0, 1.0
    b = brightness((a, a, a, 90.0, 90.0, 90.0), domain_A, length_um, beam_um)
    v_domain_um3 = math.pi / 6.0 * (domain_A / 1e4) ** 3
    n_seed = round((v_domain_um3 * 1e12 / a**3) ** (1.0 / 3.0))
    assert b.ncells_abc == (n_seed, n_seed, n_seed)
    seed_domains = (math.pi / 4.0 * beam_um**2 * length_um) / v_domain_um3
    assert b.spot_scale == pytest.approx(seed_domains * v_domain_um3 * 1e12 / (n_seed**3 * a**3), rel=1e-12)
    assert (b.ncells_source, b.spot_scale_source) == ("derived", "derived")


def test_unit_cells_in_the_beam_and_domain_extent():
    """Whatever sets Ncells, a derived spot scale keeps pi/4 d^2 L / V_cell cells in the beam; the
    derived domain has one real-space extent along a, b, c (N_i |a_i| equal to rounding) and about
    the volume of a sphere of the domain size."""
    cells = math.pi / 4.0 * 1.0**2 * 4.0 * 1e12 / (PSII[0] * PSII[1] * PSII[2])
    derived = brightness(PSII, 4000.0, 4.0, 1.0)
    explicit_n = brightness(PSII, 4000.0, 4.0, 1.0, ncells_abc=(16, 16, 16))
    for b in (derived, explicit_n):
        assert b.cells_in_beam == pytest.approx(cells, rel=1e-12)
        assert b.spot_scale * np.prod(b.ncells_abc) == pytest.approx(cells, rel=1e-12)
    extents = np.array(derived.ncells_abc) * np.array(PSII[:3])
    assert extents.max() / extents.min() < 1.2  # rounding of 10-27 cells
    volume = np.prod(derived.ncells_abc) * PSII[0] * PSII[1] * PSII[2]
    assert volume / (math.pi / 6.0 * 4000.0**3) == pytest.approx(1.0, abs=0.1)
    assert explicit_n.ncells_source == "explicit" and explicit_n.spot_scale_source == "derived"


def test_beam_diameter_cancels_and_explicit_scale_wins():
    """fluence * spot_scale * cells per domain, the Bragg brightness, does not depend on the beam
    diameter (fluence ~ 1/d^2, illuminated cells ~ d^2); an explicit spot scale is used as given
    (the seed's recipe: 16^3 cells, 93.75 domains)."""
    def bragg(d_um):
        b = brightness(PSII, 4000.0, 4.0, d_um)
        return 1e12 / (math.pi / 4.0 * d_um**2) * b.cells_in_beam

    assert bragg(3.385) == pytest.approx(bragg(1.0), rel=1e-12)
    seed = brightness(PSII, 4000.0, 4.0, 3.385, ncells_abc=(16, 16, 16), spot_scale=93.75)
    assert (seed.ncells_abc, seed.spot_scale, seed.cells_in_beam) == ((16.0, 16.0, 16.0), 93.75, 93.75 * 16**3)
    assert seed.spot_scale_source == "explicit"


def test_cell_volume_of_a_monoclinic_cell():
    """V = a c sin(beta) b for a monoclinic cell (the ferredoxin cell of PDB 1M2A)."""
    cell = (67.2, 59.8, 47.2, 90.0, 110.3, 90.0)
    assert cell_volume_A3(cell) == pytest.approx(67.2 * 59.8 * 47.2 * math.sin(math.radians(110.3)), rel=1e-12)
