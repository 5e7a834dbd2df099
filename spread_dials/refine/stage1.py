"""Stage 1 of SPREAD refinement: one still's scale, crystal offsets and background planes by a
damped Gauss-Newton (Fisher scoring / Levenberg-Marquardt) fit with |F|^2 fixed (pure torch).

With the channels summed once (:class:`~spread_dials.refine.model.BraggTerms`) the rate is

    lambda_p = x_p . beta_b + G (b0_p + J_p . (x - x0)),   x_p = (1, fast_p, slow_p),

so a step needs, per pixel, the derivatives u_p = (G bragg_p, G J_p) in (log G, offsets) and x_p
in the plane beta_b of its shoebox.  The normal matrix sum_p w_p d_p d_p^T (w = 1 / variance:
the Fisher information of the Poisson or Gaussian-readout likelihood) is arrow-shaped: a 3 x 3
block per shoebox and a small dense block for (log G, offsets); the planes are eliminated per
shoebox (Schur complement), the small system solved, the planes back-substituted: O(pixels)
per step.  The gradient is autograd's, of the likelihood itself.  Steps are damped
(Levenberg-Marquardt: diagonal x (1 + mu)) and accepted only when the NLL falls; each offset stays
in the box x0 +- t (the trust radius of the linearisation: ``rotation_step_mrad``,
``cell_step_permille``): an offset on the box whose gradient points outward is held for the step
(projected Gauss-Newton), the others are clipped to it.  Ends after ``stage1_iterations`` steps or when a step lowers the NLL
by less than ``STAGE1_TOLERANCE``.

Why not L-BFGS (torch.optim) as stage 2: a still has ~3 parameters per shoebox that couple only
through the few shared ones; L-BFGS needed all 50 iterations and still left the stills
unconverged between macrocycles (the edge shift drifted for 8 macrocycles on the demo), while
Gauss-Newton with the exact block structure converges in a few steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spread_dials.refine.information import eliminate_planes, normal_blocks, refined_offsets, shot_columns
from spread_dials.refine.model import (
    BraggTerms,
    ShotCache,
    ShotState,
    bragg_terms,
    fisher_weights,
    negative_log_likelihood,
    rate_from_terms,
)

__all__ = ["refine_shot", "trust_radius", "STAGE1_TOLERANCE", "OFFSET_UNIT"]

#: a Gauss-Newton step that lowers the NLL by less than this ends stage 1 for the still
STAGE1_TOLERANCE = 1e-3

#: unit of the trust radii: mrad for rotations, parts per thousand for log cell lengths
OFFSET_UNIT = 1e-3


def trust_radius(n_offsets: int, settings, like: Tensor) -> Tensor:
    """(n_offsets,) trust radius of each crystal offset (rad for the 3 rotation angles, log length
    for the cell lengths): ``rotation_step_mrad`` and ``cell_step_permille`` of ``settings``
    times :data:`OFFSET_UNIT`, with the dtype and device of ``like``."""
    radius = [settings.rotation_step_mrad] * 3 + [settings.cell_step_permille] * (n_offsets - 3)
    return torch.tensor(radius, dtype=like.dtype, device=like.device) * OFFSET_UNIT


def _nll(cache: ShotCache, state: ShotState, terms: BraggTerms, settings) -> Tensor:
    lam, _ = rate_from_terms(cache, state, terms)
    return negative_log_likelihood(lam, cache.counts, cache.fitted, settings.readout_sigma, settings.model_error_fraction)


def _normal_equations(cache: ShotCache, state: ShotState, terms: BraggTerms, settings, refined: Tensor):
    """NLL, gradient and Fisher blocks at ``state``: (nll, g_s (S,), g_b (B, 3), H_ss (S, S),
    H_bs (B, 3, S), H_bb (B, 3, 3)) with s = (log G, refined offsets)."""
    n_b = int(state.background.shape[0])
    log_scale = state.log_scale.detach().clone().requires_grad_(True)
    offsets = state.offsets.detach().clone().requires_grad_(True)
    background = state.background.detach().clone().requires_grad_(True)
    trial = ShotState(log_scale, offsets[:3], background, None if state.cell is None else offsets[3:])
    lam, bragg = rate_from_terms(cache, trial, terms)
    nll = negative_log_likelihood(lam, cache.counts, cache.fitted, settings.readout_sigma, settings.model_error_fraction)
    g_scale, g_offsets, g_b = torch.autograd.grad(nll, [log_scale, offsets, background], allow_unused=True)
    g_offsets = torch.zeros_like(offsets) if g_offsets is None else g_offsets
    lam = lam.detach()
    u = shot_columns(state, terms, bragg.detach(), refined)  # (N, S)
    w = fisher_weights(lam, cache.fitted, settings.readout_sigma, settings.model_error_fraction)
    h_bb, h_bs, h_ss = normal_blocks(cache, w, u, n_b)
    g_s = torch.cat([g_scale.reshape(1), g_offsets[refined.to(g_offsets.device)]])
    return nll.detach(), g_s, g_b, h_ss, h_bs, h_bb


def _damped_step(g_s: Tensor, g_b: Tensor, h_ss: Tensor, h_bs: Tensor, h_bb: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """(step_s (S,), step_b (B, 3)) of the normal equations damped by diagonal x (1 + mu), the
    planes eliminated per shoebox (:func:`~spread_dials.refine.information.eliminate_planes`)."""
    h_bb = h_bb + torch.diag_embed(mu * h_bb.diagonal(dim1=-2, dim2=-1))
    eye = torch.eye(h_ss.shape[0], dtype=h_ss.dtype, device=h_ss.device)
    h_ss = h_ss + torch.diag(mu * h_ss.diagonal()) + 1e-12 * (1 + h_ss.diagonal().amax()) * eye
    reduced, rhs, back, back_g = eliminate_planes(h_bb, h_bs, h_ss, g_b, g_s)
    step_s = -torch.linalg.solve(0.5 * (reduced + reduced.T), rhs)
    return step_s, -(back_g + (back @ step_s.unsqueeze(-1)).squeeze(-1))


def refine_shot(cache: ShotCache, state: ShotState, intensity: Tensor, settings) -> tuple[ShotState, float]:
    """Stage 1 for one still (module docstring): log G, refined offsets and background planes
    with |F|^2 = ``intensity`` (B, C) fixed, offsets within the trust box about the cache point.

    Args:
        cache: the still's cache (profiles and their offsets' Jacobian at x0).
        state: the starting per-shot parameters.
        intensity: (B, C) |F_h(E_c)|^2.
        settings: :class:`~spread_dials.refine.engine.RefineSettings`.

    Returns:
        (state, NLL) at the end.
    """
    terms = bragg_terms(cache, intensity)
    refined = refined_offsets(state.offsets.numel(), settings) & (terms.jacobian is not None)
    x0 = cache.profiles.offsets.to(state.rotation)
    radius = trust_radius(x0.numel(), settings, x0)
    low, high = x0 - radius, x0 + radius
    state = ShotState(state.log_scale.detach(), state.rotation.detach(), state.background.detach(),
                      None if state.cell is None else state.cell.detach())  # fmt: skip
    mu = 1e-3
    nll, g_s, g_b, h_ss, h_bs, h_bb = _normal_equations(cache, state, terms, settings, refined)
    refined_device = refined.to(x0.device)
    for _ in range(settings.stage1_iterations):
        # offsets on the box that the gradient pushes outward stay there for this step
        x = state.offsets[refined_device]
        g = g_s[1:]
        pinned = ((x >= high[refined_device] - 1e-12) & (g < 0)) | ((x <= low[refined_device] + 1e-12) & (g > 0))
        keep = torch.cat([torch.ones(1, dtype=torch.bool, device=pinned.device), ~pinned])
        accepted = False
        for _attempt in range(12):
            step_kept, step_b = _damped_step(g_s[keep], g_b, h_ss[keep][:, keep], h_bs[..., keep], h_bb, mu)
            step_s = torch.zeros_like(g_s)
            step_s[keep] = step_kept
            offsets = state.offsets.clone()
            offsets[refined_device] += step_s[1:]
            offsets = torch.minimum(torch.maximum(offsets, low), high)
            trial = ShotState(state.log_scale + step_s[0], offsets[:3], state.background + step_b,
                              None if state.cell is None else offsets[3:])  # fmt: skip
            with torch.no_grad():
                value = _nll(cache, trial, terms, settings)
            if bool(torch.isfinite(value)) and float(value) < float(nll):
                accepted = True
                break
            mu = max(mu, 1e-6) * 10.0
        if not accepted:
            break
        gain = float(nll - value)
        state = trial
        mu = max(mu / 10.0, 1e-9)
        nll, g_s, g_b, h_ss, h_bs, h_bb = _normal_equations(cache, state, terms, settings, refined)
        if gain < STAGE1_TOLERANCE:
            break
    return state, float(nll)
