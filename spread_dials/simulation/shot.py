"""Simulate one planned shot: the sparse kernel's Bragg windows, background, detector response,
and the true spots (per Miller index and panel) from the same window photons.

The Bragg image and each window's photon moments come from ``simulate_sparse_windows`` (the
truth table needs the per-window photons); background and the detector response come from
``physics.still``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from spread_dials.physics.beam import make_sources
from spread_dials.physics.bragg import Scene
from spread_dials.physics.crystal import Crystal, real_space_from_cell
from spread_dials.physics.mosaic_quadrature import domain_rotations
from spread_dials.physics.sparse import BraggWindows, predict_windows, simulate_sparse_windows
from spread_dials.physics.still import DetectorResponse, detector_counts
from spread_dials.simulation.plan import ShotPlan
from spread_dials.simulation.setup import RunSetup

__all__ = ["ShotResult", "StillCounts", "simulate_counts", "simulate_shot", "true_spots"]


@dataclass
class ShotResult:
    """A simulated shot.

    Attributes:
        plan: the shot's plan.
        counts: (P, S, F) int32 detector counts (ADU).
        real_space: (3, 3) rows a, b, c (A, lab frame).
        domain_rotations: (M, 3, 3) mosaic domain rotations.
        spots: the true Bragg spots (:func:`true_spots`).
        n_windows: Bragg windows evaluated.
        bragg_photons, background_photons: expected totals over the detector.
        peak_bragg_photons: expected Bragg photons in the brightest pixel (the strongest
            spot's peak, before background and noise).
        seconds: time taken.
    """

    plan: ShotPlan
    counts: np.ndarray
    real_space: np.ndarray
    domain_rotations: np.ndarray
    spots: dict
    n_windows: int
    bragg_photons: float
    background_photons: float
    peak_bragg_photons: float
    seconds: float


def true_spots(windows: BraggWindows, sums: torch.Tensor, n_fast: int, n_slow: int) -> dict:
    """Windows merged per (Miller index, panel): photons, intensity-weighted centroid, bounding box.

    Arguments:
        windows: the sparse kernel's windows.
        sums: (W, 3) per window: sum of photons, of photons * (fast + 0.5), of photons * (slow + 0.5).

    Returns:
        dict of numpy arrays: miller_index (R, 3) int32, panel (R,), intensity (R,) (expected
        photons summed over the spot's windows: all domains and channels), xyzcal_px (R, 3)
        (pixel coordinates, z = 0 for a still), bbox (R, 6) int32 (x0, x1, y0, y1, 0, 1), sorted
        by panel then Miller index; spots with no photons are left out.
    """
    if windows.n_windows == 0:
        return {"miller_index": np.zeros((0, 3), np.int32), "panel": np.zeros(0, np.int64),
                "intensity": np.zeros(0), "xyzcal_px": np.zeros((0, 3)), "bbox": np.zeros((0, 6), np.int32)}  # fmt: skip
    # one integer key per (panel, h, k, l), ordered as the tuples; merged where the windows are
    # (on a GPU: the host only receives the spots)
    hkl = windows.miller_index
    span = 2 * int(hkl.abs().max()) + 1
    digits = hkl + span // 2
    key = ((windows.panel * span + digits[:, 0]) * span + digits[:, 1]) * span + digits[:, 2]
    unique, inverse = torch.unique(key, return_inverse=True)
    n = unique.shape[0]
    s = torch.zeros((n, 3), dtype=torch.float64, device=key.device).index_add_(0, inverse, sums.detach().double())
    f0, s0 = windows.fast0, windows.slow0
    f1 = (f0 + windows.n_fast).clamp(max=n_fast)
    s1 = (s0 + windows.n_slow).clamp(max=n_slow)

    def reduce(values: torch.Tensor, how: str) -> torch.Tensor:
        init = torch.full((n,), (1 << 40) if how == "amin" else -(1 << 40), dtype=torch.long, device=key.device)
        return init.scatter_reduce(0, inverse, values.long(), how)

    bbox = torch.stack([reduce(f0, "amin"), reduce(f1, "amax"), reduce(s0, "amin"), reduce(s1, "amax")], -1)
    keep = (s[:, 0] > 0).nonzero().squeeze(1)
    s, unique, bbox = s[keep].cpu(), unique[keep], bbox[keep].cpu()
    intensity = s[:, 0]
    xyz = torch.stack([s[:, 1] / intensity, s[:, 2] / intensity, torch.zeros_like(intensity)], -1)
    bbox6 = torch.cat([bbox, torch.zeros_like(bbox[:, :1]), torch.ones_like(bbox[:, :1])], -1)
    l_digit = unique % span
    k_digit = unique // span % span
    h_digit = unique // (span * span) % span
    miller = torch.stack([h_digit, k_digit, l_digit], -1) - span // 2
    return {
        "miller_index": miller.cpu().numpy().astype(np.int32),
        "panel": (unique // (span**3)).cpu().numpy().astype(np.int64),
        "intensity": intensity.numpy(),
        "xyzcal_px": xyz.numpy(),
        "bbox": bbox6.numpy().astype(np.int32),
    }


@dataclass
class StillCounts:
    """One still's detector counts and the windows that made its Bragg photons.

    Attributes:
        counts: (P, S, F) int32 detector counts (ADU), on the host.
        windows: the sparse kernel's windows.
        sums: (W, 3) per-window photon moments (see ``simulate_sparse_windows``).
        bragg_photons, background_photons: expected totals over the detector.
        peak_bragg_photons: expected Bragg photons in the brightest pixel.
    """

    counts: np.ndarray
    windows: BraggWindows
    sums: torch.Tensor
    bragg_photons: float
    background_photons: float
    peak_bragg_photons: float


@torch.no_grad()
def simulate_counts(
    scene: Scene,
    tolerance: float,
    background_per_photon: torch.Tensor | None,
    photons: float,
    response: DetectorResponse,
    noise_seed: int,
) -> StillCounts:
    """Bragg photons (sparse kernel; fused on a GPU) + background (photons per incident photon,
    computed once per run, times this pulse's ``photons``), then the detector response with the
    noise drawn from ``noise_seed``; counts rounded to int32."""
    device = scene.panels.origin_mm.device
    compiled = device.type == "cuda"
    windows = predict_windows(scene, tolerance, compiled=compiled)
    bragg, sums = simulate_sparse_windows(scene, windows, compiled=compiled)
    expected = bragg
    background_total = 0.0
    if background_per_photon is not None:
        background = background_per_photon * photons
        background_total = float(background.sum())
        expected = bragg + background
    generator = torch.Generator(device=device).manual_seed(noise_seed)
    counts = detector_counts(expected, response, generator)
    counts = torch.round(counts.double()).clamp(-(2**31), 2**31 - 1).to(torch.int32)
    if device.type == "cuda":  # through page-locked memory (reused by torch's host allocator): a plain DMA
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        counts = host.copy_(counts)
    return StillCounts(counts.cpu().numpy(), windows, sums, float(bragg.sum()), background_total, float(bragg.max()))


@torch.no_grad()
def simulate_shot(setup: RunSetup, plan: ShotPlan) -> ShotResult:
    """Expected photons (Bragg + background), detector counts and the true spots of one shot."""
    t0 = time.perf_counter()
    params = setup.params
    device, dtype = setup.device, setup.dtype
    c = params.crystal
    real_space = real_space_from_cell(torch.tensor(setup.unit_cell, dtype=torch.float64),
                                      torch.as_tensor(plan.rotation, dtype=torch.float64))  # fmt: skip
    aniso = torch.tensor(c.anisotropic_spread_deg, dtype=torch.float64) if c.anisotropic_spread_deg else None
    rotations = domain_rotations(c.domain_set, c.mosaic_spread_deg, c.mosaic_domains, plan.seeds.mosaic, real_space, aniso)
    crystal = Crystal(
        real_space=real_space,
        ncells_abc=torch.tensor(setup.brightness.ncells_abc, dtype=torch.float64),
        domain_rotations=rotations,
        shape=c.shape,
        spot_scale=setup.brightness.spot_scale,
    )
    sources = make_sources(
        torch.as_tensor(plan.energies_eV, dtype=torch.float64), torch.as_tensor(plan.weights, dtype=torch.float64),
        plan.fluence_photons_per_m2, polarization_fraction=params.beam.polarization_fraction,
        divergence_mrad=params.beam.divergence_mrad, divergence_steps=params.beam.divergence_steps,
    )  # fmt: skip
    scene = Scene(
        setup.panels, sources.to(device=device, dtype=dtype), crystal.to(device=device, dtype=dtype),
        setup.structure_factors, oversample=params.detector.oversample,
    )  # fmt: skip
    still = simulate_counts(scene, params.tolerance, setup.background_per_photon, plan.photons, setup.response,
                            plan.seeds.noise)  # fmt: skip
    return ShotResult(
        plan=plan,
        counts=still.counts,
        real_space=real_space.numpy(),
        domain_rotations=rotations.numpy(),
        spots=true_spots(still.windows, still.sums, setup.panels.n_fast, setup.panels.n_slow),
        n_windows=still.windows.n_windows,
        bragg_photons=still.bragg_photons,
        background_photons=still.background_photons,
        peak_bragg_photons=still.peak_bragg_photons,
        seconds=time.perf_counter() - t0,
    )
