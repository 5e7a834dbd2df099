"""XFEL pulse spectra on a fixed grid of channels: seeded SASE-like spiky spectra and rebinning of
measured spectra (numpy, with torch for the normal CDF; no I/O).

A self-amplified spontaneous emission (SASE) pulse has a spiky spectrum: many narrow modes of
random height under a smooth envelope a few tens of eV wide.  :func:`sase_spectrum` draws such
a spectrum as a sum of Gaussian spikes (centres from the envelope, exponentially distributed
heights as in SASE statistics).  :func:`rebin_spectrum` moves a measured spectrum (e.g.
shared/data/spectra/sase_spectra.npz) onto the simulation's channels, conserving its integral.
Every function returns (energies_eV, weights) with weights >= 0 that sum to 1.

Example:
    >>> energy, weight = sase_spectrum(7120.0, 20.0, 40, 1.0, n_spikes=12, spike_fwhm_eV=1.5, seed=3)
    >>> energy.shape, round(float(weight.sum()), 12)
    ((40,), 1.0)
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["channel_energies", "monochromatic_spectrum", "rebin_spectrum", "sase_spectrum", "spectrum_centroid",
           "window_fraction"]

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF, elementwise (float64)."""
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def channel_energies(mean_eV: float, n_channels: int, channel_width_eV: float) -> np.ndarray:
    """Centres (eV) of ``n_channels`` channels of ``channel_width_eV``, centred on ``mean_eV``."""
    if n_channels < 1:
        raise ValueError(f"the spectrum needs at least one channel, not {n_channels}")
    if n_channels > 1 and not channel_width_eV > 0:
        raise ValueError(f"channel width must be > 0 eV, not {channel_width_eV}")
    return mean_eV + (np.arange(n_channels, dtype=np.float64) - (n_channels - 1) / 2.0) * channel_width_eV


def monochromatic_spectrum(energy_eV: float) -> tuple[np.ndarray, np.ndarray]:
    """One channel at ``energy_eV`` with weight 1."""
    return np.array([float(energy_eV)]), np.ones(1)


def sase_spectrum(
    mean_eV: float,
    fwhm_eV: float,
    n_channels: int,
    channel_width_eV: float,
    n_spikes: int,
    spike_fwhm_eV: float,
    seed: int | np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded spiky SASE-like spectrum on the channels around ``mean_eV``.

    Arguments:
        mean_eV: centre of the envelope and of the channel grid (eV).
        fwhm_eV: FWHM of the Gaussian envelope from which spike centres are drawn (eV).
        n_channels, channel_width_eV: the channel grid.
        n_spikes: number of spikes (SASE modes).
        spike_fwhm_eV: FWHM of one spike (eV); each spike is integrated over the channels.
        seed: an int seed or a numpy Generator.

    Returns:
        (energies_eV (C,), weights (C,), summing to 1).  If every spike falls off the grid
        the Gaussian envelope itself is returned.
    """
    if n_spikes < 1:
        raise ValueError(f"a SASE spectrum needs at least one spike, not {n_spikes}")
    if not spike_fwhm_eV > 0:
        raise ValueError(f"spike FWHM must be > 0 eV, not {spike_fwhm_eV}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(int(seed))
    energy = channel_energies(mean_eV, n_channels, channel_width_eV)
    centres = mean_eV + rng.normal(0.0, fwhm_eV * _FWHM_TO_SIGMA, n_spikes)
    heights = rng.exponential(1.0, n_spikes)
    width = channel_width_eV if n_channels > 1 else 1.0
    lo, hi = energy - width / 2.0, energy + width / 2.0
    sigma = spike_fwhm_eV * _FWHM_TO_SIGMA
    cdf_hi = _normal_cdf((hi[None, :] - centres[:, None]) / sigma)
    cdf_lo = _normal_cdf((lo[None, :] - centres[:, None]) / sigma)
    weight = (heights[:, None] * (cdf_hi - cdf_lo)).sum(0)
    if not weight.sum() > 0:
        weight = np.exp(-0.5 * ((energy - mean_eV) / max(fwhm_eV * _FWHM_TO_SIGMA, 1e-12)) ** 2)
    return energy, weight / weight.sum()


def spectrum_centroid(energy_eV: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean energy (eV) of a spectrum, negative weights clipped to 0."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    if not w.sum() > 0:
        raise ValueError("the spectrum has no positive weight")
    return float((w * np.asarray(energy_eV, dtype=np.float64)).sum() / w.sum())


def rebin_spectrum(
    energy_eV: np.ndarray, weights: np.ndarray, channels_eV: np.ndarray, shift_eV: float = 0.0
) -> np.ndarray:
    """Weights of a sampled spectrum integrated over the channels centred at ``channels_eV``.

    The source spectrum (samples ``weights`` >= 0 at increasing ``energy_eV``, negatives clipped
    to 0) is moved by ``shift_eV`` and treated as piecewise constant over its bins; each channel
    gets the integral over [centre - width/2, centre + width/2] (width from the channel spacing),
    so the rebinning conserves the part of the spectrum that the channels cover.

    Returns:
        (C,) weights summing to 1.

    Raises:
        ValueError: if the channels cover none of the spectrum.
    """
    out, _ = _channel_integrals(energy_eV, weights, channels_eV, shift_eV)
    return out / out.sum()


def window_fraction(energy_eV: np.ndarray, weights: np.ndarray, channels_eV: np.ndarray, shift_eV: float = 0.0) -> float:
    """The fraction of a sampled spectrum's photons (moved by ``shift_eV``) that the channels
    centred at ``channels_eV`` cover; ``rebin_spectrum`` drops the rest."""
    out, total = _channel_integrals(energy_eV, weights, channels_eV, shift_eV)
    return float(out.sum() / total)


def _channel_integrals(energy_eV, weights, channels_eV, shift_eV: float) -> tuple[np.ndarray, float]:
    """(the spectrum integrated over each channel, its integral over all its bins)."""
    e = np.asarray(energy_eV, dtype=np.float64) + shift_eV
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    if e.ndim != 1 or e.shape != w.shape or e.size < 2:
        raise ValueError("a sampled spectrum needs matching 1-d energies and weights (at least 2 samples)")
    if np.any(np.diff(e) <= 0):
        raise ValueError("spectrum energies must increase")
    channels = np.asarray(channels_eV, dtype=np.float64).reshape(-1)
    if channels.size > 1:
        step = np.diff(channels)
        edges = np.concatenate([[channels[0] - step[0] / 2], channels[:-1] + step / 2, [channels[-1] + step[-1] / 2]])
    else:
        half = float(np.median(np.diff(e)))
        edges = np.array([channels[0] - half, channels[0] + half])
    # bin edges of the source samples, then the cumulative integral at those edges
    mid = (e[1:] + e[:-1]) / 2
    src_edges = np.concatenate([[e[0] - (e[1] - e[0]) / 2], mid, [e[-1] + (e[-1] - e[-2]) / 2]])
    cumulative = np.concatenate([[0.0], np.cumsum(w * np.diff(src_edges))])
    at_edges = np.interp(edges, src_edges, cumulative)
    out = np.diff(at_edges)
    if not out.sum() > 0:
        raise ValueError(
            f"the channels {channels[0]:.1f}-{channels[-1]:.1f} eV cover none of the spectrum "
            f"({e[0]:.1f}-{e[-1]:.1f} eV after the shift)"
        )
    return out, float(cumulative[-1])
