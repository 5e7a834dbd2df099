"""The corrected physics model and its fit: dials.spread_refine's engine with a learned correction
between the kernel's profiles and the likelihood (pure torch plus the engine's communicator).

:class:`CorrectedModel` wraps a :class:`~spread_dials.refine.engine.Refinement`: it keeps each
still's physics profiles and hands the engine corrected ones (through ``Refinement.profile_map``,
so the kernel's recomputations are corrected too).  The objective in the global parameters
theta (edge shifts) and the correction's weights phi is

    F(theta, phi) = min over per-shot parameters of NLL(lambda*(theta, phi))
                    + beta A(phi) + prior(theta) + prior(phi),
    A(phi) = sum_stills sum_pixels KL(Poisson(lambda*_0(phi)) || Poisson(lambda_0))

with the anchor A in closed form (:func:`~spread_dials.correct.divergence.poisson_kl`) at a frozen
reference: lambda_0 = b_0 + s_0 B_0 is each still's physics rate at the warm start (its edge
shifts theta_0 and the per-shot parameters the model starts from: background b_0, scale s_0,
Bragg photons per unit scale B_0), and lambda*_0(phi) = b_0 + s_0 C_phi(B_0) the same with the
correction applied.  So the anchor constrains the correction only.  Taken at the current theta
and per-shot parameters instead, it has a gradient in theta of its own and, through the refitted
scales (the KL of a strong correction is ~1e9 at scale, and homogeneous in the scale), F's
minimum in theta moves off the likelihood's: measured on the toy, theta steps stalled 1.9 sigma
from the truth.

An epoch: stage 1 of the engine (each still's scale, crystal offsets and backgrounds on the
corrected profiles, profiles recomputed), then one Fisher-scoring step of F in phi and (after
the first ``warmup_epochs``, which also hold the stills' energy jitters) one in (theta, phi)
jointly, or in theta alone where the joint step finds no descent, with the per-shot parameters
profiled out of the information exactly as the engine's scoring step does for theta
(:func:`~spread_dials.refine.information.shot_information` with the correction's columns
d lambda* / d phi), and a backtracking line search on F (every
still refitted at the trial point).  The anchor's curvature in phi is beta times its
Gauss-Newton Hessian at the frozen reference.  Per-still values are summed in still order over
the ranks, so any number of ranks gives the serial answer.  (A resumed fit rebuilds the frozen
reference from its checkpoint's crystals, so its anchor differs slightly from the first run's.)

The covariance of theta with phi profiled out (:meth:`CorrectedModel.covariance`) is the
corrected model's posterior covariance under the Laplace approximation: the correction's own
uncertainty widens the edge shifts' intervals.  :meth:`CorrectedModel.robust_covariance` is the
sandwich beside it (the stills' scores' scatter in place of the information), a check of that
sigma where a model error is left (benchmarks/correct.py records both).

Because the correction (except the leaky arm) is linear in the profiles and the same for every
channel, it commutes with the channel sum: the corrected Bragg term of a pixel is the correction
applied to the channel-summed physics term.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from spread_dials.correct.context import PixelContext
from spread_dials.correct.correction import PixelCorrection
from spread_dials.correct.divergence import poisson_kl
from spread_dials.refine.engine import Refinement
from spread_dials.refine.information import follow_step, psd_pseudo_inverse, shot_information
from spread_dials.refine.model import (
    LAMBDA_FLOOR,
    BraggTerms,
    ShotState,
    fisher_weights,
    negative_log_likelihood,
    rate_from_terms,
    shot_negative_log_prior,
)
from spread_dials.refine.profiles import ShotProfiles
from spread_dials.refine.residuals import standardized_residuals, still_leverage

__all__ = ["CorrectSettings", "CorrectedModel", "feature_statistics"]

if TYPE_CHECKING:
    from spread_dials.correct.noise_flow import ResidualFlow

logger = logging.getLogger("dials.spread.correct")


@dataclass(frozen=True)
class CorrectSettings:
    """The fit's schedule.

    Attributes:
        epochs: the most epochs (stage 1, then one joint scoring step).
        warmup_epochs: the first epochs step the correction only (edge shifts and the stills'
            energy jitters and mosaic factors held: :func:`latents_held`).
        theta_tolerance, phi_tolerance: the fit has converged after an epoch past the warm-up
            that moved no global parameter by more than these (eV for edge shifts; the
            correction's weights); it stops there.  A fixed number of epochs stopped toy fits
            half-way: a Fisher step moves an edge shift by at most the trust radius (2 eV) and
            a warm start 5.7 eV off needed 5 epochs past the warm-up.
        anchor_beta: weight of the Poisson KL anchor to the physics rate.  Its curvature is
            ~beta times the likelihood's in every direction that changes the rate, so it
            shrinks the correction by ~beta / (1 + beta) whatever the data's size: at 0.01 a
            1.5 px PSF's stencil came out 0.6 % short on all 12 rubredoxin data sets of 20
            stills, and held-out stills' brightest shell had residual sd 1.13 (1.04-1.29);
            at 0.001 the stencil is within 0.02 % and that shell's sd 0.98, the edge shift
            the same to 0.001 eV (chosen on held-out stills, as CORRECT_DESIGN.md asks;
            benchmarks/RESULTS.md session 23).
        line_search: step fractions tried in turn; the first that lowers F is taken.  Down to
            1/256: with three fractions (to 1/16) an H200 run's first stencil step overshot
            (0.154 to each edge neighbour for a PSF's 0.114) and every later step of the
            correction was refused (its KL the same to 10 digits for five epochs), leaving the
            edge shift 4.9 sigma from the oracle's.
        noise_flow: learn the pixel noise (charge-integrating detectors; the Gaussian
            likelihoods only): a :class:`~spread_dials.correct.noise_flow.ResidualFlow` on the
            standardized residuals, refitted after the first ``flow_epochs`` epochs' stage 1 at
            the corrected rates; where kept (``flow_significance``) every NLL and Fisher weight
            uses its variance from then on (:func:`~spread_dials.refine.model.pixel_nll`).
        flow_epochs: the flow is refitted after each of the first this many epochs' stage 1,
            then held: its optimum is flat (successive refits of the same pixels moved the
            precision factor by up to 5 %), so refitting it every epoch kept moving the edge
            shifts and 2 of the first 6 toy fits ran to their 15-epoch limit.
        flow_beta: the flow's anchor weight (its KL to N(0, 1) summed over 16 rate contexts).
        flow_steps: Adam steps of each refit.
        flow_pixels: the fitted pixels it is fitted to (a fixed, evenly strided sample over
            the stills; every rank fits the same sample and so the same flow).
        flow_seed: seeds the flow's hidden layers (the last layers start at 0: the identity).
        flow_significance: each refit is to every other pixel of the sample and is kept only if
            its variance predicts the other half better than the Gaussian readout's, by this
            many standard errors of the mean log-likelihood gain
            (:func:`~spread_dials.correct.noise_flow.held_out_gain`); otherwise the flow goes
            back to the identity.  Fitted unchecked, it moved the edge shifts of data with
            nothing to learn by 0.2 sigma rms (up to 0.9) and narrowed their intervals by 2.5 %
            (40 toy data sets, benchmarks/RESULTS.md session 20): the variance of a few hundred
            bright pixels is known to ~10 %.
    """

    epochs: int = 8
    warmup_epochs: int = 2
    anchor_beta: float = 0.001
    theta_tolerance: float = 1e-3
    phi_tolerance: float = 1e-4
    line_search: tuple[float, ...] = (1.0, 0.25, 0.0625, 0.015625, 0.00390625)
    noise_flow: bool = False
    flow_epochs: int = 3
    flow_beta: float = 1.0
    flow_steps: int = 200
    flow_pixels: int = 20000
    flow_seed: int = 0
    flow_significance: float = 3.0


@contextmanager
def latents_held(refinement: Refinement, held: bool) -> Iterator[None]:
    """While ``held``, the stills' energy jitters and mosaic factors stay where they are: the
    refinement's settings without the jitter prior (stage 1, the information and the objective
    then leave the jitters out) and with a zero trust radius for the mosaic factors (then not
    refined: out of stage 1's steps, the information and follow_step,
    :func:`~spread_dials.refine.information.mosaic_refined`).
    The warm-up's epochs hold them, as the engine's first macrocycle does: fitted against the
    uncorrected model they take up its error (H200 session 16, rubredoxin with a 1.5 px PSF: rms
    5-13 eV after the first epoch under a 1 eV prior, and one fit of four ended with its jitters
    uncorrelated with the injected ones)."""
    saved = refinement.settings
    if held:
        refinement.settings = replace(saved, energy_jitter_sigma_eV=None, mosaic_step_percent=0.0)
    try:
        yield
    finally:
        refinement.settings = saved


def feature_statistics(refinement: Refinement, contexts: list[PixelContext]) -> Tensor:
    """(2, F) mean and standard deviation of each head feature over every pixel of every still
    (ranks summed in still order): the centre and scale of the head's standardized inputs."""
    parts = []
    for ctx in contexts:
        x = ctx.head_features.detach().cpu()
        parts.append(torch.cat([torch.tensor([float(x.shape[0])], dtype=x.dtype), x.sum(0), (x * x).sum(0)]))
    total = refinement.ordered_sum(parts)
    n_f = (total.numel() - 1) // 2
    n, s1, s2 = total[0], total[1 : 1 + n_f], total[1 + n_f :]
    mean = s1 / n
    return torch.stack([mean, (s2 / n - mean * mean).clamp(min=0).sqrt()])


class CorrectedModel:
    """A refinement whose profiles pass through a learned correction (module docstring).

    Args:
        refinement: the physics engine, with its caches made (physics profiles) and per-shot
            states initialised; its ``profile_map`` is taken over.
        correction: the correction (:class:`~spread_dials.correct.correction.PixelCorrection`
            or its leaky variant), on the device of the stills.
        contexts: each local still's :class:`~spread_dials.correct.context.PixelContext`.
        settings: the schedule and anchor.
    """

    def __init__(self, refinement: Refinement, correction: PixelCorrection, contexts: list[PixelContext],
                 settings: CorrectSettings):  # fmt: skip
        self.refinement = refinement
        self.correction = correction
        self.contexts = contexts
        self.settings = settings
        self.physics = [c.profiles for c in refinement.caches]
        self.history: list[dict] = []
        self._anchor = [self._anchor_reference(i) for i in range(len(refinement.caches))]
        self._names = correction.learned()
        refinement.map_profiles(self._map)
        self._profiles_phi = self.phi  # the weights every cache's profiles were corrected with
        self._seconds = {"stage1": 0.0, "refits": 0.0, "information": 0.0}  # wall time spent in each, in all
        if settings.noise_flow:
            if refinement.settings.readout_sigma is None and refinement.settings.model_error_fraction == 0:
                raise ValueError("the noise flow needs a Gaussian likelihood (likelihood=gaussian_readout, or "
                                 "model_error_fraction > 0): photon-counting pixels are Poisson")  # fmt: skip
            from spread_dials.correct.noise_flow import ResidualFlow  # zuko only when asked for

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.flow_seed)
                flow = ResidualFlow()
            dtype = refinement.caches[0].counts.dtype if refinement.caches else torch.float64
            device = refinement.caches[0].counts.device if refinement.caches else "cpu"
            refinement.settings = replace(refinement.settings, noise_flow=flow.to(device=device, dtype=dtype))

    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Add the wall time of the block to ``part``'s total (each epoch records its share)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[part] += time.perf_counter() - t0

    @property
    def noise_flow(self) -> ResidualFlow | None:
        """The learned pixel noise, or None."""
        return self.refinement.settings.noise_flow

    def residual_sample(self) -> tuple[Tensor, Tensor]:
        """(z, lambda*) (M,) of about ``settings.flow_pixels`` fitted pixels of the stills in the
        fit, on every rank: every k-th of each still's (k from the total over all ranks), in
        global still order, so that any number of ranks gives the serial sample; the
        studentized residuals at the corrected rates (:func:`~spread_dials.refine.residuals.still_leverage`)
        and the rates (photons)."""
        r = self.refinement
        parts = []
        with torch.no_grad():
            for i, cache in enumerate(r.caches):
                rate = self.rates(i)[0].clamp(min=LAMBDA_FLOOR)
                z = standardized_residuals(rate, cache.counts, r.settings.readout_sigma, r.settings.model_error_fraction)
                # studentized: the shoebox's plane and the still's scale and crystal offsets take their
                # degrees of freedom from the residuals, most from the bright pixels that pin them
                z = z / (1 - still_leverage(r, i)).clamp(min=0.05).sqrt()
                keep = cache.fitted & (cache.weight > 0)
                parts.append((r.shot_index[i], z[keep].cpu(), rate[keep].cpu()))
        total = int(r.comm.allreduce(sum(z.numel() for _, z, _ in parts)))
        stride = max(1, total // max(self.settings.flow_pixels, 1))
        gathered = sorted((g, z[::stride], lam[::stride]) for part in r.comm.allgather(parts) for g, z, lam in part)
        if not gathered:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return torch.cat([z for _, z, _ in gathered]), torch.cat([lam for _, _, lam in gathered])

    def fit_noise(self) -> dict:
        """Refit the noise flow to every other pixel of :meth:`residual_sample` (the same on every
        rank) and keep it only if it predicts the other half significantly better than N(0, 1)
        (``settings.flow_significance``), else reset it to the identity.  Returns its final loss
        per pixel, the held-out gain per pixel and its standard error, whether it was kept, the
        mean precision factor over the sample and the pixel count."""
        from spread_dials.correct.noise_flow import fit_residual_flow, held_out_gain

        flow = self.noise_flow
        z, lam = self.residual_sample()
        device = next(flow.parameters()).device
        z, lam = z.to(device), lam.to(device)
        losses = fit_residual_flow(flow, z[::2], lam[::2], self.settings.flow_beta, self.settings.flow_steps)
        gain, error = held_out_gain(flow, z[1::2], lam[1::2])
        kept = gain > self.settings.flow_significance * error
        if not kept:
            flow.reset()
        return {"loss": losses[-1], "held_out_gain": gain, "held_out_error": error, "kept": bool(kept),
                "precision": float(flow.precision_factor(lam).mean()), "pixels": z.numel()}  # fmt: skip

    # -- the correction's weights as one vector ---------------------------------------------------

    @property
    def phi(self) -> Tensor:
        """(Q,) the correction's weights, flat (CPU)."""
        return torch.nn.utils.parameters_to_vector(self._parameters()).detach().cpu()

    def _parameters(self) -> list[torch.nn.Parameter]:
        named = dict(self.correction.named_parameters())
        return [named[n] for n in self._names]

    def set_phi(self, phi: Tensor) -> None:
        """Set the correction's weights to ``phi`` (Q,) and every still's profiles with them (the
        profiles are left as they are when they were made with these weights: correcting every
        still's per-channel profiles and Jacobian was 43 % of a fit's time on the CPU, most of
        it for an unchanged phi at the start and baseline of each scoring step)."""
        current = self.phi
        if torch.equal(phi.to(current), self._profiles_phi) and torch.equal(current, self._profiles_phi):
            return
        params = self._parameters()
        torch.nn.utils.vector_to_parameters(phi.to(params[0]), params)
        self.refresh()

    def _unflatten(self, phi: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, p in zip(self._names, self._parameters()):
            out[name] = phi[start : start + p.numel()].view_as(p)
            start += p.numel()
        return out

    # -- profiles -------------------------------------------------------------------------------

    def _apply(self, i: int, values: Tensor, phi: Tensor | None = None) -> Tensor:
        """The correction of local still i applied to per-pixel ``values`` (N, ...), with the
        weights ``phi`` (functional, differentiable) or the module's own."""
        shot = self.refinement.shots.shots[i]
        kwargs = {"miller_index": shot.shoeboxes.miller_index}
        if phi is None:
            return self.correction.apply(values, self.contexts[i], **kwargs)
        return torch.func.functional_call(self.correction, self._unflatten(phi), (values, self.contexts[i]), kwargs)

    def corrected_profiles(self, i: int, profiles: ShotProfiles) -> ShotProfiles:
        """Still i's ``profiles`` through the current correction (no gradient)."""
        with torch.no_grad():
            jacobian = None if profiles.jacobian is None else self._apply(i, profiles.jacobian)
            return ShotProfiles(profiles.rotation, self._apply(i, profiles.profile), jacobian, profiles.cell)

    def _map(self, i: int, profiles: ShotProfiles) -> ShotProfiles:
        self.physics[i] = profiles
        return self.corrected_profiles(i, profiles)

    def refresh(self) -> None:
        """Every still's cache to its physics profiles through the current correction."""
        r = self.refinement
        r.caches = [c.with_profiles(self.corrected_profiles(i, p)) for i, (c, p) in enumerate(zip(r.caches, self.physics))]
        self._profiles_phi = self.phi

    # -- rates ----------------------------------------------------------------------------------

    def _physics_terms(self, i: int, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(profile (N, C), weight (N, C)): still i's physics profiles moved (linearly) to its
        current crystal offsets, and each pixel's |F_h(E_c)|^2 at ``theta`` (differentiable)."""
        r = self.refinement
        p, cache = self.physics[i], r.caches[i]
        profile = p.profile
        if p.jacobian is not None:
            profile = profile + p.jacobian @ (r.states[i].offsets - p.offsets.to(profile))
        return profile, r.curves_intensity(i, theta)[cache.pixel_shoebox]

    def _bragg(self, i: int, profile: Tensor, weight: Tensor, phi: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(corrected, physics) channel-summed Bragg terms (N,) of still i."""
        physics = (profile * weight).sum(-1)
        if getattr(self.correction, "per_channel", False):  # channel-dependent (the leaky arm)
            return (self._apply(i, profile, phi) * weight).sum(-1), physics
        return self._apply(i, physics, phi), physics  # linear, channel-independent: correct the sum

    def bragg(self, i: int, theta: Tensor | None = None, phi: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(corrected, physics) Bragg terms (N,) of local still i per unit scale at its current
        crystal offsets, for ``theta`` and ``phi`` (default the current ones)."""
        theta = self.refinement.theta if theta is None else theta
        return self._bragg(i, *self._physics_terms(i, theta), phi)

    def _rate(self, i: int, bragg: Tensor) -> Tensor:
        """(N,) local still i's rate at its current per-shot parameters for Bragg terms ``bragg``
        (N,) per unit scale."""
        state = self.refinement.states[i]
        rate, _ = rate_from_terms(self.refinement.caches[i], state, BraggTerms(bragg, None, state.offsets))
        return rate

    def rates(self, i: int, theta: Tensor | None = None, phi: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(lambda*, lambda_phys) (N,) of local still i at its current per-shot parameters, for
        ``theta`` and ``phi`` (default the current ones; differentiable in both)."""
        corrected, physics = self.bragg(i, theta, phi)
        return self._rate(i, corrected), self._rate(i, physics)

    # -- the anchor ----------------------------------------------------------------------------

    def _anchor_reference(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Local still i's frozen anchor reference (module docstring): (physics profile (N, C)
        and |F|^2 weight (N, C) at theta_0, channel-summed unless the correction acts per
        channel; s_0 (0-d); lambda_0 (N,))."""
        r = self.refinement
        with torch.no_grad():
            profile, weight = self._physics_terms(i, r.theta.detach())
            if not getattr(self.correction, "per_channel", False):
                profile, weight = (profile * weight).sum(-1, keepdim=True), torch.ones_like(profile[:, :1])
            state = r.states[i]
            physics = (profile * weight).sum(-1)
            lam_0, _ = rate_from_terms(r.caches[i], state, BraggTerms(physics, None, state.offsets))
        return profile, weight, torch.exp(state.log_scale.detach()), lam_0

    def anchored_rate(self, i: int, phi: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(lambda*_0(phi), lambda_0) (N,) of local still i (differentiable in ``phi``)."""
        profile, weight, scale, lam_0 = self._anchor[i]
        corrected, physics = self._bragg(i, profile, weight, phi)
        return lam_0 + scale * (corrected - physics), lam_0

    def anchor(self, i: int, phi: Tensor | None = None) -> Tensor:
        """Local still i's weighted anchor sum_pixels KL(lambda*_0(phi) || lambda_0)."""
        cache = self.refinement.caches[i]
        lam_star, lam_0 = self.anchored_rate(i, phi)
        return cache.weight * torch.where(cache.fitted, poisson_kl(lam_star, lam_0), torch.zeros_like(lam_0)).sum()

    def still_terms(self, i: int, theta: Tensor | None = None, phi: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(weighted NLL of lambda* at ``theta``, weighted anchor) of local still i."""
        r = self.refinement
        cache = r.caches[i]
        lam_star = self._rate(i, self.bragg(i, theta, phi)[0])
        nll = negative_log_likelihood(lam_star, cache.counts, cache.fitted, r.settings.readout_sigma,
                                      r.settings.model_error_fraction, r.settings.noise_flow)  # fmt: skip
        return cache.weight * nll, self.anchor(i, phi)

    # -- the objective F and its scoring step ---------------------------------------------------

    def objective(self, theta: Tensor, phi: Tensor, starts: list[ShotState] | None = None) -> tuple[float, list[ShotState]]:
        """F(theta, phi) (module docstring) on the current caches' profiles: every still's
        per-shot parameters refitted by stage 1's Gauss-Newton at (theta, phi) from ``starts``
        (default their current values), then the NLL and beta KL at them plus the priors (the
        sites', the correction's and each still's energy-jitter prior, weighted as its NLL: the
        minimum over the per-shot parameters is of their NLL plus their prior, as in stage 1; left
        out, a common jitter traded against the edge shifts at no cost, H200 session 16); and the
        refitted per-shot parameters.  Leaves the correction's weights at ``phi``."""
        with self._timed("refits"):
            return self._objective(theta, phi, starts)

    def _objective(self, theta: Tensor, phi: Tensor, starts: list[ShotState] | None) -> tuple[float, list[ShotState]]:
        r = self.refinement
        self.set_phi(phi)
        saved = r.states
        r.states = [state for state, _ in r.refit_shots(theta, starts)]
        try:
            with torch.no_grad():
                parts = [self._still_parts(i, theta) for i in range(len(r.caches))]
        finally:
            states, r.states = r.states, saved
        total = r.ordered_sum(parts)
        nll, kl, shot_prior = (0.0, 0.0, 0.0) if total is None else (float(total[0]), float(total[1]), float(total[2]))
        with torch.no_grad():
            prior = float(r.sites.negative_log_prior(theta)) + float(self.correction.negative_log_prior()) + shot_prior
        self._terms = {"nll": nll, "kl": kl, "prior": prior}
        return nll + self.settings.anchor_beta * kl + prior, states

    def _still_parts(self, i: int, theta: Tensor) -> Tensor:
        """(3,) float64 on the CPU: local still i's weighted NLL at ``theta``, its weighted
        anchor and its weighted per-shot prior (energy jitter, mosaic factors), at its current per-shot parameters."""
        r = self.refinement
        prior = shot_negative_log_prior(r.states[i], r.settings)
        shot_prior = torch.tensor([float(r.caches[i].weight * prior)], dtype=torch.float64)
        return torch.cat([torch.stack(self.still_terms(i, theta)).cpu(), shot_prior])

    def _bragg_jacobian(self, i: int, profile: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(N, Q_i) d (corrected Bragg term) / d phi of local still i at the current phi, for
        physics ``profile`` and ``weight`` (N, C), in closed form, and the indices (Q_i,) of
        those of phi's entries the still's pixels depend on (the others' columns are 0)
        (:meth:`~spread_dials.correct.correction.PixelCorrection.bragg_jacobian`)."""
        with torch.no_grad():
            miller_index = self.refinement.shots.shots[i].shoeboxes.miller_index
            return self.correction.bragg_jacobian(profile, weight, self.contexts[i], miller_index)[1:]

    def _columns(self, i: int) -> tuple[Tensor, Tensor]:
        """(N, Q_i) d lambda* / d phi of local still i at its current per-shot parameters and
        phi, and their indices (Q_i,) in phi (:meth:`_bragg_jacobian`)."""
        r = self.refinement
        profile, weight = self._physics_terms(i, r.theta.detach())
        columns, index = self._bragg_jacobian(i, profile, weight)
        return torch.exp(r.states[i].log_scale.detach()) * columns, index

    def _anchor_curvature(self, i: int) -> tuple[Tensor, Tensor]:
        """(Q_i, Q_i) the Gauss-Newton curvature of local still i's weighted anchor in phi at the
        current phi, and its rows' indices (Q_i,) in phi (:meth:`_bragg_jacobian`; 0 elsewhere):
        J^T diag(1 / lambda*_0) J with J = d lambda*_0 / d phi = s_0 d C_phi(B_0) / d phi
        (the KL's second derivative in lambda* is 1 / lambda*; 0 at or below the KL's floor,
        where the clamped rate does not move: a background plane below zero at a box corner gave
        1 / 1e-300 and an infinite curvature, H200 session 9)."""
        cache = self.refinement.caches[i]
        profile, weight, scale, _ = self._anchor[i]
        columns, index = self._bragg_jacobian(i, profile, weight)
        jacobian = scale * columns
        with torch.no_grad():
            lam_star = self.anchored_rate(i)[0]
        w = fisher_weights(lam_star, cache.fitted) * cache.weight
        return ((w.unsqueeze(-1) * jacobian).T @ jacobian).detach(), index

    def gradient_and_information(self) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
        """At the current (theta, phi) and per-shot parameters: the gradient (P + Q,) of F at
        fixed per-shot parameters (the profile gradient when stage 1 is at its optimum), the
        profiled information (P + Q, P + Q) of (theta, phi) summed over the stills plus the
        anchor's and the priors' curvature, the same without the anchor (the likelihood's and
        priors' only: the posterior precision), each local still's per-shot response
        (S_i, P + Q) to (theta, phi) (:func:`~spread_dials.refine.information.follow_step`), and
        the sum over the stills of the outer product of each still's NLL gradient (P + Q, P + Q):
        the scores' empirical covariance, the middle of :meth:`robust_covariance`."""
        with self._timed("information"):
            return self._gradient_and_information()

    def _gradient_and_information(self) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
        r = self.refinement
        theta, phi = r.theta.detach(), self.phi
        beta = self.settings.anchor_beta
        p, q = theta.numel(), phi.numel()
        n = p + q
        parts, informations, anchors, outers, responses = [], [], [], [], []
        for i in range(len(r.caches)):
            t = theta.clone().requires_grad_(True)
            x = phi.clone().to(r.caches[i].counts).requires_grad_(True)
            nll, kl = self.still_terms(i, t, x)
            g_t, g_x = torch.autograd.grad(nll, [t, x], allow_unused=True)
            (g_kl,) = torch.autograd.grad(kl, x, allow_unused=True) if kl.requires_grad else (None,)
            score = torch.cat([g.cpu() if g is not None else torch.zeros_like(v).cpu() for g, v in ((g_t, theta), (g_x, phi))])
            g_kl = torch.zeros_like(phi) if g_kl is None else g_kl
            # (theta, phi)'s entries the still's pixels depend on: its score, information and
            # response are 0 elsewhere (the leaky arm's factors of reflections it does not see)
            columns, index = self._columns(i)
            seen = torch.cat([torch.arange(p), p + index.cpu()])
            information = shot_information(r, i, theta, extra=columns)
            response = information.response.new_zeros((information.response.shape[0], n))
            response[:, seen] = information.response
            responses.append(response)
            parts.append(torch.cat([score, beta * g_kl.cpu()]))
            informations.append((seen, information.profiled))
            anchor, anchor_index = self._anchor_curvature(i)
            anchors.append((anchor_index, anchor))
            outers.append((seen, torch.outer(score[seen], score[seen])))
        total = r.ordered_sum(parts)
        grad = total[:n].clone()
        grad[p:] += total[n:]
        information = r.ordered_scatter_sum(informations, n)
        anchor = r.ordered_scatter_sum(anchors, q)
        scores = r.ordered_scatter_sum(outers, n)
        prior_h = torch.autograd.functional.hessian(lambda t, x: self._prior_value(t, x), (theta, phi))
        prior_matrix = torch.cat([torch.cat([prior_h[0][0], prior_h[0][1]], 1), torch.cat([prior_h[1][0], prior_h[1][1]], 1)])
        prior_grad = torch.autograd.functional.jacobian(lambda t, x: self._prior_value(t, x), (theta, phi))
        grad = grad + torch.cat([prior_grad[0], prior_grad[1]])
        posterior = information + prior_matrix
        curvature = posterior.clone()
        curvature[p:, p:] += beta * anchor
        return grad, curvature, posterior, responses, scores

    def _prior_value(self, theta: Tensor, phi: Tensor) -> Tensor:
        """prior(theta) + prior(phi) as a function of both (differentiable)."""
        weights = self._unflatten(phi)
        return self.refinement.sites.negative_log_prior(theta) + self.correction.negative_log_prior(weights)

    def scoring_step(self, block: str) -> tuple[dict, bool]:
        """One Fisher-scoring step of F in ``theta`` (the correction held), ``phi`` (the edge
        shifts held) or ``both``, the per-shot parameters profiled out of the information, with
        a backtracking line search (``settings.line_search``); returns F's terms at the end and
        whether a step was taken.  Each edge shift moves at most the engine's
        ``max_global_step``; each trial's refits start from the per-shot parameters moved by
        their linear response to the step (:func:`~spread_dials.refine.information.follow_step`:
        without it an edge shift traded against the stills' energy jitters moved 1/16 of a step
        per epoch, 20 epochs leaving it 1.2 eV off on the H200, session 15)."""
        r = self.refinement
        theta, phi = r.theta.detach().clone(), self.phi
        _, r.states = self.objective(theta, phi)  # (the point where the information is taken)
        grad, curvature, _, responses, _ = self.gradient_and_information()
        p = theta.numel()
        keep = torch.zeros(grad.numel(), dtype=torch.bool)
        keep[:p] = block in ("theta", "both")
        keep[p:] = block in ("phi", "both")
        step = torch.zeros_like(grad)
        h = 0.5 * (curvature + curvature.T)
        step[keep] = -psd_pseudo_inverse(h[keep][:, keep]) @ grad[keep]
        largest = float(step[:p].abs().max()) if p else 0.0
        if largest > r.settings.max_global_step:
            step = step * (r.settings.max_global_step / largest)
        # the trials' baseline is the step of length 0: stage 1's refit is linear in each still's
        # jitter about where it starts, so a refit from the refitted states lands elsewhere (F
        # +0.06 on a toy, against gains of 0.02 a step: the fit crawled along a flat ridge)
        origin = r.states
        value, zero = self.objective(theta, phi, origin)
        terms = dict(self._terms)
        logger.debug("%s step: predicted decrease %.4g, theta step %s", block, float(-0.5 * grad @ step), step[:p].tolist())
        for t in self.settings.line_search:
            starts = [follow_step(s, q, t * step, r.settings) for s, q in zip(origin, responses)]
            trial_value, states = self.objective(theta + t * step[:p], phi + t * step[p:], starts)
            logger.debug("  t %.4g: F - F0 %.4g", t, trial_value - value)
            if trial_value < value:
                r.theta, r.states = theta + t * step[:p], states
                return dict(self._terms), True
        self.set_phi(phi)  # no step lowered F
        r.states = zero
        return terms, False

    def covariance(self, held: tuple[int, ...] = ()) -> tuple[Tensor, Tensor, Tensor]:
        """(P, P) covariances of theta at the current point: with the correction's weights
        profiled out (the corrected model's posterior; Laplace), with them held fixed, and with
        them profiled out but the parameters ``held`` (indices into theta, e.g. the
        spectrometer's latents) fixed (their rows and columns 0)."""
        _, _, posterior, _, _ = self.gradient_and_information()
        p = self.refinement.theta.numel()
        h = 0.5 * (posterior + posterior.T)
        joint = psd_pseudo_inverse(h)
        conditional = psd_pseudo_inverse(h[:p, :p])
        free = torch.ones(h.shape[0], dtype=torch.bool)
        free[list(held)] = False
        given = torch.zeros_like(h)
        given[free.unsqueeze(-1) & free] = psd_pseudo_inverse(h[free][:, free]).reshape(-1)
        return joint[:p, :p], conditional, given[:p, :p]

    def robust_covariance(self, held: tuple[int, ...] = ()) -> Tensor:
        """(P, P) the sandwich covariance of theta with the correction's weights profiled out and
        the parameters ``held`` fixed (rows and columns 0), as :meth:`covariance`'s third:
        H^-1 B H^-1 with H the posterior precision and B the sum over the stills of the outer
        product of each still's NLL gradient (the per-shot parameters at their optimum: the
        profile scores).  Equal to the Laplace covariance on average where the likelihood is
        right; wider where the stills scatter more than it says (a model error the correction
        missed).  Stills are the independent units: with few of them B is noisy
        (White 1982, Econometrica 50:1)."""
        _, _, posterior, _, scores = self.gradient_and_information()
        p = self.refinement.theta.numel()
        free = torch.ones(posterior.shape[0], dtype=torch.bool)
        free[list(held)] = False
        inverse = psd_pseudo_inverse(0.5 * (posterior + posterior.T)[free][:, free])
        out = torch.zeros_like(posterior)
        out[free.unsqueeze(-1) & free] = (inverse @ scores[free][:, free] @ inverse).reshape(-1)
        return out[:p, :p]

    # -- the schedule -------------------------------------------------------------------------------

    @property
    def converged(self) -> bool:
        """Whether the last epoch met the tolerances (:class:`CorrectSettings`)."""
        return bool(self.history) and bool(self.history[-1].get("converged"))

    def run(self, on_epoch: Callable[["CorrectedModel"], None] | None = None) -> None:
        """The epochs of the schedule (module docstring) until converged or ``epochs``; one
        history entry per epoch."""
        r = self.refinement
        for epoch in range(len(self.history), self.settings.epochs):
            if self.converged:
                break
            t0 = time.perf_counter()
            theta_0, phi_0 = r.theta.detach().clone(), self.phi
            seconds_0 = dict(self._seconds)
            with latents_held(r, epoch < self.settings.warmup_epochs):
                with self._timed("stage1"):
                    r.stage1()
                noise = self.fit_noise() if self.noise_flow is not None and epoch < self.settings.flow_epochs else None
                terms, steps = self.scoring_step("phi")
            steps = {"phi": steps}
            if epoch >= self.settings.warmup_epochs:
                # a joint step follows theta and phi along their correlation; where it finds no
                # descent (measured on bright stills with a strong PSF: every joint trial failed
                # and theta stayed 5.6 eV off) a step in theta alone
                terms, steps["both"] = self.scoring_step("both")
                if not steps["both"]:
                    terms, steps["theta"] = self.scoring_step("theta")
            moved = {"theta": float((r.theta.detach() - theta_0).abs().max()), "phi": float((self.phi - phi_0).abs().max())}
            converged = (epoch >= self.settings.warmup_epochs and moved["theta"] <= self.settings.theta_tolerance
                         and moved["phi"] <= self.settings.phi_tolerance)  # fmt: skip
            self.history.append({"epoch": epoch + 1, **terms, "theta": r.theta.tolist(), "steps_taken": steps,
                                 "moved": moved, "converged": converged, "seconds": time.perf_counter() - t0,
                                 "seconds_in": {k: v - seconds_0[k] for k, v in self._seconds.items()}})  # fmt: skip
            if noise is not None:
                self.history[-1]["noise_flow"] = noise
                logger.info("  noise flow: %s (held-out gain %.2g +- %.2g per pixel on %d pixels), mean precision factor %.3f",
                            "kept" if noise["kept"] else "reset to N(0, 1)", noise["held_out_gain"],
                            noise["held_out_error"], noise["pixels"] // 2, noise["precision"])  # fmt: skip
            logger.info("epoch %d: NLL %.2f, KL %.3f, prior %.3f; %s (%.1f s: %s)", epoch + 1, terms["nll"], terms["kl"],
                        terms["prior"], ", ".join(f"{n} {v:.3f}" for n, v in zip(r.sites.parameter_names(), r.theta.tolist())),
                        time.perf_counter() - t0,
                        ", ".join(f"{k} {v:.1f}" for k, v in self.history[-1]["seconds_in"].items()))  # fmt: skip
            if on_epoch is not None:
                on_epoch(self)
