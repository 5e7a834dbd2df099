"""Uncertainty of the global parameters: curvature with the per-shot parameters profiled out,
a bootstrap over stills, intervals and oxidation-state probabilities (pure torch).

Curvature: the Fisher information of the Poisson likelihood (its expected Hessian,
sum_p J_p J_p^T / lambda_p with J = d lambda / d parameters; for the Gaussian-readout likelihood
1 / (lambda + sigma^2)) over the global parameters theta AND every still's scale, three
rotation angles, cell lengths (when refined) and background planes, plus the prior's Hessian
(autograd).  The per-shot parameters are eliminated by the Schur complement (first each
shoebox's plane, then scale, rotation and cell), so
the covariance of theta accounts for them.  The observed Hessian of the NLL in theta with the
per-shot parameters held fixed (autograd) is reported beside the Fisher one as a check.

Bootstrap: B resamples of the stills (multinomial weights drawn from a seed, identical on every
rank); each refits theta from the optimum by Fisher scoring of the resampled profile likelihood
(the per-shot parameters refitted).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spread_dials.refine.engine import global_objective

__all__ = ["CurvatureResult", "curvature", "refit_weighted", "bootstrap", "interval", "state_probabilities"]

logger = logging.getLogger("dials.spread.refine")


@dataclass(frozen=True)
class CurvatureResult:
    """Covariances (P, P) of theta: ``profiled`` (per-shot parameters eliminated; exact when the
    pixel model is right), ``sandwich`` (the profiled inverse information around the spread of
    the stills' scores, H^-1 S H^-1: honest when the model misfits; None with fewer than 3
    stills), ``conditional`` (per-shot parameters fixed, Fisher) and ``observed_conditional``
    (per-shot fixed, observed autograd Hessian; None when not computed); ``sandwich_observed``
    the sandwich with the observed Hessian as bread (under misfit the Fisher information can
    overstate the curvature many-fold; None without the observed Hessian or with < 3 stills)."""

    profiled: Tensor
    sandwich: Tensor | None
    conditional: Tensor
    observed_conditional: Tensor | None
    sandwich_observed: Tensor | None = None


def curvature(refinement, observed: bool = True) -> CurvatureResult:
    """Covariances of theta at the current optimum (see the module docstring)."""
    theta = refinement.theta.detach()
    profiled_information, conditional_information = refinement.information(theta)
    # each still's score: the gradient of its NLL at its per-shot optimum (profiled score)
    scores = [v[1:].cpu() for v in refinement.still_values_and_grads(theta)]
    profiled_cov = _inverse(profiled_information)
    sandwich, spread = None, None
    if refinement.n_shots >= 3:
        n = refinement.n_shots
        outer = refinement.ordered_sum([s.unsqueeze(-1) * s.unsqueeze(-2) for s in scores])
        mean = refinement.ordered_sum(scores) / n
        spread = (outer - n * mean.unsqueeze(-1) * mean.unsqueeze(-2)) * (n / (n - 1))
        sandwich = profiled_cov @ spread @ profiled_cov
    observed_cov = None
    if observed:
        observed_sum = refinement.ordered_sum([_still_hessian(refinement, i, theta) for i in range(len(refinement.caches))])
        observed_cov = _inverse(observed_sum + refinement.prior_hessian(theta))
    sandwich_observed = observed_cov @ spread @ observed_cov if observed_cov is not None and spread is not None else None
    return CurvatureResult(profiled_cov, sandwich, _inverse(conditional_information), observed_cov, sandwich_observed)


def _still_hessian(refinement, i: int, theta: Tensor) -> Tensor:
    """(P, P) observed Hessian (autograd) of still i's weighted NLL in theta, per-shot fixed."""
    one = [refinement.caches[i]], [refinement.states[i]]
    settings = refinement.settings

    def nll(t: Tensor) -> Tensor:
        return global_objective(t, *one, refinement.sites, settings.readout_sigma, settings.model_error_fraction)[0]

    return torch.autograd.functional.hessian(nll, theta).cpu()


def _inverse(h: Tensor) -> Tensor:
    """Inverse of a symmetric information matrix (pseudo-inverse if singular)."""
    h = 0.5 * (h + h.T)
    try:
        return torch.linalg.inv(h)
    except RuntimeError:
        return torch.linalg.pinv(h, hermitian=True)


def refit_weighted(refinement, weights: np.ndarray, steps: int = 4, tolerance: float = 1e-5) -> Tensor:
    """(P,) theta refitted with each still's NLL counted ``weights[i]`` times (``weights`` (n,)
    over all stills, indexed by ``shot_index``): from the current optimum, up to ``steps``
    Fisher-scoring steps of the weighted profile likelihood (:meth:`Refinement.scoring_step`:
    every still's scale, crystal offsets and background planes refitted at each trial; the
    profiles kept) until no parameter moves more than ``tolerance``.  The refinement is left
    as it was."""
    from dataclasses import replace

    theta0 = refinement.theta.detach().clone()
    states0, caches0 = list(refinement.states), list(refinement.caches)
    try:
        refinement.caches = [replace(c, weight=float(weights[j])) for c, j in zip(caches0, refinement.shot_index)]
        for _ in range(steps):
            before = refinement.theta.clone()
            refinement.scoring_step()
            if float((refinement.theta - before).abs().max()) < tolerance:
                break
        return refinement.theta.detach().clone()
    finally:
        refinement.caches, refinement.theta, refinement.states = caches0, theta0, states0


def bootstrap(refinement, n_resamples: int, seed: int, steps: int = 4, tolerance: float = 1e-5, progress=None) -> Tensor:
    """(n_resamples, P) refits of theta (:func:`refit_weighted`) on stills resampled with
    replacement (multinomial weights from ``seed``, the same on every rank).  The per-shot
    parameters are profiled, not held: refits with them held at the optimum gave half the
    spread of the estimates and 76 % coverage for nominal 95 % intervals over 100 replicate
    data sets (benchmarks/RESULTS.md, the calibration study)."""
    rng = np.random.default_rng(seed)
    n = refinement.n_shots
    draws = []
    for b in range(n_resamples):
        draws.append(refit_weighted(refinement, rng.multinomial(n, np.full(n, 1.0 / n)), steps, tolerance))
        if progress is not None:
            progress(b + 1, n_resamples)
    return torch.stack(draws) if draws else torch.zeros((0, refinement.theta.numel()), dtype=refinement.theta.dtype)


def interval(mean: float, sigma: float, level: float) -> tuple[float, float]:
    """Central Gaussian interval of probability ``level`` (e.g. 0.68, 0.95)."""
    z = math.sqrt(2.0) * torch.erfinv(torch.tensor(level, dtype=torch.float64)).item()
    return mean - z * sigma, mean + z * sigma


def state_probabilities(edge_shift_eV: float, sigma_eV: float, state_shifts_eV: dict[int, float]) -> dict[int, float]:
    """P(oxidation state | edge shift) with equal prior odds: a Gaussian likelihood of the
    measured shift around each state's shift (eV, against the same reference curve)."""
    if not state_shifts_eV:
        return {}
    logs = {s: -0.5 * ((edge_shift_eV - d) / sigma_eV) ** 2 for s, d in state_shifts_eV.items()}
    top = max(logs.values())
    weights = {s: math.exp(v - top) for s, v in logs.items()}
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}
