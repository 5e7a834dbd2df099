"""Each still's mosaic spreads as crystal offsets (CrystalModel.mosaic_latent): the profiles at
log factors m equal those of a model told the anisotropic spreads s exp(m), and their
derivatives in m (the kernel's per-domain derivatives contracted before the domain sum) match
central differences; stage 1 finds injected anisotropic spreads (pure torch, CPU)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from spread_dials.refine.profiles import CrystalModel, stills_profiles
from spread_dials.refine.synthetic import InjectedErrors, anisotropic_spreads
from spread_dials.refine.uncertainty import curvature

from ..correct.toy import MOSAIC_SPREAD_DEG, toy_refinement
from .test_synthetic_errors import _stills

MODEL = CrystalModel((20.0,) * 3, 0.1, 6)
LATENT = replace(MODEL, mosaic_latent=True)


def _profiles(shots, model, mosaic, together=False, jacobian=True, cell=True):
    """The two stills' profiles at zero rotation and cell, with mosaic factors ``mosaic`` (3,)."""
    zero = [torch.zeros(3, dtype=torch.float64)] * 2
    n_cell = model.n_cell_parameters
    cells = [torch.cat([torch.zeros(n_cell, dtype=torch.float64), mosaic]) if model.mosaic_latent
             else torch.zeros(n_cell, dtype=torch.float64)] * 2 if cell else [None, None]  # fmt: skip
    return stills_profiles(shots, shots.shots, model, zero, cells, jacobian, together)


def test_the_latent_at_m_is_the_model_told_the_spreads():
    """m = 0: the isotropic model's profiles and offset derivatives; m = log(2, 1, 1/2): the
    profiles of the model with anisotropic_spread_deg = (0.2, 0.1, 0.05)."""
    _, shots = _stills(None)
    zero = torch.zeros(3, dtype=torch.float64)
    for a, b in zip(_profiles(shots, MODEL, zero), _profiles(shots, LATENT, zero)):
        assert b.jacobian.shape[-1] == a.jacobian.shape[-1] + 3
        assert torch.allclose(b.profile, a.profile, rtol=1e-12, atol=1e-15)
        assert torch.allclose(b.jacobian[..., :-3], a.jacobian, rtol=1e-10, atol=1e-12)
    m = torch.tensor([math.log(2.0), 0.0, math.log(0.5)], dtype=torch.float64)
    told = replace(MODEL, anisotropic_spread_deg=(0.2, 0.1, 0.05))
    for a, b, c in zip(_profiles(shots, told, zero), _profiles(shots, LATENT, m), _profiles(shots, MODEL, zero)):
        assert torch.allclose(b.profile, a.profile, rtol=1e-10, atol=1e-14)
        assert not torch.allclose(a.profile, c.profile, rtol=1e-2)  # the anisotropy shows


def test_the_mosaic_derivatives_match_central_differences_alone_and_together():
    _, shots = _stills(None)
    m = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    alone, together = _profiles(shots, LATENT, m), _profiles(shots, LATENT, m, together=True)
    for a, b in zip(alone, together):
        assert torch.allclose(b.profile, a.profile, rtol=1e-12, atol=1e-15)
        assert torch.allclose(b.jacobian, a.jacobian, rtol=1e-10, atol=1e-12)
    h = 1e-5
    for j in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[j] = h
        up, down = _profiles(shots, LATENT, m + step, jacobian=False), _profiles(shots, LATENT, m - step, jacobian=False)
        for a, u, d in zip(alone, up, down):
            difference = (u.profile - d.profile) / (2 * h)
            scale = float(difference.abs().max())
            assert scale > 0 and torch.allclose(a.jacobian[..., -3 + j], difference, rtol=1e-4, atol=1e-5 * scale)


def test_stage_1_finds_each_stills_anisotropic_spreads_and_the_edge_shifts_follow():
    """Stills made with spreads (2s, s, s/2) about a, b, c: refined with the latent, every
    still's factors land within 0.15 of (log 2, 0, -log 2) and both edge shifts within 1.5
    posterior sigma of the truth (2, 0 eV); the isotropic model on the same stills is > 2.5
    sigma off on both (seed 1: 3.5 and 2.9)."""
    truth = torch.tensor([2.0, 0.0], dtype=torch.float64)
    errors = InjectedErrors(mosaic_spread_abc_deg=anisotropic_spreads(MOSAIC_SPREAD_DEG, 2.0))
    z = {}
    for latent in (False, True):
        r = toy_refinement(1, errors=errors, macrocycles=10, refine_mosaic=latent)
        r.run()
        z[latent] = (r.theta - truth) / curvature(r, observed=False).profiled.diag().sqrt()
    injected = torch.tensor([math.log(2.0), 0.0, -math.log(2.0)], dtype=torch.float64)
    for state in r.states:
        assert float((state.cell[-3:] - injected).abs().max()) < 0.15, state.cell
    assert bool((z[True].abs() < 1.5).all()) and bool((z[False].abs() > 2.5).all()), z


def test_the_refinement_refuses_a_latent_the_settings_do_not_refine():
    r = toy_refinement(1, n_stills=1)
    for model, settings in ((LATENT, r.settings), (r.crystal_model, replace(r.settings, refine_mosaic=True))):
        with pytest.raises(ValueError, match="mosaic_latent must agree"):
            replace(r, crystal_model=model, settings=settings)


def test_a_start_off_the_trust_box_starts_on_its_edge_and_a_held_factor_is_not_followed():
    """Stage 1's refined offsets stay in the box about their cache point (the profiles are linear
    about it): a start 5 log units off (as a still followed a global step, follow_step) comes back
    on the box's edge even when no step is taken.  With mosaic_step_percent 0 (the correction's
    warm-up) the factors are not refined: a start off the box stays, and follow_step leaves them."""
    from spread_dials.refine.information import follow_step, refined_offsets
    from spread_dials.refine.stage1 import OFFSET_UNIT

    r = toy_refinement(seed=2, n_stills=2, macrocycles=1, refine_mosaic=True)
    r.run()
    radius = 10.0 * r.settings.mosaic_step_percent * OFFSET_UNIT
    starts = []
    for s in r.states:
        cell = s.cell.clone()
        cell[-1] += 5.0
        starts.append(replace(s, cell=cell))
    r.settings = replace(r.settings, stage1_iterations=0)
    for cache, (state, _) in zip(r.caches, r.refit_shots(r.theta, starts)):
        off = state.cell[-3:] - cache.profiles.offsets[-3:]
        assert float(off.abs().max()) <= radius + 1e-12 and abs(float(off[-1]) - radius) < 1e-12, off
    r.settings = replace(r.settings, mosaic_step_percent=0.0)
    for start, (state, _) in zip(starts, r.refit_shots(r.theta, starts)):
        assert torch.equal(state.cell[-3:], start.cell[-3:])
    n_shot = 1 + int(refined_offsets(r.states[0].offsets.numel(), r.settings).sum())  # the scale's row, the refined offsets'
    assert n_shot == 4  # (rotations only)
    moved = follow_step(r.states[0], torch.ones((n_shot, 1), dtype=torch.float64), torch.ones(1), r.settings)
    assert torch.equal(moved.cell[-3:], r.states[0].cell[-3:]) and not torch.equal(moved.rotation, r.states[0].rotation)
