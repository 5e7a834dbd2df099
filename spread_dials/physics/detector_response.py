"""Detector response: point-spread blur, Poisson photon noise, calibration (gain) error,
quantum gain, readout noise and ADC offset, in nanoBragg's order (PSF on the expected image,
then noise).  Every random draw comes from a torch.Generator seeded by the caller, so the same
seed on the same device gives identical images.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["calibration_gain_map", "gaussian_psf", "add_noise"]


def calibration_gain_map(shape: tuple[int, ...], rms: float, seed: int, device=None, dtype=torch.float32) -> Tensor:
    """Per-pixel gain factors 1 + rms * N(0, 1), fixed for a detector (drawn on the CPU from ``seed``)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    return (1.0 + rms * noise).to(device=device, dtype=dtype)


def gaussian_psf(image: Tensor, fwhm_px: float, radius_px: int | None = None) -> Tensor:
    """Blur each panel of (P, n_slow, n_fast) with a normalised Gaussian of FWHM ``fwhm_px`` (pixels).

    Separable convolution with zero padding (light leaving a panel edge is lost, as in a real
    sensor).  Differentiable.  ``radius_px`` defaults to 3 sigma.
    """
    if fwhm_px <= 0:
        return image
    sigma = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    radius = int(math.ceil(3.0 * sigma)) if radius_px is None else int(radius_px)
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = image.unsqueeze(1)  # (P, 1, S, F)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1), padding=(0, radius))
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return out.squeeze(1)


def add_noise(
    expected_photons: Tensor,
    generator: torch.Generator,
    poisson: bool = True,
    calibration_gain: Tensor | None = None,
    quantum_gain: float = 1.0,
    readout_noise_adu: float = 0.0,
    adc_offset_adu: float = 0.0,
) -> Tensor:
    """Detector counts (ADU) from expected photons.

    photons ~ Poisson(expected) (if ``poisson``); counts = quantum_gain * photons * calibration
    + N(0, readout_noise) + adc_offset.  ``generator`` must live on the image's device.
    """
    photons = torch.poisson(expected_photons.clamp(min=0), generator=generator) if poisson else expected_photons
    counts = photons * quantum_gain
    if calibration_gain is not None:
        counts = counts * calibration_gain
    if readout_noise_adu > 0:
        noise = torch.randn(counts.shape, generator=generator, device=counts.device, dtype=counts.dtype)
        counts = counts + readout_noise_adu * noise
    return counts + adc_offset_adu
