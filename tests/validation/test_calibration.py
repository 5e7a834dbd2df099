"""Calibration measures (spread_dials.validation.calibration) against closed forms and against
replicates drawn from known (calibrated and miscalibrated) posteriors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from spread_dials.validation.calibration import (
    LEVELS,
    calibration_summary,
    coverage,
    coverage_band,
    draws_pit,
    gaussian_pit,
)


def test_gaussian_interval_edges_match_the_normal_quantiles():
    # a truth just inside / just outside the central interval of probability l: |z| = z_l -+ 1e-6
    for level in LEVELS:
        z = stats.norm.ppf(0.5 + level / 2)
        inside = gaussian_pit(np.zeros(2), np.full(2, 0.3), 0.3 * np.array([z - 1e-6, -(z - 1e-6)]))
        outside = gaussian_pit(np.zeros(2), np.full(2, 0.3), 0.3 * np.array([z + 1e-6, -(z + 1e-6)]))
        assert coverage(inside, [level]) == [1.0]
        assert coverage(outside, [level]) == [0.0]


def _replicates(rng, r: int, sigma_reported_factor: float):
    truth = rng.normal(0.0, 1.0, r)  # from the prior
    sigma = rng.uniform(0.05, 0.2, r)  # each data set's own posterior width
    estimate = truth + sigma * rng.normal(size=r)
    return truth, estimate, sigma * sigma_reported_factor


def test_a_calibrated_posterior_passes_and_an_overconfident_one_fails():
    rng = np.random.default_rng(3)
    truth, estimate, sigma = _replicates(rng, 2000, 1.0)
    good = calibration_summary(gaussian_pit(estimate, sigma, truth))
    assert good["within_tolerance"] and good["uniform"]
    for c, (lo, hi) in zip(good["coverage"], [coverage_band(2000, lv, 0.999) for lv in LEVELS]):
        assert lo <= c <= hi
    truth, estimate, sigma = _replicates(rng, 2000, 0.5)  # sigmas half the truth's spread
    bad = calibration_summary(gaussian_pit(estimate, sigma, truth))
    assert not bad["within_tolerance"] and not bad["uniform"]
    assert bad["coverage"][1] == pytest.approx(2 * stats.norm.cdf(0.5) - 1, abs=0.04)  # 68 % -> 38 %


def test_ranks_among_posterior_draws_are_uniform_and_biased_draws_are_not():
    rng = np.random.default_rng(5)
    truth, estimate, sigma = _replicates(rng, 1000, 1.0)
    draws = estimate[:, None] + sigma[:, None] * rng.normal(size=(1000, 20))
    assert calibration_summary(draws_pit(draws, truth, rng))["uniform"]
    shifted = draws + 1.0 * sigma[:, None]  # a bias of one sigma
    summary = calibration_summary(draws_pit(shifted, truth, rng))
    assert not summary["uniform"] and summary["mean_pit"] < 0.4


def test_ties_are_split_uniformly():
    # every draw equals the truth: the rank is uniform over 0..B, so the PIT is uniform
    pit = draws_pit(np.zeros((4000, 3)), np.zeros(4000), np.random.default_rng(0))
    assert stats.kstest(pit, "uniform").pvalue > 0.01


def test_bad_sigma_is_refused():
    with pytest.raises(ValueError, match="positive"):
        gaussian_pit(np.zeros(2), np.array([0.1, 0.0]), np.zeros(2))
