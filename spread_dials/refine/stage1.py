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
(Levenberg-Marquardt: diagonal x (1 + mu)) and accepted only when the NLL falls; each refined
offset stays in the box x0 +- t (the trust radius of the linearisation: ``rotation_step_mrad``,
``cell_step_permille``, ``mosaic_step_percent``; a start off it starts on its edge): an offset on
the box whose gradient points outward is held for the step (projected Gauss-Newton), the others
are clipped to it.  Ends after ``stage1_iterations`` steps or when a step lowers the NLL
by less than ``STAGE1_TOLERANCE``.

With an energy-jitter prior (``settings.energy_jitter_sigma_eV``) each still's jitter delta
(:class:`~spread_dials.refine.model.ShotState`) joins its offsets: the Bragg term is linear in
delta about the value the intensities were made at (their slope d|F|^2 / d delta given,
:func:`~spread_dials.refine.model.intensities_and_slope`), its trust radius one prior sd, and
the still's NLL carries the prior delta^2 / (2 sigma^2) (its Fisher term 1 / sigma^2).

Stills are fitted in batches (:func:`refine_shots`): their pixels concatenated, every step one
set of tensor operations for all of them, each still with its own damping, acceptance and
stopping (a still's fit is the one it gets alone).  A rubredoxin still is a few thousand
operations of ~16k pixels per fit: one at a time the GPU waits on kernel launches.

Why not L-BFGS (torch.optim) as stage 2: a still has ~3 parameters per shoebox that couple only
through the few shared ones; L-BFGS needed all 50 iterations and still left the stills
unconverged between macrocycles (the edge shift drifted for 8 macrocycles on the demo), while
Gauss-Newton with the exact block structure converges in a few steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.refine.information import eliminate_planes, normal_blocks, refined_offsets, shot_columns
from spread_dials.refine.model import (
    ShotCache,
    ShotState,
    bragg_terms,
    fisher_weights,
    jitter_negative_log_prior,
    mosaic_factors,
    mosaic_negative_log_prior,
    offset_kinds,
    pixel_nll,
    plane_rate,
)

__all__ = ["refine_shot", "refine_shots", "trust_radius", "STAGE1_TOLERANCE", "STAGE1_BATCH_PIXELS", "OFFSET_UNIT"]

#: a Gauss-Newton step that lowers the NLL by less than this ends stage 1 for the still
STAGE1_TOLERANCE = 1e-3

#: most pixels fitted in one batch (the normal equations' per-pixel blocks: ~1 kB a pixel)
STAGE1_BATCH_PIXELS = 1 << 22

#: unit of the trust radii: mrad for rotations, parts per thousand for log cell lengths
OFFSET_UNIT = 1e-3


def trust_radius(n_offsets: int, settings, like: Tensor) -> Tensor:
    """(n_offsets,) trust radius of each crystal offset (rad for the 3 rotation angles, log length
    for the cell lengths, log factor for the mosaic spreads): ``rotation_step_mrad``,
    ``cell_step_permille`` and ``mosaic_step_percent`` of ``settings`` in units of
    :data:`OFFSET_UNIT`, with the dtype and device of ``like``."""
    per_kind = {"rotation": settings.rotation_step_mrad, "cell": settings.cell_step_permille,
                "mosaic": 10.0 * settings.mosaic_step_percent}  # fmt: skip
    radius = [per_kind[kind] for kind in offset_kinds(n_offsets, settings.refine_mosaic)]
    return torch.tensor(radius, dtype=like.dtype, device=like.device) * OFFSET_UNIT


@dataclass(frozen=True)
class _Batch:
    """K stills' pixels concatenated, with the channels summed at fixed |F|^2.

    Attributes:
        still: (N,) each pixel's still; box_still: (B,) each shoebox's.
        pixel_shoebox: (N,) each pixel's shoebox in the batch's numbering.
        fast, slow, counts: (N,); fitted: (N,) bool.
        bragg: (N,) sum_c P_c |F_h(E_c)|^2 at the cache points; jacobian: (N, 3 + k [+ 1]) its
            derivative in the crystal offsets [and the energy jitter], or None.
        x0: (K, 3 + k [+ 3] [+ 1]) each still's cache point [, mosaic factors] [and jitter].
        jitter_sigma: the energy jitter's prior sd (eV) when it is the last column, else None.
        mosaic_sigma: the mosaic log factors' prior sd when they are refined (the 3 columns
            before the jitter's), else None.
    """

    still: Tensor
    box_still: Tensor
    pixel_shoebox: Tensor
    fast: Tensor
    slow: Tensor
    counts: Tensor
    fitted: Tensor
    bragg: Tensor
    jacobian: Tensor | None
    x0: Tensor
    jitter_sigma: float | None = None
    mosaic_sigma: float | None = None

    @property
    def n_stills(self) -> int:
        return int(self.x0.shape[0])

    @property
    def n_shoeboxes(self) -> int:
        return int(self.box_still.numel())


def _batch(caches: list[ShotCache], states: list[ShotState], intensities: list[Tensor], slopes: list[Tensor] | None,
           jitter_sigma: float | None, mosaic_sigma: float | None = None) -> _Batch:  # fmt: skip
    terms = [bragg_terms(c, i) for c, i in zip(caches, intensities)]
    has_jacobian = {t.jacobian is not None for t in terms}
    if len(has_jacobian) > 1 or len({int(t.offsets.numel()) for t in terms}) > 1:
        raise ValueError("stage 1 batches stills with the same crystal offsets and profile derivatives")
    jacobian = torch.cat([t.jacobian for t in terms]) if has_jacobian == {True} else None
    x0 = torch.stack([t.offsets.to(s.rotation) for t, s in zip(terms, states)])
    if jitter_sigma is not None:  # the energy jitter: one more column, linear about the slopes' delta
        d_jitter = torch.cat([(c.profiles.profile * d[c.pixel_shoebox]).sum(-1) for c, d in zip(caches, slopes)])
        if jacobian is None:
            jacobian = d_jitter.new_zeros((d_jitter.numel(), x0.shape[1]))
        jacobian = torch.cat([jacobian, d_jitter.unsqueeze(-1)], -1)
        x0 = torch.cat([x0, torch.stack([s.energy_jitter(x0) for s in states]).unsqueeze(-1)], -1)
    device = caches[0].counts.device
    n_pixels = torch.tensor([c.counts.numel() for c in caches], device=device)
    n_boxes = torch.tensor([s.background.shape[0] for s in states], device=device)
    first_box = torch.cumsum(n_boxes, 0) - n_boxes
    still = torch.repeat_interleave(torch.arange(len(caches), device=device), n_pixels)
    cat = lambda name: torch.cat([getattr(c, name) for c in caches])  # noqa: E731
    return _Batch(
        still=still,
        box_still=torch.repeat_interleave(torch.arange(len(caches), device=device), n_boxes),
        pixel_shoebox=cat("pixel_shoebox") + first_box[still],
        fast=cat("fast"), slow=cat("slow"), counts=cat("counts"),
        fitted=torch.cat([c.fitted for c in caches]),
        bragg=torch.cat([t.value for t in terms]), jacobian=jacobian, x0=x0, jitter_sigma=jitter_sigma,
        mosaic_sigma=mosaic_sigma,
    )  # fmt: skip


def _shot_prior(batch: _Batch, offsets: Tensor) -> Tensor | float:
    """(K,) each still's -log prior of its energy jitter (the last offset) and mosaic log
    factors (the 3 before it), or 0 without either."""
    end = offsets.shape[1] - (batch.jitter_sigma is not None)
    return (jitter_negative_log_prior(offsets[:, -1], batch.jitter_sigma)
            + mosaic_negative_log_prior(mosaic_factors(offsets[:, :end]), batch.mosaic_sigma))  # fmt: skip


def _rate(batch: _Batch, log_scale: Tensor, offsets: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """(lambda, bragg) (N,) at per-still log G (K,), crystal offsets (K, 3 + k) (linear about
    the cache points) and shoebox planes (B, 3)."""
    bragg = batch.bragg
    if batch.jacobian is not None:
        bragg = bragg + (batch.jacobian * (offsets - batch.x0)[batch.still]).sum(-1)
    return plane_rate(batch, background) + torch.exp(log_scale)[batch.still] * bragg, bragg


def _noise(settings) -> tuple:
    """The likelihood's noise arguments of :func:`pixel_nll` and :func:`fisher_weights`."""
    return settings.readout_sigma, settings.model_error_fraction, settings.noise_flow


def _nll(batch: _Batch, log_scale: Tensor, offsets: Tensor, background: Tensor, settings) -> Tensor:
    """(K,) each still's NLL."""
    lam, _ = _rate(batch, log_scale, offsets, background)
    terms = pixel_nll(lam, batch.counts, batch.fitted, *_noise(settings))
    return terms.new_zeros(batch.n_stills).index_add(0, batch.still, terms) + _shot_prior(batch, offsets)


def _normal_equations(batch: _Batch, log_scale: Tensor, offsets: Tensor, background: Tensor, settings, refined: Tensor):
    """NLL, gradient and Fisher blocks: (nll (K,), g_s (K, S), g_b (B, 3), H_ss (K, S, S),
    H_bs (B, 3, S), H_bb (B, 3, 3)) with s = (log G, refined offsets) of each still."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (log_scale, offsets, background)]
    lam, bragg = _rate(batch, *leaves)
    terms = pixel_nll(lam, batch.counts, batch.fitted, *_noise(settings))
    nll = terms.new_zeros(batch.n_stills).index_add(0, batch.still, terms) + _shot_prior(batch, leaves[1])
    g_scale, g_offsets, g_b = torch.autograd.grad(nll.sum(), leaves, allow_unused=True)
    g_offsets = torch.zeros_like(offsets) if g_offsets is None else g_offsets
    scale = torch.exp(log_scale.detach())[batch.still]
    u = shot_columns(scale, bragg.detach(), batch.jacobian, refined)  # (N, S)
    w = fisher_weights(lam.detach(), batch.fitted, *_noise(settings))
    h_bb, h_bs, h_ss = normal_blocks(batch, w, u, batch.n_shoeboxes, batch.still, batch.n_stills)
    if batch.jitter_sigma is not None:  # the prior's information (the jitter is the last shared parameter)
        h_ss[:, -1, -1] += batch.jitter_sigma**-2
    g_s = torch.cat([g_scale.unsqueeze(-1), g_offsets[:, refined.to(g_offsets.device)]], -1)
    return nll.detach(), g_s, g_b, h_ss, h_bs, h_bb


def _damped_step(batch: _Batch, g_s: Tensor, g_b: Tensor, h_ss: Tensor, h_bs: Tensor, h_bb: Tensor, mu: Tensor,
                 keep: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(step_s (K, S), step_b (B, 3)) of each still's normal equations damped by diagonal x
    (1 + mu) (mu (K,)), the planes eliminated per shoebox; shared parameters not in ``keep``
    (K, S) bool take no step (their rows and columns decoupled)."""
    k = keep.to(h_ss.dtype)
    h_bs = h_bs * k[batch.box_still].unsqueeze(-2)
    g_s = g_s * k
    diagonal = h_ss.diagonal(dim1=-2, dim2=-1)
    h_ss = h_ss * (k.unsqueeze(-1) * k.unsqueeze(-2))
    ridge = 1e-12 * (1 + (diagonal * k).amax(-1))
    h_ss = h_ss + torch.diag_embed(mu.unsqueeze(-1) * diagonal * k + ridge.unsqueeze(-1) * k + (1 - k))
    h_bb = h_bb + torch.diag_embed(mu[batch.box_still].unsqueeze(-1) * h_bb.diagonal(dim1=-2, dim2=-1))
    reduced, rhs, back, back_g = eliminate_planes(h_bb, h_bs, h_ss, g_b, g_s, batch.box_still)
    step_s = -torch.linalg.solve(0.5 * (reduced + reduced.transpose(-1, -2)), rhs.unsqueeze(-1)).squeeze(-1) * k
    return step_s, -(back_g + (back @ step_s[batch.box_still].unsqueeze(-1)).squeeze(-1))


def refine_shots(caches: list[ShotCache], states: list[ShotState], intensities: list[Tensor],
                 settings, slopes: list[Tensor] | None = None) -> list[tuple[ShotState, float]]:  # fmt: skip
    """Stage 1 for a batch of stills (module docstring): each still's log G, refined offsets,
    energy jitter (with ``settings.energy_jitter_sigma_eV``) and background planes with f', f''
    fixed, offsets within the trust box about its cache point; the stills share nothing but the
    tensor operations.

    Args:
        caches: the stills' caches (profiles and their offsets' Jacobian at x0), on one device,
            all with or all without the Jacobian and with the same crystal offsets.
        states: their starting per-shot parameters.
        intensities: (B_i, C) |F_h(E_c - delta_i)|^2 of each still's reflections at its jitter.
        settings: :class:`~spread_dials.refine.engine.RefineSettings`.
        slopes: (B_i, C) d|F|^2 / d delta there, each still's (needed with the jitter prior).

    Returns:
        (state, NLL) of each still at the end of its fit.

    Raises:
        ValueError: stills that differ in their crystal offsets or profile derivatives; the
            jitter prior without the slopes.
    """
    sigma = settings.energy_jitter_sigma_eV
    if sigma is not None and slopes is None:
        raise ValueError("stage 1 with an energy-jitter prior needs the intensities' slopes in the jitter")
    slopes = slopes if sigma is not None else [None] * len(caches)
    fits, start, pixels = [], 0, 0
    for k, cache in enumerate(caches):
        if k > start and pixels + cache.counts.numel() > STAGE1_BATCH_PIXELS:
            fits += _refine_batch(caches[start:k], states[start:k], intensities[start:k], slopes[start:k], settings)
            start, pixels = k, 0
        pixels += cache.counts.numel()
    return fits + (_refine_batch(caches[start:], states[start:], intensities[start:], slopes[start:], settings) if caches else [])


def _refine_batch(caches: list[ShotCache], states: list[ShotState], intensities: list[Tensor], slopes: list,
                  settings) -> list[tuple[ShotState, float]]:  # fmt: skip
    """:func:`refine_shots` on one batch."""
    sigma = settings.energy_jitter_sigma_eV
    batch = _batch(caches, states, intensities, slopes, sigma, settings.mosaic_sigma if settings.refine_mosaic else None)
    n_offsets = int(batch.x0.shape[1]) - (sigma is not None)
    refined = refined_offsets(n_offsets, settings) & (caches[0].profiles.jacobian is not None)
    radius = trust_radius(n_offsets, settings, batch.x0)
    if sigma is not None:  # the jitter: refined, one prior sd per pass
        refined = torch.cat([refined, torch.ones(1, dtype=torch.bool)])
        radius = torch.cat([radius, radius.new_full((1,), sigma)])
    refined_device = refined.to(batch.x0.device)
    low, high = batch.x0 - radius, batch.x0 + radius
    log_scale = torch.stack([s.log_scale.detach() for s in states])
    offsets = torch.stack([s.offsets.detach() for s in states])
    if sigma is not None:  # the jitter starts where its linearisation point is
        offsets = torch.cat([offsets, batch.x0[:, -1:]], -1)
    # the refined offsets stay in the box about the cache point, where the linear profiles are
    # trusted; a start off it (moved by its linear response to a global step: follow_step)
    # starts on its edge (a toy still's mosaic factor that followed a stencil step 8.7 off its
    # cache point stayed there); offsets not refined stay where they are
    def in_box(x: Tensor) -> Tensor:
        return torch.where(refined_device, torch.minimum(torch.maximum(x, low), high), x)

    offsets = in_box(offsets)
    background = torch.cat([s.background.detach() for s in states])
    n = batch.n_stills
    mu = torch.full((n,), 1e-3, dtype=log_scale.dtype, device=log_scale.device)
    active = torch.ones(n, dtype=torch.bool, device=log_scale.device)
    nll, g_s, g_b, h_ss, h_bs, h_bb = _normal_equations(batch, log_scale, offsets, background, settings, refined)
    for _ in range(settings.stage1_iterations):
        # offsets on the box that the gradient pushes outward stay there for this step
        x, g = offsets[:, refined_device], g_s[:, 1:]
        pinned = ((x >= high[:, refined_device] - 1e-12) & (g < 0)) | ((x <= low[:, refined_device] + 1e-12) & (g > 0))
        keep = torch.cat([torch.ones((n, 1), dtype=torch.bool, device=pinned.device), ~pinned], -1)
        pending, accepted = active.clone(), torch.zeros_like(active)
        new_scale, new_offsets, new_background, new_nll = log_scale, offsets, background, nll
        for _attempt in range(12):
            step_s, step_b = _damped_step(batch, g_s, g_b, h_ss, h_bs, h_bb, mu, keep)
            trial_offsets = offsets.clone()
            trial_offsets[:, refined_device] += step_s[:, 1:]
            trial_offsets = in_box(trial_offsets)
            trial = (log_scale + step_s[:, 0], trial_offsets, background + step_b)
            with torch.no_grad():
                value = _nll(batch, *trial, settings)
            ok = pending & torch.isfinite(value) & (value < nll)
            box_ok = ok[batch.box_still].unsqueeze(-1)
            new_scale = torch.where(ok, trial[0], new_scale)
            new_offsets = torch.where(ok.unsqueeze(-1), trial[1], new_offsets)
            new_background = torch.where(box_ok, trial[2], new_background)
            new_nll = torch.where(ok, value, new_nll)
            accepted |= ok
            pending &= ~ok
            mu = torch.where(pending, mu.clamp(min=1e-6) * 10.0, mu)
            if not bool(pending.any()):
                break
        gain = nll - new_nll
        log_scale, offsets, background = new_scale, new_offsets, new_background
        mu = torch.where(accepted, (mu / 10.0).clamp(min=1e-9), mu)
        nll, g_s, g_b, h_ss, h_bs, h_bb = _normal_equations(batch, log_scale, offsets, background, settings, refined)
        active &= accepted & (gain >= STAGE1_TOLERANCE)
        if not bool(active.any()):
            break
    values = nll.tolist()
    boxes = torch.split(background, [int(s.background.shape[0]) for s in states])
    cells = [s.cell is not None for s in states]
    return [(ShotState(log_scale[k], offsets[k, :3], boxes[k], offsets[k, 3:n_offsets] if cells[k] else None,
                       offsets[k, -1] if sigma is not None else states[k].energy_offset), values[k])
            for k in range(n)]  # fmt: skip


def refine_shot(cache: ShotCache, state: ShotState, intensity: Tensor, settings,
                slope: Tensor | None = None) -> tuple[ShotState, float]:  # fmt: skip
    """Stage 1 for one still (:func:`refine_shots` with a batch of one).

    Args:
        cache: the still's cache (profiles and their offsets' Jacobian at x0).
        state: the starting per-shot parameters.
        intensity: (B, C) |F_h(E_c - delta)|^2.
        settings: :class:`~spread_dials.refine.engine.RefineSettings`.
        slope: (B, C) d|F|^2 / d delta (with the jitter prior).

    Returns:
        (state, NLL) at the end.
    """
    return refine_shots([cache], [state], [intensity], settings, None if slope is None else [slope])[0]
