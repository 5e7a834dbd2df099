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
