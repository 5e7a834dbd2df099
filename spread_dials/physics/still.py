"""One still from start to end: Bragg photons (sparse or dense kernel) + amorphous background,
optional PSF, then detector response.  Simulation and the benchmarks call this; refinement
calls the kernels directly on shoebox windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.physics.background import AmorphousMaterial, background_photons
from spread_dials.physics.bragg import Scene
from spread_dials.physics.dense import simulate_dense
from spread_dials.physics.detector_response import add_noise, gaussian_psf
from spread_dials.physics.sparse import BraggWindows, predict_windows, simulate_sparse

__all__ = ["AmorphousMaterial", "DetectorResponse", "StillResult", "expected_photons", "detector_counts"]


@dataclass(frozen=True)
class DetectorResponse:
    """Detector response settings (nanoBragg's): PSF, noise, gains.

    Attributes:
        psf_fwhm_px: Gaussian PSF FWHM (pixels); 0 = off.
        poisson: draw photon noise.
        calibration_gain: optional (P, S, F) per-pixel gain map (see calibration_gain_map).
        quantum_gain: ADU per photon.
        readout_noise_adu: rms Gaussian readout noise (ADU).
        adc_offset_adu: constant offset (ADU).
    """

    psf_fwhm_px: float = 0.0
    poisson: bool = True
    calibration_gain: Tensor | None = None
    quantum_gain: float = 1.0
    readout_noise_adu: float = 0.0
    adc_offset_adu: float = 0.0


@dataclass(frozen=True)
class StillResult:
    """Expected photons of a still and how they were made.

    Attributes:
        bragg: (P, S, F) expected Bragg photons.
        background: (P, S, F) expected background photons (zeros without materials).
        windows: the sparse kernel's windows (None for the dense kernel).
    """

    bragg: Tensor
    background: Tensor
    windows: BraggWindows | None

    @property
    def total(self) -> Tensor:
        return self.bragg + self.background


def expected_photons(
    scene: Scene,
    materials: tuple[AmorphousMaterial, ...] = (),
    photons_per_pulse: float = 0.0,
    kernel: str = "sparse",
    tolerance: float = 1e-6,
    compiled: bool = False,
    max_terms_per_chunk: int | None = None,
) -> StillResult:
    """Expected photons per pixel of one still (Bragg + background), before the detector response.

    The background uses the pulse's mean energy and direction (``Sources.collapsed``): the
    amorphous ring is smooth over an XFEL band.  ``compiled`` fuses the sparse kernel's
    per-pixel physics and the background with torch.compile (worth it on a GPU).
    """
    if kernel == "sparse":
        windows = predict_windows(scene, tolerance, compiled=compiled)
        bragg = simulate_sparse(scene, windows, compiled=compiled, max_terms_per_chunk=max_terms_per_chunk)
    elif kernel == "dense":
        windows = None
        bragg = simulate_dense(scene)
    else:
        raise ValueError(f"unknown kernel {kernel!r}: choose sparse or dense")
    background = torch.zeros_like(bragg)
    if materials:
        background = background_photons(
            scene.panels, scene.sources.collapsed(), materials, photons_per_pulse, compiled=compiled
        )
    return StillResult(bragg=bragg, background=background, windows=windows)


def detector_counts(expected: Tensor, response: DetectorResponse, generator: torch.Generator) -> Tensor:
    """Detector counts (ADU) from expected photons: PSF, then noise and gains."""
    blurred = gaussian_psf(expected, response.psf_fwhm_px)
    return add_noise(
        blurred, generator, poisson=response.poisson, calibration_gain=response.calibration_gain,
        quantum_gain=response.quantum_gain, readout_noise_adu=response.readout_noise_adu,
        adc_offset_adu=response.adc_offset_adu,
    )  # fmt: skip
