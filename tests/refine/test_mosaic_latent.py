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
