"""The correction's guards (CORRECT_DESIGN.md "Why it cannot absorb the edge shifts"): identity at
initialisation, no dependence on the forbidden inputs, flux conservation, the Lipschitz bound,
and the Poisson KL anchor against Monte Carlo (pure torch; references: closed forms,
torch.distributions, independent sums)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from spread_dials.correct.context import pixel_context
from spread_dials.correct.correction import (
    CorrectionSettings,
    LeakyCorrection,
    PixelCorrection,
    channel_polynomials,
    edge_shift_basis,
    energy_basis,
    redistribute,
)
from spread_dials.correct.divergence import poisson_kl
from spread_dials.correct.fit import CorrectedModel, CorrectSettings, feature_statistics
from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.refine.derivatives import value_and_jacobian
from spread_dials.refine.model import mosaic_negative_log_prior, pixel_rate
from spread_dials.refine.synthetic import InjectedErrors, anisotropic_spreads

from .toy import MOSAIC_SPREAD_DEG, NOMINAL_EV, toy_refinement


@pytest.fixture(scope="module")
def toy():
    return toy_refinement(seed=0, n_stills=2)


def _correction(refinement, contexts, **settings) -> PixelCorrection:
    """A correction with every part on (the head too, which is off by default) unless ``settings`` say otherwise."""
    settings = {"head": True, **settings}
    return PixelCorrection(refinement.shots.panels.n_panels, CorrectionSettings(**settings), feature_statistics(refinement, contexts))


def _randomise(correction: PixelCorrection, seed: int, size: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in correction.parameters():
            p.copy_(size * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_identity_at_initialisation(toy):
    """A fresh correction leaves every still's pixel rate equal to the physics rate (1e-6
    relative) and its profiles and their Jacobian exactly as they were."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    correction = _correction(toy, contexts)
    physics = [c.profiles for c in toy.caches]
    before = [pixel_rate(c, s, toy.curves_intensity(i))[0] for i, (c, s) in enumerate(zip(toy.caches, toy.states))]
    model = CorrectedModel(toy, correction, contexts, CorrectSettings())
    for i, cache in enumerate(toy.caches):
        assert torch.equal(cache.profiles.profile, physics[i].profile)
        assert torch.equal(cache.profiles.jacobian, physics[i].jacobian)
        lam_star, lam_phys = model.rates(i)
        assert torch.allclose(lam_star, lam_phys, rtol=1e-6, atol=0)
        assert torch.allclose(lam_phys, before[i], rtol=1e-12, atol=0)
        nll, kl = model.still_terms(i)
        assert float(kl.detach()) == 0.0
    toy.profile_map = None


def _perturbed_shot(shot):
    """The still with its Miller indices, counts and recorded spectrum changed."""
    sb = shot.shoeboxes
    boxes = replace(sb, miller_index=sb.miller_index[torch.randperm(sb.n_shoeboxes, generator=torch.Generator().manual_seed(1))],
                    counts=sb.counts * 2 + 1)  # fmt: skip
    return replace(shot, shoeboxes=boxes, energy_eV=shot.energy_eV + 7.0, weight=torch.flip(shot.weight, [0]))


def test_context_ignores_forbidden_inputs(toy):
    """Changing a still's Miller indices, counts or recorded spectrum changes nothing in its
    context; the context has no gradient with respect to the spectrum."""
    shot = toy.shots.shots[0]
    a = pixel_context(toy.shots, shot, NOMINAL_EV)
    b = pixel_context(toy.shots, _perturbed_shot(shot), NOMINAL_EV)
    for name in ("panel", "panel_xy", "two_theta", "azimuth", "obliquity", "shoebox", "local", "neighbours",
                 "direction", "resolution"):  # fmt: skip
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    energy = shot.energy_eV.clone().requires_grad_(True)
    weight = shot.weight.clone().requires_grad_(True)
    ctx = pixel_context(toy.shots, replace(shot, energy_eV=energy, weight=weight), NOMINAL_EV)
    for t in (ctx.head_features, ctx.panel_xy, ctx.two_theta):
        assert not t.requires_grad


def test_correction_has_zero_jacobian_in_F0_G_and_the_edge_shifts(toy):
    """With random weights, the correction's output for a still (its per-pixel factor and
    stencil) has zero derivative with respect to F0, G and the edge shifts: autograd finds no
    path; perturbing F0 and G in the cache leaves the corrected profiles unchanged."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    correction = _correction(toy, contexts)
    _randomise(correction, 3)
    cache = toy.caches[0]
    F0 = cache.F0.clone().requires_grad_(True)
    G = cache.G.clone().requires_grad_(True)
    theta = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    perturbed = replace(cache, F0=F0 * 1.3, G=G * 1j)
    toy.caches[0] = perturbed
    try:
        out = torch.cat([correction.factor(contexts[0]), correction.coefficients()])
        grads = torch.autograd.grad(out.sum(), [F0, G, theta], allow_unused=True)
        assert all(g is None for g in grads)
        model = CorrectedModel(toy, correction, contexts, CorrectSettings())
        corrected_perturbed = toy.caches[0].profiles.profile
    finally:
        toy.caches[0] = cache
        toy.profile_map = None
    model = CorrectedModel(toy, correction, contexts, CorrectSettings())
    assert torch.equal(corrected_perturbed, toy.caches[0].profiles.profile)
    toy.caches[0] = cache.with_profiles(model.physics[0])
    toy.profile_map = None


def test_closed_redistribution_conserves_every_shoebox_total(toy):
    """With closed shoeboxes, K x keeps each shoebox's sum (1e-12 relative) for random
    coefficients up to 0.5 and random (N, C) inputs, while moving photons between pixels."""
    shot = toy.shots.shots[1]
    ctx = pixel_context(toy.shots, shot, NOMINAL_EV, stencil_radius=2)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand((shot.shoeboxes.n_pixels, 3), generator=gen, dtype=torch.float64)
    c = 0.5 * torch.rand(ctx.neighbours.shape[0], generator=gen, dtype=torch.float64)
    y = redistribute(x, c, ctx.neighbours, open_boundary=False)
    n_b = shot.shoeboxes.n_shoeboxes
    total_x = torch.zeros((n_b, 3), dtype=x.dtype).index_add(0, ctx.shoebox, x)
    total_y = torch.zeros((n_b, 3), dtype=x.dtype).index_add(0, ctx.shoebox, y)
    assert torch.allclose(total_y, total_x, rtol=1e-12, atol=0)
    assert (y - x).abs().max() > 0.1


@pytest.mark.parametrize("radius", [1, 2])
def test_redistribution_is_a_convolution_and_conserves_photons_on_the_detector(toy, radius):
    """Open shoeboxes: K x over a whole box (edges included) equals the 2-D convolution of the
    box, zero outside it, with the stencil (1 - sum c) at the centre, c_o at offset o (torch's
    conv2d as the reference), and K x's sum plus the light the convolution puts outside the box
    equals x's sum (1e-12): photons are conserved on the detector.  Closed shoeboxes give the
    same values away from the edges."""
    shot = toy.shots.shots[0]
    ctx = pixel_context(toy.shots, shot, NOMINAL_EV, stencil_radius=radius)
    sb = shot.shoeboxes
    b = int(torch.argmax(sb.n_fast * sb.n_slow))
    start = int((sb.n_fast * sb.n_slow)[:b].sum())
    w, h = int(sb.n_fast[b]), int(sb.n_slow[b])
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(sb.n_pixels, generator=gen, dtype=torch.float64)
    c = 0.1 * torch.rand(len(ctx.offsets), generator=gen, dtype=torch.float64)
    y = redistribute(x, c, ctx.neighbours)[start : start + w * h].view(h, w)
    closed = redistribute(x, c, ctx.neighbours, open_boundary=False)[start : start + w * h].view(h, w)
    size = 2 * radius + 1
    kernel = torch.zeros(size, size, dtype=torch.float64)
    kernel[radius, radius] = 1 - c.sum()
    for coefficient, (dx, dy) in zip(c, ctx.offsets):
        kernel[radius + dy, radius + dx] = coefficient  # photons at p move to p + o: y[p + o] += c x[p]
    image = x[start : start + w * h].view(1, 1, h, w)
    full = torch.nn.functional.conv2d(image, kernel.flip([0, 1]).view(1, 1, size, size), padding=2 * radius).view(
        h + 2 * radius, w + 2 * radius)  # fmt: skip
    box = full[radius : radius + h, radius : radius + w]
    assert torch.allclose(y, box, rtol=1e-12, atol=1e-14)
    outside = full.sum() - box.sum()
    assert float(outside) > 0
    assert float(y.sum() + outside) == pytest.approx(float(image.sum()), rel=1e-12)
    inner = (slice(radius, h - radius), slice(radius, w - radius))
    assert torch.allclose(closed[inner], box[inner], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(closed, box)


def test_a_d4_stencil_ties_the_offsets_the_squares_symmetries_map_onto_each_other(toy):
    """correction.stencil_symmetry=d4: 2 free weights for radius 1 and 5 for radius 2 (what the
    capacity guard counts); every offset's coefficient is its orbit's weight, so the stencil is
    unchanged by sign flips and by swapping fast and slow; the redistribution equals the untied
    stencil given those same coefficients; and it starts at the identity."""
    from spread_dials.correct.correction import within_capacity

    for radius, weights in ((1, 2), (2, 5)):
        contexts = [pixel_context(toy.shots, s, NOMINAL_EV, stencil_radius=radius) for s in toy.shots.shots]
        tied = _correction(toy, contexts, stencil_radius=radius, stencil_symmetry="d4", gain=False, head=False)
        assert tied.stencil.numel() == weights
        x = torch.rand((toy.shots.shots[0].shoeboxes.n_pixels, 2), generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)  # fmt: skip
        assert torch.equal(tied.apply(x, contexts[0]), x)  # identity at initialisation
        with torch.no_grad():
            tied.stencil.copy_(torch.linspace(0.01, 0.05, weights, dtype=torch.float64))
        c = dict(zip(tied.offsets, tied.coefficients().tolist()))
        for (dx, dy), value in c.items():
            for image in ((-dx, dy), (dx, -dy), (dy, dx), (-dy, -dx)):
                assert c[image] == value
        assert len(set(c.values())) == weights
        free = _correction(toy, contexts, stencil_radius=radius, stencil_symmetry="none", gain=False, head=False)
        with torch.no_grad():
            free.stencil.copy_(tied.coefficients())
        assert torch.equal(tied.apply(x, contexts[0]), free.apply(x, contexts[0]))
        settings = CorrectionSettings(stencil_radius=radius, stencil_symmetry="d4", gain=False)
        assert within_capacity(settings, 50 * weights, 1, 50.0)[0].redistribution
        assert not within_capacity(settings, 50 * weights - 1, 1, 50.0)[0].redistribution


def test_head_slope_is_within_its_reported_bound(toy):
    """|head(x) - head(y)| <= L |x - y| (standardized features) with L = head_slope_bound()
    (2 ||w||_1) for random weights and random pairs of the still's pixels, and |d head / d x| <= L
    at every pixel (autograd); the bound is not loose by more than 20x (the ratios reach L / 20)."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    correction = _correction(toy, contexts)
    _randomise(correction, 6, size=1.0)
    bound = correction.head_slope_bound()
    assert bound == pytest.approx(2 * float(correction.head_weights.abs().sum()))
    ctx = contexts[0]
    x = ((ctx.head_features - correction.feature_mean) / correction.feature_scale).requires_grad_(True)
    head = correction.head(replace(ctx, direction=x[:, :3] * correction.feature_scale[:3] + correction.feature_mean[:3],
                                   resolution=x[:, 3] * correction.feature_scale[3] + correction.feature_mean[3]))  # fmt: skip
    (grad,) = torch.autograd.grad(head.sum(), x)
    assert float(grad.norm(dim=-1).max()) <= bound * (1 + 1e-9)
    head, x = head.detach(), x.detach()
    assert torch.allclose(head, correction.head(ctx).detach(), atol=1e-12)
    gen = torch.Generator().manual_seed(7)
    i, j = torch.randint(0, x.shape[0], (2, 20000), generator=gen)
    distance = (x[i] - x[j]).norm(dim=-1)
    keep = distance > 0
    ratio = (head[i] - head[j]).abs()[keep] / distance[keep]
    assert float(ratio.max()) <= bound * (1 + 1e-9)
    assert float(ratio.max()) > bound / 20


def test_gain_field_interpolates_its_nodes(toy):
    """The bicubic field (torch grid_sample, align_corners) takes each node's value, less the
    mean over all nodes, at the node's panel coordinates (nodes at -1 ... 1); a constant field is
    0 everywhere (the per-shot scales own the overall intensity)."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    correction = _correction(toy, contexts, gain_nodes=5)
    gen = torch.Generator().manual_seed(10)
    with torch.no_grad():
        correction.log_gain_nodes.copy_(0.05 * torch.randn(correction.log_gain_nodes.shape, generator=gen, dtype=torch.float64))
    ctx = contexts[0]
    grid = torch.linspace(-1, 1, 5, dtype=torch.float64)
    p, iy, ix = torch.meshgrid(torch.arange(4), torch.arange(5), torch.arange(5), indexing="ij")
    at_nodes = replace(ctx, panel=p.reshape(-1), panel_xy=torch.stack([grid[ix.reshape(-1)], grid[iy.reshape(-1)]], -1))
    centred = correction.log_gain_nodes - correction.log_gain_nodes.mean()
    assert torch.allclose(correction.log_gain(at_nodes), centred[p, 0, iy, ix].reshape(-1), atol=1e-12)
    with torch.no_grad():
        correction.log_gain_nodes.fill_(0.03)
    assert torch.allclose(correction.log_gain(ctx), torch.zeros_like(ctx.two_theta), atol=1e-12)


def test_one_gain_node_is_a_gain_per_panel(toy):
    """gain_nodes = 1: every pixel of a panel carries that panel's node, less the mean over the
    panels, wherever it lies on the panel."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    correction = _correction(toy, contexts, gain_nodes=1)
    with torch.no_grad():
        correction.log_gain_nodes.copy_(torch.tensor([0.03, -0.01, 0.05, 0.0], dtype=torch.float64).view(4, 1, 1, 1))
    for c in contexts:
        expected = torch.tensor([0.03, -0.01, 0.05, 0.0], dtype=torch.float64)[c.panel] - 0.0175
        assert c.panel_xy.abs().max() > 0.5  # pixels away from the panel's centre
        assert torch.allclose(correction.log_gain(c), expected, atol=1e-12)


@pytest.mark.parametrize("settings", [
    {"gain_nodes": 2, "stencil_symmetry": "d4", "head": True},
    {"gain_nodes": 1, "stencil_symmetry": "none", "shoebox_boundary": "closed", "head": False},
    {"gain": False, "stencil_radius": 1, "head": True},
])  # fmt: skip
def test_closed_form_jacobian_matches_autograd(toy, settings):
    """PixelCorrection.jacobian (the fit's d lambda* / d phi columns) against autograd's Jacobian
    of the corrected values in the flat weights, at random weights, for each part and boundary."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV, settings.get("stencil_radius", 2)) for s in toy.shots.shots]
    correction = _correction(toy, contexts, **settings)
    _randomise(correction, 12, size=0.1)
    params = [dict(correction.named_parameters())[n] for n in correction.learned()]
    phi = torch.nn.utils.parameters_to_vector(params).detach()
    gen = torch.Generator().manual_seed(13)
    values = torch.rand(contexts[0].panel.shape[0], generator=gen, dtype=torch.float64)

    def corrected(x):
        flat, start = {}, 0
        for name, p in zip(correction.learned(), params):
            flat[name] = x[start : start + p.numel()].view_as(p)
            start += p.numel()
        return torch.func.functional_call(correction, flat, (values.unsqueeze(-1), contexts[0]))[:, 0]

    expected_value, expected = value_and_jacobian(corrected, phi)
    value, jacobian = correction.jacobian(values, contexts[0])
    assert jacobian.shape == expected.shape == (values.numel(), phi.numel())
    assert float(expected.abs().max()) > 0.1
    assert torch.allclose(value, expected_value, rtol=1e-12, atol=1e-14)
    assert torch.allclose(jacobian, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("degree", [None, 0, 2])
def test_leaky_closed_form_jacobian_matches_autograd(toy, degree):
    """LeakyCorrection.bragg_jacobian (the leaky arm's d lambda* / d phi, per channel) against
    autograd's Jacobian of sum_c w_c (corrected P)_c in the flat weights, at random weights, for
    a free factor per channel (None) and the smooth energy bases of degree 0 and 2; the shoeboxes
    of one Miller index share their columns, the others' are 0."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    hkl = torch.cat([s.shoeboxes.miller_index for s in toy.shots.shots])
    shot = toy.shots.shots[0]
    n_channels = shot.energy_eV.numel()
    basis = None if degree is None else channel_polynomials(n_channels, degree)
    leaky = LeakyCorrection(toy.shots.panels.n_panels, CorrectionSettings(gain_nodes=2, head=True), feature_statistics(toy, contexts),
                            hkl, n_channels, energy_basis=basis)  # fmt: skip
    _randomise(leaky, 5, size=0.1)
    params = [dict(leaky.named_parameters())[n] for n in leaky.learned()]
    phi = torch.nn.utils.parameters_to_vector(params).detach()
    gen = torch.Generator().manual_seed(6)
    n = contexts[0].panel.shape[0]
    profile = torch.rand((n, n_channels), generator=gen, dtype=torch.float64)
    weight = torch.rand((shot.shoeboxes.n_shoeboxes, n_channels), generator=gen, dtype=torch.float64)[contexts[0].shoebox]

    def bragg(x):
        flat, start = {}, 0
        for name, p in zip(leaky.learned(), params):
            flat[name] = x[start : start + p.numel()].view_as(p)
            start += p.numel()
        corrected = torch.func.functional_call(leaky, flat, (profile, contexts[0]), {"miller_index": shot.shoeboxes.miller_index})
        return (corrected * weight).sum(-1)

    expected_value, expected = value_and_jacobian(bragg, phi)
    value, columns, index = leaky.bragg_jacobian(profile, weight, contexts[0], shot.shoeboxes.miller_index)
    # columns only for the base weights and the still's own reflections' factors; the rest are 0
    n_base = phi.numel() - leaky.per_reflection.numel()
    reflections = torch.unique(leaky._rows(shot.shoeboxes.miller_index))
    assert 0 < reflections.numel() < leaky.miller_index.shape[0]
    assert columns.shape == (n, index.numel()) and index.numel() == n_base + reflections.numel() * leaky.energy_basis.shape[0]
    jacobian = columns.new_zeros(expected.shape)
    jacobian[:, index] = columns
    assert float(expected[:, -leaky.per_reflection.numel():].abs().max()) > 0.1
    assert torch.allclose(value, expected_value, rtol=1e-12, atol=1e-14)
    assert torch.allclose(jacobian, expected, rtol=1e-10, atol=1e-13)
    with pytest.raises(NotImplementedError):
        leaky.jacobian(profile.sum(-1), contexts[0])


def test_leaky_prior_is_a_gaussian_on_the_factors(toy):
    """With prior_sigma the leaky arm's prior adds sum a^2 / (2 sigma^2) to the guarded parts'
    (also at weights given by name, as the fit differentiates it); without, nothing."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    hkl = torch.cat([s.shoeboxes.miller_index for s in toy.shots.shots])
    n_channels = toy.shots.shots[0].energy_eV.numel()
    stats = feature_statistics(toy, contexts)
    free = LeakyCorrection(toy.shots.panels.n_panels, CorrectionSettings(), stats, hkl, n_channels)
    held = LeakyCorrection(toy.shots.panels.n_panels, CorrectionSettings(), stats, hkl, n_channels, prior_sigma=0.5)
    _randomise(free, 3)
    _randomise(held, 3)
    a = held.per_reflection.detach()
    assert float(held.negative_log_prior() - free.negative_log_prior()) == pytest.approx(float((a**2).sum() / 0.5), rel=1e-12)
    other = {"per_reflection": 2 * a}
    assert float(held.negative_log_prior(other) - free.negative_log_prior(other)) == pytest.approx(float((4 * a**2).sum() / 0.5), rel=1e-12)


def test_channel_polynomials_are_legendre():
    """channel_polynomials: P0 = 1, P1 = x, P2 = (3 x^2 - 1) / 2 on the channels mapped to [-1, 1]."""
    basis = channel_polynomials(5, 2)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(basis, torch.stack([torch.ones_like(x), x, (3 * x**2 - 1) / 2]))
    with pytest.raises(ValueError):
        channel_polynomials(5, -1)


def test_edge_shift_basis_is_the_references_shift_derivative_times_the_polynomials():
    """edge_shift_basis: per reference, d f'/ds and d f''/ds of f(E - s) (central finite
    differences of the moved curve, h = 1e-4 eV; and, to the 0.25 eV table's interpolation
    error, -df/dE of the closed-form curves) times P0, P1 of the channel, each row scaled to a
    largest magnitude of 1; a curve flat over the channels, no curves or a negative degree are
    a ValueError."""
    grid = torch.arange(7000.0, 7300.0, 0.25, dtype=torch.float64)
    curve = TabulatedCurve(grid, -5.0 - 3.0 * torch.tanh((grid - 7112.0) / 3.0), 2.0 + 1.5 * torch.tanh((grid - 7116.0) / 4.0))
    energy = torch.linspace(7100.5, 7139.5, 40, dtype=torch.float64)
    basis = edge_shift_basis([curve], energy, degree=1)
    assert basis.shape == (4, 40)
    h = 1e-4
    (up_p, up_pp), (down_p, down_pp) = curve.at(energy, h), curve.at(energy, -h)
    x = torch.linspace(-1.0, 1.0, 40, dtype=torch.float64)
    closed = [3.0 / 3.0 / torch.cosh((energy - 7112.0) / 3.0) ** 2, -1.5 / 4.0 / torch.cosh((energy - 7116.0) / 4.0) ** 2]
    for k, (finite, exact) in enumerate(zip(((up_p - down_p) / (2 * h), (up_pp - down_pp) / (2 * h)), closed)):
        for j, polynomial in enumerate((torch.ones_like(x), x)):
            row = finite * polynomial
            assert torch.allclose(basis[2 * k + j], row / row.abs().max(), atol=1e-6)
            assert torch.allclose(basis[2 * k + j], exact * polynomial / (exact * polynomial).abs().max(), atol=5e-3)
    assert torch.allclose(basis.abs().amax(-1), torch.ones(4, dtype=torch.float64))
    flat = TabulatedCurve(grid, torch.full_like(grid, -6.0), torch.full_like(grid, 3.0), "flat")
    for bad in (lambda: edge_shift_basis([flat], energy), lambda: edge_shift_basis([], energy),
                lambda: edge_shift_basis([curve], energy, degree=-1)):  # fmt: skip
        with pytest.raises(ValueError):
            bad()


def test_energy_basis_names_the_two_bases():
    """energy_basis: "polynomial" is P0 = 1, P1 = x on the channels; "edge" has a row per
    reference curve, f' and f'' and polynomial (4 for one curve at degree 1), each peaking at 1
    and changing sign nowhere for P0 (a sigmoid's derivative); another kind is a ValueError."""
    grid = torch.arange(7000.0, 7300.0, 0.25, dtype=torch.float64)
    curve = TabulatedCurve(grid, -5.0 - 3.0 * torch.tanh((grid - 7112.0) / 3.0), 2.0 + 1.5 * torch.tanh((grid - 7116.0) / 4.0))
    energy = torch.linspace(7100.5, 7139.5, 40, dtype=torch.float64)
    polynomial = energy_basis("polynomial", 1, [curve], energy)
    assert torch.allclose(polynomial, torch.stack([torch.ones(40, dtype=torch.float64), torch.linspace(-1.0, 1.0, 40, dtype=torch.float64)]))
    edge = energy_basis("edge", 1, [curve], energy)
    assert edge.shape == (4, 40) and torch.allclose(edge.abs().amax(-1), torch.ones(4, dtype=torch.float64))
    assert bool((edge[0] > 0).all()) and bool((edge[2] < 0).all())
    with pytest.raises(ValueError):
        energy_basis("spline", 1, [curve], energy)


def test_leaky_correction_reads_the_miller_index(toy):
    """The leaky arm's output moves with the Miller index (it is given h and the channels): the
    guard tests above would fail for it."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    hkl = torch.cat([s.shoeboxes.miller_index for s in toy.shots.shots])
    shot = toy.shots.shots[0]
    leaky = LeakyCorrection(toy.shots.panels.n_panels, CorrectionSettings(), feature_statistics(toy, contexts), hkl, shot.energy_eV.numel())
    _randomise(leaky, 8)
    ones = torch.ones((shot.shoeboxes.n_pixels, shot.energy_eV.numel()), dtype=torch.float64)
    a = leaky.apply(ones, contexts[0], miller_index=shot.shoeboxes.miller_index)
    b = leaky.apply(ones, contexts[0], miller_index=_perturbed_shot(shot).shoeboxes.miller_index)
    assert (a - b).abs().max() > 1e-3


def test_a_leaky_correction_given_fitted_parts_is_those_parts_at_factors_zero(toy):
    """take_parts: at factors 0 the leaky correction applies the fitted parts' gain, stencil and
    head to every channel (the parts' own output channel by channel); parts of other settings
    are refused."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    hkl = torch.cat([s.shoeboxes.miller_index for s in toy.shots.shots])
    shot = toy.shots.shots[0]
    settings, stats = CorrectionSettings(gain_nodes=2, head=True), feature_statistics(toy, contexts)
    parts = PixelCorrection(toy.shots.panels.n_panels, settings, stats)
    _randomise(parts, 9, size=0.1)
    leaky = LeakyCorrection(toy.shots.panels.n_panels, settings, stats, hkl, shot.energy_eV.numel())
    profile = torch.rand((shot.shoeboxes.n_pixels, shot.energy_eV.numel()), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    before = leaky.apply(profile, contexts[0], miller_index=shot.shoeboxes.miller_index)
    leaky.take_parts(parts)
    after = leaky.apply(profile, contexts[0], miller_index=shot.shoeboxes.miller_index)
    expected = torch.stack([parts.apply(profile[:, c], contexts[0]) for c in range(profile.shape[1])], -1)
    assert (before - expected).abs().max() > 1e-3  # (the identity is not the parts)
    assert torch.allclose(after, expected, rtol=1e-12, atol=1e-14)
    assert float(leaky.per_reflection.abs().max()) == 0.0
    with pytest.raises(ValueError, match="do not match"):
        leaky.take_parts(PixelCorrection(toy.shots.panels.n_panels, CorrectionSettings(gain_nodes=3), stats))


def test_anchor_curvature_is_the_kl_hessian_also_where_the_rate_is_not_positive(toy):
    """At the physics (phi = 0, where log(lambda* / lambda_0) = 0) the anchor's Gauss-Newton
    curvature J^T diag(1 / lambda*) J is the autograd Hessian of the Poisson KL itself; pixels
    whose reference rate is at or below the KL's floor (a background plane below zero at a box
    corner) add nothing to either, and the curvature stays finite (it was infinite: 1 / 1e-300)."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    model = CorrectedModel(toy, _correction(toy, contexts, head=False), contexts, CorrectSettings())
    profile, weight, scale, lam_0 = model._anchor[0]
    lam_0 = lam_0.clone()
    lam_0[:40] = -0.5
    model._anchor[0] = (profile, weight, scale, lam_0)
    phi = model.phi.detach().clone()
    curvature, index = model._anchor_curvature(0)
    assert torch.equal(index.cpu(), torch.arange(phi.numel()))
    hessian = torch.autograd.functional.hessian(lambda x: model.anchor(0, x), phi)
    assert bool(torch.isfinite(curvature).all()) and float(hessian.abs().max()) > 0
    assert torch.allclose(curvature, hessian, rtol=1e-8, atol=1e-10 * float(hessian.abs().max()))


def test_poisson_kl_matches_monte_carlo():
    """Closed-form KL(Poisson(a) || Poisson(b)) against the mean of log p_a(k) - log p_b(k) over
    200k draws k ~ Poisson(a) (torch.distributions), within 4 standard errors."""
    gen = torch.Generator().manual_seed(9)
    for a, b in [(0.3, 0.5), (4.0, 3.0), (50.0, 58.0), (1e3, 1.02e3)]:
        pa, pb = torch.distributions.Poisson(torch.tensor(a, dtype=torch.float64)), torch.distributions.Poisson(torch.tensor(b, dtype=torch.float64))
        k = torch.poisson(torch.full((200000,), a, dtype=torch.float64), generator=gen)
        log_ratio = pa.log_prob(k) - pb.log_prob(k)
        mc, se = float(log_ratio.mean()), float(log_ratio.std() / 200000**0.5)
        exact = float(poisson_kl(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))
        assert abs(mc - exact) < 4 * se + 1e-12, (a, b, mc, exact, se)
    assert float(poisson_kl(torch.tensor(7.0), torch.tensor(7.0))) == 0.0


def test_the_fit_stops_once_converged_and_a_rerun_adds_nothing():
    """epochs is the most: a PSF fit from a biased warm start stops at the first epoch past the
    warm-up that moved no edge shift by > theta_tolerance and no weight by > phi_tolerance (the
    epochs before it moved more), and run() again adds no epoch."""
    r = toy_refinement(seed=3, n_stills=2, spot_scale=4000.0, errors=InjectedErrors(psf_fwhm_px=1.5))
    r.run()
    contexts = [pixel_context(r.shots, s, NOMINAL_EV) for s in r.shots.shots]
    correction = PixelCorrection(r.shots.panels.n_panels, CorrectionSettings(gain=False), feature_statistics(r, contexts))
    settings = CorrectSettings(epochs=20, warmup_epochs=1, theta_tolerance=1e-3, phi_tolerance=1e-4)
    model = CorrectedModel(r, correction, contexts, settings)
    model.run()
    history = model.history
    assert model.converged and 2 < len(history) < 20, [h["moved"] for h in history]
    assert history[-1]["moved"]["theta"] <= 1e-3 and history[-1]["moved"]["phi"] <= 1e-4
    assert not any(h["converged"] for h in history[:-1])
    assert max(h["moved"]["theta"] for h in history) > 0.1  # the edge shifts did travel
    model.run()
    assert len(model.history) == len(history)


def test_the_line_search_does_not_crawl_along_the_jitter_ridge():
    """The line search compares each trial with the zero-length step (the same refit from the
    same states), not with the refit it started from: stage 1's refit is linear in each still's
    jitter about its start, so refitting the refitted states moved F by +0.06 here, more than a
    step's gain, and this data set (calibration replicate 29 of session 16: 3 stills, a 1.5 px
    PSF, 1 eV jitter) crawled 0.015 -> 0.003 eV an epoch for 34 epochs to an F 1.06 higher than
    the one this fit reaches in 5.  (With the radius-1 stencil it was found with; the default
    radius-2 d4 stencil takes 16 epochs here, its joint steps overshooting by ~1.6x an epoch.)"""
    errors = InjectedErrors(psf_fwhm_px=1.5, energy_jitter_eV=1.0)
    r = toy_refinement(seed=1852994904, shifts=(-0.3727617611317973, 0.07746479289348289), spot_scale=4000.0,
                       errors=errors, macrocycles=4, prior_sigma_eV=1.0, refine_cell=True)  # fmt: skip
    r.run()
    r.settings = replace(r.settings, energy_jitter_sigma_eV=1.0)
    contexts = [pixel_context(r.shots, s, NOMINAL_EV, stencil_radius=1) for s in r.shots.shots]
    correction = _correction(r, contexts, gain=False, head=False, stencil_radius=1, stencil_symmetry="none")
    model = CorrectedModel(r, correction, contexts, CorrectSettings(epochs=10))
    model.run()
    assert model.converged and len(model.history) <= 7, [h["moved"] for h in model.history]


def test_objective_is_the_engines_profile_objective_with_the_jitter_prior():
    """At initialisation (KL 0) F(theta, phi) is the engine's profiled NLL plus priors, each
    still's energy-jitter prior included: at the fit and along the direction that moves the
    edge shifts up and every jitter down by 1 eV, which the data hardly see (H200 session 16:
    without the stills' prior in F the corrected fit drifted 8 sigma along it)."""
    r = toy_refinement(seed=3, n_stills=3, spot_scale=4000.0, errors=InjectedErrors(energy_jitter_eV=1.0),
                       refine_cell=True, energy_jitter_sigma_eV=1.0)  # fmt: skip
    r.run()
    contexts = [pixel_context(r.shots, s, NOMINAL_EV) for s in r.shots.shots]
    model = CorrectedModel(r, _correction(r, contexts, gain=False, head=False), contexts, CorrectSettings())
    values = []
    for move in (0.0, 1.0):
        starts = [replace(s, energy_offset=s.energy_offset - move) for s in r.states]
        corrected, _ = model.objective(r.theta + move, model.phi, starts)
        engine, _ = r._profile_nll(r.theta + move, starts)
        assert model._terms["kl"] == 0.0 and abs(corrected - engine) < 1e-2, (move, corrected, engine)
        values.append(corrected)
    assert values[1] - values[0] > 1.0  # the jitter prior holds the direction (1.37 measured)


def test_objective_is_the_engines_profile_objective_with_the_mosaic_prior():
    """With each still's mosaic factors refined, F at initialisation is the engine's profiled
    NLL plus every prior, the factors' N(0, mosaic_sigma^2) included (they sit ~0.7 from 0 on
    these 2:1 stills: ~12 in F, so the test fails without it)."""
    errors = InjectedErrors(mosaic_spread_abc_deg=anisotropic_spreads(MOSAIC_SPREAD_DEG, 2.0))
    r = toy_refinement(seed=1, n_stills=3, errors=errors, macrocycles=6, refine_mosaic=True)
    r.run()
    contexts = [pixel_context(r.shots, s, NOMINAL_EV) for s in r.shots.shots]
    model = CorrectedModel(r, _correction(r, contexts, gain=False, head=False), contexts, CorrectSettings())
    corrected, _ = model.objective(r.theta, model.phi, r.states)
    engine, _ = r._profile_nll(r.theta, r.states)
    assert model._terms["kl"] == 0.0 and abs(corrected - engine) < 1e-2, (corrected, engine)
    assert sum(float(mosaic_negative_log_prior(s.cell[-3:], r.settings.mosaic_sigma)) for s in r.states) > 5.0


def test_the_warm_up_holds_the_stills_mosaic_factors():
    """Epochs inside warmup_epochs leave every still's mosaic factors where they were; the
    first epoch past them moves them (stills with a PSF the factors could take up)."""
    errors = InjectedErrors(psf_fwhm_px=1.5, mosaic_spread_abc_deg=anisotropic_spreads(MOSAIC_SPREAD_DEG, 1.5))
    r = toy_refinement(seed=3, n_stills=2, spot_scale=4000.0, errors=errors, refine_mosaic=True)
    r.run()
    start = [s.cell[-3:].clone() for s in r.states]
    contexts = [pixel_context(r.shots, s, NOMINAL_EV) for s in r.shots.shots]
    model = CorrectedModel(r, _correction(r, contexts, gain=False, head=False), contexts,
                           CorrectSettings(epochs=1, warmup_epochs=1))  # fmt: skip
    model.run()
    assert all(torch.equal(s.cell[-3:], m) for s, m in zip(r.states, start)) and r.settings.mosaic_step_percent > 0
    model.settings = replace(model.settings, epochs=2)
    model.run()
    assert max(float((s.cell[-3:] - m).abs().max()) for s, m in zip(r.states, start)) > 1e-3


def test_the_warm_up_holds_the_stills_energy_jitters():
    """Epochs inside warmup_epochs leave every still's energy jitter where it was (and restore
    the jitter prior after); the first epoch past them moves the jitters."""
    r = toy_refinement(seed=3, n_stills=2, spot_scale=4000.0, errors=InjectedErrors(psf_fwhm_px=1.5, energy_jitter_eV=1.0),
                       refine_cell=True, energy_jitter_sigma_eV=1.0)  # fmt: skip
    r.run()
    start = [float(s.energy_jitter()) for s in r.states]
    contexts = [pixel_context(r.shots, s, NOMINAL_EV) for s in r.shots.shots]
    model = CorrectedModel(r, _correction(r, contexts, gain=False, head=False), contexts,
                           CorrectSettings(epochs=1, warmup_epochs=1))  # fmt: skip
    model.run()
    assert [float(s.energy_jitter()) for s in r.states] == start and r.settings.energy_jitter_sigma_eV == 1.0
    model.settings = replace(model.settings, epochs=2)
    model.run()
    assert max(abs(float(s.energy_jitter()) - j) for s, j in zip(r.states, start)) > 1e-3


def test_score_outer_products_are_the_stills_finite_difference_gradients(toy):
    """gradient_and_information's last term is sum_i g_i g_i^T over the stills, g_i the gradient of
    still i's weighted NLL in (theta, phi) at its per-shot parameters (here by central finite
    differences, not autograd); robust_covariance sandwiches it between the posterior's inverse."""
    contexts = [pixel_context(toy.shots, s, NOMINAL_EV) for s in toy.shots.shots]
    model = CorrectedModel(toy, _correction(toy, contexts, head=False, gain=False), contexts, CorrectSettings())
    _randomise(model.correction, seed=4, size=0.01)
    theta, phi = toy.theta.detach().clone(), model.phi.detach().clone()
    x0 = torch.cat([theta, phi])
    p, h = theta.numel(), 1e-6  # (at 1e-4 a step crosses the rate floor of a few pixels)

    def nll(i: int, x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(model.still_terms(i, x[:p], x[p:])[0])

    outer = torch.zeros(x0.numel(), x0.numel(), dtype=torch.float64)
    for i in range(len(toy.caches)):
        g = torch.tensor([(nll(i, x0 + h * e) - nll(i, x0 - h * e)) / (2 * h) for e in torch.eye(x0.numel(), dtype=torch.float64)])
        outer += torch.outer(g, g)
    model.set_phi(phi)
    _, _, posterior, _, scores = model.gradient_and_information()
    assert float(outer.abs().max()) > 0
    assert torch.allclose(scores, outer, rtol=1e-3, atol=1e-6 * float(outer.abs().max()))
    inverse = torch.linalg.inv(0.5 * (posterior + posterior.T))
    assert torch.allclose(model.robust_covariance(), (inverse @ scores @ inverse)[:p, :p], rtol=1e-6, atol=1e-14)
