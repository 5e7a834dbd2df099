"""A two-site toy problem in memory for dials.spread_correct's tests (pure torch): a 34 x 35 x 44 A
crystal with random F0 and two anomalous sites of random phase, small stills on a 2 x 2-panel
detector, optional injected model errors."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from spread_dials.parallel import Parallel
from spread_dials.physics.crystal import real_space_from_cell
from spread_dials.physics.sparse import miller_indices_within
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.engine import Refinement, RefineSettings, channel_summer, make_caches
from spread_dials.refine.profiles import CrystalModel
from spread_dials.refine.sites import EdgeShiftSites
from spread_dials.refine.synthetic import InjectedErrors, synthetic_shots

from ..physics.scene_factory import grid_panels
from ..refine.test_engine import _reference

ENERGY = torch.arange(7106.0, 7136.0, 4.0, dtype=torch.float64)
NOMINAL_EV = 7120.0
CELL = (34.1, 34.9, 43.7, 90.0, 90.0, 90.0)
MOSAIC_SPREAD_DEG = 0.1
DETECTOR_SHAPE = (4, 160, 160)  # panels, slow, fast of the 2 x 2 grid


def toy_table() -> StructureFactors:
    """The toys' structure: F0 and the two sites' G of every reflection to 2 A (one seeded draw)."""
    hkl = miller_indices_within(real_space_from_cell(torch.tensor(CELL, dtype=torch.float64)), 2.0)
    gen = torch.Generator().manual_seed(100)
    n = hkl.shape[0]
    F0 = torch.complex(torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)) * 20
    G = torch.polar(torch.ones(n, 2, dtype=torch.float64), 2 * math.pi * torch.rand(n, 2, generator=gen, dtype=torch.float64))
    return StructureFactors(hkl, F0, G)


def toy_refinement(seed: int, shifts=(2.0, 0.0), n_stills: int = 3, spot_scale: float = 2000.0,
                   errors: InjectedErrors | None = None, macrocycles: int = 2, prior_sigma_eV: float = 10.0,
                   refine_cell: bool = False, energy_jitter_sigma_eV: float | None = None,
                   sum_channels: bool = False, anisotropic_spread_deg: tuple[float, float, float] | None = None,
                   refine_mosaic: bool = False) -> Refinement:  # fmt: skip
    """A physics-only :class:`Refinement` of ``n_stills`` toy stills whose two sites' truths are
    the reference moved by ``shifts`` (eV); per-shot states initialised, nothing refined yet.
    The structure (F0, G) is the same for every seed; the stills, spectra and noise are drawn
    from ``seed``; each edge shift's prior is N(0, ``prior_sigma_eV``^2); ``refine_cell``: each
    still's cell lengths refined too; ``energy_jitter_sigma_eV``, ``sum_channels``: the engine's
    settings (the caches summed over the channels with the latter); ``anisotropic_spread_deg``:
    the model's mosaic spreads about a, b, c (the stills are made with the model unless
    ``errors`` say otherwise); ``refine_mosaic``: each still's mosaic spreads refined too
    (the model's mosaic latent)."""
    ref = _reference()
    cell = real_space_from_cell(torch.tensor(CELL, dtype=torch.float64))
    table = toy_table()
    hkl, F0, G = table.miller_index, table.F0, table.G
    curves = [ref.at(ENERGY, s) for s in shifts]
    truth = StructureFactors(hkl, F0, G, torch.stack([c[0] for c in curves]), torch.stack([c[1] for c in curves]))
    panels = grid_panels(n_fast=160, n_slow=160, pixel_mm=0.1, distance_mm=40.0, grid=(2, 2), gap_mm=0.5, tilt_deg=0.0)
    model = CrystalModel((20.0,) * 3, MOSAIC_SPREAD_DEG, 6, anisotropic_spread_deg=anisotropic_spread_deg)
    shots, _ = synthetic_shots(panels, truth, model, cell, ENERGY, n_shots=n_stills, seed=seed, spot_scale=spot_scale,
                               min_bragg_photons=10.0, orientation_error_deg=0.01, errors=errors)  # fmt: skip
    sites = EdgeShiftSites([ref, ref], [0, 1], ["A", "B"], prior_sigma_eV=prior_sigma_eV)
    settings = RefineSettings(macrocycles=macrocycles, relinearisations=1, refine_cell=refine_cell,
                              energy_jitter_sigma_eV=energy_jitter_sigma_eV, sum_channels=sum_channels,
                              refine_mosaic=refine_mosaic)  # fmt: skip
    model = replace(model, mosaic_latent=refine_mosaic)  # (the stills above are made without it)
    caches = make_caches(shots, StructureFactors(hkl, F0, G), model, refine_cell=refine_cell,
                         reduce=channel_summer(sites, sites.initial(), settings))  # fmt: skip
    r = Refinement(shots, list(range(n_stills)), n_stills, caches, [], sites, sites.initial(), model, Parallel(), settings)
    r.initialise_states()
    return r
