"""Residual helpers of spread_dials.refine.residuals."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from spread_dials.refine.residuals import plane_leverage


def test_plane_leverage_is_the_variance_a_fitted_plane_takes_from_each_residual():
    """Two shoeboxes of 5 x 5 and 4 x 6 pixels, weights 1 / variance (one pixel out of the fit):
    each box's leverages sum to 3 (its plane's degrees of freedom), and over 4000 noise draws
    the weighted least-squares plane leaves residuals of variance (1 - h_p) v_p (Monte Carlo,
    torch.linalg.lstsq on the whitened system)."""
    g = torch.Generator().manual_seed(3)
    fast = torch.cat([torch.arange(5.0).repeat(5), torch.arange(4.0).repeat(6)]) - 2
    slow = torch.cat([torch.arange(5.0).repeat_interleave(5), torch.arange(6.0).repeat_interleave(4)]) - 2
    box = torch.cat([torch.zeros(25, dtype=torch.long), torch.ones(24, dtype=torch.long)])
    variance = 1 + 20 * torch.rand(49, generator=g, dtype=torch.float64)
    w = 1 / variance
    w[7] = 0.0
    cache = SimpleNamespace(pixel_shoebox=box, fast=fast.double(), slow=slow.double())
    h = plane_leverage(cache, w, 2)
    assert torch.allclose(torch.zeros(2, dtype=torch.float64).index_add(0, box, h), torch.full((2,), 3.0, dtype=torch.float64))
    assert h[7] == 0
    noise = torch.randn(4000, 49, generator=g, dtype=torch.float64) * variance.sqrt()
    x = torch.stack([torch.ones(49, dtype=torch.float64), fast.double(), slow.double()], -1)
    residual = torch.empty_like(noise)
    for b in (0, 1):
        rows = (box == b).nonzero()[:, 0]
        root = w[rows].sqrt().unsqueeze(-1)
        beta = torch.linalg.lstsq((root * x[rows]).expand(4000, -1, -1), (root * noise[:, rows].unsqueeze(-1))).solution
        residual[:, rows] = noise[:, rows] - (x[rows] @ beta).squeeze(-1)
    measured = (residual**2).mean(0) / variance
    fitted = w > 0
    assert torch.allclose(measured[fitted], (1 - h)[fitted], atol=0.08)
    assert float((measured[fitted] - (1 - h)[fitted]).abs().mean()) < 0.02


def test_still_leverage_is_the_dense_hat_matrix_diagonal():
    """On a refined toy still (scale, orientation and cell refined, no per-shot prior): the
    leverages equal the diagonal of the dense weighted hat matrix W^1/2 D (D^T W D)^+ D^T W^1/2
    built from the planes' columns (one (1, fast, slow) block per shoebox) and the per-shot
    columns, and sum to 3 per shoebox plus the per-shot parameter count (its trace)."""
    from spread_dials.refine.information import still_system
    from spread_dials.refine.residuals import still_leverage
    from tests.correct.toy import toy_refinement

    r = toy_refinement(seed=4, n_stills=1, refine_cell=True, macrocycles=2)
    r.run()
    h = still_leverage(r, 0)
    cache, system = r.caches[0], still_system(r, 0, r.theta.detach())
    n_boxes = int(r.states[0].background.shape[0])
    x = torch.stack([torch.ones_like(cache.fast), cache.fast, cache.slow], -1)
    planes = torch.zeros((x.shape[0], 3 * n_boxes), dtype=x.dtype)
    rows = torch.arange(x.shape[0])
    for k in range(3):
        planes[rows, 3 * cache.pixel_shoebox + k] = x[:, k]
    design = torch.cat([planes, system.columns[:, system.n_global :]], -1)
    fitted = system.weights > 0
    root = system.weights.sqrt().unsqueeze(-1)
    dense = torch.linalg.pinv(root * design, rtol=1e-10)  # (D^T W D)^+ D^T W^1/2
    expected = ((root * design) * dense.T).sum(-1)
    assert torch.allclose(h[fitted], expected[fitted], atol=1e-8), float((h - expected)[fitted].abs().max())
    boxes_fitted = int(torch.unique(cache.pixel_shoebox[fitted]).numel())
    per_shot = design.shape[1] - 3 * n_boxes
    assert per_shot >= 7  # log G, 3 angles, 3 cell lengths
    assert abs(float(h[fitted].sum()) - (3 * boxes_fitted + per_shot)) < 1e-6
