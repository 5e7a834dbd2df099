"""The spline_kk site model: its Kramers-Kronig pair against an independent principal-value
quadrature, the reference at theta = 0, gradients, the prior and the matched edge shift
against closed forms, and a refinement of in-memory stills whose truth is the reference moved
by +2 eV (pure torch + scipy; no DIALS)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import chi2

from spread_dials.parallel import Parallel
from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.physics.crystal import real_space_from_cell
from spread_dials.physics.kramers_kronig import kramers_kronig
from spread_dials.physics.sparse import miller_indices_within
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.derivatives import value_and_jacobian
from spread_dials.refine.engine import Refinement, RefineSettings, make_caches
from spread_dials.refine.profiles import CrystalModel
from spread_dials.refine.references import matched_edge_shifts
from spread_dials.refine.sites import EdgeShiftSites, SplineKKSites
from spread_dials.refine.synthetic import synthetic_shots
from spread_dials.refine.uncertainty import curvature
from spread_dials.validation.anomalous import figure9_report

from ..physics.scene_factory import grid_panels

f64 = torch.float64
NODES = torch.arange(7100.0, 7141.0, 2.0, dtype=f64)


def _kk_reference(edge_eV: float = 7120.0, label: str = "ref") -> TabulatedCurve:
    """A K edge whose f' is the Kramers-Kronig transform of its f'' (so that a shifted copy is
    again a Kramers-Kronig pair to ~1e-3 e): f'' a logistic step from 0.5 to 4 e of width
    1.5 eV on 6000-9000 eV, f' its exact transform, tabulated every 0.5 eV on 7000-7300 eV."""
    wide = torch.arange(6000.0, 9000.0, 0.5, dtype=f64)
    fdp = 0.5 + 3.5 / (1 + torch.exp(-(wide - edge_eV) / 1.5))
    keep = (wide >= 7000.0) & (wide < 7300.0)
    return TabulatedCurve(wide[keep], kramers_kronig(wide, fdp, wide[keep]), fdp[keep], label)


def _principal_value_kk(change, breakpoints: list[float], at_eV: float) -> float:
    """f'(E) = (1/pi) P int f''(x) [1/(E - x) - 1/(E + x)] dx by scipy's QUADPACK: the Cauchy
    weight (QAWC) on the piece holding E, plain adaptive quadrature on the others (split at
    the nodes, where the cubic's second derivative jumps)."""
    total = 0.0
    for a, b in zip(breakpoints[:-1], breakpoints[1:]):
        if a < at_eV < b:  # quad's weight "cauchy" integrates f(x) / (x - wvar)
            total -= quad(change, a, b, weight="cauchy", wvar=at_eV, epsabs=1e-12, limit=200)[0]
        else:
            total += quad(lambda x: change(x) / (at_eV - x), a, b, epsabs=1e-12, limit=200)[0]
        total -= quad(lambda x: change(x) / (at_eV + x), a, b, epsabs=1e-12, limit=200)[0]
    return total / math.pi


def test_theta_zero_gives_the_references_exactly():
    """Two groups, three sites with their own references: at theta = 0 every site's curves are
    its reference's, bit for bit, inside, at and beyond the nodes."""
    refs = [_kk_reference(7120.0, "a"), _kk_reference(7118.0, "b"), _kk_reference(7123.0, "c")]
    sites = SplineKKSites(refs, [0, 1, 0], ["g0", "g1"], NODES)
    energy = torch.cat([torch.arange(7050.0, 7200.0, 0.37, dtype=f64), NODES])
    fp, fdp = sites.curves(sites.initial(), energy)
    for s, ref in enumerate(refs):
        want_fp, want_fdp = ref.at(energy)
        assert torch.equal(fp[s], want_fp) and torch.equal(fdp[s], want_fdp)


def test_f_double_prime_change_is_the_node_values_and_vanishes_beyond():
    """The change of f'' equals theta at the nodes (interpolation), is zero beyond two node steps
    past either end, and is shared by the sites of a group."""
    refs = [_kk_reference(), _kk_reference()]
    sites = SplineKKSites(refs, [0, 0], ["g"], NODES)
    theta = torch.randn(NODES.numel(), generator=torch.Generator().manual_seed(4), dtype=f64)
    _, fdp = sites.curves(theta, NODES)
    assert torch.allclose(fdp[0] - refs[0].at(NODES)[1], theta, atol=1e-12)
    assert torch.equal(fdp[0], fdp[1])
    outside = torch.tensor([7000.0, 7095.9, 7144.1, 7250.0], dtype=f64)
    _, fdp_out = sites.curves(theta, outside)
    assert torch.equal(fdp_out[0], refs[0].at(outside)[1])


@pytest.mark.parametrize("node", [0, 9, 20])
def test_kramers_kronig_pair_matches_principal_value_quadrature(node):
    """A unit change at one node: the model's change of f' against scipy's principal-value
    integral of the model's own change of f'' (below, inside and above the band, on and off the
    nodes).  The model transforms the change sampled every 0.05 eV, so it differs from the
    transform of the cubic by O(0.05^2 times its second derivative), ~2e-4 e.  The integrand
    is the model's f'' change, a cubic on each piece between nodes, read off the model at four
    points per piece (checked against the model at two others) so that QUADPACK calls numpy."""
    ref = _kk_reference()
    sites = SplineKKSites([ref], [0], ["g"], NODES)
    theta = torch.zeros(NODES.numel(), dtype=f64)
    theta[node] = 1.0
    step = float(NODES[1] - NODES[0])
    breakpoints = [float(NODES[0]) - 2 * step, float(NODES[0]) - step, *NODES.tolist(), float(NODES[-1]) + step,
                   float(NODES[-1]) + 2 * step]  # fmt: skip
    pieces = []
    for a, b in zip(breakpoints[:-1], breakpoints[1:]):
        x = torch.tensor([a + 0.1, a + 0.7, a + 1.3, b - 0.1], dtype=f64)
        poly = np.polyfit(x.numpy() - a, (sites.curves(theta, x)[1][0] - ref.at(x)[1]).numpy(), 3)
        probe = torch.tensor([a + 0.45, b - 0.33], dtype=f64)
        model = (sites.curves(theta, probe)[1][0] - ref.at(probe)[1]).numpy()
        assert np.allclose(np.polyval(poly, probe.numpy() - a), model, atol=1e-9)
        pieces.append((a, b, poly))

    def change(x: float) -> float:
        for a, b, poly in pieces:
            if a <= x <= b:
                return float(np.polyval(poly, x - a))
        return 0.0

    at = [7050.0, 7099.3, float(NODES[node]) + 0.3, float(NODES[node]) + 1.0, 7117.77, 7141.5, 7180.0, 7400.0]
    fp, _ = sites.curves(theta, torch.tensor(at, dtype=f64))
    model = fp[0] - ref.at(torch.tensor(at, dtype=f64))[0]
    expected = torch.tensor([_principal_value_kk(change, breakpoints, e) for e in at], dtype=f64)
    assert torch.allclose(model, expected, atol=5e-4, rtol=0), (model - expected).tolist()
    assert expected.abs().max() > 0.2  # a real signal


def test_curves_gradcheck_and_forward_mode():
    """gradcheck of (f', f'') in theta (two groups, channels inside and outside the nodes), and
    forward-mode (jacfwd) equals reverse-mode and the two reverse passes the information uses
    (refine.derivatives.value_and_jacobian)."""
    sites = SplineKKSites([_kk_reference(), _kk_reference(7121.0)], [0, 1], ["a", "b"], NODES)
    energy = torch.tensor([7090.0, 7101.3, 7119.9, 7120.0, 7135.2, 7160.0], dtype=f64)
    theta = torch.randn(sites.initial().numel(), generator=torch.Generator().manual_seed(1), dtype=f64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sites.curves(t, energy), (theta,))
    assert torch.autograd.gradgradcheck(lambda t: sites.curves(t, energy), (theta,))
    fwd = torch.func.jacfwd(lambda t: torch.cat(sites.curves(t, energy)))(theta.detach())
    rev = torch.func.jacrev(lambda t: torch.cat(sites.curves(t, energy)))(theta.detach())
    assert torch.allclose(fwd, rev, atol=1e-12)
    assert torch.allclose(value_and_jacobian(lambda t: torch.cat(sites.curves(t, energy)), theta.detach())[1], rev, atol=1e-12)


def test_negative_log_prior_closed_form():
    """0.5 (sum (second differences)^2 / sigma_s^2 + sum theta^2 / sigma_c^2), with numpy."""
    sites = SplineKKSites([_kk_reference(), _kk_reference()], [0, 1], ["a", "b"], NODES, smoothness_sigma_e=0.3,
                          change_sigma_e=1.7)  # fmt: skip
    theta = torch.randn(2 * NODES.numel(), generator=torch.Generator().manual_seed(2), dtype=f64)
    d = theta.numpy().reshape(2, -1)
    expected = 0.5 * ((np.diff(d, n=2, axis=1) ** 2).sum() / 0.3**2 + (d**2).sum() / 1.7**2)
    assert float(sites.negative_log_prior(theta)) == pytest.approx(expected, rel=1e-12)
    assert sites.parameter_names()[NODES.numel()] == "f_double_prime_change[b]@7100.0eV"


def test_matched_edge_shift_of_an_edge_shift_model_is_its_parameter():
    """For the edge_shift model (curves = the reference moved by theta) the matched shift is
    theta and its Jacobian the identity (closed form)."""
    refs = [_kk_reference(), _kk_reference(7118.0)]
    sites = EdgeShiftSites(refs, [0, 1], ["a", "b"])
    theta = torch.tensor([1.37, -0.82], dtype=f64)
    shifts, jac = matched_edge_shifts(sites, theta, refs, 7105.0, 7135.0)
    assert torch.allclose(shifts, theta, atol=1e-6)
    assert torch.allclose(jac, torch.eye(2, dtype=f64), atol=1e-5)


def test_matched_edge_shift_jacobian_against_finite_differences():
    """d shift / d theta by implicit differentiation against central differences of the shift."""
    ref = _kk_reference()
    sites = SplineKKSites([ref], [0], ["g"], NODES)
    theta = ref.at(NODES, 1.0)[1] - ref.at(NODES)[1]  # the f'' change of a +1 eV shift at the nodes
    shifts, jac = matched_edge_shifts(sites, theta, [ref], 7105.0, 7135.0)
    h = 1e-4
    for k in (5, 9, 10, 11, 15):
        step = torch.zeros_like(theta)
        step[k] = h
        up = matched_edge_shifts(sites, theta + step, [ref], 7105.0, 7135.0, jacobian=False)[0]
        down = matched_edge_shifts(sites, theta - step, [ref], 7105.0, 7135.0, jacobian=False)[0]
        assert float(jac[0, k]) == pytest.approx(float((up - down) / (2 * h)), rel=1e-4, abs=1e-6)
    assert float(jac.abs().max()) > 0.1


TRUTH_EV = 2.0


@pytest.fixture(scope="module")
def recovered():
    """2 in-memory stills (15 channels 2 eV apart, 7106-7134 eV) made with the reference moved by
    +2 eV (f' and f'' together), refined with spline_kk (16 nodes 2 eV apart) from theta = 0:
    (sites, reference, refined theta, Fisher covariance, seconds)."""
    t0 = time.perf_counter()
    ref = _kk_reference()
    energy = torch.arange(7106.0, 7135.0, 2.0, dtype=f64)
    cell = real_space_from_cell(torch.tensor([34.1, 34.9, 43.7, 90.0, 90.0, 90.0], dtype=f64))
    hkl = miller_indices_within(cell, 2.0)
    gen = torch.Generator().manual_seed(100)
    n = hkl.shape[0]
    F0 = torch.complex(torch.randn(n, generator=gen, dtype=f64), torch.randn(n, generator=gen, dtype=f64)) * 20
    G = torch.polar(torch.ones(n, dtype=f64), 2 * math.pi * torch.rand(n, generator=gen, dtype=f64)).unsqueeze(-1)
    fp, fdp = ref.at(energy, TRUTH_EV)
    truth = StructureFactors(hkl, F0, G, fp.unsqueeze(0), fdp.unsqueeze(0))
    panels = grid_panels(n_fast=160, n_slow=160, pixel_mm=0.1, distance_mm=40.0, grid=(2, 2), gap_mm=0.5, tilt_deg=0.0)
    model = CrystalModel((20.0,) * 3, 0.1, 2)
    shots, _ = synthetic_shots(panels, truth, model, cell, energy, n_shots=2, seed=0, spot_scale=10000.0,
                               min_bragg_photons=50.0, orientation_error_deg=0.0, max_box_px=15)  # fmt: skip
    nodes = torch.arange(7106.0, 7137.0, 2.0, dtype=f64)
    sites = SplineKKSites([ref], [0], ["Fe"], nodes)
    caches = make_caches(shots, StructureFactors(hkl, F0, G), model)
    r = Refinement(shots, [0, 1], 2, caches, [], sites, sites.initial(), model, Parallel(),
                   RefineSettings(macrocycles=2, relinearisations=1, refine_orientation=False, stage1_iterations=20))  # fmt: skip
    r.initialise_states()
    r.run()
    cov = curvature(r, observed=False).profiled
    return sites, ref, r.theta, cov, time.perf_counter() - t0


def test_refinement_recovers_the_f_double_prime_change(recovered):
    """The refined node changes against the true change (the reference moved by +2 eV minus the
    reference, at the nodes): chi^2 with the Fisher covariance below its 99.9 % quantile."""
    sites, ref, theta, cov, seconds = recovered
    true = ref.at(sites.nodes_eV, TRUTH_EV)[1] - ref.at(sites.nodes_eV)[1]
    d = theta - true
    statistic = float(d @ torch.linalg.solve(cov, d))
    assert statistic < chi2.ppf(0.999, d.numel()), (theta.tolist(), true.tolist(), cov.diag().sqrt().tolist())
    # and the data, not the prior, moved it: the change at the edge is clearly negative
    edge = (sites.nodes_eV >= 7118) & (sites.nodes_eV <= 7124)
    assert float(theta[edge].mean()) < -0.3
    print(f"spline_kk recovery: chi2 {statistic:.1f} for {d.numel()} nodes, {seconds:.1f} s")


def test_refinement_recovers_the_edge_position(recovered):
    """The matched edge shift of the refined curves is within 3 sigma (covariance propagated by
    its Jacobian) of the truth, +2 eV, with sigma < 1 eV; Figure 9 against the truth: the refined
    f'' is closer to the truth than the starting reference is."""
    sites, ref, theta, cov, _ = recovered
    shifts, jac = matched_edge_shifts(sites, theta, [ref], 7106.0, 7134.0)
    sigma = float((jac @ cov @ jac.T)[0, 0].sqrt())
    assert abs(float(shifts[0]) - TRUTH_EV) < 3 * sigma and sigma < 1.0, (float(shifts[0]), sigma)
    truth = ref.shifted(TRUTH_EV, "truth")
    report = figure9_report(sites, theta, [truth], ["A/FE"], ["Fe"], [ref], (7106.0, 7134.0))
    start = figure9_report(sites, torch.zeros_like(theta), [truth], ["A/FE"], ["Fe"], [ref], (7106.0, 7134.0))
    assert report["A/FE"]["rmsd_f_double_prime_e"] < 0.6 * start["A/FE"]["rmsd_f_double_prime_e"]
    assert report["A/FE"]["cc_f_double_prime"] > start["A/FE"]["cc_f_double_prime"]
    print(f"spline_kk edge shift {float(shifts[0]):.3f} +- {sigma:.3f} eV (truth {TRUTH_EV}); figure 9 {report['A/FE']}")
