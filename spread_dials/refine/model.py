"""The pixel-rate model of SPREAD refinement and its likelihood (pure torch).

For shoebox pixel p of reflection h in a still::

    lambda_p = (a_b + b_b x_p + c_b y_p) + G * sum_c P_c(p; rotation) * |F_h(E_c)|^2
    F_h(E) = F0_h + sum_s (f'_s(E) + i f''_s(E)) G_{s,h}

with a background plane per shoebox (photons per pixel; x, y pixel offsets from the shoebox
centre), the still's scale G, the kernel's per-channel profile P (photons per unit |F|^2,
summed over mosaic domains; :mod:`spread_dials.refine.profiles`) and the structure factor of the
round-1 assembly.  P is cached at crystal offsets x0 (rotation and, optionally, cell) with its
derivative, and evaluated as P(x0) + dP/dx (x - x0) (exact at the cache point).  Likelihoods: Poisson (photon counting) or
Gaussian with variance lambda + sigma_readout^2 (charge-integrating detectors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from spread_dials.refine.derivatives import value_and_jacobian
from spread_dials.refine.profiles import ShotProfiles

__all__ = ["ShotState", "ShotCache", "BraggTerms", "bragg_terms", "rate_from_terms", "plane_rate", "intensities", "site_intensities", "intensities_and_slope", "intensities_and_jacobian", "sum_channels", "pixel_rate", "pixel_variance", "fisher_weights", "negative_log_likelihood", "pixel_nll", "LAMBDA_FLOOR", "N_MOSAIC_FACTORS", "offset_kinds", "mosaic_factors"]

#: smallest pixel rate (photons) the likelihood sees (a plane may dip below 0 at a corner)
LAMBDA_FLOOR = 1e-6


@dataclass(frozen=True)
class ShotState:
    """Per-shot parameters.

    Attributes:
        log_scale: () log of the scale G.
        rotation: (3,) small rotation vector (rad, lab frame) applied to the .expt crystal.
        background: (B, 3) plane per shoebox: photons per pixel at the centre, per pixel in
            fast, per pixel in slow.
        cell: (k,) log changes of the unit-cell lengths (profiles.CrystalModel.cell_ties), or
            None when the cell is not refined.
        energy_offset: () the still's energy jitter delta (eV): its spectrum's recorded channel
            energies are delta above the true ones, so f', f'' are evaluated at E_c - delta
            (the spot positions do not move: a still's relative energy error is a cell scale,
            which the cell refinement takes); None when not refined (0).
    """

    log_scale: Tensor
    rotation: Tensor
    background: Tensor
    cell: Tensor | None = None
    energy_offset: Tensor | None = None

    @property
    def offsets(self) -> Tensor:
        """(3 + k,) crystal offsets: rotation then cell (as ShotProfiles.offsets)."""
        return self.rotation if self.cell is None else torch.cat([self.rotation, self.cell.to(self.rotation)])

    def energy_jitter(self, like: Tensor | None = None) -> Tensor:
        """() the energy jitter (eV; 0 when not refined), detached, with ``like``'s dtype and
        device (default float64 on the CPU)."""
        like = torch.zeros((), dtype=torch.float64) if like is None else like
        return like.new_zeros(()) if self.energy_offset is None else self.energy_offset.detach().to(like)

    def detach(self) -> "ShotState":
        detached = lambda t: None if t is None else t.detach()  # noqa: E731
        return ShotState(self.log_scale.detach(), self.rotation.detach(), self.background.detach(),
                         detached(self.cell), detached(self.energy_offset))  # fmt: skip


@dataclass(frozen=True)
class ShotCache:
    """What stage 2 needs of one still, fixed between stage-1 passes.

    Attributes:
        pixel_shoebox: (N,) long shoebox of each pixel.
        fast, slow: (N,) pixel offsets from the shoebox centre.
        counts: (N,) photons; valid: (N,) bool (mask and trusted range).
        F0: (B,) complex non-anomalous structure factor of each shoebox's reflection.
        G: (B, S) complex site basis of each reflection.
        energy_eV: (C,) channel energies at which f', f'' are evaluated (on the CPU, with the
            global parameters; everything else on the still's device).
        profiles: cached per-channel profiles (and derivatives), or their sums over the
            channels (:func:`sum_channels`).
        weight: how many times the still counts (bootstrap resampling; 1 normally).
        rejected: (B,) bool shoeboxes left out of the fit (extreme residuals), or None.
    """

    pixel_shoebox: Tensor
    fast: Tensor
    slow: Tensor
    counts: Tensor
    valid: Tensor
    F0: Tensor
    G: Tensor
    energy_eV: Tensor
    profiles: ShotProfiles
    weight: float = 1.0
    rejected: Tensor | None = None

    @property
    def fitted(self) -> Tensor:
        """(N,) bool pixels in the fit: valid and not in a rejected shoebox."""
        return self.valid if self.rejected is None else self.valid & ~self.rejected[self.pixel_shoebox]

    def with_profiles(self, profiles: ShotProfiles) -> "ShotCache":
        return replace(self, profiles=profiles)


def intensities(F0: Tensor, G: Tensor, f_prime: Tensor, f_double_prime: Tensor) -> Tensor:
    """|F0 + G (f' + i f'')|^2: (B, C) electrons^2 from F0 (B,), G (B, S), f', f'' (S, C)."""
    anomalous = torch.complex(f_prime, f_double_prime).to(G.dtype)
    F = F0.unsqueeze(-1) + G @ anomalous
    return F.real * F.real + F.imag * F.imag


def site_intensities(sites, theta: Tensor, cache: ShotCache, energy_offset: Tensor | None = None) -> Tensor:
    """(B, C) |F_h(E_c - delta)|^2 of the still's reflections for global parameters ``theta``
    (P,) of the site model ``sites`` (:class:`~spread_dials.refine.sites.SiteModel`; theta on
    the CPU, like the curves) and the still's energy jitter ``energy_offset`` delta (() eV, on
    any device; None: 0), on the device of the still's cache.

    For profiles summed over the channels (:func:`sum_channels`) the weights of their virtual
    channels instead: (B, 1 + P [+ 1]) rows (1, theta - theta0 [, delta - delta0]), so that
    every channel sum below is the first-order expansion of the exact one about the point the
    channels were summed at (exact there; differentiable in theta and delta alike).

    Raises:
        ValueError: a non-zero jitter for summed profiles made without a jitter column.
    """
    if cache.profiles.summed_at is not None:
        return _virtual_intensities(theta, energy_offset, cache)
    energy = cache.energy_eV
    if energy_offset is not None:
        energy = energy.to(torch.float64) - energy_offset.to(energy.device, torch.float64)
    fp, fdp = sites.curves(theta, energy)
    device = cache.F0.device
    return intensities(cache.F0, cache.G, fp.to(device), fdp.to(device))


def _virtual_intensities(theta: Tensor, energy_offset: Tensor | None, cache: ShotCache) -> Tensor:
    """(B, 1 + P [+ 1]) weights of summed profiles' virtual channels (:func:`site_intensities`)."""
    p = cache.profiles
    columns = [torch.ones(1, dtype=torch.float64), (theta.to(torch.float64) - p.summed_at.to(theta.device, torch.float64))]
    delta = None if energy_offset is None else energy_offset.to("cpu", torch.float64)
    if p.summed_jitter is not None:
        delta = torch.zeros((), dtype=torch.float64) if delta is None else delta
        columns.append((delta - p.summed_jitter.to("cpu", torch.float64)).reshape(1))
    elif delta is not None and (delta.requires_grad or float(delta) != 0.0):
        raise ValueError("profiles summed over the channels without an energy-jitter column cannot move the jitter")
    row = torch.cat(columns).to(cache.F0.device)
    return row.expand(int(cache.F0.shape[0]), -1)


def sum_channels(cache: ShotCache, sites, theta: Tensor, energy_offset: Tensor | None = None) -> ShotProfiles:
    """The still's per-channel profiles summed over the channels at global parameters ``theta``
    (P,) and (when not None) energy jitter ``energy_offset`` (() eV): per pixel
    sum_c P_c |F_h(E_c)|^2, its derivatives in theta (and in the jitter) and, from the
    profiles' Jacobian, the first one's derivative in the crystal offsets
    (:class:`~spread_dials.refine.profiles.ShotProfiles` with ``summed_at``).  A still then
    costs (1 + P [+ 1] + 3 + k) numbers a pixel instead of C (4 + k): 30x less for rubredoxin
    (40 channels), 60x for PSII (100).  Exact at the point summed at; elsewhere first order
    in theta and the jitter (the engine sums again wherever the kernel recomputes the profiles,
    so a converged refinement is the per-channel one's fixed point).

    Raises:
        ValueError: profiles already summed.
    """
    p = cache.profiles
    if p.summed_at is not None:
        raise ValueError("these profiles are already summed over the channels")
    intensity, d_intensity = intensities_and_jacobian(sites, theta, cache, energy_offset)  # (B, C), (B, C, P [+ 1])
    sb = cache.pixel_shoebox
    profile = torch.stack([(p.profile * w[sb]).sum(-1) for w in [intensity, *d_intensity.unbind(-1)]], -1)
    jacobian = None if p.jacobian is None else torch.einsum("nck,nc->nk", p.jacobian, intensity[sb]).unsqueeze(1)
    jitter = None if energy_offset is None else energy_offset.detach().to("cpu", torch.float64).clone()
    return ShotProfiles(p.rotation, profile, jacobian, p.cell, theta.detach().to("cpu", torch.float64).clone(), jitter)


def intensities_and_jacobian(sites, theta: Tensor, cache: ShotCache, energy_offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(|F|^2 (B, C), its derivatives (B, C, P [+ 1]) in theta [and, when ``energy_offset``
    delta (() eV) is given, in the jitter]) of :func:`site_intensities`, detached.  The
    curves' Jacobian (S, C) by autograd on the CPU, the structure factors' in closed form,
    d|F|^2 = 2 Re(conj(F) G da), on the cache's device (a handful of operations a still, where
    autograd through the (B, C) intensities took ~100).  For summed profiles the virtual
    channels' weights and their (constant) derivatives."""
    n = theta.numel()
    x = theta.detach().to("cpu", torch.float64)
    if energy_offset is not None:
        x = torch.cat([x, energy_offset.detach().to("cpu", torch.float64).reshape(1)])
    jitter = lambda t: None if energy_offset is None else t[n]  # noqa: E731
    device = cache.F0.device
    if cache.profiles.summed_at is not None:  # rows (1, theta - theta0 [, delta - delta0])
        value = site_intensities(sites, x[:n], cache, jitter(x))
        d = torch.zeros((value.shape[1], x.numel()), dtype=torch.float64)
        d[1 : 1 + n, :n] = torch.eye(n, dtype=torch.float64)
        if energy_offset is not None and cache.profiles.summed_jitter is not None:
            d[1 + n, n] = 1.0
        return value, d.to(device).expand(value.shape[0], -1, -1)

    def curves(t: Tensor) -> Tensor:
        energy = cache.energy_eV.to(torch.float64)
        if energy_offset is not None:
            energy = energy - t[n]
        return torch.stack(sites.curves(t[:n], energy))  # (2, S, C)

    a, da = value_and_jacobian(curves, x)  # (2, S, C), (2, S, C, Q)
    anomalous = torch.complex(a[0], a[1]).to(device, cache.G.dtype)
    d_anomalous = torch.complex(da[0], da[1]).to(device, cache.G.dtype)
    F = cache.F0.unsqueeze(-1) + cache.G @ anomalous  # (B, C)
    dF = torch.einsum("bs,scq->bcq", cache.G, d_anomalous)
    value = F.real * F.real + F.imag * F.imag
    return value, 2 * (F.real.unsqueeze(-1) * dF.real + F.imag.unsqueeze(-1) * dF.imag)


def intensities_and_slope(sites, theta: Tensor, cache: ShotCache, energy_offset: Tensor) -> tuple[Tensor, Tensor]:
    """(|F|^2, d|F|^2 / d delta) each (B, C) (electrons^2, electrons^2 / eV) of
    :func:`site_intensities` at the still's energy jitter ``energy_offset`` delta (() eV),
    detached (stage 1 linearises the Bragg terms in delta about it)."""
    value, d = intensities_and_jacobian(sites, theta, cache, energy_offset)
    return value, d[..., -1]


@dataclass(frozen=True)
class BraggTerms:
    """A still's Bragg photons per unit scale with the channels summed at fixed |F|^2 (stage 1
    holds f', f'' fixed, so it contracts the channels once per pass, not at every evaluation).

    Attributes:
        value: (N,) sum_c P_c(p; x0) |F_h(E_c)|^2 at the cache point x0.
        jacobian: (N, 3 + k) its derivative in the crystal offsets, or None.
        offsets: (3 + k,) the cache point x0.
    """

    value: Tensor
    jacobian: Tensor | None
    offsets: Tensor


def bragg_terms(cache: ShotCache, intensity: Tensor, jacobian: bool = True) -> BraggTerms:
    """:class:`BraggTerms` of ``cache`` for ``intensity`` (B, C) |F_h(E_c)|^2 (with the offsets'
    derivative when ``jacobian`` and the cache has one)."""
    weight = intensity[cache.pixel_shoebox]
    value = (cache.profiles.profile * weight).sum(-1)
    d = None
    if jacobian and cache.profiles.jacobian is not None:  # summed profiles: of the first virtual channel only
        d = torch.einsum("nck,nc->nk", cache.profiles.jacobian, weight[:, : cache.profiles.jacobian.shape[1]])
    return BraggTerms(value, d, cache.profiles.offsets)


def rate_from_terms(cache: ShotCache, state: ShotState, terms: BraggTerms) -> tuple[Tensor, Tensor]:
    """(lambda, bragg) (N,) of :func:`pixel_rate` from channel-summed terms, linear in the
    offsets' change from the terms' cache point."""
    bragg = terms.value
    if terms.jacobian is not None:
        delta = state.offsets - terms.offsets.to(state.rotation)
        if delta.requires_grad or bool((delta != 0).any()):
            bragg = bragg + terms.jacobian @ delta
    return plane_rate(cache, state.background) + torch.exp(state.log_scale) * bragg, bragg


def plane_rate(pixels, background: Tensor) -> Tensor:
    """(N,) each pixel's background from its shoebox's plane: ``background`` (B, 3) photons per
    pixel at the centre, per pixel in fast, per pixel in slow; ``pixels`` has ``pixel_shoebox``,
    ``fast``, ``slow`` (N,) (a :class:`ShotCache`, or stage 1's batch of stills)."""
    plane = background[pixels.pixel_shoebox]
    return plane[:, 0] + plane[:, 1] * pixels.fast + plane[:, 2] * pixels.slow


def pixel_rate(cache: ShotCache, state: ShotState, intensity: Tensor) -> tuple[Tensor, Tensor]:
    """(lambda, bragg): expected photons (N,) of every pixel and the Bragg part without G.

    Args:
        cache: the still's cache.
        state: its per-shot parameters (rotation and cell relative to the cache's are linearised).
        intensity: (B, C) |F_h(E_c)|^2 of its reflections.
    """
    moved = False
    if cache.profiles.jacobian is not None:
        delta = state.offsets - cache.profiles.offsets.to(state.rotation)
        moved = delta.requires_grad or bool((delta != 0).any())
    return rate_from_terms(cache, state, bragg_terms(cache, intensity, jacobian=moved))


def pixel_variance(lam: Tensor, readout_sigma: float | None = None, model_error_fraction: float = 0.0) -> Tensor:
    """Variance (photons^2) of a pixel's count: lambda (Poisson) + sigma_readout^2 + (f lambda)^2,
    the last term the model's own fractional error f (bright spots: a 2 % error in a 1e4-photon
    pixel is 200 photons, twice its Poisson noise)."""
    lam = lam.clamp(min=LAMBDA_FLOOR)
    return lam + (readout_sigma or 0.0) ** 2 + (model_error_fraction * lam) ** 2


def fisher_weights(lam: Tensor, fitted: Tensor, readout_sigma: float | None = None, model_error_fraction: float = 0.0,
                   noise_flow=None) -> Tensor:  # fmt: skip
    """(N,) weights 1 / variance of the Fisher information sum_p w_p (d lambda_p)(d lambda_p)^T:
    0 for pixels out of the fit and for pixels whose rate is at or below the floor (the clamped
    rate does not move with the parameters; 1 / floor would swamp the information).  With a
    ``noise_flow`` (:class:`~spread_dials.correct.noise_flow.ResidualFlow`) each weight is
    multiplied by the flow's precision factor 1 / Var_q(z) at the pixel's rate."""
    w = fitted.to(lam.dtype) / pixel_variance(lam, readout_sigma, model_error_fraction)
    if noise_flow is not None:
        w = w * noise_flow.precision_factor(lam.detach())
    return torch.where(lam > LAMBDA_FLOOR, w, torch.zeros_like(w))


def negative_log_likelihood(lam: Tensor, counts: Tensor, valid: Tensor, readout_sigma: float | None = None,
                            model_error_fraction: float = 0.0, noise_flow=None) -> Tensor:  # fmt: skip
    """Sum over valid pixels of the NLL (up to a constant): Poisson lambda - k log lambda, or
    (``readout_sigma`` (photons) or ``model_error_fraction`` given) Gaussian
    0.5 ((k - lambda)^2 / v + log v) with v = :func:`pixel_variance`, with a ``noise_flow``
    v divided by its precision factor (:func:`pixel_nll`)."""
    return pixel_nll(lam, counts, valid, readout_sigma, model_error_fraction, noise_flow).sum()


def jitter_negative_log_prior(jitter: Tensor, sigma: float | None) -> Tensor | float:
    """-log of the energy-jitter prior N(0, ``sigma``^2) (up to a constant) of jitters (eV, any
    shape), or 0 without a prior (``sigma`` None: the jitter is not refined)."""
    if sigma is None:
        return 0.0
    return 0.5 * (jitter / sigma) ** 2


#: mosaic log factors at the end of a still's cell vector with ``CrystalModel.mosaic_latent``
N_MOSAIC_FACTORS = 3


def offset_kinds(n_offsets: int, refine_mosaic: bool) -> list[str]:
    """Each of a still's ``n_offsets`` crystal offsets (:attr:`ShotState.offsets`) by kind:
    ``rotation`` (3, rad), ``cell`` (log cell lengths), then with ``refine_mosaic`` ``mosaic``
    (:data:`N_MOSAIC_FACTORS` log factors of the spreads about a, b, c)."""
    n_mosaic = N_MOSAIC_FACTORS if refine_mosaic else 0
    return ["rotation"] * 3 + ["cell"] * (n_offsets - 3 - n_mosaic) + ["mosaic"] * n_mosaic


def mosaic_factors(cell: Tensor) -> Tensor:
    """(..., 3) the mosaic log factors of cell vectors (..., k + 3) that carry them (their end)."""
    return cell[..., -N_MOSAIC_FACTORS:]


def mosaic_negative_log_prior(mosaic: Tensor, sigma: float | None) -> Tensor | float:
    """-log of the prior N(0, ``sigma``^2) on each mosaic log factor (up to a constant), summed
    over the last axis of ``mosaic`` (..., 3), or 0 without a prior (``sigma`` None: the
    mosaic spreads are not refined)."""
    if sigma is None:
        return 0.0
    return 0.5 * ((mosaic / sigma) ** 2).sum(-1)


def shot_negative_log_prior(state: ShotState, settings) -> Tensor | float:
    """() -log prior of a still's refined per-shot parameters that have one under ``settings``
    (:class:`~spread_dials.refine.engine.RefineSettings`): its energy jitter and its mosaic log
    factors (the last 3 of ``state.cell``); stage 1 minimises it with the still's NLL."""
    prior = jitter_negative_log_prior(state.energy_jitter(), settings.energy_jitter_sigma_eV)
    if settings.refine_mosaic:
        prior = prior + mosaic_negative_log_prior(mosaic_factors(state.cell.detach()), settings.mosaic_sigma)
    return prior


def pixel_nll(lam: Tensor, counts: Tensor, valid: Tensor, readout_sigma: float | None = None,
              model_error_fraction: float = 0.0, noise_flow=None) -> Tensor:  # fmt: skip
    """(N,) each pixel's term of :func:`negative_log_likelihood` (0 where not ``valid``).

    ``noise_flow``: None, or a learned density q(z | c) of the standardized residual
    (:class:`~spread_dials.correct.noise_flow.ResidualFlow`, Gaussian likelihoods only): the
    term is 0.5 (P (k - lambda)^2 / v + log v), P = 1 / Var_q(z | lambda) the flow's precision
    factor held as a weight at the current rate (its derivative in lambda is not followed, as
    in iteratively reweighted least squares): the pixel's variance is v / P.  The Gaussian term
    itself at the flow's identity.  Only q's variance enters, not its shape: the full density
    -log q(z) moved the edge shifts by 0.4 sigma rms on data with nothing to learn, following a
    flow fitted to a few hundred bright pixels, and a P that moves with lambda (with its
    -log P) bent the background planes of dim pixels where P falls from 1 to 0.6
    (benchmarks/RESULTS.md, session 20)."""
    lam = lam.clamp(min=LAMBDA_FLOOR)
    if readout_sigma is None and model_error_fraction == 0:
        terms = lam - counts * torch.log(lam)
    else:
        v = pixel_variance(lam, readout_sigma, model_error_fraction)
        if noise_flow is None:
            terms = 0.5 * ((counts - lam) ** 2 / v + torch.log(v))
        else:
            precision = noise_flow.precision_factor(lam.detach())
            terms = 0.5 * ((counts - lam) ** 2 / v * precision + torch.log(v))
    return torch.where(valid, terms, torch.zeros_like(terms))
