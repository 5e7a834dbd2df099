"""Noise, calibration, PSF and background against closed forms and statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spread_dials.physics.background import WATER_F_BG, AmorphousMaterial, background_photons
from spread_dials.physics.beam import make_sources
from spread_dials.physics.constants import AVOGADRO, HC_EV_A, R_E_SQ_M2
from spread_dials.physics.detector_response import add_noise, calibration_gain_map, gaussian_psf

from .scene_factory import grid_panels


def test_same_seed_same_noise_and_poisson_statistics():
    rate = torch.full((4, 200, 250), 5.0)
    a = add_noise(rate, torch.Generator().manual_seed(7), readout_noise_adu=0.5, adc_offset_adu=10.0)
    b = add_noise(rate, torch.Generator().manual_seed(7), readout_noise_adu=0.5, adc_offset_adu=10.0)
    c = add_noise(rate, torch.Generator().manual_seed(8), readout_noise_adu=0.5, adc_offset_adu=10.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    photons = add_noise(rate, torch.Generator().manual_seed(1))
    n = photons.numel()
    # Poisson(5): mean 5 and variance 5; 5 standard errors of each estimate
    assert abs(float(photons.mean()) - 5.0) < 5 * math.sqrt(5.0 / n)
    assert abs(float(photons.var()) - 5.0) < 5 * 5.0 * math.sqrt(2.0 / n + 1.0 / (5.0 * n))
    assert torch.equal(photons, photons.round())
    # readout noise adds variance sigma^2 and the offset shifts the mean
    assert float(a.mean()) == pytest.approx(15.0, abs=0.05)
    assert float(a.var()) == pytest.approx(5.25, rel=0.03)


def test_calibration_map_is_fixed_by_seed():
    g1 = calibration_gain_map((2, 50, 60), 0.03, seed=5)
    g2 = calibration_gain_map((2, 50, 60), 0.03, seed=5)
    assert torch.equal(g1, g2)
    assert float(g1.std()) == pytest.approx(0.03, rel=0.05)
    counts = add_noise(torch.full((2, 50, 60), 100.0), torch.Generator().manual_seed(0), poisson=False, calibration_gain=g1)
    assert torch.allclose(counts, 100.0 * g1)


def test_gaussian_psf_conserves_photons_and_has_its_width():
    image = torch.zeros(1, 81, 81, dtype=torch.float64)
    image[0, 40, 40] = 1000.0
    fwhm = 3.0
    out = gaussian_psf(image, fwhm)
    assert float(out.sum()) == pytest.approx(1000.0, rel=1e-3)  # 3 sigma kernel: 0.3% cut
    y = torch.arange(81, dtype=torch.float64) - 40
    var = float((out[0].sum(1) * y**2).sum() / out.sum())
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    assert math.sqrt(var) == pytest.approx(sigma, rel=0.02)


def test_water_background_one_pixel_closed_form():
    panels = grid_panels(n_fast=3, n_slow=3, pixel_mm=0.2, distance_mm=100.0, grid=(1, 1), thickness_mm=0.0, tilt_deg=0.0)
    energy = 9000.0
    sources = make_sources(torch.tensor([energy], dtype=torch.float64), torch.ones(1, dtype=torch.float64), 1e24,
                           polarization_fraction=0.0)  # fmt: skip
    table = torch.tensor(WATER_F_BG, dtype=torch.float64)
    image = background_photons(panels, sources, [AmorphousMaterial(table, 0.1, 1.0, 18.0)], 1e12)
    # pixel (1, 1): centre at origin + 1.5 px along fast and slow
    origin = panels.origin_mm[0].numpy()
    pos = origin + 1.5 * 0.2 * np.array([1.0, 0, 0]) + 1.5 * 0.2 * np.array([0, 1.0, 0])
    r = np.linalg.norm(pos)
    two_theta = math.acos(-pos[2] / r)
    stol = math.sin(two_theta / 2) * energy / HC_EV_A
    f_bg = np.interp(stol, [p[0] for p in WATER_F_BG], [p[1] for p in WATER_F_BG])
    omega = 0.04 / r**2 * (100.0 / r)
    polar = 0.5 * (1 + math.cos(two_theta) ** 2)
    molecules_per_m2 = 0.1e-3 * 1.0e6 * AVOGADRO / 18.0
    expected = R_E_SQ_M2 * 1e12 * molecules_per_m2 * f_bg**2 * omega * polar
    assert float(image[0, 1, 1]) == pytest.approx(expected, rel=1e-10)
