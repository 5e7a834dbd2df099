"""The refinement engine on small in-memory stills (pure torch; references: the kernel itself,
finite differences, autograd's gradcheck)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from spread_dials.parallel import Parallel
from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.physics.crystal import real_space_from_cell
from spread_dials.physics.sparse import BraggWindows, miller_indices_within, window_photons
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.engine import Refinement, RefineSettings, make_caches, table_rows
from spread_dials.refine.model import intensities
from spread_dials.refine.profiles import CrystalModel, shoebox_windows, shot_profiles, shot_scene, stills_profiles
from spread_dials.refine.sites import EdgeShiftSites
from spread_dials.refine.synthetic import synthetic_shots

from ..physics.scene_factory import grid_panels

E = torch.arange(7110.0, 7130.0, 2.0, dtype=torch.float64)


def _reference() -> TabulatedCurve:
    """A smooth synthetic K edge: f'' a logistic step, f' a dip at the edge (electrons)."""
    e = torch.arange(7000.0, 7300.0, 0.5, dtype=torch.float64)
    fdp = 0.5 + 3.5 / (1 + torch.exp(-(e - 7120.0) / 1.5))
    fp = -2.0 - 5.0 * torch.exp(-0.5 * ((e - 7119.0) / 3.0) ** 2)
    return TabulatedCurve(e, fp, fdp, "ref")


@pytest.fixture(scope="module")
def problem():
    ref = _reference()
    cell = real_space_from_cell(torch.tensor([34.1, 34.9, 43.7, 90.0, 90.0, 90.0], dtype=torch.float64))
    hkl = miller_indices_within(cell, 2.0)
    gen = torch.Generator().manual_seed(1)
    n = hkl.shape[0]
    F0 = torch.polar(5 + 10 * torch.rand(n, generator=gen, dtype=torch.float64),
                     2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64))  # fmt: skip
    G = torch.polar(torch.ones(n, dtype=torch.float64), 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)).unsqueeze(-1)
    fp, fdp = ref.at(E, 2.0)
    truth = StructureFactors(hkl, F0, G, fp.unsqueeze(0), fdp.unsqueeze(0))
    panels = grid_panels(n_fast=160, n_slow=160, pixel_mm=0.1, distance_mm=40.0, grid=(2, 2), gap_mm=0.5, tilt_deg=0.0)
    model = CrystalModel((12.0, 12.0, 12.0), 0.05, 2, seed=1)
    shots, _ = synthetic_shots(panels, truth, model, cell, E, n_shots=2, seed=3, spot_scale=50.0, min_bragg_photons=5.0)
    table = StructureFactors(hkl, F0, G)
    return shots, table, truth, model, ref


def test_cached_profiles_equal_the_full_kernel(problem):
    """sum_c profile_c * |F(h, E_c)|^2 == window_photons with the same f', f'' (< 1e-6 relative)."""
    shots, table, truth, model, _ = problem
    shot = shots.shots[0]
    rotation = torch.tensor([1e-4, -2e-4, 5e-5], dtype=torch.float64)
    profiles = shot_profiles(shots, shot, model, rotation, jacobian=False)
    cache = make_caches(shots, table, model, [rotation, rotation])[0]
    cached = (profiles.profile * intensities(cache.F0, cache.G, truth.f_prime, truth.f_double_prime)[cache.pixel_shoebox]).sum(-1)
    scene = shot_scene(shots, shot, model, rotation)
    scene = type(scene)(scene.panels, scene.sources, scene.crystal, truth, scene.oversample)
    w = shoebox_windows(shot, model.mosaic_domains)
    w = BraggWindows(w.miller_index, truth.index_of(w.miller_index), w.domain, w.panel, w.fast0, w.slow0, w.n_fast, w.n_slow)
    _, photons = window_photons(scene, w)
    full = photons.view(model.mosaic_domains, -1).sum(0)
    assert full.max() > 0
    assert torch.allclose(cached, full, rtol=1e-6, atol=1e-9 * float(full.max()))


def test_stills_made_together_equal_each_made_alone(problem):
    """Two stills' profiles and offset derivatives made in one kernel call (each still's
    crystal its own block of domains, unit channel weights scaled after: the GPU's path, forced
    here on the CPU) equal each still's made alone, to 1e-10 relative; the stills have
    different spectra weights and crystal offsets."""
    shots, _, _, model, _ = problem
    assert not torch.equal(shots.shots[0].weight, shots.shots[1].weight)
    rotations = [torch.tensor([1e-4, -2e-4, 5e-5], dtype=torch.float64), torch.tensor([-3e-4, 1e-4, 2e-4], dtype=torch.float64)]
    cells = [torch.tensor([1e-3, -5e-4, 2e-4], dtype=torch.float64), torch.tensor([0.0, 2e-4, -1e-4], dtype=torch.float64)]
    together = stills_profiles(shots, shots.shots, model, rotations, cells, together=True)
    for k, shot in enumerate(shots.shots):
        alone = shot_profiles(shots, shot, model, rotations[k], cell=cells[k])
        for a, b in ((together[k].profile, alone.profile), (together[k].jacobian, alone.jacobian)):
            assert a.shape == b.shape and float(b.abs().max()) > 0
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))


def test_select_keeps_the_chosen_stills_in_order_with_their_sources(problem):
    shots = problem[0]
    shots = replace(shots, sources=["a.h5 0", "a.h5 1"])
    picked = shots.select([1, 0])
    assert picked.shots[0] is shots.shots[1] and picked.shots[1] is shots.shots[0]
    assert picked.sources == ["a.h5 1", "a.h5 0"]
    assert picked.panels is shots.panels and picked.beam_direction is shots.beam_direction and picked.cell_ties == shots.cell_ties
    assert shots.select([]).shots == [] and len(shots.shots) == 2  # the set itself is untouched


@pytest.mark.gpu
@pytest.mark.parametrize("mosaic", ["isotropic", "anisotropic", "latent"])
def test_profiles_on_the_gpu_equal_the_cpu(problem, mosaic):
    """stills_profiles on a GPU (the fused kernel; the stills made together) equal the CPU's
    eager profiles and offset derivatives to 1e-9 relative (ShotSet moved with .to, as the
    engine does, so CPU scalars left in the scene would fail the fused kernel), also with an
    anisotropic mosaic spread (each still's own domain set, made beside its crystal) and with
    the mosaic latent (each still's spreads among its offsets, their derivatives per domain)."""
    shots, _, _, model, _ = problem
    if mosaic == "anisotropic":
        spread = model.mosaic_spread_deg
        model = replace(model, anisotropic_spread_deg=(2 * spread, spread, spread / 2))
    rotations = [torch.tensor([1e-4, -2e-4, 5e-5], dtype=torch.float64), torch.tensor([-3e-4, 1e-4, 2e-4], dtype=torch.float64)]
    cells = [torch.tensor([1e-3, -5e-4, 2e-4], dtype=torch.float64), torch.tensor([0.0, 2e-4, -1e-4], dtype=torch.float64)]
    if mosaic == "latent":
        model = replace(model, mosaic_latent=True)
        factors = [torch.tensor([0.3, 0.0, -0.4], dtype=torch.float64), torch.tensor([-0.2, 0.1, 0.2], dtype=torch.float64)]
        cells = [torch.cat([c, m]) for c, m in zip(cells, factors)]
    cpu = stills_profiles(shots, shots.shots, model, rotations, cells)
    gpu_shots = shots.to("cuda")
    gpu = stills_profiles(gpu_shots, gpu_shots.shots, model, [r.cuda() for r in rotations], [c.cuda() for c in cells])
    for a, b in zip(gpu, cpu):
        for x, y in ((a.profile, b.profile), (a.jacobian, b.jacobian)):
            assert float(y.abs().max()) > 0
            assert float((x.cpu() - y).abs().max()) <= 1e-9 * float(y.abs().max())


def test_crystal_offset_jacobian_matches_finite_differences(problem):
    """d profile / d (rotation, log cell lengths) in closed form against central differences
    of the kernel, for all six offsets."""
    shots, _, _, model, _ = problem
    shot = shots.shots[1]
    r0 = torch.tensor([2e-4, 1e-4, -1e-4], dtype=torch.float64)
    c0 = torch.tensor([1e-3, -5e-4, 2e-4], dtype=torch.float64)
    profiles = shot_profiles(shots, shot, model, r0, cell=c0)
    assert profiles.jacobian.shape[-1] == 6
    h = 1e-7
    for i in range(6):
        step = torch.zeros(6, dtype=torch.float64)
        step[i] = h
        plus = shot_profiles(shots, shot, model, r0 + step[:3], jacobian=False, cell=c0 + step[3:]).profile
        minus = shot_profiles(shots, shot, model, r0 - step[:3], jacobian=False, cell=c0 - step[3:]).profile
        fd = (plus - minus) / (2 * h)
        scale = float(fd.abs().max())
        assert scale > 0
        assert torch.allclose(profiles.jacobian[..., i], fd, atol=1e-5 * scale)


def test_cell_lengths_scale_the_real_space_rows():
    """crystal_real_space: the rows a, b, c turned by R(r) and scaled by exp(cell[ties]) (closed
    form: the lengths change by exactly those factors, the rotation keeps them)."""
    from spread_dials.physics.crystal import rotation_from_vector
    from spread_dials.refine.profiles import crystal_real_space

    a0 = real_space_from_cell(torch.tensor([40.0, 50.0, 60.0, 90.0, 90.0, 90.0], dtype=torch.float64))
    r = torch.tensor([0.01, -0.02, 0.03], dtype=torch.float64)
    turned = crystal_real_space(a0, r, None, (0, 1, 2))
    assert torch.allclose(turned, a0 @ rotation_from_vector(r).T)
    tetragonal = crystal_real_space(a0, r, torch.tensor([0.01, -0.02], dtype=torch.float64), (0, 0, 1))
    ratio = tetragonal.norm(dim=-1) / a0.norm(dim=-1)
    assert torch.allclose(ratio, torch.exp(torch.tensor([0.01, 0.01, -0.02], dtype=torch.float64)))


def _refinement(problem) -> Refinement:
    shots, table, _, model, ref = problem
    caches = make_caches(shots, table, model)
    sites = EdgeShiftSites([ref], [0], ["Fe"])
    r = Refinement(shots, [0, 1], 2, caches, [], sites, sites.initial(), model, Parallel(), RefineSettings(macrocycles=2))
    r.initialise_states()
    return r


def test_global_nll_gradcheck(problem):
    """The global NLL's autograd gradient in the edge shift against finite differences (float64)."""
    r = _refinement(problem)

    def total(theta: torch.Tensor) -> torch.Tensor:
        value, _ = r.global_value_and_grad(theta)
        return value

    theta = torch.tensor([0.7], dtype=torch.float64)
    _, grad = r.global_value_and_grad(theta)
    h = 1e-5
    fd = (total(theta + h) - total(theta - h)) / (2 * h)
    assert float(grad[0]) == pytest.approx(float(fd), rel=1e-5, abs=1e-6)
    from spread_dials.refine.engine import global_objective

    theta = theta.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sum(global_objective(t, r.caches, r.states, r.sites, None)), (theta,))


def test_ordered_sum_does_not_depend_on_the_split():
    """Per-still values summed in global still order: two 'ranks' give the serial bits."""

    class FakeComm:
        def __init__(self, parts):
            self.parts = parts

        def allgather(self, obj):
            return self.parts

    values = [torch.tensor([0.1 * (i + 1) ** 1.7, 1e8 + i], dtype=torch.float64) for i in range(7)]
    serial = Refinement.ordered_sum(type("R", (), {"comm": FakeComm([list(enumerate(values))]), "shot_index": list(range(7)),
                                                   "n_shots": 7})(), values)  # fmt: skip
    split = [list(zip(range(0, 7, 2), values[0::2])), list(zip(range(1, 7, 2), values[1::2]))]
    two = Refinement.ordered_sum(type("R", (), {"comm": FakeComm(split), "shot_index": [], "n_shots": 7})(), [])
    assert torch.equal(serial, two)


def test_ordered_scatter_sum_places_each_block_and_does_not_depend_on_the_split():
    """Per-still blocks (Q_i, Q_i) at their rows and columns: the dense sum of each still's
    block scattered into a zero matrix by hand, and two 'ranks' give the serial bits."""

    class FakeComm:
        def __init__(self, parts):
            self.parts = parts

        def allgather(self, obj):
            return self.parts

    gen = torch.Generator().manual_seed(4)
    indices = [torch.tensor(ix) for ix in ([0, 1, 5], [0, 2, 3, 6], [4], [0, 1, 2, 3, 4, 5, 6], [6, 1])]
    blocks = [torch.randn((ix.numel(), ix.numel()), generator=gen, dtype=torch.float64) * 1e3 ** k for k, ix in enumerate(indices)]
    expected = torch.zeros((7, 7), dtype=torch.float64)
    for ix, block in zip(indices, blocks):
        for a, row in enumerate(ix.tolist()):
            for b, col in enumerate(ix.tolist()):
                expected[row, col] += block[a, b]
    local = list(zip(indices, blocks))
    serial = Refinement.ordered_scatter_sum(type("R", (), {"comm": FakeComm([list(enumerate(local))]), "shot_index": list(range(5)),
                                                           "n_shots": 5})(), local, 7)  # fmt: skip
    assert torch.allclose(serial, expected, rtol=1e-14, atol=0.0)
    split = [list(zip(range(0, 5, 2), local[0::2])), list(zip(range(1, 5, 2), local[1::2]))]
    two = Refinement.ordered_scatter_sum(type("R", (), {"comm": FakeComm(split), "shot_index": [], "n_shots": 5})(), [], 7)
    assert torch.equal(serial, two)


def test_rejected_shoeboxes_leave_the_fit(problem):
    """A still's NLL with shoeboxes rejected equals its NLL with those shoeboxes' pixels marked
    invalid (the reference: the mask built by hand), and the rejection threshold picks exactly
    the shoeboxes whose sigma_Z exceeds it."""
    from dataclasses import replace

    from spread_dials.refine.engine import global_objective
    from spread_dials.refine.residuals import shoebox_statistics

    r = _refinement(problem)
    cache, state = r.caches[0], r.states[0]
    n_b = int(r.shots.shots[0].shoeboxes.n_shoeboxes)
    rejected = torch.zeros(n_b, dtype=torch.bool)
    rejected[::3] = True
    by_hand = replace(cache, valid=cache.valid & ~rejected[cache.pixel_shoebox])
    theta = r.theta
    (a,) = global_objective(theta, [replace(cache, rejected=rejected)], [state], r.sites, None)
    (b,) = global_objective(theta, [by_hand], [state], r.sites, None)
    (c,) = global_objective(theta, [cache], [state], r.sites, None)
    assert float(a) == pytest.approx(float(b), rel=1e-12) and float(a) != pytest.approx(float(c), rel=1e-6)
    sigma_z = shoebox_statistics(cache, state, r.curves_intensity(0), n_b)["sigma_z"]
    threshold = float(np.median(sigma_z))
    r.settings = RefineSettings(reject_sigma_z=threshold)
    r.reject_shoeboxes()
    assert r.caches[0].rejected.tolist() == (sigma_z > threshold).tolist()


def _bright_stills(n_shots: int, cell_error_fraction: float):
    """(shots, table, model, reference, made): brighter in-memory stills (30^3-cell domains,
    spot scale 2000, truth the reference moved by +2 eV) whose crystals are handed on with
    orientation errors and cell lengths off by ``cell_error_fraction`` (rms)."""
    energy = torch.arange(7106.0, 7136.0, 4.0, dtype=torch.float64)
    ref = _reference()
    cell = real_space_from_cell(torch.tensor([34.1, 34.9, 43.7, 90.0, 90.0, 90.0], dtype=torch.float64))
    hkl = miller_indices_within(cell, 2.0)
    gen = torch.Generator().manual_seed(100)
    n = hkl.shape[0]
    F0 = torch.complex(torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)) * 20
    G = torch.polar(torch.ones(n, dtype=torch.float64), 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)).unsqueeze(-1)
    fp, fdp = ref.at(energy, 2.0)
    truth = StructureFactors(hkl, F0, G, fp.unsqueeze(0), fdp.unsqueeze(0))
    panels = grid_panels(n_fast=160, n_slow=160, pixel_mm=0.1, distance_mm=40.0, grid=(2, 2), gap_mm=0.5, tilt_deg=0.0)
    model = CrystalModel((30.0,) * 3, 0.05, 6)
    shots, made = synthetic_shots(panels, truth, model, cell, energy, n_shots=n_shots, seed=0, spot_scale=2000.0,
                                  min_bragg_photons=10.0, orientation_error_deg=0.01,
                                  cell_error_fraction=cell_error_fraction)  # fmt: skip
    return shots, StructureFactors(hkl, F0, G), model, ref, made


def test_stage_one_recovers_each_stills_cell():
    """Stills handed on with their cell lengths off by 0.2 % (rms; a, b, c independently) and
    refined with refinement.refine_cell: the refined length factors match the truth's
    (true / given length) to 4e-4 (measured: within 1.3e-4), i.e. the error shrinks >= 5x."""
    shots, table, model, ref, made = _bright_stills(2, 0.002)
    sites = EdgeShiftSites([ref], [0], ["Fe"])
    caches = make_caches(shots, table, model, refine_cell=True)
    r = Refinement(shots, [0, 1], 2, caches, [], sites, sites.initial(), model, Parallel(),
                   RefineSettings(macrocycles=3, refine_cell=True))  # fmt: skip
    r.initialise_states()
    r.run()
    for state, error in zip(r.states, made.cell_error):
        needed = 1.0 / error
        assert float((needed - 1).abs().max()) > 1e-3
        assert torch.allclose(torch.exp(state.cell), needed, atol=4e-4), (torch.exp(state.cell), needed)


def test_stage_one_reaches_the_optimum_of_an_independent_optimiser(problem):
    """Stage 1's Gauss-Newton fit of one still (log G, rotation, background planes) ends at the
    NLL minimum that scipy's L-BFGS-B finds on the same linearised objective run to convergence
    (to 1e-3 in NLL, with the offsets inside the same trust box)."""
    from scipy.optimize import minimize

    from spread_dials.refine.model import ShotState, bragg_terms, negative_log_likelihood, rate_from_terms
    from spread_dials.refine.stage1 import refine_shot

    r = _refinement(problem)
    cache, start = r.caches[0], r.states[0]
    intensity = r.curves_intensity(0).detach()
    settings = RefineSettings(stage1_iterations=100)
    fitted, nll = refine_shot(cache, start, intensity, settings)
    terms = bragg_terms(cache, intensity)
    n_b = start.background.shape[0]

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        state = ShotState(t[0], t[1:4], t[4:].view(n_b, 3))
        lam, _ = rate_from_terms(cache, state, terms)
        value = negative_log_likelihood(lam, cache.counts, cache.fitted)
        (grad,) = torch.autograd.grad(value, t)
        return float(value), grad.numpy()

    x0 = torch.cat([start.log_scale.reshape(1), start.rotation, start.background.reshape(-1)]).numpy()
    radius = settings.rotation_step_mrad * 1e-3
    bounds = [(None, None)] + [(float(v) - radius, float(v) + radius) for v in start.rotation] + [(None, None)] * (3 * n_b)
    reference = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                         options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-15, "gtol": 1e-9})  # fmt: skip
    assert nll <= reference.fun + 1e-3, (nll, reference.fun, reference.message)
    # stage 1 stops when a step gains < 1e-3 in NLL (a 1-sigma move of one parameter is 0.5)
    assert float(fitted.log_scale) == pytest.approx(reference.x[0], abs=2e-3)


def test_a_batch_of_stills_fits_each_as_alone(problem):
    """refine_shots on several stills at once (one set of tensor operations, each still with
    its own damping, acceptance and stopping) ends where each still's fit alone ends: the same
    scale, offsets, planes and NLL to 1e-9, with one still's shoeboxes partly left out and the
    other started away from its optimum."""
    from spread_dials.refine.model import ShotState
    from spread_dials.refine.stage1 import refine_shot, refine_shots

    r = _refinement(problem)
    caches = [r.caches[0], replace(r.caches[1], rejected=torch.arange(r.states[1].background.shape[0]) % 3 == 0)]
    turned = ShotState(r.states[1].log_scale + 0.3, r.states[1].rotation + 4e-4, r.states[1].background, r.states[1].cell)
    states = [r.states[0], turned]
    intensities = [r.curves_intensity(i).detach() for i in range(2)]
    settings = RefineSettings()
    together = refine_shots(caches, states, intensities, settings)
    for cache, state, intensity, (batched, nll) in zip(caches, states, intensities, together):
        alone, nll_alone = refine_shot(cache, state, intensity, settings)
        assert nll == pytest.approx(nll_alone, rel=1e-12, abs=1e-9)
        for a, b in ((batched.log_scale, alone.log_scale), (batched.rotation, alone.rotation),
                     (batched.background, alone.background)):  # fmt: skip
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(together[1][0].rotation, turned.rotation)  # the fit moved the turned still


def test_scoring_and_lbfgs_stage_two_reach_the_same_edge_shift():
    """Stage 2 by profile-likelihood scoring (default) and by L-BFGS with the per-shot
    parameters fixed are different optimisers of the same likelihood: run to convergence on
    bright stills they agree to 5 % of the Fisher sigma (measured on 3 such stills: 2.1892 both,
    sigma 0.12), scoring in no more macrocycles."""
    from spread_dials.refine.uncertainty import curvature

    shots, table, model, ref, _ = _bright_stills(2, 0.0)
    results = {}
    for stage2 in ("scoring", "lbfgs"):
        sites = EdgeShiftSites([ref], [0], ["Fe"])
        r = Refinement(shots, [0, 1], 2, make_caches(shots, table, model), [], sites, sites.initial(), model, Parallel(),
                       RefineSettings(macrocycles=12, stage2=stage2, parameter_tolerance=1e-3))  # fmt: skip
        r.initialise_states()
        r.run()
        results[stage2] = (float(r.theta[0]), len(r.history), math.sqrt(float(curvature(r, observed=False).profiled[0, 0])))
    (a, n_a, sigma), (b, n_b, _) = results["scoring"], results["lbfgs"]
    assert sigma < 1.0, results  # the stills determine the shift (the prior's sigma is 10 eV)
    assert abs(a - b) < 0.05 * sigma, results
    assert n_a <= n_b, results


def test_a_weighted_refit_drops_a_still_as_a_refinement_without_it():
    """The bootstrap's refit (uncertainty.refit_weighted: scoring steps of the weighted profile
    likelihood, per-shot parameters refitted) with weights (1, 1, 0) from the 3-still optimum
    lands where an independent refinement of the first two stills alone converges (to 5 % of
    its Fisher sigma), and weights (1, 1, 1) leave theta at the optimum; the refinement is left
    as it was."""
    from spread_dials.refine.uncertainty import curvature, refit_weighted

    shots, table, model, ref, _ = _bright_stills(3, 0.002)

    def refined(indices: list[int]) -> Refinement:
        subset = replace(shots, shots=[shots.shots[i] for i in indices], sources=[shots.sources[i] for i in indices])
        sites = EdgeShiftSites([ref], [0], ["Fe"])
        r = Refinement(subset, list(range(len(indices))), len(indices), make_caches(subset, table, model, refine_cell=True),
                       [], sites, sites.initial(), model, Parallel(),
                       RefineSettings(macrocycles=12, refine_cell=True, parameter_tolerance=1e-4))  # fmt: skip
        r.initialise_states()
        r.run()
        return r

    every, two = refined([0, 1, 2]), refined([0, 1])
    sigma = math.sqrt(float(curvature(two, observed=False).profiled[0, 0]))
    theta = every.theta.clone()
    assert abs(float(theta[0] - two.theta[0])) > 0.2 * sigma  # the third still matters
    dropped = refit_weighted(every, np.array([1.0, 1.0, 0.0]))
    assert float(dropped[0]) == pytest.approx(float(two.theta[0]), abs=0.05 * sigma)
    assert torch.equal(every.theta, theta) and all(c.weight == 1.0 for c in every.caches)
    assert float(refit_weighted(every, np.ones(3))[0]) == pytest.approx(float(theta[0]), abs=1e-3 * sigma)


def test_fisher_weights_are_zero_at_the_rate_floor():
    """w = 1 / variance (closed form: 1 / lambda for Poisson, 1 / (lambda + sigma^2) with readout
    noise) on fitted pixels; 0 off the fit and where the rate sits at or below the floor (the
    clamped rate does not move with the parameters)."""
    from spread_dials.refine.model import LAMBDA_FLOOR, fisher_weights

    lam = torch.tensor([4.0, 0.5, LAMBDA_FLOOR, -3.0, 2.0], dtype=torch.float64)
    fitted = torch.tensor([True, True, True, True, False])
    assert torch.equal(fisher_weights(lam, fitted), torch.tensor([0.25, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    readout = fisher_weights(lam, fitted, readout_sigma=2.0)
    assert torch.allclose(readout, torch.tensor([1 / 8.0, 1 / 4.5, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_spoiled_rows_step_down_in_l_at_the_tables_edge():
    """The spoil_hkl control looks each reflection up at l + 1, and at l - 1 where l + 1 lies
    beyond a table made to the detector's reach (a ferredoxin campaign stopped on it)."""
    hkl = torch.tensor([[1, 2, 0], [1, 2, 1], [1, 2, 2], [3, 0, -1]])
    table = StructureFactors(miller_index=hkl, F0=torch.ones(4, dtype=torch.complex128))
    assert table_rows(table, hkl).tolist() == [0, 1, 2, 3]
    assert table_rows(table, hkl, spoil_hkl=True).tolist() == [1, 2, 1, 4]  # (3, 0, -2) and (3, 0, 0): not there
