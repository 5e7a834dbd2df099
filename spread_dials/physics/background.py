"""Amorphous (water, air) background: diffuse scattering from an F_bg(sin(theta)/lambda) table.

Per pixel: r_e^2 * photons * (molecules per m^2 of beam cross-section) * F_bg(stol)^2 * polar *
omega * capture, with molecules per m^2 = thickness * density * N_A / molecular weight.  The
beam area cancels (nanoBragg's amorphous_molecules / beam area), so only the pulse's photons,
the sample thickness, density and molecular weight enter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.physics.beam import Sources
from spread_dials.physics.bragg import sensor_points, subpixel_offsets
from spread_dials.physics.constants import AVOGADRO, R_E_SQ_M2
from spread_dials.physics.fusion import fused
from spread_dials.physics.geometry import PanelArray, kahn_polarization

__all__ = ["AIR_F_BG", "WATER_F_BG", "AmorphousMaterial", "background_photons", "interpolate_f_bg"]

#: Water's diffuse scattering F_bg (electrons per molecule) vs sin(theta)/lambda (1/A): the
#: table the simtbx/nanoBragg community uses for water rings (after Hura et al. 2000).
WATER_F_BG: tuple[tuple[float, float], ...] = (
    (0.0, 2.57), (0.0365, 2.58), (0.07, 2.8), (0.12, 5.0), (0.162, 8.0), (0.18, 7.32), (0.2, 6.75),
    (0.216, 6.75), (0.236, 6.5), (0.28, 4.5), (0.3, 4.3), (0.345, 4.36), (0.436, 3.77), (0.5, 3.17),
)  # fmt: skip
#: Air's F_bg (electrons per molecule, mean N2/O2) vs sin(theta)/lambda (1/A).
AIR_F_BG: tuple[tuple[float, float], ...] = (
    (0.0, 14.1), (0.045, 13.5), (0.174, 8.35), (0.35, 4.78), (0.5, 4.22),
)  # fmt: skip


def interpolate_f_bg(stol: Tensor, table: Tensor) -> Tensor:
    """F_bg at sin(theta)/lambda ``stol`` by linear interpolation in a (n, 2) table, clamped at its ends."""
    x, y = table[:, 0], table[:, 1]
    s = torch.minimum(torch.maximum(stol, x[0]), x[-1])
    i = torch.searchsorted(x.contiguous(), s.contiguous(), right=True).clamp(1, x.numel() - 1)
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    return y0 + (y1 - y0) * (s - x0) / (x1 - x0)


@dataclass(frozen=True)
class AmorphousMaterial:
    """A diffusely scattering layer in the beam (water jet, air path).

    Attributes:
        f_bg_table: (n, 2) sin(theta)/lambda (1/A) and F_bg (electrons per molecule).
        thickness_mm: path length in the beam (mm).
        density_g_cm3: density (g/cm^3).
        molecular_weight_Da: molecular weight (g/mol).
    """

    f_bg_table: Tensor
    thickness_mm: float
    density_g_cm3: float
    molecular_weight_Da: float

    @property
    def molecules_per_m2(self) -> float:
        """Molecules per m^2 of beam cross-section: thickness * density * N_A / MW."""
        return self.thickness_mm * 1e-3 * self.density_g_cm3 * 1e6 * AVOGADRO / self.molecular_weight_Da


def background_photons(
    panels: PanelArray,
    sources: Sources,
    materials: Sequence[AmorphousMaterial],
    photons_per_pulse: float | Tensor,
    oversample: int = 1,
    max_pixels_per_chunk: int | None = None,
    compiled: bool = False,
) -> Tensor:
    """Expected background photons per pixel, (P, n_slow, n_fast), from every material together.

    Args:
        panels: detector.
        sources: beam (``Sources.collapsed()`` is usually enough: the ring is smooth in energy).
        materials: the amorphous layers in the beam.
        photons_per_pulse: photons in the pulse.
        oversample: sub-pixels per pixel edge.
        max_pixels_per_chunk: pixels evaluated at once (default 2^25 on a GPU, 2^21 on the CPU).
        compiled: fuse the per-pixel arithmetic with torch.compile (worth it on a GPU).
    """
    dtype, device = panels.origin_mm.dtype, panels.origin_mm.device
    if max_pixels_per_chunk is None:
        max_pixels_per_chunk = 1 << (25 if device.type == "cuda" else 21)
    tables = [m.f_bg_table.to(device=device, dtype=dtype) for m in materials]
    offsets = subpixel_offsets(oversample, dtype, device)
    n_f, n_s = panels.n_fast, panels.n_slow
    jj, ii = torch.meshgrid(torch.arange(n_s, device=device), torch.arange(n_f, device=device), indexing="ij")
    fast = ii.reshape(-1, 1).to(dtype) + offsets[:, 0]  # (K, o2)
    slow = jj.reshape(-1, 1).to(dtype) + offsets[:, 1]
    panel_chunk = max(1, max_pixels_per_chunk // (n_f * n_s * oversample**2 * panels.n_layers))
    weights = [m.molecules_per_m2 for m in materials]
    evaluate = fused(_panel_background) if compiled else _panel_background
    out = []
    for start in range(0, panels.n_panels, panel_chunk):
        panel = torch.arange(start, min(start + panel_chunk, panels.n_panels), device=device).view(-1, 1, 1)
        shape = (panel.shape[0],) + fast.shape
        total = evaluate(panels, sources, tables, weights, panel.expand(shape), fast.expand(shape), slow.expand(shape))
        out.append(total.reshape(-1, n_s, n_f))
    return torch.cat(out, 0) * (R_E_SQ_M2 * photons_per_pulse / oversample**2)


def _panel_background(panels, sources, tables, weights, panel, fast, slow) -> Tensor:
    """Sum over sources, sub-pixels and layers of weight * F_bg^2 * polar * omega * capture."""
    pts = sensor_points(panels, panel, fast, slow)  # (p, K, o2, T)
    total = 0.0
    for c in range(sources.n_sources):
        direction = sources.direction[c]
        stol = 0.5 * sources.wavenumber[c] * (pts.diffracted - direction).norm(dim=-1)
        f_bg_sq = sum(w * interpolate_f_bg(stol, t) ** 2 for w, t in zip(weights, tables))
        polar = kahn_polarization(direction, pts.diffracted, sources.e_vector, sources.polarization_fraction)
        total = total + sources.weight[c] * (f_bg_sq * polar * pts.omega_capture).sum(dim=(-1, -2))
    return total
