"""Synthetic SASE spectra and rebinning of measured spectra, against analytic integrals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spread_dials.physics.spectra import channel_energies, rebin_spectrum, sase_spectrum, spectrum_centroid


def test_sase_spectrum_is_seeded_spiky_and_normalised():
    a = sase_spectrum(7120.0, 20.0, 100, 1.0, n_spikes=15, spike_fwhm_eV=1.2, seed=11)
    b = sase_spectrum(7120.0, 20.0, 100, 1.0, n_spikes=15, spike_fwhm_eV=1.2, seed=11)
    c = sase_spectrum(7120.0, 20.0, 100, 1.0, n_spikes=15, spike_fwhm_eV=1.2, seed=12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    energy, weight = a
    assert np.allclose(energy, 7120.0 + np.arange(-49.5, 50.0))
    assert weight.min() >= 0 and weight.sum() == pytest.approx(1.0, abs=1e-12)
    # spiky: many local maxima, far from a smooth Gaussian
    peaks = np.sum((weight[1:-1] > weight[:-2]) & (weight[1:-1] > weight[2:]) & (weight[1:-1] > 0.2 * weight.max()))
    assert peaks >= 3
    assert abs(spectrum_centroid(energy, weight) - 7120.0) < 20.0


def test_single_spike_matches_the_gaussian_integral_over_channels():
    """One spike of known centre and width: each channel holds the normal CDF difference."""
    rng = np.random.default_rng(5)
    centre = 7120.0 + rng.normal(0.0, 4.0 / (2 * math.sqrt(2 * math.log(2))))
    energy, weight = sase_spectrum(7120.0, 4.0, 30, 0.5, n_spikes=1, spike_fwhm_eV=2.0, seed=np.random.default_rng(5))
    sigma = 2.0 / (2 * math.sqrt(2 * math.log(2)))
    cdf = [0.5 * (1 + math.erf((e - centre) / (sigma * math.sqrt(2)))) for e in np.append(energy - 0.25, energy[-1] + 0.25)]
    expected = np.diff(cdf)
    assert np.allclose(weight, expected / expected.sum(), atol=1e-12)


def test_rebin_conserves_a_sampled_gaussian():
    """A finely sampled Gaussian rebinned onto 1 eV channels equals its analytic channel integrals."""
    fine = np.arange(7000.0, 7200.0, 0.06)
    mu, sigma = 7093.3, 6.0
    samples = np.exp(-0.5 * ((fine - mu) / sigma) ** 2)
    channels = channel_energies(7100.0, 60, 1.0)
    got = rebin_spectrum(fine, samples, channels, shift_eV=-3.0)
    edges = np.append(channels - 0.5, channels[-1] + 0.5)
    cdf = np.array([0.5 * (1 + math.erf((e - (mu - 3.0)) / (sigma * math.sqrt(2)))) for e in edges])
    want = np.diff(cdf) / np.diff(cdf).sum()
    assert np.abs(got - want).max() < 2e-4
    assert spectrum_centroid(channels, got) == pytest.approx(mu - 3.0, abs=0.02)


def test_rebin_real_sase_spectra(shared_data):
    """The shared SASE spectra moved to 6550 eV keep their centroid (within the rebinning error)."""
    with np.load(shared_data / "spectra" / "sase_spectra.npz") as npz:
        energies, weights = npz["energies_eV"], npz["weights"]
    centroids = np.array([spectrum_centroid(energies, w) for w in weights])
    shift = 6550.0 - centroids.mean()
    channels = channel_energies(6550.0, 100, 1.0)
    for i in (0, 17, 99):
        w = rebin_spectrum(energies, weights[i], channels, shift)
        assert w.sum() == pytest.approx(1.0) and w.min() >= 0
        assert spectrum_centroid(channels, w) == pytest.approx(centroids[i] + shift, abs=0.3)


def test_rebin_rejects_spectra_off_the_channels():
    with pytest.raises(ValueError, match="cover none"):
        rebin_spectrum(np.linspace(7000, 7010, 50), np.ones(50), channel_energies(8000.0, 10, 1.0))
    with pytest.raises(ValueError, match="at least one channel"):
        channel_energies(7000.0, 0, 1.0)
