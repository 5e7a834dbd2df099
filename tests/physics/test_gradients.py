"""torch.autograd.gradcheck (float64, finite differences) through the sparse and dense kernels."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from spread_dials.physics import (
    Crystal,
    Scene,
    StructureFactors,
    make_sources,
    mosaic_domain_rotations,
    predict_windows,
    real_space_from_cell,
    rotation_from_vector,
    simulate_dense,
    simulate_sparse,
)

from .scene_factory import _all_hkl, grid_panels

D = torch.float64


def _inputs():
    gen = torch.Generator().manual_seed(11)
    hkl = _all_hkl(6)
    F = torch.polar(5.0 + 5.0 * torch.rand(hkl.shape[0], 2, generator=gen, dtype=D),
                    2 * math.pi * torch.rand(hkl.shape[0], 2, generator=gen, dtype=D))  # fmt: skip
    return {
        "rotvec": torch.tensor([0.31, 0.52, 0.13], dtype=D),
        "cell": torch.tensor([31.0, 36.0, 41.0, 90.0, 90.0, 90.0], dtype=D),
        "ncells": torch.tensor([5.0, 6.0, 4.0], dtype=D),
        "spread_deg": torch.tensor(0.3, dtype=D),
        "scale": torch.tensor(2.0, dtype=D),
        "weights": torch.tensor([0.6, 0.4], dtype=D),
        "F": F,
    }, hkl


def _scene(rotvec, cell, ncells, spread_deg, scale, weights, F, hkl):
    panels = grid_panels(n_fast=24, n_slow=20, pixel_mm=0.2, distance_mm=40.0, grid=(2, 1), n_layers=1)
    sources = make_sources(torch.tensor([8990.0, 9010.0], dtype=D), torch.ones(2, dtype=D), 1e24)
    sources = type(sources)(**{**sources.__dict__, "weight": weights})  # differentiable weights
    crystal = Crystal(
        real_space=real_space_from_cell(cell, rotation_from_vector(rotvec)),
        ncells_abc=ncells,
        domain_rotations=mosaic_domain_rotations(spread_deg, 2, seed=4),
        shape="gauss",
        spot_scale=scale,
    )
    return Scene(panels, sources, crystal, StructureFactors(miller_index=hkl, F0=F), oversample=1)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_gradcheck_all_parameters(kernel):
    inputs, hkl = _inputs()
    names = list(inputs)
    with torch.no_grad():
        windows = predict_windows(_scene(*inputs.values(), hkl), tolerance=1e-12)

    def image(*args):
        scene = _scene(*args, hkl)
        out = simulate_sparse(scene, windows) if kernel == "sparse" else simulate_dense(scene)
        return out / 1e-6  # photons -> O(1) numbers for the finite-difference check

    args = tuple(inputs[n].clone().requires_grad_(True) for n in names)
    out = image(*args)
    assert float(out.detach().max()) > 1.0, "the scene must light spots"
    # every parameter reaches the image
    grads = torch.autograd.grad(out.sum(), args)
    for n, g in zip(names, grads):
        assert float(g.abs().sum()) > 0, n
    assert gradcheck(image, args, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_gradcheck_anomalous_form():
    """F = F0 + sum_s (f' + i f'') G_s: gradients with respect to f' and f'' per channel."""
    gen = torch.Generator().manual_seed(2)
    hkl = _all_hkl(6)
    n = hkl.shape[0]
    F0 = torch.polar(20.0 * torch.rand(n, generator=gen, dtype=D), 6.0 * torch.rand(n, generator=gen, dtype=D))
    G = torch.polar(torch.rand(n, 2, generator=gen, dtype=D), 6.0 * torch.rand(n, 2, generator=gen, dtype=D))
    inputs, _ = _inputs()
    with torch.no_grad():
        windows = predict_windows(_scene(*inputs.values(), hkl), tolerance=1e-12)

    def image(fp, fdp):
        scene = _scene(*inputs.values(), hkl)
        sf = StructureFactors(miller_index=hkl, F0=F0, G=G, f_prime=fp, f_double_prime=fdp)
        return simulate_sparse(Scene(scene.panels, scene.sources, scene.crystal, sf), windows) / 1e-6

    fp = torch.tensor([[-7.0, -6.5], [-5.0, -4.8]], dtype=D, requires_grad=True)
    fdp = torch.tensor([[3.0, 3.5], [0.5, 4.0]], dtype=D, requires_grad=True)
    assert gradcheck(image, (fp, fdp), eps=1e-6, atol=1e-5, rtol=1e-4)
