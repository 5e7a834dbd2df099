"""The Gaussian likelihood with a fractional model error (refinement.model_error_fraction) reaches
the optimum from stills_process's crystals: the same NLL and edge shifts as a fit that first
converged under Poisson and then switched (pure torch, CPU)."""

from __future__ import annotations

from dataclasses import replace

from spread_dials.refine.uncertainty import curvature

from ..correct.toy import toy_refinement


def test_a_model_error_fit_from_the_starting_crystals_reaches_the_poisson_started_optimum():
    """Toy stills of 2e4 photons per spot, 5 % model error.  Reference: Poisson to convergence,
    then the model-error likelihood from there.  The direct fit (its first stage 1 under Poisson,
    engine.Refinement.stage1) must land on the same NLL (within 0.5) and edge shifts (within 0.05
    sigma); fitted under the Gaussian from the start it stopped in a worse optimum (NLL 39405
    against 6108, edge shift A 0.37 eV off)."""
    reference = toy_refinement(3, spot_scale=2e4, macrocycles=10)
    reference.run()
    reference.settings = replace(reference.settings, model_error_fraction=0.05)
    reference.history = []
    reference.run()
    direct = toy_refinement(3, spot_scale=2e4, macrocycles=10)
    direct.settings = replace(direct.settings, model_error_fraction=0.05)
    direct.run()
    sigma = curvature(reference, observed=False).profiled.diag().sqrt()
    assert abs(direct.history[-1]["nll"] - reference.history[-1]["nll"]) < 0.5, (direct.history, reference.history)
    assert bool(((direct.theta - reference.theta).abs() < 0.05 * sigma).all()), (direct.theta, reference.theta, sigma)
