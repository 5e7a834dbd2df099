"""The kernel's closed-form derivatives in the crystal (lattice_factor_and_gradient,
window_term_and_gradient via window_channel_profiles) against autograd through the kernel and
central differences."""

from __future__ import annotations

import pytest
import torch

from spread_dials.physics import predict_windows
from spread_dials.physics.crystal import rotation_from_vector
from spread_dials.physics.lattice import LATTICE_SHAPES, lattice_factor_and_gradient, lattice_factor_components
from spread_dials.physics.sparse import window_channel_profiles
from spread_dials.refine.derivatives import value_and_jacobian

from .scene_factory import small_scene


@pytest.mark.parametrize("shape", LATTICE_SHAPES)
def test_lattice_gradient_matches_autograd(shape):
    """dF_latt / d dh in closed form equals autograd's, including offsets at and near 0 (the
    series branches) and the gauss cut-off."""
    gen = torch.Generator().manual_seed(2)
    dh = (torch.rand(3, 400, generator=gen, dtype=torch.float64) - 0.5) * 0.98
    dh[:, :20] *= 1e-8  # the tiny-argument series
    dh[:, 20:40] *= 0.01  # round's series (pi r < 0.1) and its edge
    ncells = torch.tensor([7.0, 8.0, 6.0], dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in dh]
    reference = lattice_factor_components(leaves, ncells, shape)
    grads = torch.autograd.grad(reference.sum(), leaves, allow_unused=True) if reference.requires_grad else [None] * 3
    value, gradient = lattice_factor_and_gradient(list(dh), ncells, shape)
    assert torch.equal(value, reference.detach())
    peak = float(value.abs().max())
    # square's tiny-argument branch is a constant to autograd (derivative 0); the closed form
    # has the series there: check those entries against central differences instead
    exact = slice(20 if shape == "square" else 0, None)
    for i, (closed, auto) in enumerate(zip(gradient, grads)):
        auto = torch.zeros_like(closed) if auto is None else auto
        assert torch.allclose(closed[exact], auto[exact], rtol=1e-9, atol=1e-9 * peak), shape
        step = torch.zeros_like(dh)
        step[i] = 1e-7
        quotient = (lattice_factor_components(list(dh + step), ncells, shape) - lattice_factor_components(list(dh - step), ncells, shape)) / 2e-7
        assert float((quotient[:20] - closed[:20]).abs().max()) <= 1e-6 * peak, shape


def _crystal_real_space(scene, x):
    """(3, 3) the scene crystal's real space turned by x[:3] (rad), its lengths scaled by exp(x[3:])."""
    return torch.exp(x[3:]).unsqueeze(-1) * (scene.crystal.real_space @ rotation_from_vector(x[:3]).transpose(-1, -2))


def _domains(scene, a):
    """(D, 3, 3) the domains' real space A R_d^T."""
    return a @ scene.crystal.domain_rotations.transpose(-1, -2)


@pytest.mark.parametrize("shape", LATTICE_SHAPES)
def test_profile_gradient_matches_autograd_and_differences(shape):
    """window_channel_profiles' closed-form derivatives in the crystal's real space, through
    d A / d (3 angles, 3 cell lengths), equal autograd through the same kernel (two reverse
    passes) and central differences; the profiles themselves are those made without them.
    Sub-pixels, two sensor layers, divergence (two sources per channel), three domains."""
    scene = small_scene(shape=shape, n_channels=2, n_domains=3, n_layers=2, divergence_mrad=0.5, divergence_steps=2)
    windows = predict_windows(scene, 1e-3)
    # 24 windows spread over the list: square's and round's slow tails make many large windows
    windows = windows.select(torch.linspace(0, windows.n_windows - 1, min(windows.n_windows, 24)).long())
    x0 = torch.tensor([1e-3, -2e-3, 5e-4, 1e-3, -1e-3, 2e-3], dtype=torch.float64)
    a, da = value_and_jacobian(lambda x: _crystal_real_space(scene, x), x0)  # (3, 3), (3, 3, 6)
    profiles, gradient = window_channel_profiles(scene, windows, None, _domains(scene, a), scene.crystal.domain_rotations)
    plain, none = window_channel_profiles(scene, windows, None, _domains(scene, a))
    assert none is None and torch.equal(profiles, plain) and profiles.abs().max() > 0
    assert gradient.shape == (*profiles.shape, 3, 3)
    moved = gradient.flatten(-2) @ da.reshape(9, 6)
    if shape == "tophat":  # piecewise constant in the crystal
        assert not moved.any()
        return
    auto = value_and_jacobian(lambda x: window_channel_profiles(scene, windows, None, _domains(scene, _crystal_real_space(scene, x)))[0], x0)[1]
    scale = float(auto.abs().max())
    assert scale > 0
    # 1e-8: near a lattice point square's sincg is a constant to autograd, a series here
    assert float((moved - auto).abs().max()) <= 1e-8 * scale
    if shape != "gauss":  # jumps where a term leaves its reflection's cell (square, round)
        return
    step = 1e-6
    for k in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[k] = step
        plus = window_channel_profiles(scene, windows, None, _domains(scene, _crystal_real_space(scene, x0 + e)))[0]
        minus = window_channel_profiles(scene, windows, None, _domains(scene, _crystal_real_space(scene, x0 - e)))[0]
        assert float(((plus - minus) / (2 * step) - moved[..., k]).abs().max()) <= 2e-4 * scale, (shape, k)


def test_gradient_needs_real_space():
    scene = small_scene(n_channels=2, n_domains=1)
    with pytest.raises(ValueError, match="domain_real_space"):
        window_channel_profiles(scene, predict_windows(scene, 1e-4), None, None, scene.crystal.domain_rotations)
