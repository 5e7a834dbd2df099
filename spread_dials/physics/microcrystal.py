"""How bright a still is: the crystal's unit cells in the beam, grouped into mosaic domains.

The Bragg photons of a still are r_e^2 * fluence * spot_scale * (the terms of one domain of
Na x Nb x Nc cells), so with fluence = photons / beam area they are proportional to
fluence * spot_scale * Na Nb Nc = photons / area * (cells in the beam).  One beam model sets
both: a round top-hat beam of diameter d through a crystal at least as wide as the beam, over
a path of length L along it, illuminates the volume pi/4 d^2 L and carries the fluence
photons / (pi/4 d^2).  So with the derived spot scale the Bragg photons are
photons * L / V_cell * (per-cell terms): the beam diameter cancels.

Domains are spheres of diameter D (the effective domain size).  A domain holds
V_domain / V_cell = pi/6 D^3 / V_cell unit cells, shared among the axes so that the domain has
the same real-space extent along a, b and c: N_i = s / |a_i| with s^3 = V_domain |a||b||c| /
V_cell, rounded to whole cells (at least 1).  The spot scale is the number of such domains in the
illuminated volume, (pi/4 d^2 L) / (Na Nb Nc V_cell), so that the cells in the beam are exact
whatever the rounding.

The seed's recipe (LS49 ``microcrystal`` in ExaFEL's LY99_batch.py) differs in two ways:
Ncells = round(cube root of V_domain / V_cell) on every axis (the same only for a cubic cell),
and spot scale = pi/4 d^2 L / V_domain with d = 1 um, while its fluence is photons through a
3 um square beam (9 um^2 instead of pi/4 um^2): its Bragg photons are those of our model with
the same crystal times (pi/4) / 9 = 0.0873.  docs/brightness.md compares the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Brightness", "brightness", "cell_volume_A3", "domain_ncells", "illuminated_volume_um3"]

_A3_PER_UM3 = 1e12


def cell_volume_A3(cell: Sequence[float]) -> float:
    """Volume (A^3) of the unit cell (a, b, c in A; alpha, beta, gamma in degrees)."""
    a, b, c = cell[:3]
    ca, cb, cg = (math.cos(math.radians(x)) for x in cell[3:6])
    return a * b * c * math.sqrt(1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg)


def illuminated_volume_um3(beam_diameter_um: float, length_um: float) -> float:
    """pi/4 d^2 L (um^3): a round beam of diameter d through a crystal path of length L."""
    return math.pi / 4.0 * beam_diameter_um**2 * length_um


def domain_ncells(domain_size_A: float, cell: Sequence[float]) -> tuple[float, float, float]:
    """Whole unit cells (Na, Nb, Nc) of a domain of the volume of a sphere of diameter
    ``domain_size_A`` (A) with one real-space extent along a, b and c (see the module text)."""
    v_domain = math.pi / 6.0 * domain_size_A**3
    lengths = cell[:3]
    extent = (v_domain * lengths[0] * lengths[1] * lengths[2] / cell_volume_A3(cell)) ** (1.0 / 3.0)
    return tuple(float(max(1, round(extent / length))) for length in lengths)


@dataclass(frozen=True)
class Brightness:
    """What sets a still's Bragg photons.

    Attributes:
        ncells_abc: (Na, Nb, Nc) unit cells of one mosaic domain.
        spot_scale: domains in the beam (the kernel's intensity factor).
        cells_in_beam: spot_scale * Na Nb Nc, the unit cells that diffract.
        ncells_source, spot_scale_source: ``derived`` (from the crystal and the beam) or
            ``explicit`` (given by the user).
    """

    ncells_abc: tuple[float, float, float]
    spot_scale: float
    cells_in_beam: float
    ncells_source: str
    spot_scale_source: str


def brightness(
    cell: Sequence[float],
    domain_size_A: float,
    length_um: float,
    beam_diameter_um: float,
    ncells_abc: Sequence[float] | None = None,
    spot_scale: float | None = None,
) -> Brightness:
    """Ncells and spot scale of a crystal in the beam; explicit values win over derived ones.

    Rule: ``ncells_abc``, when given, replaces the cells of a domain derived from
    ``domain_size_A``; ``spot_scale``, when given, replaces the domains in the beam.  A derived
    spot scale always counts the domains of the Ncells in use, so the cells in the beam stay
    pi/4 d^2 L / V_cell whatever sets Ncells; only an explicit spot scale changes them.

    Args:
        cell: (6,) unit cell: a, b, c (A), alpha, beta, gamma (degrees).
        domain_size_A: effective mosaic domain diameter (A).
        length_um: crystal path length along the beam (um).
        beam_diameter_um: diameter of the round top-hat beam (um).
        ncells_abc: optional (3,) explicit unit cells per domain.
        spot_scale: optional explicit number of domains in the beam.
    Returns:
        The Brightness.
    """
    if ncells_abc is None:
        ncells, ncells_source = domain_ncells(domain_size_A, cell), "derived"
    else:
        ncells, ncells_source = tuple(float(n) for n in ncells_abc), "explicit"
    cells_per_domain = ncells[0] * ncells[1] * ncells[2]
    if spot_scale is None:
        cells = illuminated_volume_um3(beam_diameter_um, length_um) * _A3_PER_UM3 / cell_volume_A3(cell)
        scale, scale_source = cells / cells_per_domain, "derived"
    else:
        scale, scale_source = float(spot_scale), "explicit"
    return Brightness(ncells, scale, scale * cells_per_domain, ncells_source, scale_source)
