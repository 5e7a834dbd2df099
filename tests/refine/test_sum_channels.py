"""Profiles summed over the channels (refinement.sum_channels; model.sum_channels).

A still's per-channel profiles (N, C) and their Jacobian (N, C, 3 + k) are what limits a data
set's size on a GPU; summed over the channels at the current theta and jitter they are
(N, 1 + P [+ 1]) and (N, 1, 3 + k) (the toy: 8 channels, 2 sites, 3 + 3 offsets: 5.6x less).  References: the per-channel computation itself (exact at
the point summed at: the same Bragg terms, offsets' Jacobian and Fisher information), its
second-order error away from it (halving the step quarters the error), and the per-channel
refinement of the same stills (the summed one must converge to its estimates and sigmas:
the sums are made again wherever the kernel recomputes the profiles)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from spread_dials.refine.engine import channel_summer, make_caches
from spread_dials.refine.information import shot_information
from spread_dials.refine.model import bragg_terms, intensities_and_jacobian, site_intensities, sum_channels
from spread_dials.refine.run import saved_summed_points
from spread_dials.refine.synthetic import InjectedErrors
from spread_dials.refine.uncertainty import curvature

from ..correct.toy import toy_refinement, toy_table

JITTER = InjectedErrors(energy_jitter_eV=1.0)


def _summed_copy(r, theta, delta):
    """Still 0's cache of refinement ``r`` summed at ``theta`` and ``delta``."""
    cache = r.caches[0]
    return cache.with_profiles(sum_channels(cache, r.sites, theta, delta))


def test_summed_terms_are_exact_at_their_point_and_second_order_off_it():
    r = toy_refinement(seed=3, n_stills=1, errors=JITTER, refine_cell=True, energy_jitter_sigma_eV=1.0)
    cache, sites = r.caches[0], r.sites
    theta0, delta0 = torch.tensor([1.3, -0.4], dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    summed = _summed_copy(r, theta0, delta0)
    assert summed.profiles.profile.shape == (cache.counts.numel(), 1 + 2 + 1)

    def terms(c, theta, delta):
        return bragg_terms(c, site_intensities(sites, theta, c, delta))

    exact, at = terms(cache, theta0, delta0), terms(summed, theta0, delta0)
    assert torch.allclose(at.value, exact.value, rtol=1e-12, atol=0)
    assert torch.allclose(at.jacobian, exact.jacobian, rtol=1e-12, atol=1e-12 * float(exact.jacobian.abs().max()))
    # away from the point: first order, so the error falls 4x when the step halves
    direction = torch.tensor([0.6, 0.8], dtype=torch.float64)
    errors = []
    for h in (0.2, 0.1):
        off = terms(summed, theta0 + h * direction, delta0 + h).value - terms(cache, theta0 + h * direction, delta0 + h).value
        errors.append(float(off.abs().max()))
    assert errors[1] > 0 and 3.5 < errors[0] / errors[1] < 4.5, errors
    # the Fisher information (scale, offsets, jitter and planes profiled) at the point
    state = replace(r.states[0], energy_offset=delta0)
    r.states = [state]
    full = shot_information(r, 0, theta0)[0]
    r.caches = [summed]
    assert torch.allclose(shot_information(r, 0, theta0)[0], full, rtol=1e-9)


def test_the_closed_form_intensity_jacobian_is_the_finite_difference():
    """intensities_and_jacobian's d|F|^2 / d(theta, delta) (closed form on the structure
    factors) against central differences of site_intensities."""
    r = toy_refinement(seed=3, n_stills=1)
    cache, sites = r.caches[0], r.sites
    x, h = torch.tensor([1.3, -0.4, 0.37], dtype=torch.float64), 1e-4
    value, d = intensities_and_jacobian(sites, x[:2], cache, x[2])
    assert d.shape == (*value.shape, 3)
    at = lambda y: site_intensities(sites, y[:2], cache, y[2])  # noqa: E731
    assert torch.allclose(value, at(x), rtol=1e-12)
    for k in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[k] = h
        fd = (at(x + step) - at(x - step)) / (2 * h)
        assert torch.allclose(d[..., k], fd, rtol=1e-5, atol=1e-6 * float(value.abs().max()))
        assert float(d[..., k].abs().max()) > 0


@pytest.fixture(scope="module")
def arms():
    out = {}
    for summed in (False, True):
        r = toy_refinement(seed=5, n_stills=4, spot_scale=8000.0, errors=JITTER, macrocycles=6, refine_cell=True,
                           energy_jitter_sigma_eV=1.0, sum_channels=summed)  # fmt: skip
        r.run()
        out[summed] = (r, curvature(r, observed=False).profiled)
    return out


def test_a_summed_refinement_reaches_the_per_channel_estimates(arms):
    (r, cov), (s, cov_summed) = arms[False], arms[True]
    sigma = cov.diag().sqrt()
    assert float(sigma.max()) < 1.0  # (an informative data set)
    assert torch.allclose(s.theta, r.theta, atol=0.05 * float(sigma.min())), (s.theta, r.theta, sigma)
    assert torch.allclose(cov_summed.diag().sqrt(), sigma, rtol=0.02)
    found = torch.tensor([float(st.energy_offset) for st in s.states])
    assert torch.allclose(found, torch.tensor([float(st.energy_offset) for st in r.states]), atol=0.05)
    held = sum(c.profiles.profile.numel() + c.profiles.jacobian.numel() for c in s.caches)
    assert 5 * held < sum(c.profiles.profile.numel() + c.profiles.jacobian.numel() for c in r.caches)
    assert all(c.profiles.summed_at is not None for c in s.caches)


def test_resumed_caches_are_summed_where_the_checkpoint_left_them(arms):
    """A checkpoint's (theta0, jitter0) per still (checkpoint_states' cache_theta, cache_jitter)
    make the same summed caches again (so a resumed refinement goes on from the same point)."""
    s, _ = arms[True]
    saved = {"states": {shot.identifier: {"cache_theta": c.profiles.summed_at.tolist(),
                                          "cache_jitter": float(c.profiles.summed_jitter)}
                        for shot, c in zip(s.shots.shots, s.caches)}}  # fmt: skip
    points = saved_summed_points(saved, s.shots)
    rotations = [c.profiles.rotation for c in s.caches]
    cells = [c.profiles.cell for c in s.caches]
    again = make_caches(s.shots, toy_table(), s.crystal_model, rotations, cells=cells, refine_cell=True,
                        reduce=channel_summer(s.sites, s.theta, s.settings, points))  # fmt: skip
    for c, d in zip(s.caches, again):
        assert torch.equal(c.profiles.summed_at, d.profiles.summed_at)
        assert torch.allclose(d.profiles.profile, c.profiles.profile, rtol=1e-10, atol=1e-12 * float(c.profiles.profile.abs().max()))
    assert math.isclose(float(again[0].profiles.summed_jitter), float(s.caches[0].profiles.summed_jitter))

