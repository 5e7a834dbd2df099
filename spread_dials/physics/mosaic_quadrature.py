"""Mosaic domains as an equal-weight quadrature of the mosaic distribution (pure torch).

The mosaic model (:func:`spread_dials.physics.crystal.mosaic_domain_rotations`) turns each domain
about a uniformly random axis by an angle ~ N(0, spread).  A real crystal holds millions of
domains, so its spots are the average over that distribution; a few random domains per still
sample it with an error that changes every still.  This module gives a deterministic set
instead: angles on K radial shells (the half-normal split into K equal-probability bins, each
shell at the root-mean-square angle of its bin, so the mean squared angle is exact), and on
each shell axes in antipodal pairs from a spherical Fibonacci lattice (so the mean rotation is
exactly zero), each shell twisted by the golden angle against the last.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spread_dials.physics.crystal import domain_rotations_from_unit_vectors, mosaic_domain_rotations

__all__ = ["DOMAIN_SETS", "mosaic_quadrature_vectors", "mosaic_domain_quadrature", "domain_rotations"]

#: the ways of choosing a crystal's mosaic domains (PHIL crystal.domain_set)
DOMAIN_SETS = ("random", "quadrature")

_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def _shell_angles(n_shells: int) -> Tensor:
    """(K,) rms angle of each of K equal-probability bins of the unit half-normal."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    # half-normal bin edges: P(|a| < edge) = k / K  <=>  Phi(edge) = 0.5 + 0.5 k / K
    q = 0.5 + 0.5 * torch.arange(n_shells + 1, dtype=torch.float64) / n_shells
    edges = normal.icdf(q.clamp(max=1.0))
    pdf = torch.exp(normal.log_prob(edges))
    edge_pdf = torch.where(torch.isinf(edges), torch.zeros_like(edges), edges * pdf)
    # E[a^2 | l < a < u] for the unit normal = 1 + (l phi(l) - u phi(u)) / (Phi(u) - Phi(l))
    mass = 0.5 / n_shells
    second = 1.0 + (edge_pdf[:-1] - edge_pdf[1:]) / mass
    return second.sqrt()


def _antipodal_axes(n: int, twist: float) -> Tensor:
    """(n, 3) axes: n // 2 spherical-Fibonacci unit vectors and their negatives, plus a zero
    vector when n is odd (a domain that is not turned)."""
    half = n // 2
    i = torch.arange(half, dtype=torch.float64)
    z = 1.0 - (2.0 * i + 1.0) / max(half, 1)
    r = (1.0 - z * z).clamp(min=0).sqrt()
    phi = i * _GOLDEN_ANGLE + twist
    axes = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    axes = torch.cat([axes, -axes], 0)
    if n % 2:
        axes = torch.cat([axes, torch.zeros(1, 3, dtype=torch.float64)], 0)
    return axes


def mosaic_quadrature_vectors(n_domains: int) -> Tensor:
    """(n_domains, 3) rotation vectors for a unit rms mosaic angle (multiply by the spread in rad).

    The number of shells is round(n_domains^(1/3) / 2) (at least 1); shells share the domains
    as evenly as possible.  One domain gives the zero rotation.
    """
    if n_domains < 1:
        raise ValueError("n_domains must be >= 1")
    if n_domains == 1:
        return torch.zeros(1, 3, dtype=torch.float64)
    n_shells = max(1, min(n_domains // 2, round(n_domains ** (1.0 / 3.0) / 2.0)))
    angles = _shell_angles(n_shells)
    vectors = []
    for k in range(n_shells):
        m = n_domains // n_shells + (1 if k < n_domains % n_shells else 0)
        vectors.append(_antipodal_axes(m, k * _GOLDEN_ANGLE) * angles[k])
    return torch.cat(vectors, 0)


def mosaic_domain_quadrature(
    spread_deg: Tensor | float,
    n_domains: int,
    real_space: Tensor | None = None,
    anisotropic_spread_deg: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """(n_domains, 3, 3) rotations of the quadrature set for an rms mosaic angle ``spread_deg``
    (degrees; a tensor keeps the result differentiable in it), or anisotropic spreads along the
    crystal axes as :func:`~spread_dials.physics.crystal.mosaic_domain_rotations`."""
    return domain_rotations_from_unit_vectors(mosaic_quadrature_vectors(n_domains), spread_deg, real_space,
                                              anisotropic_spread_deg, dtype)  # fmt: skip


def domain_rotations(
    domain_set: str,
    spread_deg: Tensor | float,
    n_domains: int,
    seed: int,
    real_space: Tensor | None = None,
    anisotropic_spread_deg: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """(n_domains, 3, 3) rotations of a crystal's mosaic domains: ``quadrature`` (this module's
    deterministic set; ``seed`` unused) or ``random`` (a draw from ``seed``,
    :func:`~spread_dials.physics.crystal.mosaic_domain_rotations`).

    Raises:
        ValueError: another ``domain_set``.
    """
    if domain_set == "quadrature":
        return mosaic_domain_quadrature(spread_deg, n_domains, real_space, anisotropic_spread_deg, dtype)
    if domain_set == "random":
        return mosaic_domain_rotations(spread_deg, n_domains, seed, real_space, anisotropic_spread_deg, dtype)
    raise ValueError(f"domain_set must be one of {', '.join(DOMAIN_SETS)}, not {domain_set!r}")
