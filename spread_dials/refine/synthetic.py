"""Stills built in memory with the physics core: refinement inputs without DIALS (pure torch).

For the GPU machines (no DIALS) and fast tests: each still's true crystal is drawn, its spots
predicted and simulated with the sparse kernel (``window_photons``, the simulator's own path),
shoeboxes are the bounding boxes of each reflection's windows plus a margin, counts are Poisson
draws of Bragg + a flat background, and the crystal handed to refinement is the true one turned
by a random rotation and with its cell lengths scaled by random factors (the orientation and
cell errors that indexing leaves).  Every draw comes from ``seed``.

Model errors that refinement is not told about (:class:`InjectedErrors`, for
dials.spread_correct's experiments): a Gaussian point-spread function (each shoebox's expected
Bragg photons blurred inside its box), per-panel gain factors (on Bragg and background), and a
recorded spectrum whose energies are off by a spectrometer offset plus a per-still jitter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from spread_dials.physics.beam import make_sources
from spread_dials.physics.bragg import Scene
from spread_dials.physics.crystal import Crystal, rotation_from_vector
from spread_dials.physics.detector_response import calibration_gain_map, gaussian_psf
from spread_dials.physics.geometry import PanelArray
from spread_dials.physics.sparse import BraggWindows, predict_windows, window_photons
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.profiles import CrystalModel, ShotProfiles, shoebox_windows
from spread_dials.refine.shots import Shoeboxes, Shot, ShotSet
from spread_dials.simulation.plan import uniform_rotation

__all__ = ["InjectedErrors", "SyntheticTruth", "blur_boxes", "oracle_profile_map", "synthetic_shots"]


@dataclass(frozen=True)
class InjectedErrors:
    """Model errors in synthetic stills (the refinement's model lacks them).

    Attributes:
        psf_fwhm_px: Gaussian point-spread FWHM (pixels; 0 off), applied to the Bragg photons
            of each shoebox inside its box.
        panel_gain: (P,) factors on each panel's expected photons, or None.
        spectrometer_offset_eV: recorded channel energies = true + this + the still's jitter.
        energy_jitter_eV: rms of a per-still N(0, 1) jitter of the recorded energies.
        pixel_gain: (P, n_slow, n_fast) factors on every pixel's expected photons, Bragg and
            background (a flat-field calibration error: dials.spread_simulate's
            noise.gain_error_rms, :func:`~spread_dials.physics.detector_response.calibration_gain_map`),
            or None.
        mosaic_spread_abc_deg: None, or the crystals' rms mosaic angles about their a, b, c
            axes (degrees) in place of the model's isotropic spread (dials.spread_simulate's
            crystal.anisotropic_spread_deg).
        photon_charge_rms: a charge-integrating pixel's spread of the charge one photon leaves
            (fraction of a photon's; charge sharing, gain): n photons read as
            n + rms sqrt(n) N(0, 1).  The Gaussian-readout likelihood takes the variance as
            lambda + sigma^2; the true one is lambda (1 + rms^2) + sigma^2.
        readout_sigma_photons: Gaussian readout noise added to every pixel (photons).
    """

    psf_fwhm_px: float = 0.0
    panel_gain: Tensor | None = None
    spectrometer_offset_eV: float = 0.0
    energy_jitter_eV: float = 0.0
    pixel_gain: Tensor | None = None
    mosaic_spread_abc_deg: tuple[float, float, float] | None = None
    photon_charge_rms: float = 0.0
    readout_sigma_photons: float = 0.0

    def pixel_factors(self, boxes: Shoeboxes) -> Tensor | None:
        """(N,) the panel and pixel gain on every pixel of ``boxes``, or None without either."""
        if self.panel_gain is None and self.pixel_gain is None:
            return None
        panel, slow, fast = boxes.pixel_positions()
        factors = torch.ones(boxes.n_pixels, dtype=boxes.counts.dtype, device=boxes.counts.device)
        if self.panel_gain is not None:
            factors = factors * self.panel_gain.to(factors)[panel]
        if self.pixel_gain is not None:
            factors = factors * self.pixel_gain.to(factors)[panel, slow, fast]
        return factors


FLAT_FIELD_SEED = 0x91C5


def flat_field_error(shape: tuple[int, int, int], rms: float) -> Tensor:
    """(P, n_slow, n_fast) float64 per-pixel gain factors 1 + ``rms`` N(0, 1): one detector's
    flat-field error (the same map for every still and replicate, from :data:`FLAT_FIELD_SEED`),
    for :attr:`InjectedErrors.pixel_gain`."""
    return calibration_gain_map(shape, rms, seed=FLAT_FIELD_SEED, dtype=torch.float64)


def anisotropic_spreads(spread_deg: float, factor: float) -> tuple[float, float, float]:
    """Mosaic spreads (degrees) about a, b, c of ``factor``, 1 and 1 / ``factor`` times an
    isotropic ``spread_deg``, for :attr:`InjectedErrors.mosaic_spread_abc_deg`."""
    return (spread_deg * factor, spread_deg, spread_deg / factor)


def blur_boxes(values: Tensor, nx: Tensor, ny: Tensor, fwhm_px: float) -> Tensor:
    """Per-pixel ``values`` (N, ...) of boxes of ``nx`` x ``ny`` pixels (row-major, boxes
    consecutive) blurred inside each box by a Gaussian of ``fwhm_px`` (light leaving a box is
    lost, as light leaving a panel), each trailing column on its own."""
    out, start = [], 0
    for w, h in zip(nx.tolist(), ny.tolist()):
        box = values[start : start + w * h]
        columns = box.reshape(h, w, -1).permute(2, 0, 1)  # (K, h, w)
        out.append(gaussian_psf(columns, fwhm_px).permute(1, 2, 0).reshape(box.shape))
        start += w * h
    return torch.cat(out) if out else values


def oracle_profile_map(shots: ShotSet, errors: InjectedErrors) -> Callable[[int, ShotProfiles], ShotProfiles] | None:
    """The physics model told the injected pixel-level errors (dials.spread_correct's oracle
    arm), as a ``Refinement.profile_map``: every channel's profile of still i (and its
    Jacobian) blurred inside its box by the PSF exactly as the stills were made
    (:func:`blur_boxes`), times the panel and pixel gain (the background's gain is the shoebox
    background plane's: exact for a panel's gain, to first order in the box for a pixel's).
    None when ``errors`` has no PSF and no gain.  (A spectrometer offset or jitter is told by
    giving the stills their true energies.)"""
    if errors.psf_fwhm_px <= 0 and errors.panel_gain is None and errors.pixel_gain is None:
        return None

    def exact(i: int, p: ShotProfiles) -> ShotProfiles:
        sb = shots.shots[i].shoeboxes
        gain = errors.pixel_factors(sb)
        gain = None if gain is None else gain.to(p.profile)

        def apply(x: Tensor) -> Tensor:
            if errors.psf_fwhm_px > 0:
                x = blur_boxes(x, sb.n_fast, sb.n_slow, errors.psf_fwhm_px)
            return x if gain is None else gain.view(-1, *([1] * (x.dim() - 1))) * x

        with torch.no_grad():
            return ShotProfiles(p.rotation, apply(p.profile), None if p.jacobian is None else apply(p.jacobian), p.cell)

    return exact


@dataclass(frozen=True)
class SyntheticTruth:
    """What the synthetic stills were made with: per still the true real space (3, 3), the
    orientation error (rotation vector, rad), the cell error (3,) (given / true length of a, b,
    c) and the scale."""

    real_space: list[Tensor]
    rotation_error: list[Tensor]
    spot_scale: float
    cell_error: list[Tensor]


def _boxes(windows: BraggWindows, margin: int, n_fast: int, n_slow: int) -> tuple[Tensor, ...]:
    """One box per (reflection, panel): the union of its windows plus ``margin`` pixels, clipped."""
    key = torch.cat([windows.miller_index, windows.panel.unsqueeze(-1)], -1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    n = unique.shape[0]
    big = torch.iinfo(torch.long).max

    def reduce(values: Tensor, how: str, init: int) -> Tensor:
        return torch.full((n,), init, dtype=torch.long).index_reduce(0, inverse, values, how, include_self=True)

    x0 = reduce(windows.fast0, "amin", big).sub(margin).clamp(min=0)
    y0 = reduce(windows.slow0, "amin", big).sub(margin).clamp(min=0)
    x1 = reduce(windows.fast0 + windows.n_fast, "amax", -big).add(margin).clamp(max=n_fast)
    y1 = reduce(windows.slow0 + windows.n_slow, "amax", -big).add(margin).clamp(max=n_slow)
    return unique[:, :3], unique[:, 3], x0, y0, x1 - x0, y1 - y0


def synthetic_shots(
    panels: PanelArray,
    structure_factors: StructureFactors,
    model: CrystalModel,
    unit_cell_real_space: Tensor,
    energy_eV: Tensor,
    n_shots: int,
    seed: int,
    spot_scale: float = 1.0,
    background_photons: float = 0.5,
    orientation_error_deg: float = 0.02,
    cell_error_fraction: float = 0.0,
    min_bragg_photons: float = 20.0,
    max_box_px: int = 25,
    cut_large_boxes: bool = False,
    margin_px: int = 2,
    tolerance: float = 1e-5,
    truth_model: CrystalModel | None = None,
    domains_per_still: bool = False,
    device: str | torch.device = "cpu",
    errors: InjectedErrors | None = None,
    poisson: bool = True,
    noise_seed: int | None = None,
) -> tuple[ShotSet, SyntheticTruth]:
    """``n_shots`` stills of a crystal with rows a, b, c ``unit_cell_real_space`` (3, 3) (A) in
    random orientations, flat SASE-like spectra on channels ``energy_eV`` (C,) (random weights),
    the true f', f'' inside ``structure_factors`` (F0, G, f_prime, f_double_prime per channel).
    The crystal handed on is the true one turned by N(0, ``orientation_error_deg``) about each
    axis and with each cell length scaled by 1 + N(0, ``cell_error_fraction``).

    Shoeboxes keep reflections with at least ``min_bragg_photons`` expected Bragg photons and
    boxes at most ``max_box_px`` on a side (larger ones dropped, or with ``cut_large_boxes`` cut
    to that size about their centre, as dials.spread_refine's refinement.max_shoebox_px cuts
    DIALS' shoeboxes: broad spots keep their core).  ``poisson`` False: the counts are the
    expected photons themselves (noise-free stills).  The crystals are made with ``truth_model`` (default
    ``model``, the one handed to refinement, whose domain count sets the shoebox windows);
    ``domains_per_still`` draws each still's mosaic domains from its own seed (as
    dials.spread_simulate does) instead of the model's one draw.  ``errors``: model errors the
    stills carry (:class:`InjectedErrors`).  The kernel runs on ``device``; the stills come back
    on the CPU.  ``noise_seed``: the photon (and charge, readout) noise drawn from it instead of
    ``seed``'s stream: the same stills (orientations, spectra, boxes, starting crystals) with
    fresh noise, for a parametric bootstrap.  Returns the stills and what made them.
    """
    truth_model = model if truth_model is None else truth_model
    if errors is not None and errors.mosaic_spread_abc_deg is not None:
        truth_model = replace(truth_model, anisotropic_spread_deg=tuple(errors.mosaic_spread_abc_deg))
    panels_device = panels.to(device)
    sf_device = structure_factors.to(device)
    rng = np.random.default_rng(seed)
    dtype = torch.float64
    beam = torch.tensor([0.0, 0.0, -1.0], dtype=dtype)
    e_vector = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    shots, reals, rotation_errors, cell_errors = [], [], [], []
    for i in range(n_shots):
        real_space = unit_cell_real_space.to(dtype) @ torch.as_tensor(uniform_rotation(rng), dtype=dtype).T
        weight = torch.as_tensor(rng.gamma(2.0, size=energy_eV.numel()), dtype=dtype)
        domain_seed = int(rng.integers(2**62)) if domains_per_still else truth_model.seed
        rotations = truth_model.domain_rotations(domain_seed, dtype, real_space)
        sources = make_sources(energy_eV.to(dtype), weight, truth_model.fluence_photons_per_m2, beam_direction=beam, e_vector=e_vector)
        crystal = Crystal(real_space, torch.tensor(truth_model.ncells_abc, dtype=dtype), rotations, truth_model.shape, spot_scale)
        scene = Scene(panels_device, sources.to(device=device), crystal.to(device=device), sf_device, truth_model.oversample)
        windows = predict_windows(scene, tolerance).to(device="cpu")
        hkl, panel, x0, y0, nx, ny = _boxes(windows, margin_px, panels.n_fast, panels.n_slow)
        if cut_large_boxes:
            x0, y0 = x0 + (nx - nx.clamp(max=max_box_px)) // 2, y0 + (ny - ny.clamp(max=max_box_px)) // 2
            nx, ny = nx.clamp(max=max_box_px), ny.clamp(max=max_box_px)
        keep = (nx <= max_box_px) & (ny <= max_box_px) & (nx > 0) & (ny > 0)
        hkl, panel, x0, y0, nx, ny = hkl[keep], panel[keep], x0[keep], y0[keep], nx[keep], ny[keep]
        n_pix = int((nx * ny).sum())
        dummy = Shoeboxes(hkl, panel, x0, y0, nx, ny, torch.zeros(n_pix, dtype=dtype), torch.ones(n_pix, dtype=torch.bool),
                          torch.arange(hkl.shape[0]))  # fmt: skip
        box_windows = shoebox_windows(Shot("", real_space, energy_eV, weight, dummy), truth_model.mosaic_domains)
        box_windows = BraggWindows(*[getattr(box_windows, f) for f in ("miller_index",)],
                                   structure_factors.index_of(box_windows.miller_index),
                                   *[getattr(box_windows, f) for f in ("domain", "panel", "fast0", "slow0", "n_fast", "n_slow")])  # fmt: skip
        with torch.no_grad():
            _, photons = window_photons(scene, box_windows.to(device=device))
        bragg = photons.view(truth_model.mosaic_domains, n_pix).sum(0).cpu()
        sb_of_pixel = torch.repeat_interleave(torch.arange(hkl.shape[0]), nx * ny)
        per_box = torch.zeros(hkl.shape[0], dtype=dtype).index_add(0, sb_of_pixel, bragg)
        noise_draw = int(rng.integers(2**62))  # (drawn either way: the stills after it are the same)
        if noise_seed is not None:
            noise_draw = int(np.random.SeedSequence([noise_seed, seed, i]).generate_state(1, np.uint64)[0]) >> 2
        gen = torch.Generator().manual_seed(noise_draw)
        expected = bragg + background_photons
        if errors is not None:
            if errors.psf_fwhm_px > 0:
                expected = blur_boxes(bragg, nx, ny, errors.psf_fwhm_px) + background_photons
            factors = errors.pixel_factors(dummy)
            if factors is not None:
                expected = expected * factors
        counts = torch.poisson(expected, generator=gen) if poisson else expected.clone()
        if errors is not None and (errors.photon_charge_rms > 0 or errors.readout_sigma_photons > 0):
            spread = torch.randn(counts.shape, generator=gen, dtype=counts.dtype) * counts.sqrt()
            readout = torch.randn(counts.shape, generator=gen, dtype=counts.dtype)
            counts = counts + errors.photon_charge_rms * spread + errors.readout_sigma_photons * readout
        strong = per_box >= min_bragg_photons
        pixel_keep = strong[sb_of_pixel]
        error = torch.as_tensor(rng.normal(size=3), dtype=dtype) * math.radians(orientation_error_deg)
        boxes = Shoeboxes(hkl[strong], panel[strong], x0[strong], y0[strong], nx[strong], ny[strong],
                          counts[pixel_keep], torch.ones(int(pixel_keep.sum()), dtype=torch.bool),
                          torch.arange(int(strong.sum())))  # fmt: skip
        cell_error = torch.ones(3, dtype=dtype)
        if cell_error_fraction > 0:  # (no draw otherwise: the same stills as without the option)
            cell_error = cell_error + torch.as_tensor(rng.normal(size=3), dtype=dtype) * cell_error_fraction
        given = cell_error.unsqueeze(-1) * real_space @ rotation_from_vector(error).T
        recorded = energy_eV.to(dtype)
        if errors is not None and (errors.spectrometer_offset_eV or errors.energy_jitter_eV):
            recorded = recorded + errors.spectrometer_offset_eV + errors.energy_jitter_eV * float(rng.normal())
        shots.append(Shot(f"synthetic-{seed}-{i}", given, recorded, weight / weight.sum(), boxes))
        reals.append(real_space)
        rotation_errors.append(error)
        cell_errors.append(cell_error)
    shot_set = ShotSet(panels, beam, e_vector, 0.999, shots, [f"synthetic still {i}" for i in range(n_shots)])
    return shot_set, SyntheticTruth(reals, rotation_errors, spot_scale, cell_errors)
