"""Per-still energy jitter as a stage-1 parameter (refinement.energy_jitter_sigma_eV).

A still whose recorded spectrum sits delta_i above the true energies sees every site at
f_ref(E_rec - delta_i - Delta): the data fix delta_i + Delta per still, so the jitters are found
against each other, and the common edge shift Delta only up to the mean jitter, which the prior
N(0, sigma_j^2) bounds: its sigma must include ~sigma_j / sqrt(N).  The inter-site difference
does not see the jitter.  Toy stills (tests/correct/toy.py) with the jitter injected
(synthetic.InjectedErrors.energy_jitter_eV) against independent references: the injected
jitters, central finite differences, the closed-form sigma_j / sqrt(N).  The cell is refined:
the jitter also moves every spot's Bragg condition, a relative wavelength change that a cell
scale absorbs exactly (without it the jitters were found with correlation 0.39, not 0.95)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from spread_dials.refine.information import shot_information
from spread_dials.refine.model import intensities_and_slope, site_intensities
from spread_dials.refine.synthetic import InjectedErrors
from spread_dials.refine.uncertainty import curvature

from ..correct.toy import ENERGY, toy_refinement

JITTER_EV = 1.0
N_STILLS = 8
SHIFTS = (2.0, 0.0)


def _run(sigma: float | None):
    r = toy_refinement(seed=3, shifts=SHIFTS, n_stills=N_STILLS, spot_scale=8000.0,
                       errors=InjectedErrors(energy_jitter_eV=JITTER_EV), macrocycles=4, refine_cell=True)  # fmt: skip
    r.settings = replace(r.settings, energy_jitter_sigma_eV=sigma)
    r.initialise_states()
    r.run()
    return r, curvature(r, observed=False).profiled


@pytest.fixture(scope="module")
def arms():
    return {"latent": _run(JITTER_EV), "physics": _run(None)}


def test_slope_is_the_finite_difference():
    """intensities_and_slope's d|F|^2 / d delta against a central difference of site_intensities."""
    r = toy_refinement(seed=3, n_stills=1)
    cache, theta = r.caches[0], torch.tensor([1.3, -0.4], dtype=torch.float64)
    delta, h = torch.tensor(0.37, dtype=torch.float64), 1e-4
    value, slope = intensities_and_slope(r.sites, theta, cache, delta)
    up, down = (site_intensities(r.sites, theta, cache, delta + s) for s in (h, -h))
    assert torch.allclose(value, site_intensities(r.sites, theta, cache, delta), rtol=1e-12)
    assert torch.allclose(slope, (up - down) / (2 * h), rtol=1e-5, atol=1e-6 * float(value.abs().max()))
    assert float(slope.abs().max()) > 0


def test_the_jitters_are_found(arms):
    """Each still's refined jitter follows the injected one (both about their means: the data
    fix the jitters only relative to the common edge shift)."""
    r, _ = arms["latent"]
    true = torch.tensor([float(s.energy_eV[0] - ENERGY[0]) for s in r.shots.shots])
    found = torch.tensor([float(s.energy_offset) for s in r.states])
    assert float(true.std()) > 0.5 * JITTER_EV  # (the draw has a spread to find)
    a, b = true - true.mean(), found - found.mean()
    correlation = float((a * b).sum() / (a.norm() * b.norm()))
    assert correlation > 0.95, (true.tolist(), found.tolist())
    assert float((a - b).abs().max()) < 0.3 * JITTER_EV


def test_the_absolute_shift_carries_the_jitter(arms):
    """With the jitter refined, each edge shift's sigma holds the mean jitter's sigma_j / sqrt(N)
    (without it, only the counting noise: several times smaller), and the estimate sits at the
    truth plus the stills' mean jitter (what the data can say) within that sigma; the inter-site
    difference stays at its truth with either model."""
    (r, cov), (p, cov_physics) = arms["latent"], arms["physics"]
    floor = JITTER_EV / math.sqrt(N_STILLS)
    sigma, sigma_physics = cov.diag().sqrt(), cov_physics.diag().sqrt()
    assert float(sigma.min()) > 0.9 * floor
    assert float(sigma_physics.max()) < 0.5 * floor
    mean_jitter = sum(float(s.energy_eV[0] - ENERGY[0]) for s in r.shots.shots) / N_STILLS
    for k, truth in enumerate(SHIFTS):
        assert abs(float(r.theta[k]) - truth) < 3 * float(sigma[k])
        assert abs(float(r.theta[k]) - truth - mean_jitter) < 3 * float(sigma_physics[k]) + 0.1 * floor
    for arm, c in ((r, cov), (p, cov_physics)):
        difference_sigma = math.sqrt(float(c[0, 0] + c[1, 1] - 2 * c[0, 1]))
        assert abs(float(arm.theta[0] - arm.theta[1]) - (SHIFTS[0] - SHIFTS[1])) < 3 * difference_sigma


def test_information_profiles_the_jitter_in_closed_form():
    """A still's jitter moves both sites' curves as one common edge shift does, so its column is
    the sum of the sites' and profiling it under its prior's information p = 1 / sigma^2 is a
    rank-one update of the information H without it: H - (H 1)(H 1)^T / (1^T H 1 + p)."""
    from spread_dials.refine.information import shot_information

    r = toy_refinement(seed=3, n_stills=2, spot_scale=8000.0, refine_cell=True)
    r.initialise_states()
    theta = torch.tensor([1.2, -0.3], dtype=torch.float64)
    sigma = 0.7
    for i in range(2):
        plain = shot_information(r, i, theta).profiled
        r.settings = replace(r.settings, energy_jitter_sigma_eV=sigma)
        r.states[i] = replace(r.states[i], energy_offset=torch.tensor(0.0, dtype=torch.float64))
        jittered = shot_information(r, i, theta).profiled
        r.settings = replace(r.settings, energy_jitter_sigma_eV=None)
        r.states[i] = replace(r.states[i], energy_offset=None)
        h1 = plain.sum(-1)
        expected = plain - torch.outer(h1, h1) / (h1.sum() + sigma**-2)
        assert torch.allclose(jittered, expected, rtol=1e-6, atol=1e-9 * float(plain.abs().max()))
        assert float(torch.linalg.det(jittered)) < float(torch.linalg.det(plain))


def test_the_per_shot_response_is_the_refits_finite_difference(arms):
    """ShotInformation.response (d s / d theta at each still's optimum, from the Fisher blocks)
    against a central difference of stage 1's refits at theta +- h: each jitter follows an edge
    shift by -0.07 to -0.7 eV per eV here (the ridge a line search must follow, follow_step).
    The refits follow the observed curvature, the response the expected one (Fisher): they
    differ by up to 0.05 eV per eV on these stills, 7 % over all of them (the same at
    h = 0.01)."""
    r, _ = arms["latent"]
    h = 0.05
    step = torch.zeros_like(r.theta)
    step[0] = h
    _, up = r._profile_nll(r.theta + step)
    _, down = r._profile_nll(r.theta - step)
    predicted, found = [], []
    for i, (s_up, s_down) in enumerate(zip(up, down)):
        response = shot_information(r, i, r.theta).response[:, 0]
        predicted.append(float(response[-1]))
        found.append(float(s_up.energy_offset - s_down.energy_offset) / (2 * h))
        scale = float(s_up.log_scale - s_down.log_scale) / (2 * h)
        assert response[0] == pytest.approx(scale, rel=0.1, abs=5e-4)
    predicted, found = torch.tensor(predicted), torch.tensor(found)
    assert float((predicted - found).abs().max()) < 0.07
    assert float((predicted - found).norm() / found.norm()) < 0.1
    assert float(found.max()) < -0.05


def test_follow_step_moves_each_row_onto_its_parameter():
    """follow_step reads the response's rows as (log G, the refined offsets when the profiles
    carry their derivatives, the jitter when refined): with offset rows, without them (profiles
    without derivatives), and without a jitter; the planes stay."""
    from spread_dials.refine.engine import RefineSettings
    from spread_dials.refine.information import follow_step
    from spread_dials.refine.model import ShotState

    f64 = torch.float64
    state = ShotState(torch.tensor(0.5, dtype=f64), torch.zeros(3, dtype=f64), torch.ones(2, 3, dtype=f64),
                      torch.zeros(2, dtype=f64), torch.tensor(0.1, dtype=f64))  # fmt: skip
    step = torch.tensor([2.0], dtype=f64)
    jitter_on = RefineSettings(refine_cell=True, energy_jitter_sigma_eV=1.0)
    rows = torch.arange(1.0, 8.0, dtype=f64).unsqueeze(-1)  # log G, 3 angles, 2 cell lengths, jitter
    moved = follow_step(state, rows, step, jitter_on)
    assert float(moved.log_scale) == pytest.approx(2.5)
    assert moved.rotation.tolist() == [4.0, 6.0, 8.0] and moved.cell.tolist() == [10.0, 12.0]
    assert float(moved.energy_offset) == pytest.approx(14.1)
    assert torch.equal(moved.background, state.background)
    bare = follow_step(state, torch.tensor([[1.0], [-0.5]], dtype=f64), step, jitter_on)  # no offset rows
    assert bare.rotation.tolist() == [0.0] * 3 and float(bare.energy_offset) == pytest.approx(-0.9)
    no_jitter = follow_step(replace(state, energy_offset=None), rows[:6], step, replace(jitter_on, energy_jitter_sigma_eV=None))
    assert no_jitter.energy_offset is None and no_jitter.cell.tolist() == [10.0, 12.0]
