"""Anomalous-scattering models: interpolation, edge shifts, free channels, oxidation states.

Pure torch (no cctbx): the references are analytic curves built here and the measured
rubredoxin tables.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spread_dials.io.anomalous_tables import read_anomalous_table
from spread_dials.physics.anomalous import (
    EdgeShiftModel,
    FreeChannelModel,
    TabulatedCurve,
    band_kramers_kronig_matrix,
    interpolate_cubic,
    interpolate_linear,
    second_difference_penalty,
)
from spread_dials.physics.kramers_kronig import kramers_kronig
from spread_dials.physics.oxidation_states import (
    DEFAULT_MN_EDGE_EV,
    edge_energy,
    fe_rubredoxin_states,
    mn_edge_shifts_eV,
    mn_oxidation_state_curves,
)

f64 = torch.float64


def step_edge_curve(edge_eV: float = 6539.0, lo: float = 6000.0, hi: float = 7500.0, step: float = 0.5) -> TabulatedCurve:
    """A smooth synthetic K edge: f'' = 0.46 + 3.5 / (1 + exp(-(E - edge) / 1.5)), f' its transform."""
    E = torch.arange(lo, hi, step, dtype=f64)
    fdp = 0.46 + 3.5 / (1 + torch.exp(-(E - edge_eV) / 1.5))
    wide = torch.arange(lo - 3000, hi + 3000, step, dtype=f64)
    fdp_wide = 0.46 + 3.5 / (1 + torch.exp(-(wide - edge_eV) / 1.5))
    return TabulatedCurve(E, kramers_kronig(wide, fdp_wide, E), fdp, label="synthetic")


def test_interpolate_linear_matches_numpy_and_batches():
    xp = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=f64)
    fp = torch.tensor([[0.0, 1.0, -1.0, 2.0], [1.0, 1.0, 1.0, 1.0]], dtype=f64)
    x = torch.tensor([[0.5, 1.0, 1.5, 3.0, 4.0, 6.9, 8.0], [2.5, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5]], dtype=f64)
    y = interpolate_linear(x, xp, fp)
    for s in range(2):
        assert np.allclose(y[s].numpy(), np.interp(x[s].numpy(), xp.numpy(), fp[s].numpy()))
    assert interpolate_linear(torch.tensor([3.0], dtype=f64), xp, fp).shape == (2, 1)  # x broadcast over rows


def test_edge_shift_semantics_and_gradient():
    curve = step_edge_curve()
    E = torch.arange(6520.0, 6560.0, 1.0, dtype=f64)
    model = EdgeShiftModel([curve, curve], torch.tensor([0.0, 2.0], dtype=f64))
    fp, fdp = model(E)
    assert fp.shape == fdp.shape == (2, 40)
    # site 1's curve is site 0's moved up by 2 eV: f_1(E) = f_0(E - 2)
    fp0, fdp0 = curve.at(E - 2.0)
    assert torch.allclose(fdp[1], fdp0) and torch.allclose(fp[1], fp0)
    assert torch.allclose(model(E)[1][1], curve.shifted(2.0).at(E)[1])
    # d f''/d(Delta E) = -slope of the table (analytic: the logistic's derivative)
    (fdp[1].sum()).backward()
    x = (E - 2.0 - 6539.0) / 1.5
    analytic = -(3.5 / 1.5 * torch.exp(-x) / (1 + torch.exp(-x)) ** 2).sum()
    assert model.edge_shift_eV.grad[1].item() == pytest.approx(analytic.item(), rel=2e-3)
    assert model.edge_shift_eV.grad[0].item() == 0.0


def test_interpolate_cubic_matches_scipy_hermite_and_is_smooth():
    """Against scipy's CubicHermiteSpline with the same node slopes (independent evaluation), and
    the derivative in x continuous across nodes (where the linear one jumps)."""
    from scipy.interpolate import CubicHermiteSpline

    xp = torch.tensor([0.0, 0.5, 1.5, 2.0, 3.5, 4.0], dtype=f64)
    fp = torch.tensor([[1.0, 2.0, 0.5, 3.0, 2.5, 4.0], [0.0, -1.0, 1.0, 0.0, 2.0, 1.0]], dtype=f64)
    x = torch.linspace(0.0, 4.0, 41, dtype=f64)
    y = interpolate_cubic(x, xp, fp)
    xn, fn = xp.numpy(), fp.numpy()
    slopes = np.gradient(fn, xn, axis=-1, edge_order=1)
    slopes[:, 1:-1] = (fn[:, 2:] - fn[:, :-2]) / (xn[2:] - xn[:-2])
    for row in range(2):
        ref = CubicHermiteSpline(xn, fn[row], slopes[row])(x.numpy())
        np.testing.assert_allclose(y[row].numpy(), ref, rtol=1e-12, atol=1e-12)
    node = 1.5
    for fn_ in (interpolate_cubic, interpolate_linear):
        left, right = [torch.tensor([node + d], dtype=f64, requires_grad=True) for d in (-1e-7, 1e-7)]
        gl = torch.autograd.grad(fn_(left, xp, fp[0]).sum(), left)[0]
        gr = torch.autograd.grad(fn_(right, xp, fp[0]).sum(), right)[0]
        jump = abs(float(gl - gr))
        if fn_ is interpolate_cubic:
            assert jump < 1e-5
        else:
            assert jump > 1.0


def test_edge_shift_with_different_grids_and_frozen_shift(shared_data):
    ox = read_anomalous_table(shared_data / "anomalous" / "pf-rd-ox_fftkk.out")
    fake = read_anomalous_table(shared_data / "anomalous" / "Fe_fake.dat")
    E = torch.arange(7090.0, 7140.0, 1.0, dtype=f64)
    model = EdgeShiftModel([ox, fake], refine=False)
    assert not model.edge_shift_eV.requires_grad
    fp, fdp = model(E)
    assert torch.allclose(fdp[0], interpolate_cubic(E, ox.energy_eV, ox.f_double_prime))
    assert torch.allclose(fp[1], interpolate_cubic(E, fake.energy_eV, fake.f_prime))
    if torch.cuda.is_available():
        fp_gpu, _ = model.to("cuda")(E.cuda())
        assert torch.allclose(fp_gpu.cpu(), fp)


def test_free_channel_model_priors():
    curve = step_edge_curve()
    E = torch.arange(6500.0, 6600.0, 1.0, dtype=f64)
    model = FreeChannelModel(E, [curve, curve])
    fp, fdp = model()
    assert fp.shape == (2, 100)
    assert model.kramers_kronig_penalty().item() == 0.0
    # a Kramers-Kronig-consistent change: the same curve 1.5 eV higher
    with torch.no_grad():
        moved_fp, moved_fdp = curve.at(E, 1.5)
        model.f_prime[0] = moved_fp
        model.f_double_prime[0] = moved_fdp
    consistent = model.kramers_kronig_residual()[0, 5:-5].abs().max().item()
    # an inconsistent one: f'' moved, f' left behind
    with torch.no_grad():
        model.f_prime[0] = curve.at(E)[0]
    inconsistent = model.kramers_kronig_residual()[0, 5:-5].abs().max().item()
    assert consistent < 0.02 and inconsistent > 20 * consistent, (consistent, inconsistent)  # seen 0.011, 0.48
    # gradients reach every value
    loss = model.negative_log_prior(0.05, 0.05)
    loss.backward()
    assert (model.f_prime.grad[0] != 0).any() and (model.f_double_prime.grad[0] != 0).any()
    with pytest.raises(ValueError):
        model(E[:-1])


def test_second_difference_penalty_is_zero_for_lines():
    E = torch.tensor([1.0, 2.0, 4.0, 5.0, 9.0], dtype=f64)
    assert second_difference_penalty((3 * E - 1).unsqueeze(0), E).item() == pytest.approx(0.0, abs=1e-20)
    assert second_difference_penalty((E**2).unsqueeze(0), E).item() > 0


def test_band_matrix_matches_full_transform():
    """The band matrix is the transform of a perturbation that vanishes outside the band."""
    E = torch.arange(7000.0, 7100.0, 1.0, dtype=f64)
    bump = torch.exp(-0.5 * ((E - 7050.0) / 8.0) ** 2)
    K = band_kramers_kronig_matrix(E)
    wide = torch.cat([torch.tensor([6999.0], dtype=f64), E, torch.tensor([7100.0], dtype=f64)])
    full = kramers_kronig(wide, torch.cat([torch.zeros(1, dtype=f64), bump, torch.zeros(1, dtype=f64)]), E)
    assert torch.allclose(K @ bump, full, atol=1e-12)


def test_fe_oxidation_states_from_measured_pair(shared_data):
    ox = read_anomalous_table(shared_data / "anomalous" / "pf-rd-ox_fftkk.out")
    red = read_anomalous_table(shared_data / "anomalous" / "pf-rd-red_fftkk.out")
    states = fe_rubredoxin_states(ox, red)
    assert states[2].label == "Fe(II)" and states[3].label == "Fe(III)"
    # MANIFEST: steepest f'' rise at ~7118 (ox) and ~7117 eV (red): Fe(III) about 1 eV higher
    e3 = edge_energy(states[3], 7100.0, 7140.0, smoothing_eV=1.0)
    e2 = edge_energy(states[2], 7100.0, 7140.0, smoothing_eV=1.0)
    assert e3 == pytest.approx(7118.0, abs=1.0) and e2 == pytest.approx(7117.0, abs=1.0)
    assert 0.5 < e3 - e2 < 2.5


def test_mn_states_are_edge_shifted_references():
    free_atom = step_edge_curve(6539.0)  # stands in for the free-atom table (tests/adapters uses Sasaki's)
    assert edge_energy(free_atom, 6500.0, 6600.0) == pytest.approx(6539.0, abs=0.01)
    curves = mn_oxidation_state_curves(free_atom)
    assert [c.label for c in curves.values()] == ["Mn(II)", "Mn(III)", "Mn(IV)"]
    for state, curve in curves.items():
        assert edge_energy(curve, 6500.0, 6600.0) == pytest.approx(DEFAULT_MN_EDGE_EV[state], abs=0.01)
    shifts = mn_edge_shifts_eV(free_atom, (3, 4))
    assert shifts[4] - shifts[3] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="oxidation state"):
        mn_edge_shifts_eV(free_atom, (7,))
