"""The learned pixel noise of charge-integrating detectors (spread_dials.correct.noise_flow)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from spread_dials.correct.context import pixel_context
from spread_dials.correct.correction import CorrectionSettings, PixelCorrection
from spread_dials.correct.fit import CorrectedModel, CorrectSettings, feature_statistics
from spread_dials.correct.noise_flow import ResidualFlow, fit_residual_flow
from spread_dials.correct.predictive import residual_sums, shell_edges, z_moments
from spread_dials.refine.engine import inverse_resolution
from spread_dials.refine.model import fisher_weights, pixel_nll
from spread_dials.refine.synthetic import InjectedErrors
from tests.correct.toy import NOMINAL_EV, toy_refinement


def _variance_ratio(lam: torch.Tensor) -> torch.Tensor:
    """The true variance of z in the fitted data below: 1 + 0.5 lambda / (lambda + 4)."""
    return 1 + 0.5 * lam / (lam + 4)


@pytest.fixture(scope="module")
def fitted() -> ResidualFlow:
    """A flow fitted to z ~ N(0, s(lambda)^2), s^2 rising from 1 to 1.5 with the rate."""
    g = torch.Generator().manual_seed(1)
    lam = torch.exp(torch.rand(20000, generator=g, dtype=torch.float64) * 6)
    z = torch.randn(20000, generator=g, dtype=torch.float64) * _variance_ratio(lam).sqrt()
    torch.manual_seed(0)
    flow = ResidualFlow()
    losses = fit_residual_flow(flow, z, lam, steps=200, learning_rate=0.02)
    assert losses[-1] < losses[0]
    return flow


def test_the_flow_starts_as_the_standard_normal():
    """At initialisation log q(z | lambda) is the N(0, 1) log-density (to 1e-6) for any rate,
    its KL to N(0, 1) is 0 and its precision factor 1."""
    torch.manual_seed(5)
    flow = ResidualFlow().double()
    z = torch.linspace(-9, 9, 37, dtype=torch.float64)
    lam = torch.logspace(-2, 5, 37, dtype=torch.float64)
    normal = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(flow.log_density(z, lam), normal, atol=1e-6, rtol=0)
    assert flow.divergence(torch.rand(5, 1, dtype=torch.float64)).abs().max() < 1e-6
    flow.tabulate(lam)
    assert torch.allclose(flow.precision_factor(lam), torch.ones_like(lam), atol=1e-6)


def test_the_fitted_flow_has_the_precision_factor_of_the_true_noise(fitted):
    """Fitted to N(0, s^2) residuals, the location information E[(d log q / dz)^2] is 1 / s^2
    (the closed form for a normal) within 5 % across the rates, and the KL to N(0, 1) is > 0."""
    lam = torch.tensor([1.0, 10.0, 100.0, 400.0], dtype=torch.float64)
    ratio = fitted.precision_factor(lam) * _variance_ratio(lam)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.05), ratio
    assert bool((fitted.divergence(torch.tensor([[0.2], [1.4]])) > 0).all())


def test_the_pixel_likelihood_through_the_flow(fitted):
    """pixel_nll with the identity flow is the Gaussian readout's term and the Fisher weights are
    the same; with a fitted flow the term is 0.5 (P z^2 + log v), P the flow's precision factor
    at lambda, whose autograd derivative in lambda is the closed form with P held (a weight, as
    in iteratively reweighted least squares), and the Fisher weight is P / v."""
    g = torch.Generator().manual_seed(2)
    lam = torch.exp(torch.rand(50, generator=g, dtype=torch.float64) * 5)
    counts = lam + torch.randn(50, generator=g, dtype=torch.float64) * (lam + 4).sqrt()
    valid = torch.ones(50, dtype=torch.bool)
    torch.manual_seed(0)
    identity = ResidualFlow().double()
    gaussian = pixel_nll(lam, counts, valid, 2.0)
    assert torch.allclose(pixel_nll(lam, counts, valid, 2.0, noise_flow=identity), gaussian, atol=1e-12)
    assert torch.equal(fisher_weights(lam, valid, 2.0, noise_flow=identity), fisher_weights(lam, valid, 2.0))
    flow = fitted.double()
    p, v, r = flow.precision_factor(lam), lam + 4, counts - lam
    assert bool((p < 0.9).any())  # (fitted to a wider noise: the test has power)
    assert torch.allclose(pixel_nll(lam, counts, valid, 2.0, noise_flow=flow), 0.5 * (p * r**2 / v + torch.log(v)), atol=1e-12)
    leaf = lam.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(pixel_nll(leaf, counts, valid, 2.0, noise_flow=flow).sum(), leaf)
    closed = 0.5 * (p * (-2 * r / v - r**2 / v**2) + 1 / v)
    assert torch.allclose(grad, closed, rtol=1e-10, atol=1e-12)
    assert torch.allclose(fisher_weights(lam, valid, 2.0, noise_flow=flow), p / v, rtol=1e-12)


def _corrected(errors: InjectedErrors, readout: float | None, noise_flow: bool) -> CorrectedModel:
    r = toy_refinement(seed=11, n_stills=2, spot_scale=4000.0, errors=errors)
    r.settings = replace(r.settings, readout_sigma=readout)
    r.run()
    contexts = [pixel_context(r.shots, s, NOMINAL_EV) for s in r.shots.shots]
    correction = PixelCorrection(r.shots.panels.n_panels, CorrectionSettings(gain=False), feature_statistics(r, contexts))
    return CorrectedModel(r, correction, contexts, CorrectSettings(epochs=1, noise_flow=noise_flow, flow_steps=150))


def test_the_corrected_fit_learns_a_charge_integrating_pixels_noise():
    """Toy stills read by a charge-integrating detector (each photon's charge spread by 100 %,
    a 1-photon Gaussian readout; the likelihood told the readout only): after one epoch the
    flow's precision factor in each band of rates is the measured 1 / Var(z) of the residuals
    there within 12 %, and for bright pixels within 15 % of the closed form
    (lambda + 1) / (2 lambda + 1), where the Gaussian readout's is 1.  The posterior
    predictive check's residuals through the flow have sd 1 within 5 % (the Gaussian readout's:
    > 1.1)."""
    model = _corrected(InjectedErrors(photon_charge_rms=1.0, readout_sigma_photons=1.0), 1.0, noise_flow=True)
    model.run()
    assert model.history[-1]["noise_flow"]["pixels"] > 5000
    assert model.history[-1]["noise_flow"]["kept"]
    z, lam = model.residual_sample()
    learned = model.noise_flow.precision_factor(lam)
    for low, high in ((0, 0.5), (0.5, 1), (1, 2), (2, 20), (20, 1e9)):
        band = (lam >= low) & (lam < high)
        assert band.sum() >= 100, (low, band.sum())
        assert abs(float(learned[band].mean() * z[band].var()) - 1) < 0.12, (low, high)
    bright = lam > 5
    truth = (lam[bright] + 1) / (2 * lam[bright] + 1)
    assert abs(float(learned[bright].mean() / truth.mean()) - 1) < 0.15
    assert float(learned[bright].mean()) < 0.65
    r = model.refinement
    inverse_d = [inverse_resolution(shot) for shot in r.shots.shots]
    edges = shell_edges(torch.cat(inverse_d), 1)
    through = residual_sums(r, [0, 1], inverse_d, edges, 1)[0, 0]
    flow, r.settings = r.settings.noise_flow, replace(r.settings, noise_flow=None)
    gaussian = residual_sums(r, [0, 1], inverse_d, edges, 1)[0, 0]
    r.settings = replace(r.settings, noise_flow=flow)
    assert abs(z_moments(*through.tolist())["sd"] - 1) < 0.05
    assert z_moments(*gaussian.tolist())["sd"] > 1.1


def test_the_noise_flow_is_not_kept_where_the_gaussian_readout_is_right():
    """Poisson photons and the 1-photon readout the likelihood is told (its variance lambda + 1
    exact): the refit does not predict the held-out half better (gain within 3 standard errors),
    so the flow is reset to N(0, 1) and the fit equals the one without a flow."""
    errors = InjectedErrors(readout_sigma_photons=1.0)
    model = _corrected(errors, 1.0, noise_flow=True)
    model.run()
    fit = model.history[0]["noise_flow"]
    assert not fit["kept"] and fit["held_out_gain"] < 3 * fit["held_out_error"], fit
    assert torch.equal(model.noise_flow.precision_table, torch.ones_like(model.noise_flow.precision_table))
    plain = _corrected(errors, 1.0, noise_flow=False)
    plain.run()
    assert torch.allclose(model.refinement.theta, plain.refinement.theta, rtol=0, atol=1e-12)


def test_the_noise_flow_is_refused_for_photon_counting_pixels():
    with pytest.raises(ValueError, match="Gaussian likelihood"):
        _corrected(InjectedErrors(), None, noise_flow=True)
