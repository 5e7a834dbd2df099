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
rank); each refits theta from the optimum with the per-shot parameters fixed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spread_dials.refine.engine import global_objective, refine_globals, site_intensities
from spread_dials.refine.model import pixel_rate, pixel_variance

__all__ = ["CurvatureResult", "curvature", "bootstrap", "interval", "state_probabilities"]

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


def _shot_information(refinement, i: int, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(profiled, conditional) Fisher information of theta from still i (the crystal offsets
    that stage 1 refines, rotation and cell, are profiled with the scale and backgrounds)."""
    cache, state, sites = refinement.caches[i], refinement.states[i], refinement.sites
    readout = refinement.settings.readout_sigma

    def intensity_of(t: Tensor) -> Tensor:
        return site_intensities(sites, t, cache)

    intensity = intensity_of(theta)
    d_intensity = torch.func.jacfwd(intensity_of)(theta)  # (B, C, P)
    lam, bragg = pixel_rate(cache, state, intensity)
    scale = torch.exp(state.log_scale)
    sb = cache.pixel_shoebox
    profile = cache.profiles.profile
    u_theta = scale * torch.einsum("nc,ncp->np", profile, d_intensity[sb])
    columns = [u_theta, (scale * bragg).unsqueeze(-1)]
    jacobian = cache.profiles.jacobian
    if jacobian is not None:
        settings = refinement.settings
        refined = [settings.refine_orientation] * 3 + [settings.refine_cell] * (jacobian.shape[-1] - 3)
        if any(refined):
            columns.append(scale * torch.einsum("ncr,nc->nr", jacobian[..., torch.tensor(refined)], intensity[sb]))
    u = torch.cat(columns, -1)  # (N, P + n_s)
    variance = pixel_variance(lam, readout, refinement.settings.model_error_fraction)
    w = cache.fitted.to(lam.dtype) / variance
    x = torch.stack([torch.ones_like(cache.fast), cache.fast, cache.slow], -1)  # (N, 3)
    n_b = int(state.background.shape[0])
    wx = w.unsqueeze(-1) * x
    h_bb = torch.zeros((n_b, 3, 3), dtype=lam.dtype, device=lam.device).index_add(0, sb, wx.unsqueeze(-1) * x.unsqueeze(-2))
    h_bo = torch.zeros((n_b, 3, u.shape[1]), dtype=lam.dtype, device=lam.device).index_add(0, sb, wx.unsqueeze(-1) * u.unsqueeze(-2))
    h_oo = (w.unsqueeze(-1) * u).T @ u
    h_bb = h_bb + 1e-12 * torch.eye(3, dtype=lam.dtype, device=lam.device)
    reduced = h_oo - torch.einsum("bip,biq->pq", h_bo, torch.linalg.solve(h_bb, h_bo))
    p = u_theta.shape[1]
    h_tt, h_ts, h_ss = reduced[:p, :p], reduced[:p, p:], reduced[p:, p:]
    profiled = h_tt - h_ts @ _psd_pseudo_inverse(h_ss) @ h_ts.T
    conditional = h_oo[:p, :p]
    return cache.weight * profiled.detach().cpu(), cache.weight * conditional.detach().cpu()


def _psd_pseudo_inverse(h: Tensor, rcond: float = 1e-10) -> Tensor:
    """Pseudo-inverse of a positive semi-definite information matrix, scaled to unit diagonal
    first (log G and angles in rad differ by orders of magnitude); directions with relative
    eigenvalue below ``rcond`` (a parameter the still does not determine, or round-off that
    makes an eigenvalue negative) are dropped rather than inverted."""
    d = h.diagonal().clamp(min=1e-300).rsqrt()
    evals, evecs = torch.linalg.eigh(d.unsqueeze(-1) * h * d)
    keep = evals > rcond * evals.max().clamp(min=1e-300)
    inv = (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T
    return d.unsqueeze(-1) * inv * d


def curvature(refinement, observed: bool = True) -> CurvatureResult:
    """Covariances of theta at the current optimum (see the module docstring)."""
    theta = refinement.theta.detach()
    profiled, conditional = [], []
    for i in range(len(refinement.caches)):
        a, b = _shot_information(refinement, i, theta)
        profiled.append(a)
        conditional.append(b)
    # each still's score: the gradient of its NLL at its per-shot optimum (profiled score)
    scores = [v[1:].cpu() for v in refinement.still_values_and_grads(theta)]
    profiled_sum = refinement.ordered_sum(profiled)
    conditional_sum = refinement.ordered_sum(conditional)
    prior = torch.autograd.functional.hessian(refinement.sites.negative_log_prior, theta)
    profiled_cov = _inverse(profiled_sum + prior)
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
        observed_cov = _inverse(observed_sum + prior)
    sandwich_observed = observed_cov @ spread @ observed_cov if observed_cov is not None and spread is not None else None
    return CurvatureResult(profiled_cov, sandwich, _inverse(conditional_sum + prior), observed_cov, sandwich_observed)


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


def bootstrap(refinement, n_resamples: int, seed: int, iterations: int = 30, progress=None) -> Tensor:
    """(n_resamples, P) refits of theta on resampled stills (per-shot parameters fixed)."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    theta0 = refinement.theta.detach().clone()
    caches0 = list(refinement.caches)
    draws = []
    try:
        for b in range(n_resamples):
            counts = rng.multinomial(refinement.n_shots, np.full(refinement.n_shots, 1.0 / refinement.n_shots))
            refinement.caches = [replace(c, weight=float(counts[j])) for c, j in zip(caches0, refinement.shot_index)]
            draws.append(refine_globals(refinement.global_value_and_grad, theta0, iterations))
            if progress is not None:
                progress(b + 1, n_resamples)
    finally:
        refinement.caches = caches0
    return torch.stack(draws) if draws else torch.zeros((0, theta0.numel()), dtype=theta0.dtype)


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
