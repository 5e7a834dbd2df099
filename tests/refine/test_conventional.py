"""The conventional route (refine/conventional.py): summation integration against closed-form
boxes, the binned fit against its own model (exact recovery, and its covariance against the
spread of noisy replicates), the edge-shift fit against a known shift, the energy bins."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.refine.conventional import (
    BinnedFit,
    Reflections,
    _model,
    edge_shifts_from_bins,
    energy_bins,
    fit_binned,
    summation_reflections,
)
from spread_dials.refine.model import ShotCache
from spread_dials.refine.profiles import ShotProfiles


def test_summation_of_a_spot_on_a_flat_background():
    """Two 5 x 4 boxes: background b per pixel plus a spot whose per-channel photons are known;
    I = the spot's photons, var = sum of counts + n^2 b / n_border, the energy the channels'
    mean weighted by the spot's per-channel profile, the partiality the profile's sum."""
    energy = torch.tensor([7110.0, 7120.0, 7130.0], dtype=torch.float64)
    nf, ns = torch.tensor([5, 5]), torch.tensor([4, 4])
    n = 40
    box = torch.repeat_interleave(torch.arange(2), 20)
    local = torch.arange(n) % 20
    fast = (local % 5).double() - 2.0
    slow = (local // 5).double() - 1.5
    profile = torch.zeros((n, 3), dtype=torch.float64)
    inner = (fast.abs() < 2) & (slow.abs() < 1.5)  # the 3 x 2 centre of each box
    profile[inner & (box == 0)] = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64) * 1e-3
    profile[inner & (box == 1)] = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64) * 1e-3
    spot = torch.tensor([700.0, 1300.0], dtype=torch.float64)
    per_box = torch.zeros(2, dtype=torch.float64).index_add(0, box, profile.sum(-1))
    counts = 4.0 + spot[box] * profile.sum(-1) / per_box[box]
    cache = ShotCache(box, fast, slow, counts, torch.ones(n, dtype=torch.bool), torch.ones(2, dtype=torch.complex128),
                      torch.ones((2, 1), dtype=torch.complex128), energy,
                      ShotProfiles(torch.zeros(3, dtype=torch.float64), profile, None))  # fmt: skip
    refl = summation_reflections([cache], [SimpleNamespace(n_fast=nf, n_slow=ns, n_shoeboxes=2)])
    assert refl.intensity.tolist() == pytest.approx(spot.tolist(), rel=1e-12)
    n_border = 14  # 5 x 4 minus the 3 x 2 inside
    assert refl.variance.tolist() == pytest.approx((spot + 20 * 4.0 + 20**2 * 4.0 / n_border).tolist(), rel=1e-12)
    assert refl.energy_eV.tolist() == pytest.approx([7120.0, 7127.5], abs=1e-9)
    assert refl.partiality.tolist() == pytest.approx([6 * 4e-3, 6 * 4e-3], rel=1e-12)


def _reflections(g, n_refl: int, n_stills: int, fp, fdp, edges, noise: float = 0.0):
    F0 = torch.complex(torch.randn(n_refl, generator=g, dtype=torch.float64),
                       torch.randn(n_refl, generator=g, dtype=torch.float64)) * 30  # fmt: skip
    G = torch.polar(torch.full((n_refl, 1), 1.7, dtype=torch.float64),
                    2 * math.pi * torch.rand(n_refl, 1, generator=g, dtype=torch.float64))  # fmt: skip
    still = torch.randint(0, n_stills, (n_refl,), generator=g)
    energy = edges[0] + (edges[-1] - edges[0]) * torch.rand(n_refl, generator=g, dtype=torch.float64)
    partiality = 0.001 + 0.005 * torch.rand(n_refl, generator=g, dtype=torch.float64)
    scale = 1e4 * (1 + 0.3 * torch.rand(n_stills, generator=g, dtype=torch.float64))
    bin_of = torch.bucketize(energy, edges) - 1
    mean = scale[still] * partiality * _model(SimpleNamespace(F0=F0, G=G), bin_of, fp, fdp)
    return Reflections(mean, mean.clone(), still, energy, partiality, F0, G), scale


def test_the_binned_fit_recovers_its_own_model_and_its_covariance_matches_noisy_replicates():
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([7110.0, 7115, 7120, 7125, 7130], dtype=torch.float64)
    fp = torch.tensor([[-5.0], [-6.0], [-7.5], [-6.5]], dtype=torch.float64)
    fdp = torch.tensor([[0.8], [1.2], [2.5], [3.5]], dtype=torch.float64)
    start = (torch.full((4, 1), -6.0, dtype=torch.float64), torch.full((4, 1), 1.5, dtype=torch.float64))
    exact, scale = _reflections(g, 400, 10, fp, fdp, edges)
    fit = fit_binned(exact, 10, edges, start)
    assert torch.allclose(fit.f_prime, fp, atol=1e-8) and torch.allclose(fit.f_double_prime, fdp, atol=1e-8)
    assert torch.allclose(fit.scale, scale, rtol=1e-10)
    # Gaussian noise of the stated variance, 60 replicates: the spread of f'' per bin against
    # the fit's covariance (scales profiled out)
    rng = np.random.default_rng(1)
    draws = []
    for _ in range(60):
        noisy = exact.intensity + exact.variance.sqrt() * torch.as_tensor(rng.normal(size=400))
        draws.append(fit_binned(Reflections(noisy, *[getattr(exact, f) for f in ("variance", "still", "energy_eV",
                                 "partiality", "F0", "G")]), 10, edges, start).f_double_prime[:, 0])  # fmt: skip
    spread = torch.stack(draws).std(0)
    predicted = fit.covariance.diagonal()[4:].sqrt()
    assert torch.allclose(spread, predicted, rtol=0.3), (spread, predicted)  # 60 replicates: sd known to ~10 %


def test_edge_shift_of_binned_curves_of_a_shifted_reference():
    e = torch.arange(7000.0, 7300.0, 0.5, dtype=torch.float64)
    ref = TabulatedCurve(e, -8.0 + 2.0 * torch.tanh((e - 7120) / 6.0), 2.0 + 1.5 * torch.tanh((e - 7122) / 4.0))
    centres = torch.arange(7108.0, 7134.0, 2.0, dtype=torch.float64)
    fp, fdp = ref.at(centres, torch.tensor(1.3, dtype=torch.float64))
    k = centres.numel()
    fit = BinnedFit(centres, fp.unsqueeze(-1), fdp.unsqueeze(-1), 0.01 * torch.eye(2 * k, dtype=torch.float64),
                    torch.ones(1, dtype=torch.float64), torch.full((k,), 50))  # fmt: skip
    delta, cov = edge_shifts_from_bins(fit, [ref])
    assert float(delta[0]) == pytest.approx(1.3, abs=1e-6)
    # closed form: var = 0.01 / sum_k (f'_k'^2 + f''_k'^2), derivatives of the tanh forms at E_k - 1.3
    x = centres - 1.3
    slope_fp = 2.0 / 6.0 / torch.cosh((x - 7120) / 6.0) ** 2
    slope_fdp = 1.5 / 4.0 / torch.cosh((x - 7122) / 4.0) ** 2
    assert float(cov[0, 0]) == pytest.approx(0.01 / float((slope_fp**2 + slope_fdp**2).sum()), rel=0.02)


def test_energy_bins_drop_sparse_ends_and_merge_sparse_inner_bins():
    energy = torch.cat([torch.full((3,), 7100.5), torch.full((30,), 7102.5), torch.full((5,), 7103.5),
                        torch.full((40,), 7105.5), torch.full((2,), 7109.5)]).double()  # fmt: skip
    edges = energy_bins(energy, 1.0, min_reflections=20)
    counts = torch.histogram(energy, edges).hist
    assert float(edges[0]) == 7102.0 and float(edges[-1]) == 7106.0  # the ends with 3 and 2 dropped
    assert bool((counts >= 20).all()) and int(counts.sum()) == 75
    with pytest.raises(ValueError, match="cannot fill one bin"):
        energy_bins(energy[:10], 1.0, min_reflections=20)
