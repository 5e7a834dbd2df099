"""Small scenes for the physics tests (pure torch: these tests also run on the GPU machine)."""

from __future__ import annotations

import math

import torch

from spread_dials.physics import (
    Crystal,
    PanelArray,
    Scene,
    StructureFactors,
    constant_structure_factors,
    gaussian_spectrum,
    make_sources,
    mosaic_domain_rotations,
    real_space_from_cell,
    rotation_from_vector,
)


def grid_panels(
    n_fast=48, n_slow=40, pixel_mm=0.1, distance_mm=50.0, grid=(2, 2), gap_mm=0.6, tilt_deg=4.0,
    thickness_mm=0.32, attenuation_length_mm=1 / 26.5, n_layers=1, dtype=torch.float64,
) -> PanelArray:  # fmt: skip
    """A grid of panels facing the beam; the last one is tilted ``tilt_deg`` about its slow axis."""
    origins, fasts, slows = [], [], []
    w, h = n_fast * pixel_mm, n_slow * pixel_mm
    for iy in range(grid[1]):
        for ix in range(grid[0]):
            x0 = (ix - grid[0] / 2) * (w + gap_mm) + gap_mm / 2
            y0 = (iy - grid[1] / 2) * (h + gap_mm) + gap_mm / 2
            origins.append([x0, y0, -distance_mm])
            fasts.append([1.0, 0.0, 0.0])
            slows.append([0.0, 1.0, 0.0])
    t = math.radians(tilt_deg)
    fasts[-1] = [math.cos(t), 0.0, math.sin(t)]
    return PanelArray(
        origin_mm=torch.tensor(origins, dtype=dtype),
        fast_axis=torch.tensor(fasts, dtype=dtype),
        slow_axis=torch.tensor(slows, dtype=dtype),
        pixel_size_mm=torch.full((len(origins), 2), pixel_mm, dtype=dtype),
        image_size=(n_fast, n_slow),
        thickness_mm=torch.full((len(origins),), thickness_mm, dtype=dtype),
        attenuation_length_mm=torch.full((len(origins),), attenuation_length_mm, dtype=dtype),
        n_layers=n_layers,
    )


def small_scene(
    shape="gauss", n_channels=5, n_domains=4, oversample=2, n_layers=1, divergence_mrad=0.0, divergence_steps=1,
    ncells=(7.0, 8.0, 6.0), cell=(31.0, 36.0, 41.0, 90.0, 90.0, 90.0), energy_eV=9000.0, thickness_mm=0.32,
    per_channel_F=False, dtype=torch.float64, **panel_kwargs,
) -> Scene:  # fmt: skip
    """A still with several channels, domains and panels that lights a few dozen spots."""
    panels = grid_panels(n_layers=n_layers, thickness_mm=thickness_mm, dtype=dtype, **panel_kwargs)
    energy, weight = gaussian_spectrum(energy_eV, 8.0, n_channels, 2.0)
    sources = make_sources(
        energy.to(dtype), weight.to(dtype), 1e24, divergence_mrad=divergence_mrad, divergence_steps=divergence_steps
    )
    orientation = rotation_from_vector(torch.tensor([0.31, 0.52, 0.13], dtype=dtype))
    crystal = Crystal(
        real_space=real_space_from_cell(torch.tensor(cell, dtype=dtype), orientation),
        ncells_abc=torch.tensor(ncells, dtype=dtype),
        domain_rotations=mosaic_domain_rotations(0.08, n_domains, seed=3, dtype=dtype),
        shape=shape,
    )
    if per_channel_F:
        hkl = _all_hkl(12)
        gen = torch.Generator().manual_seed(5)
        amp = 5.0 + 10.0 * torch.rand(hkl.shape[0], n_channels, generator=gen, dtype=dtype)
        phase = 2 * math.pi * torch.rand(hkl.shape[0], n_channels, generator=gen, dtype=dtype)
        sf = StructureFactors(miller_index=hkl, F0=torch.polar(amp, phase))
    else:
        sf = constant_structure_factors(10.0, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)
    return Scene(panels, sources, crystal, sf, oversample=oversample)


def _all_hkl(n: int) -> torch.Tensor:
    r = torch.arange(-n, n + 1)
    h, k, l = torch.meshgrid(r, r, r, indexing="ij")
    hkl = torch.stack([h.reshape(-1), k.reshape(-1), l.reshape(-1)], -1)
    return hkl[(hkl != 0).any(-1)]
