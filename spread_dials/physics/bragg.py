"""The per-term physics shared by the dense and the sparse kernels.

A term is one (sub-pixel point, sensor layer, source, mosaic domain) combination; a pixel is
r_e^2 * fluence * spot_scale * sum(|F(h0, channel)|^2 * F_latt^2 * weight * polar * omega *
capture) / (oversample^2 * n_domains), summed over its terms (nanoBragg's formula).
Unlike nanoBragg, the 000 'reflection' (the direct beam) is never simulated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.physics.beam import Sources
from spread_dials.physics.constants import R_E_SQ_M2
from spread_dials.physics.crystal import Crystal
from spread_dials.physics.geometry import (
    PanelArray,
    capture_fraction,
    dot3,
    kahn_polarization,
    layer_mean_depth_mm,
    pixel_surface_position_mm,
    solid_angle,
)
from spread_dials.physics.lattice import lattice_factor_and_gradient, lattice_factor_components
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.physics.tensors import TensorFields

__all__ = [
    "Scene",
    "SensorPoints",
    "bragg_term",
    "photon_scale",
    "sensor_points",
    "subpixel_offsets",
    "window_term_and_gradient",
]


@dataclass(frozen=True)
class Scene(TensorFields):
    """Everything the forward model needs for one still.

    Attributes:
        panels: detector panels.
        sources: beam sources (channels x divergence).
        crystal: orientation, cell, domains, lattice shape.
        structure_factors: F(h, channel).
        oversample: sub-pixels per pixel edge (oversample^2 points per pixel).
    """

    panels: PanelArray
    sources: Sources
    crystal: Crystal
    structure_factors: StructureFactors
    oversample: int = 1


@dataclass(frozen=True)
class SensorPoints:
    """Geometry of sensor points: shape S = (..., n_layers).

    Attributes:
        diffracted: S + (3,) unit directions from the sample.
        omega_capture: S solid angle (sr) times the layer's capture fraction.
    """

    diffracted: Tensor
    omega_capture: Tensor


def subpixel_offsets(oversample: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(oversample^2, 2) offsets (fast, slow) of sub-pixel centres inside a pixel, in pixels."""
    t = (torch.arange(oversample, dtype=dtype, device=device) + 0.5) / oversample
    f, s = torch.meshgrid(t, t, indexing="xy")
    return torch.stack([f.reshape(-1), s.reshape(-1)], -1)


def sensor_points(panels: PanelArray, panel: Tensor, fast_px: Tensor, slow_px: Tensor) -> SensorPoints:
    """Diffracted directions and omega * capture of points at every sensor layer.

    Args:
        panels: the detector.
        panel: long panel indices, shape S0.
        fast_px, slow_px: fractional pixel coordinates, shape S0.
    Returns:
        SensorPoints of shape S0 + (n_layers,).
    """
    surface = pixel_surface_position_mm(panels, panel, fast_px, slow_px)
    depth_axis = panels.depth_axis[panel]
    thickness = panels.thickness_mm[panel]
    att_len = panels.attenuation_length_mm[panel]
    cos_surface = (surface * depth_axis).sum(-1) / surface.norm(dim=-1)
    z_front, z_mean = layer_mean_depth_mm(cos_surface, thickness, att_len, panels.n_layers)
    position = surface.unsqueeze(-2) + z_mean.unsqueeze(-1) * depth_axis.unsqueeze(-2)
    diffracted = position / position.norm(dim=-1, keepdim=True)
    depth_axis_l = depth_axis.unsqueeze(-2)
    cos_obl = (diffracted * depth_axis_l).sum(-1)
    capture = capture_fraction(
        cos_obl, z_front, thickness.unsqueeze(-1), att_len.unsqueeze(-1), panels.n_layers
    )
    area = panels.pixel_size_mm[panel].prod(-1).unsqueeze(-1)
    omega = solid_angle(position, depth_axis_l, area)
    return SensorPoints(diffracted=diffracted, omega_capture=omega * capture)


def _fractional_components(diffracted: Tensor, direction: Tensor, wavenumber: Tensor, real_space: Tensor) -> list[Tensor]:
    """[h, k, l] fractional components: h_i = k (a_i . d - a_i . s_in)."""
    return [
        wavenumber * (dot3(real_space[..., i, :], diffracted) - dot3(real_space[..., i, :], direction))
        for i in range(3)
    ]


def bragg_term(
    points: SensorPoints,
    sources: Sources,
    source: Tensor | slice,
    real_space: Tensor,
    crystal: Crystal,
    structure_factors: StructureFactors,
    miller_index: Tensor | None = None,
) -> Tensor:
    """|F|^2 F_latt^2 * weight * polar * omega * capture for broadcast (point, source, domain) terms.

    Written component by component (no stacked (..., 3) temporaries of term size) so that
    torch.compile fuses the whole term and its sums into one kernel.

    Args:
        points: sensor points; ``points.diffracted`` (..., 3) broadcasts against the source and
            domain tensors as arranged by the caller.
        sources: the beam; ``source`` selects (with the broadcast shape) which sources.
        real_space: (..., 3, 3) domain real-space matrices, broadcast like the terms.
        crystal: for Ncells and the lattice shape.
        structure_factors: F(h, channel).
        miller_index: if given, (..., 3) the reflection a term belongs to: terms whose
            nearest integer index differs are zero, and |F|^2 is left to the caller (the
            sparse kernel's windows, which know their reflection).
    Returns:
        The terms, broadcast shape.
    """
    direction = sources.direction_of(source)
    h = _fractional_components(points.diffracted, direction, sources.wavenumber[source], real_space)
    if miller_index is not None:
        dh, keep = _window_offsets(h, miller_index)
        f_latt = lattice_factor_components(dh, crystal.ncells_abc, crystal.shape)
        return torch.where(keep, f_latt * f_latt, torch.zeros_like(f_latt)) * _term_weight(points, sources, source, direction)
    h0 = [torch.round(x) for x in h]
    dh = [x - x0 for x, x0 in zip(h, h0)]
    f_latt = lattice_factor_components(dh, crystal.ncells_abc, crystal.shape)
    # h = 000 is the unscattered beam, not a Bragg reflection: both kernels leave it out, whatever
    # the structure-factor table holds
    origin = (h0[0] == 0) & (h0[1] == 0) & (h0[2] == 0)
    f_latt = torch.where(origin, torch.zeros_like(f_latt), f_latt)
    row = structure_factors.index_of(torch.stack(h0, -1).long())
    f_sq = structure_factors.intensity(row, sources.channel[source])
    return f_sq * f_latt * f_latt * _term_weight(points, sources, source, direction)


def window_term_and_gradient(
    points: SensorPoints,
    sources: Sources,
    source: Tensor | slice,
    real_space: Tensor,
    crystal: Crystal,
    miller_index: Tensor,
    domain_rotation: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`bragg_term` of a window's reflection (|F|^2 left to the caller) and its derivatives
    in the crystal's real-space matrix, in closed form (one pass, no autograd).

    The domain's real space is A R^T (A the crystal's rows a, b, c; R the domain's rotation);
    h_i = k (A R^T)_i . u with u = d - s_in, and the term is F_latt(h - h0)^2 w (w: weight,
    polarization, omega, capture; independent of the crystal), so
    d term / d A_ij = 2 F_latt w (dF_latt / d dh_i) k (R^T u)_j
    (:func:`~spread_dials.physics.lattice.lattice_factor_and_gradient`).  A parameter x that
    moves the crystal then moves the term by sum_ij (d term / d A_ij) (d A_ij / d x): the same
    d A / d x for every domain, so callers sum over domains first.

    Args:
        points, sources, source, real_space, crystal, miller_index: as :func:`bragg_term`
            (``real_space`` the domain's, A R^T).
        domain_rotation: (..., 3, 3) the domain's rotation R, broadcast like ``real_space``.
    Returns:
        (terms (broadcast shape), their derivatives in A (broadcast shape + (3, 3)), per A).
    """
    direction = sources.direction_of(source)
    wavenumber = sources.wavenumber[source]
    h = _fractional_components(points.diffracted, direction, wavenumber, real_space)
    dh, keep = _window_offsets(h, miller_index)
    f_latt, gradient = lattice_factor_and_gradient(dh, crystal.ncells_abc, crystal.shape)
    weight = _term_weight(points, sources, source, direction).expand_as(f_latt).masked_fill(~keep, 0.0)
    common = 2.0 * f_latt * weight * wavenumber
    # R^T u = R^T d - R^T s_in, each half made at its own (smaller) broadcast shape
    turned = [sum(domain_rotation[..., i, j] * points.diffracted[..., i] for i in range(3))
              - sum(domain_rotation[..., i, j] * direction[..., i] for i in range(3)) for j in range(3)]  # fmt: skip
    outer = (common.unsqueeze(-1) * torch.stack(gradient, -1)).unsqueeze(-1) * torch.stack(turned, -1).unsqueeze(-2)
    return f_latt * f_latt * weight, outer


def _window_offsets(h: list[Tensor], miller_index: Tensor) -> tuple[list[Tensor], Tensor]:
    """Offsets dh = h - h0 from a window's reflection h0 = ``miller_index`` (..., 3), and where
    the term is that reflection's: its nearest index, -1/2 <= dh < 1/2 (a compare instead of
    rounding; exact half-integers, which torch.round sends to the even index, go up here), and
    h0 is not 000 (the unscattered beam, never simulated)."""
    h0 = [miller_index[..., i].to(h[0].dtype) for i in range(3)]
    dh = [x - x0 for x, x0 in zip(h, h0)]
    own = (dh[0] >= -0.5) & (dh[0] < 0.5) & (dh[1] >= -0.5) & (dh[1] < 0.5) & (dh[2] >= -0.5) & (dh[2] < 0.5)
    origin = (h0[0] == 0) & (h0[1] == 0) & (h0[2] == 0)
    return dh, own & ~origin


def _term_weight(points: SensorPoints, sources: Sources, source: Tensor | slice, direction: Tensor) -> Tensor:
    """The crystal-independent factors of a term: source weight * polarization * omega * capture."""
    polar = kahn_polarization(direction, points.diffracted, sources.e_vector, sources.polarization_fraction)
    return sources.weight[source] * polar * points.omega_capture


def photon_scale(scene: Scene) -> Tensor | float:
    """r_e^2 * fluence * spot_scale / (oversample^2 * n_domains): photons per unit term sum."""
    steps = scene.oversample**2 * scene.crystal.n_domains
    return R_E_SQ_M2 * scene.sources.fluence_photons_per_m2 * scene.crystal.spot_scale / steps
