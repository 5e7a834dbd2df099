"""psd_pseudo_inverse (refine/information.py) against the Moore-Penrose conditions on a
rank-deficient information matrix whose parameters differ in scale by many orders."""

from __future__ import annotations

import pytest
import torch

from spread_dials.refine.information import psd_pseudo_inverse


def test_moore_penrose_on_a_rank_deficient_badly_scaled_matrix():
    g = torch.Generator().manual_seed(0)
    j = torch.randn(50, 4, generator=g, dtype=torch.float64)
    j[:, 3] = j[:, 0] + j[:, 1]  # a direction the data do not determine
    j = j * torch.tensor([1e4, 1.0, 1e-3, 1.0], dtype=torch.float64)
    h = j.T @ j
    p = psd_pseudo_inverse(h)
    assert torch.allclose(h @ p @ h, h, rtol=1e-8, atol=1e-8 * float(h.abs().max()))
    assert torch.allclose(p @ h @ p, p, rtol=1e-8, atol=1e-8 * float(p.abs().max()))
    assert torch.allclose(p, p.T, rtol=1e-10, atol=1e-12 * float(p.abs().max()))
    full = h[:3, :3]
    assert torch.allclose(psd_pseudo_inverse(full), torch.linalg.inv(full), rtol=1e-9)


def test_a_non_finite_information_is_refused():
    h = torch.eye(3, dtype=torch.float64)
    h[1, 2] = h[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or an infinity"):
        psd_pseudo_inverse(h)
