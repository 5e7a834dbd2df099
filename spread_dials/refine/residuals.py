"""Per-shoebox and per-panel residuals of a finished refinement (pure torch/numpy + a communicator).

For every valid pixel (inside the mask and trusted range) of a shoebox the standardized residual
is ``z = (k - lambda) / sqrt(v)`` with k the counted photons, lambda the model's pixel rate
(:func:`~spread_dials.refine.model.pixel_rate`, floored at ``LAMBDA_FLOOR`` as the likelihood
sees it) and ``v`` the likelihood's variance: ``lambda`` (Poisson), ``+ sigma_readout^2``
(gaussian_readout), ``+ (f lambda)^2`` (likelihood.model_error_fraction f).  Where
the model is right, E[z^2] = 1 exactly for either likelihood, so a shoebox's

- ``sigma_z``: rms of z over its valid pixels, is ~1 (0 for a shoebox with no valid pixel), and
- ``bragg_photons``: sum over all its pixels of G * bragg, is the model's Bragg intensity
  (photons; masked pixels included, as the model sees the whole shoebox).

A shoebox with ``sigma_z > threshold`` is *flagged*: it stays in the refinement and in the
output reflections, and is counted in the log and the sites .json.

Example::

    summary, stills, panels = gather_residuals(refinement, comm, readout_sigma=None, threshold=3.0)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from spread_dials.refine.information import normal_blocks, plane_columns, psd_pseudo_inverse, still_system
from spread_dials.refine.model import LAMBDA_FLOOR, mosaic_factors, pixel_rate, pixel_variance

__all__ = ["Z_BIN_EDGES", "standardized_residuals", "plane_leverage", "still_leverage", "shoebox_statistics", "gather_residuals"]

#: edges of the per-panel histogram of z (values beyond the ends go to the end bins)
Z_BIN_EDGES = np.linspace(-6.0, 6.0, 49)


def standardized_residuals(lam: Tensor, counts: Tensor, readout_sigma: float | None = None,
                           model_error_fraction: float = 0.0, noise_flow=None) -> Tensor:  # fmt: skip
    """(N,) z = (k - lambda) / sqrt(v), v the likelihood's variance
    (:func:`~spread_dials.refine.model.pixel_variance`: lambda, + sigma^2, + (f lambda)^2); with
    a learned ``noise_flow`` (:class:`~spread_dials.correct.noise_flow.ResidualFlow`) z through
    it (its base variable: N(0, 1) where the learned noise is right)."""
    lam = lam.clamp(min=LAMBDA_FLOOR)
    z = (counts - lam) / pixel_variance(lam, readout_sigma, model_error_fraction).sqrt()
    return z if noise_flow is None else noise_flow.normalize(z, lam)


def plane_leverage(cache, w: Tensor, n_shoeboxes: int) -> Tensor:
    """(N,) each pixel's leverage on its shoebox's fitted background plane,
    h_p = w_p x_p^T (sum_q w_q x_q x_q^T)^-1 x_p with x = (1, fast, slow) and the likelihood's
    weights ``w`` (N,) (1 / variance, 0 out of the fit): a fitted pixel's residual has variance
    (1 - h_p) v_p, so residuals at the fitted planes are too narrow by ~3 / (pixels per box) unless
    divided by sqrt(1 - h_p) (studentized).  Sums to 3 over each shoebox with 3 or more fitted
    pixels (its planes' degrees of freedom)."""
    h_bb, _, _ = normal_blocks(cache, w, w.new_zeros((w.shape[0], 0)), n_shoeboxes)
    x = plane_columns(cache)
    inverse = torch.linalg.pinv(h_bb)[cache.pixel_shoebox]  # (N, 3, 3)
    return w * torch.einsum("ni,nij,nj->n", x, inverse, x)


def still_leverage(refinement, i: int) -> Tensor:
    """(N,) each pixel's leverage on still i's own fitted parameters at the current theta: its
    shoebox's background plane (:func:`plane_leverage`) plus the still's shared per-shot
    parameters s (log G, the refined crystal offsets, the energy jitter when refined; their
    priors' information included), w_p u~_p^T R^-1 u~_p with u~ the columns d lambda / d s
    less their regression on the planes and R the planes' Schur complement
    (:func:`~spread_dials.refine.information.still_system`).  Without priors it sums to 3 per
    shoebox plus the number of per-shot parameters (the hat matrix's trace).  The bright pixels
    that pin a still's scale and orientation carry most of it: their residuals at the fit are
    narrower by (1 - h_p) in variance than the noise."""
    cache = refinement.caches[i]
    system = still_system(refinement, i, refinement.theta.detach())
    p = system.n_global
    x = plane_columns(cache)
    u = system.columns[:, p:] - torch.einsum("ni,nis->ns", x, system.back[cache.pixel_shoebox][..., p:])
    inverse = psd_pseudo_inverse(system.reduced[p:, p:])
    plane = plane_leverage(cache, system.weights, int(refinement.states[i].background.shape[0]))
    return plane + system.weights * torch.einsum("ns,st,nt->n", u, inverse, u)


def shoebox_statistics(cache, state, intensity: Tensor, n_shoeboxes: int, readout_sigma: float | None = None,
                       model_error_fraction: float = 0.0) -> dict:  # fmt: skip
    """One still's per-shoebox numbers (numpy, CPU) and its valid pixels' z with their shoebox.

    Args:
        cache, state: the still's :class:`~spread_dials.refine.model.ShotCache` and
            :class:`~spread_dials.refine.model.ShotState` at the end of refinement.
        intensity: (B, C) |F_h(E_c)|^2 at the refined global parameters.
        n_shoeboxes: B.
        readout_sigma: None (Poisson) or the Gaussian readout width (photons).
        model_error_fraction: the likelihood's fractional model error.

    Returns:
        {"bragg_photons", "sigma_z", "mean_z" (B,) float64, "n_valid" (B,) int64, "z" (V,) the
        valid pixels' z, "z_shoebox" (V,) their shoebox}.
    """
    with torch.no_grad():
        lam, bragg = pixel_rate(cache, state, intensity)
        z = standardized_residuals(lam, cache.counts, readout_sigma, model_error_fraction)
        sb = cache.pixel_shoebox
        valid = cache.valid
        dtype = lam.dtype
        zeros = torch.zeros(n_shoeboxes, dtype=dtype, device=lam.device)
        photons = zeros.index_add(0, sb, torch.exp(state.log_scale) * bragg)
        n_valid = zeros.index_add(0, sb, valid.to(dtype))
        sum_z = zeros.index_add(0, sb, torch.where(valid, z, torch.zeros_like(z)))
        sum_z2 = zeros.index_add(0, sb, torch.where(valid, z * z, torch.zeros_like(z)))
        safe = n_valid.clamp(min=1)
        return {
            "bragg_photons": photons.cpu().numpy(),
            "sigma_z": (sum_z2 / safe).sqrt().cpu().numpy(),
            "mean_z": (sum_z / safe).cpu().numpy(),
            "n_valid": n_valid.round().long().cpu().numpy(),
            "z": z[valid].cpu().numpy(),
            "z_shoebox": sb[valid].cpu().numpy(),
        }


def _panel_accumulators(n_panels: int) -> dict:
    return {"n": np.zeros(n_panels), "sum_z": np.zeros(n_panels), "sum_z2": np.zeros(n_panels),
            "histogram": np.zeros((n_panels, Z_BIN_EDGES.size - 1))}  # fmt: skip


def gather_residuals(refinement, comm, readout_sigma: float | None, threshold: float) -> tuple[dict, list | None, dict | None]:
    """Residuals of every still on every rank, gathered on the root.

    Args:
        refinement: the finished :class:`~spread_dials.refine.engine.Refinement` (this rank's stills).
        comm: the communicator (:class:`spread_dials.parallel.Parallel`).
        readout_sigma: None (Poisson) or the Gaussian readout width (photons).
        threshold: shoeboxes with ``sigma_z`` above it are flagged.

    Returns:
        (summary, stills, panels).  summary (every rank): {"flag_sigma_z", "shoeboxes_flagged",
        "shoeboxes", "sigma_z_mean" (mean over shoeboxes), "sigma_z_median", "z_rms" (over all
        valid pixels), "valid_pixels"}.  stills (root; None elsewhere): per still in global
        still order {"identifier", "shot_index", "log_scale", "scale", "rotation_rad" (3,),
        "cell_scale" (3,) (refined / given length of a, b, c), "energy_jitter_eV" (None when not refined),
        "reflection", "panel" and the per-shoebox arrays of :func:`shoebox_statistics`,
        "flagged" (B,) bool}.  panels (root): {"n", "sum_z", "sum_z2" (P,), "histogram"
        (P, bins), "bin_edges", "mean_z", "rms_z"} over valid pixels per panel.
    """
    shots = refinement.shots
    n_panels = int(shots.panels.n_panels)
    panels = _panel_accumulators(n_panels)
    local = []
    for i, (shot, cache, state) in enumerate(zip(shots.shots, refinement.caches, refinement.states)):
        sb = shot.shoeboxes
        stats = shoebox_statistics(cache, state, refinement.curves_intensity(i).detach(), sb.n_shoeboxes, readout_sigma,
                                   refinement.settings.model_error_fraction)  # fmt: skip
        panel = sb.panel.cpu().numpy()
        z, pixel_panel = stats.pop("z"), panel[stats.pop("z_shoebox")]
        np.add.at(panels["n"], pixel_panel, 1.0)
        np.add.at(panels["sum_z"], pixel_panel, z)
        np.add.at(panels["sum_z2"], pixel_panel, z * z)
        bins = np.clip(np.searchsorted(Z_BIN_EDGES, z, side="right") - 1, 0, Z_BIN_EDGES.size - 2)
        np.add.at(panels["histogram"], (pixel_panel, bins), 1.0)
        local.append({
            "identifier": shot.identifier, "shot_index": int(refinement.shot_index[i]),
            "log_scale": float(state.log_scale), "scale": float(torch.exp(state.log_scale)),
            "rotation_rad": state.rotation.detach().cpu().numpy().astype(np.float64),
            "cell_scale": (np.ones(3) if state.cell is None else
                           torch.exp(state.cell.detach().cpu()[list(refinement.crystal_model.cell_ties)]).numpy()),
            "energy_jitter_eV": None if state.energy_offset is None else float(state.energy_offset),
            "mosaic_spread_abc_deg": (refinement.crystal_model.mosaic_spreads_deg(mosaic_factors(state.cell.detach().cpu())).numpy()
                                      if refinement.crystal_model.mosaic_latent else None),
            "reflection": sb.reflection.cpu().numpy().astype(np.int64), "panel": panel.astype(np.int64),
            "flagged": stats["sigma_z"] > threshold, **stats,
            "rejected": (np.zeros(sb.n_shoeboxes, dtype=bool) if cache.rejected is None
                         else cache.rejected.cpu().numpy().astype(bool)),
        })  # fmt: skip
    sigma_local = np.concatenate([s["sigma_z"] for s in local]) if local else np.zeros(0)
    gathered = comm.gather(local)
    summed = {k: comm.reduce(v) for k, v in panels.items()}
    n_total = int(comm.allreduce(int(sigma_local.size)))
    n_flagged = int(comm.allreduce(int((sigma_local > threshold).sum())))
    sum_sigma = float(comm.allreduce(float(sigma_local.sum())))
    pixels = comm.allreduce(np.array([panels["n"].sum(), panels["sum_z2"].sum()]))
    all_sigma = comm.gather(sigma_local)
    median = float(np.median(np.concatenate(all_sigma))) if comm.is_root and n_total else float("nan")
    summary = {
        "flag_sigma_z": float(threshold), "shoeboxes": n_total, "shoeboxes_flagged": n_flagged,
        "sigma_z_mean": sum_sigma / max(n_total, 1), "sigma_z_median": comm.bcast(median),
        "valid_pixels": int(pixels[0]), "z_rms": float(np.sqrt(pixels[1] / max(pixels[0], 1.0))),
    }  # fmt: skip
    if not comm.is_root:
        return summary, None, None
    stills = sorted((s for part in gathered for s in part), key=lambda s: s["shot_index"])
    n = np.maximum(summed["n"], 1.0)
    summed.update(bin_edges=Z_BIN_EDGES, mean_z=summed["sum_z"] / n, rms_z=np.sqrt(summed["sum_z2"] / n))
    return summary, stills, summed
