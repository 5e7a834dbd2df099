"""Calibration of intervals over replicate data sets: coverage and simulation-based calibration
(SBC) ranks (numpy, scipy).

Each replicate data set has a truth drawn from the prior and an estimate with either a Gaussian
posterior (estimate, sigma: the curvature) or draws (the bootstrap).  Its probability integral
transform (PIT) u = P(posterior < truth) is uniform on [0, 1] over replicates exactly when the
posterior is calibrated (Talts et al. 2018, arXiv 1804.06788: SBC ranks of the truth among L
posterior draws are uniform on {0..L}; u is the L -> infinity limit, and for B draws the rank
plus a uniform jitter over (B + 1) keeps u exactly uniform).  The central interval of
probability l covers the truth exactly when |2u - 1| < l, so coverage and ranks come from one
number per replicate.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["LEVELS", "gaussian_pit", "draws_pit", "coverage", "uniformity", "coverage_band", "calibration_summary"]

LEVELS = (0.5, 0.68, 0.9, 0.95)


def gaussian_pit(estimate: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(R,) PIT of ``truth`` under N(``estimate``, ``sigma``^2), all (R,) (same units, e.g. eV).

    Raises:
        ValueError: a sigma that is not finite and positive.
    """
    sigma = np.asarray(sigma, dtype=float)
    if not np.all(np.isfinite(sigma) & (sigma > 0)):
        raise ValueError("every sigma must be finite and positive")
    return stats.norm.cdf((np.asarray(truth, dtype=float) - np.asarray(estimate, dtype=float)) / sigma)


def draws_pit(draws: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(R,) randomised rank PIT of ``truth`` (R,) among each replicate's ``draws`` (R, B):
    (#{draws < truth} + U * (1 + #{draws == truth})) / (B + 1), U ~ U(0, 1) from ``rng``."""
    draws = np.asarray(draws, dtype=float)
    truth = np.asarray(truth, dtype=float)[:, None]
    below = (draws < truth).sum(1)
    ties = (draws == truth).sum(1)
    return (below + rng.uniform(size=below.shape) * (1 + ties)) / (draws.shape[1] + 1)


def coverage(pit: np.ndarray, levels=LEVELS) -> list[float]:
    """Fraction of replicates whose central interval of each probability in ``levels`` holds the truth."""
    pit = np.asarray(pit, dtype=float)
    return [float((np.abs(2 * pit - 1) < level).mean()) for level in levels]


def uniformity(pit: np.ndarray, bins: int = 10) -> dict:
    """Kolmogorov-Smirnov test of ``pit`` against U(0, 1) (statistic, p) and the rank histogram
    (``bins`` equal bins of the PIT: SBC ranks grouped)."""
    pit = np.asarray(pit, dtype=float)
    test = stats.kstest(pit, "uniform")
    counts, _ = np.histogram(pit, bins=bins, range=(0.0, 1.0))
    return {"ks_statistic": float(test.statistic), "ks_p": float(test.pvalue), "rank_histogram": counts.tolist()}


def coverage_band(n_replicates: int, level: float, probability: float = 0.95) -> tuple[float, float]:
    """Central ``probability`` range of the coverage fraction that ``n_replicates`` calibrated
    replicates give for an interval of probability ``level`` (binomial)."""
    lo, hi = stats.binom.interval(probability, n_replicates, level)
    return float(lo / n_replicates), float(hi / n_replicates)


def calibration_summary(pit: np.ndarray, levels=LEVELS, tolerance: float = 0.05, bins: int = 10) -> dict:
    """Coverage at ``levels``, its deviation from nominal, whether every level is within
    ``tolerance`` (absolute) and the PIT is uniform (KS p > 0.01: issue 12's criteria), the
    binomial 95 % range of a calibrated coverage at R replicates, the KS test and rank histogram."""
    pit = np.asarray(pit, dtype=float)
    cover = coverage(pit, levels)
    test = uniformity(pit, bins)
    return {
        "replicates": int(pit.size), "levels": list(levels), "coverage": [round(c, 4) for c in cover],
        "coverage_minus_nominal": [round(c - lv, 4) for c, lv in zip(cover, levels)],
        "calibrated_range_95": [[round(x, 3) for x in coverage_band(pit.size, lv)] for lv in levels],
        "within_tolerance": bool(all(abs(c - lv) <= tolerance for c, lv in zip(cover, levels))),
        "uniform": bool(test["ks_p"] > 0.01), **test,
        "mean_pit": round(float(pit.mean()), 4) if pit.size else math.nan,
    }  # fmt: skip
