"""The corrected physics model and its fit: dials.spread_refine's engine with a learned correction
between the kernel's profiles and the likelihood (pure torch plus the engine's communicator).

:class:`CorrectedModel` wraps a :class:`~spread_dials.refine.engine.Refinement`: it keeps each
still's physics profiles, hands the engine corrected ones (through ``Refinement.profile_map``, so
the kernel's recomputations are corrected too), and fits the correction's weights by L-BFGS on

    sum_stills NLL(lambda*) + beta sum_pixels KL(Poisson(lambda*) || Poisson(lambda_phys)) + prior

with the global and per-shot parameters held (``lambda_phys`` the physics rate at the same
parameters, :func:`~spread_dials.correct.divergence.poisson_kl` the anchor).  An epoch: the
correction's fit, then (after ``warmup_epochs`` with the global parameters frozen) one macrocycle
of the engine on the corrected profiles (stage 1 per still, the scoring step of the edge shifts).
The per-still values and gradients are summed in still order over the ranks, so any number of
ranks gives the serial answer.

Because the correction is linear in the profiles and the same for every channel, it commutes
with the channel sum: the corrected Bragg term of a pixel is the correction applied to the
channel-summed physics term (:class:`~spread_dials.refine.model.BraggTerms`), which is what the
correction's fit evaluates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.correct.context import PixelContext
from spread_dials.correct.correction import PixelCorrection
from spread_dials.correct.divergence import poisson_kl
from spread_dials.refine.engine import Refinement, refine_globals
from spread_dials.refine.model import BraggTerms, negative_log_likelihood, rate_from_terms
from spread_dials.refine.profiles import ShotProfiles

__all__ = ["CorrectSettings", "CorrectedModel", "feature_statistics"]

logger = logging.getLogger("dials.spread.correct")


@dataclass(frozen=True)
class CorrectSettings:
    """The fit's schedule.

    Attributes:
        epochs: correction fits, each followed (after the warm-up) by one engine macrocycle.
        warmup_epochs: the first epochs hold the global parameters (edge shifts) fixed; stage 1
            still refits every still on the corrected profiles.
        anchor_beta: weight of the Poisson KL anchor to the physics rate.
        correction_iterations: most L-BFGS iterations of the correction's weights per epoch.
    """

    epochs: int = 6
    warmup_epochs: int = 2
    anchor_beta: float = 0.1
    correction_iterations: int = 30


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
        refinement.profile_map = self._map
        self.refresh()

    # -- profiles -------------------------------------------------------------------------------

    def _apply(self, i: int, values: Tensor) -> Tensor:
        shot = self.refinement.shots.shots[i]
        return self.correction.apply(values, self.contexts[i], miller_index=shot.shoeboxes.miller_index)

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

    # -- the correction's objective ---------------------------------------------------------------

    def physics_terms(self, i: int) -> tuple[Tensor, Tensor]:
        """(profile (N, C), weight (N, C)) of local still i: its physics profiles moved
        (linearly) to its current crystal offsets and each pixel's |F_h(E_c)|^2 at the current
        theta; fixed while the correction is fitted."""
        r = self.refinement
        p, cache = self.physics[i], r.caches[i]
        profile = p.profile
        if p.jacobian is not None:
            profile = profile + p.jacobian @ (r.states[i].offsets - p.offsets.to(profile))
        return profile, r.curves_intensity(i).detach()[cache.pixel_shoebox]

    def rates(self, i: int, fixed: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(lambda*, lambda_phys) (N,) of local still i at its current per-shot parameters and
        theta, differentiable in the correction's weights (``fixed``: its :meth:`physics_terms`,
        computed when not given)."""
        r = self.refinement
        profile, weight = self.physics_terms(i) if fixed is None else fixed
        physics = (profile * weight).sum(-1)
        if getattr(self.correction, "per_channel", False):  # channel-dependent (the leaky arm)
            corrected = (self._apply(i, profile) * weight).sum(-1)
        else:  # K and the factor are linear and channel-independent: correct the channel sum
            corrected = self._apply(i, physics)
        state, cache = r.states[i], r.caches[i]
        lam_star, _ = rate_from_terms(cache, state, BraggTerms(corrected, None, state.offsets))
        lam_phys, _ = rate_from_terms(cache, state, BraggTerms(physics, None, state.offsets))
        return lam_star, lam_phys

    def still_terms(self, i: int, fixed: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(weighted NLL of lambda*, weighted Poisson KL anchor) of local still i."""
        r = self.refinement
        cache = r.caches[i]
        lam_star, lam_phys = self.rates(i, fixed)
        nll = negative_log_likelihood(lam_star, cache.counts, cache.fitted, r.settings.readout_sigma,
                                      r.settings.model_error_fraction)  # fmt: skip
        kl = torch.where(cache.fitted, poisson_kl(lam_star, lam_phys), torch.zeros_like(lam_star)).sum()
        return cache.weight * nll, cache.weight * kl

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.correction.parameters() if p.requires_grad]

    def objective(self, x: Tensor, fixed: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        """The correction's objective (NLL + beta KL + prior) and its gradient at the flat weight
        vector ``x`` (every rank gets the same numbers; ``fixed``: each still's
        :meth:`physics_terms`)."""
        params = self._parameters()
        torch.nn.utils.vector_to_parameters(x.to(params[0]), params)
        beta = self.settings.anchor_beta
        parts = []
        for i in range(len(self.refinement.caches)):
            nll, kl = self.still_terms(i, None if fixed is None else fixed[i])
            grads = torch.autograd.grad(nll + beta * kl, params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
            parts.append(torch.cat([torch.stack([nll.detach(), kl.detach()]).to(flat), flat]).cpu())
        total = self.refinement.ordered_sum(parts)
        if total is None:
            total = torch.zeros(2 + x.numel(), dtype=x.dtype)
        prior = self.correction.negative_log_prior()
        prior_grads = torch.autograd.grad(prior, params, allow_unused=True)
        prior_flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, prior_grads)])
        self._last = {"nll": float(total[0]), "kl": float(total[1]), "prior": float(prior)}
        return total[0] + beta * total[1] + prior.detach().cpu(), total[2:] + prior_flat.detach().cpu()

    def fit_correction(self) -> dict:
        """The correction's weights by L-BFGS with everything else held; returns the terms."""
        params = self._parameters()
        x0 = torch.nn.utils.parameters_to_vector(params).detach().cpu()
        fixed = [self.physics_terms(i) for i in range(len(self.refinement.caches))]
        x = refine_globals(lambda v: self.objective(v, fixed), x0, self.settings.correction_iterations)
        self.objective(x, fixed)  # leaves the weights at x and records the terms
        return dict(self._last)

    # -- the schedule -------------------------------------------------------------------------------

    def run(self, on_epoch: Callable[["CorrectedModel"], None] | None = None) -> None:
        """The epochs of the schedule (module docstring); one history entry per epoch."""
        r = self.refinement
        for epoch in range(len(self.history), self.settings.epochs):
            t0 = time.perf_counter()
            terms = self.fit_correction()
            self.refresh()
            stage1, _ = r.stage1()
            nll = r.stage2() if epoch >= self.settings.warmup_epochs else stage1
            self.history.append({"epoch": epoch + 1, **terms, "nll_after": nll, "theta": r.theta.tolist(),
                                 "seconds": time.perf_counter() - t0})  # fmt: skip
            logger.info("epoch %d: NLL %.2f, KL %.3f, prior %.3f; %s (%.1f s)", epoch + 1, terms["nll"], terms["kl"],
                        terms["prior"], ", ".join(f"{n} {v:.3f}" for n, v in zip(r.sites.parameter_names(), r.theta.tolist())),
                        time.perf_counter() - t0)  # fmt: skip
            if on_epoch is not None:
                on_epoch(self)
