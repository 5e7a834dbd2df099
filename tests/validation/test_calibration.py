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
    tolerance_pass_probability,
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


def test_pass_probability_of_one_level_is_the_binomial_interval():
    # one level: P(|c / R - l| <= t) with c ~ Bin(R, l), summed from the binomial pmf
    for r, level in [(100, 0.68), (37, 0.9), (10, 0.5)]:
        c = np.arange(r + 1)
        expected = stats.binom.pmf(c, r, level)[np.abs(c / r - level) <= 0.05 + 1e-9].sum()
        assert tolerance_pass_probability(r, [level]) == pytest.approx(expected, rel=1e-12)


def test_pass_probability_of_all_levels_matches_simulated_calibrated_replicates():
    # 4000 sets of R = 40 calibrated data sets (uniform PITs) through calibration_summary
    rng = np.random.default_rng(11)
    passed = [calibration_summary(rng.uniform(size=40))["within_tolerance"] for _ in range(4000)]
    exact = tolerance_pass_probability(40)
    assert abs(np.mean(passed) - exact) < 4 * np.sqrt(exact * (1 - exact) / 4000)  # exact 0.29
    assert calibration_summary(rng.uniform(size=40))["calibrated_pass_probability"] == round(exact, 3)
    assert tolerance_pass_probability(100) == pytest.approx(0.585, abs=0.001)


def test_a_coverage_exactly_at_the_tolerance_passes():
    # 100 z's covered 50 / 73 / 90 / 95 %: 68 % + 5 % exactly (0.73 - 0.68 is 0.05 + 4e-17 in floats)
    z = np.repeat([0.0, 0.8, 1.5, 1.8, 10.0], [50, 23, 17, 5, 5])
    summary = calibration_summary(stats.norm.cdf(z))
    assert summary["coverage"] == [0.5, 0.73, 0.9, 0.95]
    assert summary["within_tolerance"]
    assert not calibration_summary(stats.norm.cdf(np.repeat([0.0, 0.8, 1.5, 1.8, 10.0], [50, 24, 16, 5, 5])))["within_tolerance"]


def test_pass_probability_refuses_bad_arguments():
    with pytest.raises(ValueError):
        tolerance_pass_probability(0)
    with pytest.raises(ValueError):
        tolerance_pass_probability(10, [0.5, 1.0])
