"""The spectrometer's calibration latents of dials.spread_correct (issue 13): the offset is a
common edge shift exactly, the dispersion stretches the energy axis, and in the Fisher
information the offset enters as the sum of the edge shifts' columns, so it widens the absolute
shifts' intervals and leaves the inter-site difference's alone (references: the closed form
f(E - offset - shift), central differences, the chain rule on the plain model's information)."""

from __future__ import annotations

import pytest
import torch

from spread_dials.correct.spectrometer import SpectrometerSites
from spread_dials.refine.sites import EdgeShiftSites
from spread_dials.refine.uncertainty import curvature

from ..refine.test_engine import _reference
from .toy import ENERGY, NOMINAL_EV, toy_refinement


def _sites() -> EdgeShiftSites:
    ref = _reference()
    return EdgeShiftSites([ref, ref], [0, 1], ["A", "B"])


def test_offset_is_a_common_edge_shift_and_dispersion_stretches_energy():
    """f', f'' with an offset o equal the plain model's with every shift moved by o (1e-12); with
    a dispersion error d, the plain model's at E_nom + (1 + d)(E - E_nom); the derivative in d
    (autograd) matches a central difference; the prior adds (o / sigma)^2 / 2 per latent."""
    plain = _sites()
    wrapped = SpectrometerSites(plain, NOMINAL_EV, offset_sigma_eV=0.7, dispersion_sigma=0.004)
    assert wrapped.parameter_names() == ["edge_shift_eV[A]", "edge_shift_eV[B]", "spectrometer_offset_eV", "spectrometer_dispersion"]
    shifts = torch.tensor([1.3, -0.4], dtype=torch.float64)
    theta = torch.cat([shifts, torch.tensor([0.8, 0.0], dtype=torch.float64)])
    for got, want in zip(wrapped.curves(theta, ENERGY), plain.curves(shifts + 0.8, ENERGY)):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    theta = torch.cat([shifts, torch.tensor([0.0, 0.003], dtype=torch.float64)])
    stretched = NOMINAL_EV + 1.003 * (ENERGY - NOMINAL_EV)
    for got, want in zip(wrapped.curves(theta, ENERGY), plain.curves(shifts, stretched)):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    t = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(wrapped.curves(t, ENERGY)[1].sum(), t)
    h = 1e-5
    up, down = theta.clone(), theta.clone()
    up[3] += h
    down[3] -= h
    numeric = (wrapped.curves(up, ENERGY)[1].sum() - wrapped.curves(down, ENERGY)[1].sum()) / (2 * h)
    assert float(grad[3]) == pytest.approx(float(numeric), rel=1e-5)
    extra = wrapped.negative_log_prior(torch.cat([shifts, torch.tensor([0.8, 0.003], dtype=torch.float64)])) - plain.negative_log_prior(shifts)
    assert float(extra) == pytest.approx(0.5 * (0.8 / 0.7) ** 2 + 0.5 * (0.003 / 0.004) ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="offset_sigma_eV"):
        SpectrometerSites(plain, NOMINAL_EV, offset_sigma_eV=0.0, dispersion_sigma=None)


def test_offset_widens_absolute_shifts_and_leaves_differences():
    """On toy stills, the engine's profiled covariance with the offset latent equals the inverse
    of J^T I J plus the priors' Hessian, I the plain model's data information and J = [1 | 1]
    (1e-6): the offset's column is the sum of the shifts'.  The difference A - B keeps its
    variance; each absolute shift's variance grows by about the calibration prior's."""
    r = toy_refinement(seed=1, shifts=(1.0, -1.0), n_stills=2, spot_scale=4000.0)
    sigma_cal = 0.8
    cov_plain = curvature(r, observed=False).profiled
    prior_plain = torch.eye(2, dtype=torch.float64) / r.sites.prior_sigma_eV**2
    information = torch.linalg.inv(cov_plain) - prior_plain
    r.sites = SpectrometerSites(r.sites, NOMINAL_EV, offset_sigma_eV=sigma_cal, dispersion_sigma=None)
    r.theta = torch.cat([r.theta, torch.zeros(1, dtype=torch.float64)])
    cov = curvature(r, observed=False).profiled
    j = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    prior = torch.diag(torch.tensor([1 / 100.0, 1 / 100.0, 1 / sigma_cal**2], dtype=torch.float64))
    expected = torch.linalg.inv(j.T @ information @ j + prior)
    assert torch.allclose(cov, expected, rtol=1e-6, atol=1e-12)
    d = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    assert float(d @ cov @ d) == pytest.approx(float(cov_plain[0, 0] + cov_plain[1, 1] - 2 * cov_plain[0, 1]), rel=1e-3)
    for s in range(2):
        assert float(cov[s, s] - cov_plain[s, s]) == pytest.approx(sigma_cal**2, rel=0.05)
