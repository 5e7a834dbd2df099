"""Fisher information of the global parameters from one still, with its per-shot parameters
profiled out (pure torch); used by stage 2's scoring step and by the uncertainty.

The Fisher information of the Poisson likelihood (its expected Hessian, sum_p J_p J_p^T /
lambda_p with J = d lambda / d parameters; for the Gaussian likelihoods 1 / variance) over the
global parameters theta AND the still's scale, refined crystal offsets (rotation, cell), energy
jitter (with its prior's information, when refined) and background planes.  The per-shot parameters are eliminated by the Schur complement (first each
shoebox's plane, then scale and offsets).

The same blocks give the per-shot parameters' linear response to a global step, ds/dtheta =
-H_ss^-1 H_s,theta (the implicit-function derivative of the still's optimum): a line search that
moves them with theta starts each still's refit where the quadratic model puts it, which is what
lets a step along a ridge (an edge shift traded against the stills' energy jitters) be taken
whole instead of a fraction per epoch (:func:`follow_step`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from spread_dials.refine.model import (
    N_MOSAIC_FACTORS,
    ShotState,
    bragg_terms,
    fisher_weights,
    intensities_and_jacobian,
    offset_kinds,
    rate_from_terms,
)

__all__ = ["ShotInformation", "StillSystem", "still_system", "shot_information", "follow_step", "shot_columns", "refined_offsets", "mosaic_refined", "psd_pseudo_inverse",
           "plane_columns", "normal_blocks", "eliminate_planes"]  # fmt: skip


class ShotInformation(NamedTuple):
    """One still's information about the global parameters (P of them; P + Q with ``extra``).

    Attributes:
        profiled: (P, P) with the per-shot parameters profiled out (Schur complement), CPU.
        conditional: (P, P) with them held, CPU.
        response: (S, P) d s / d theta of the still's shared per-shot parameters s = (log G,
            the refined crystal offsets in order, the energy jitter when refined) at their
            optimum (-H_ss^-1 H_s,theta, the planes eliminated), CPU.
    """

    profiled: Tensor
    conditional: Tensor
    response: Tensor


class StillSystem(NamedTuple):
    """One still's Fisher normal system with its background planes eliminated.

    Attributes:
        weights: (N,) the pixels' Fisher weights (0 out of the fit).
        columns: (N, P + S) d lambda / d (theta [+ extra], s) with s the still's shared per-shot
            parameters (log G, the refined crystal offsets, the energy jitter when refined).
        reduced: (P + S, P + S) the normal matrix after the planes' Schur complement, with the
            per-shot priors' information (energy jitter, mosaic factors).
        back: (B, 3, P + S) H_bb^-1 H_bs (the planes' regression on the columns).
        conditional: (P, P) the theta block with every per-shot parameter held.
        n_global: P.
    """

    weights: Tensor
    columns: Tensor
    reduced: Tensor
    back: Tensor
    conditional: Tensor
    n_global: int


def still_system(refinement, i: int, theta: Tensor, extra: Tensor | None = None) -> StillSystem:
    """Still i's :class:`StillSystem` at ``theta`` (``extra``: as :func:`shot_information`)."""
    cache, state, sites = refinement.caches[i], refinement.states[i], refinement.sites
    readout = refinement.settings.readout_sigma
    n_theta = theta.numel()
    jitter_sigma = refinement.settings.energy_jitter_sigma_eV
    # with a jitter prior the still's energy jitter beside theta: one more column (a per-shot one, profiled below)
    intensity, d_intensity = intensities_and_jacobian(sites, theta, cache, None if jitter_sigma is None else state.energy_jitter())
    terms = bragg_terms(cache, intensity)
    lam, bragg = rate_from_terms(cache, state, terms)
    u_x = torch.exp(state.log_scale) * torch.einsum("nc,ncp->np", cache.profiles.profile, d_intensity[cache.pixel_shoebox])
    u_theta, u_jitter = u_x[:, :n_theta], u_x[:, n_theta:]
    if extra is not None:
        u_theta = torch.cat([u_theta, extra.to(u_theta)], -1)
    refined = refined_offsets(terms.offsets.numel(), refinement.settings)
    u = torch.cat([u_theta, shot_columns(torch.exp(state.log_scale), bragg, terms.jacobian, refined), u_jitter], -1)  # (N, P + n_s)
    w = fisher_weights(lam, cache.fitted, readout, refinement.settings.model_error_fraction, refinement.settings.noise_flow)
    h_bb, h_bo, h_oo = normal_blocks(cache, w, u, int(state.background.shape[0]))
    reduced, _, back, _ = eliminate_planes(h_bb, h_bo, h_oo)
    if jitter_sigma is not None:  # with its prior's information
        reduced[-1, -1] += jitter_sigma**-2
    if mosaic_refined(refinement.settings) and terms.jacobian is not None:  # the mosaic factors' prior: the last 3 offset columns
        end = reduced.shape[0] - (jitter_sigma is not None)
        mosaic = range(end - N_MOSAIC_FACTORS, end)
        reduced[mosaic, mosaic] += refinement.settings.mosaic_sigma**-2
    p = u_theta.shape[1]
    return StillSystem(w, u, reduced, back, h_oo[:p, :p], p)


def shot_information(refinement, i: int, theta: Tensor, extra: Tensor | None = None) -> ShotInformation:
    """The Fisher information of theta from still i, profiled and conditional (the crystal
    offsets that stage 1 refines, rotation, cell and mosaic factors, are profiled with the scale,
    backgrounds and energy jitter, each prior's information included), and the per-shot parameters' response to theta (:class:`ShotInformation`).

    ``extra``: (N, Q) derivatives of the still's pixel rates in Q more global parameters (a
    learned correction's weights, :mod:`spread_dials.correct`); the information is then over
    (theta, those), (P + Q) square."""
    system = still_system(refinement, i, theta, extra)
    p, reduced, weight = system.n_global, system.reduced, refinement.caches[i].weight
    h_tt, h_ts, h_ss = reduced[:p, :p], reduced[:p, p:], reduced[p:, p:]
    solved = psd_pseudo_inverse(h_ss) @ h_ts.T  # (S, P)
    profiled = h_tt - h_ts @ solved
    return ShotInformation(weight * profiled.detach().cpu(), weight * system.conditional.detach().cpu(),
                           -solved.detach().cpu())  # fmt: skip


def follow_step(state: ShotState, response: Tensor, step: Tensor, settings) -> ShotState:
    """``state`` moved by its linear response to a global step: s + response @ step for the
    scale, the refined crystal offsets and the energy jitter (when refined); the planes stay
    (stage 1 refits them in closed form).

    Args:
        state: the still's per-shot parameters.
        response: (S, P) :attr:`ShotInformation.response` (CPU).
        step: (P,) the step in the global parameters (eV for edge shifts).
        settings: :class:`~spread_dials.refine.engine.RefineSettings` (which offsets are refined,
            whether the jitter is).
    """
    move = (response @ step.to(response)).to(state.log_scale)
    refined = refined_offsets(state.offsets.numel(), settings).to(move.device)
    has_jitter = settings.energy_jitter_sigma_eV is not None  # (its row is there: shot_information)
    n_offsets = move.numel() - 1 - has_jitter  # (0 when the profiles carry no offset derivatives)
    offsets = state.offsets.detach().clone()
    if n_offsets:
        offsets[refined] += move[1 : 1 + n_offsets]
    n_rot = state.rotation.numel()
    jitter = state.energy_jitter(move) + move[-1] if has_jitter else state.energy_offset
    return replace(state, log_scale=state.log_scale.detach() + move[0], rotation=offsets[:n_rot],
                   cell=None if state.cell is None else offsets[n_rot:], energy_offset=jitter)  # fmt: skip


def shot_columns(scale: Tensor, bragg: Tensor, jacobian: Tensor | None, refined: Tensor) -> Tensor:
    """(N, S) derivatives of every pixel's rate in a still's shared per-shot parameters,
    s = (log G, the refined crystal offsets): G * bragg and G * d bragg / d offset (from the
    channel-summed :class:`~spread_dials.refine.model.BraggTerms`).

    Args:
        scale: the scale G, () or (N,) (each pixel's still's, for a batch of stills).
        bragg: (N,) Bragg photons per unit scale at the state.
        jacobian: (N, 3 + k) its derivative in the crystal offsets, or None.
        refined: (3 + k,) bool from :func:`refined_offsets`.
    """
    scale = scale.detach()
    columns = [(scale * bragg).unsqueeze(-1)]
    if jacobian is not None and bool(refined.any()):
        per_pixel = scale.unsqueeze(-1) if scale.dim() else scale
        columns.append(per_pixel * jacobian[:, refined.to(jacobian.device)])
    return torch.cat(columns, -1)


def mosaic_refined(settings) -> bool:
    """Whether stage 1 moves the stills' mosaic factors under ``settings``: with
    ``refine_mosaic`` and a trust radius (``mosaic_step_percent`` 0 holds them where they are,
    dials.spread_correct's warm-up, and leaves them out of the information and of
    :func:`follow_step`)."""
    return settings.refine_mosaic and settings.mosaic_step_percent > 0


def refined_offsets(n_offsets: int, settings) -> Tensor:
    """(n_offsets,) bool: which crystal offsets (3 rotation angles, the cell lengths, then with
    ``refine_mosaic`` the 3 mosaic log factors, refined where :func:`mosaic_refined`) stage 1
    refines under ``settings`` (:class:`~spread_dials.refine.engine.RefineSettings`)."""
    per_kind = {"rotation": settings.refine_orientation, "cell": settings.refine_cell, "mosaic": mosaic_refined(settings)}
    return torch.tensor([per_kind[kind] for kind in offset_kinds(n_offsets, settings.refine_mosaic)])


def plane_columns(cache) -> Tensor:
    """(N, 3) x_p = (1, fast_p, slow_p): each pixel's row of its shoebox's background plane."""
    return torch.stack([torch.ones_like(cache.fast), cache.fast, cache.slow], -1)


def normal_blocks(cache, w: Tensor, u: Tensor, n_shoeboxes: int, still: Tensor | None = None,
                  n_stills: int = 1) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Blocks of sum_p w_p d_p d_p^T with d_p = (x_p (the plane's 3 columns), u_p (S,)):
    (H_bb (B, 3, 3), H_bs (B, 3, S), H_ss (S, S)); x_p = (1, fast_p, slow_p) of the pixel's
    shoebox (``cache.pixel_shoebox``), w (N,) the weights (0 for pixels out of the fit).  With
    ``still`` (N,) (a batch of ``n_stills`` stills, each pixel's still) H_ss is (n_stills, S, S),
    each still's own."""
    x = plane_columns(cache)
    sb = cache.pixel_shoebox
    wx = w.unsqueeze(-1) * x
    zeros = torch.zeros((n_shoeboxes, 3, 3 + u.shape[1]), dtype=w.dtype, device=w.device)
    h_b = zeros.index_add(0, sb, wx.unsqueeze(-1) * torch.cat([x, u], -1).unsqueeze(-2))
    wu = w.unsqueeze(-1) * u
    if still is None:
        h_ss = wu.T @ u
    else:
        h_ss = u.new_zeros((n_stills, u.shape[1], u.shape[1])).index_add(0, still, wu.unsqueeze(-1) * u.unsqueeze(-2))
    return h_b[..., :3], h_b[..., 3:], h_ss


def eliminate_planes(h_bb: Tensor, h_bs: Tensor, h_ss: Tensor, g_b: Tensor | None = None, g_s: Tensor | None = None,
                     box_still: Tensor | None = None):  # fmt: skip
    """Schur complement of the per-shoebox plane blocks of a normal matrix (and gradient).

    ``box_still`` (B,): a batch of stills (each shoebox's still; ``h_ss`` (K, S, S), ``g_s``
    (K, S)): each still's own reduced system.

    Returns:
        (reduced (S, S) or (K, S, S), reduced gradient (S,) / (K, S) or None, H_bb^-1 H_bs
        (B, 3, S), H_bb^-1 g_b (B, 3) or None): the reduced system in the shared parameters and
        what back-substitution needs (plane step = -(H_bb^-1 g_b + H_bb^-1 H_bs step_s)).  A
        relative 1e-12 ridge keeps an empty shoebox's block invertible.
    """
    d = h_bb.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).unsqueeze(-1)
    h_bb = h_bb + 1e-12 * (1 + d) * torch.eye(3, dtype=h_bb.dtype, device=h_bb.device)
    rhs = h_bs if g_b is None else torch.cat([h_bs, g_b.unsqueeze(-1)], -1)
    solved = torch.linalg.solve(h_bb, rhs)
    back = solved[..., : h_bs.shape[-1]]
    if box_still is None:
        reduced = h_ss - torch.einsum("bis,bit->st", h_bs, back)
    else:
        reduced = h_ss - torch.zeros_like(h_ss).index_add(0, box_still, torch.einsum("bis,bit->bst", h_bs, back))
    if g_b is None:
        return reduced, None, back, None
    back_g = solved[..., -1]
    if box_still is None:
        return reduced, g_s - torch.einsum("bis,bi->s", h_bs, back_g), back, back_g
    return reduced, g_s - torch.zeros_like(g_s).index_add(0, box_still, torch.einsum("bis,bi->bs", h_bs, back_g)), back, back_g


def psd_pseudo_inverse(h: Tensor, rcond: float = 1e-10) -> Tensor:
    """Pseudo-inverse of a positive semi-definite information matrix, scaled to unit diagonal
    first (log G and angles in rad differ by orders of magnitude); directions with relative
    eigenvalue below ``rcond`` (a parameter the still does not determine, or round-off that
    makes an eigenvalue negative) are dropped rather than inverted."""
    d = h.diagonal().clamp(min=1e-300).rsqrt()
    evals, evecs = _symmetric_eigen(d.unsqueeze(-1) * h * d)
    keep = evals > rcond * evals.max().clamp(min=1e-300)
    inv = (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T
    return d.unsqueeze(-1) * inv * d


def _symmetric_eigen(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of the symmetric ``m`` (P, P) on its device.  cuSOLVER's
    eigh can fail to converge on an ill-conditioned matrix (seen on an H200 with a correction's
    11 x 11 information, error code 7): then LAPACK's on the CPU, and failing that the SVD
    (for a PSD matrix the same decomposition; a negative round-off eigenvalue comes back
    positive but below ``rcond`` it is dropped either way).

    Raises:
        ValueError: ``m`` holds a NaN or an infinity.
    """
    if not bool(torch.isfinite(m).all()):
        raise ValueError("the information matrix holds a NaN or an infinity")
    try:
        return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        pass
    cpu = m.detach().cpu()
    try:
        evals, evecs = torch.linalg.eigh(cpu)
    except torch.linalg.LinAlgError:
        evecs, evals, _ = torch.linalg.svd(cpu)
    return evals.to(m.device), evecs.to(m.device)
