"""Posterior predictive checks of dials.spread_correct on held-out stills (pure torch).

A fraction of the stills is held out of the fit of the global parameters (edge shifts, the
correction's weights: their weight in every sum over stills is 0); their own scale, crystal
offsets and background planes are still fitted, as for any still whose globals are given.
Before the correction (the physics model at the warm start) and after it, each held-out pixel's
standardized residual z = (k - lambda) / sqrt(variance(lambda)) (lambda clamped at the likelihood's
floor, :func:`~spread_dials.refine.residuals.standardized_residuals`; through the learned pixel
noise when dials.spread_correct has one, correct.noise_flow) is summarised per panel group
and resolution shell: a model that predicts the held-out photons has mean 0 and sd 1 in every
group; a missing point spread, say, shows as sd > 1 at low resolution where spots are bright.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from spread_dials.refine.engine import inverse_resolution
from spread_dials.refine.model import pixel_rate
from spread_dials.refine.residuals import standardized_residuals
from spread_dials.refine.stage1 import refine_shots

__all__ = ["PredictiveCheck", "pool_reports", "held_out_stills", "shell_edges", "residual_sums", "summarise_sums", "z_sums", "z_moments"]


logger = logging.getLogger("dials.spread.correct")


def held_out_stills(n_stills: int, fraction: float, seed: int) -> list[int]:
    """Global indices of the stills held out of the fit: round(fraction * n_stills) of them, at
    least one when ``fraction`` > 0, drawn from ``seed``; none when fewer than two stills.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), not {fraction}")
    if fraction == 0.0 or n_stills < 2:
        return []
    n = min(max(1, round(fraction * n_stills)), n_stills - 1)
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_stills, size=n, replace=False))


def shell_edges(inverse_d: Tensor, n_shells: int) -> Tensor:
    """(n_shells - 1,) inner edges (1/A) of resolution shells of equal shoebox counts over
    ``inverse_d`` (B,) 1/d of every held-out shoebox."""
    if n_shells < 2 or inverse_d.numel() == 0:
        return inverse_d.new_zeros(0)
    return torch.quantile(inverse_d, torch.linspace(0, 1, n_shells + 1, dtype=inverse_d.dtype)[1:-1])


def residual_sums(refinement, local: list[int], inverse_d: list[Tensor], edges: Tensor, n_panel_groups: int) -> Tensor:
    """(2, groups, 3) sums (count, sum z, sum z^2) of the fitted pixels of the local stills
    ``local`` per panel group (row 0) and resolution shell (row 1), ``groups`` = max(panel
    groups, shells); each still's per-shot parameters refitted (stage 1) at the refinement's
    current theta and profiles first (the refinement's states are left as they were).

    Args:
        refinement: a :class:`~spread_dials.refine.engine.Refinement` (its caches may carry a
            correction: then the rates are the corrected ones).
        local: indices of local stills.
        inverse_d: (B_i,) 1/d (1/A) of each local still's shoeboxes, for every local still.
        edges: shell edges from :func:`shell_edges`.
        n_panel_groups: the detector's panels in this many contiguous groups.
    """
    n_shells = edges.numel() + 1
    sums = torch.zeros((2, max(n_panel_groups, n_shells), 3), dtype=torch.float64)
    if not local:
        return sums
    settings = refinement.settings
    states = [refinement.states[i] for i in local]
    intensities, slopes = refinement.stage1_terms(local, states)
    fits = refine_shots([refinement.caches[i] for i in local], states, intensities, settings, slopes)
    n_panels = refinement.shots.panels.n_panels
    for i, (state, _) in zip(local, fits):
        cache, boxes = refinement.caches[i], refinement.shots.shots[i].shoeboxes
        with torch.no_grad():
            lam, _ = pixel_rate(cache, state, refinement.curves_intensity(i, state=state))
        with torch.no_grad():
            z = standardized_residuals(lam, cache.counts, settings.readout_sigma, settings.model_error_fraction,
                                       settings.noise_flow)  # fmt: skip
        keep = cache.fitted
        z = z[keep].cpu()
        box = cache.pixel_shoebox[keep].cpu()
        panel_group = (boxes.panel.cpu()[box] * n_panel_groups) // n_panels
        shell = torch.bucketize(inverse_d[i].cpu()[box], edges.cpu())
        for row, group in ((0, panel_group), (1, shell)):
            sums[row] += z_sums(z, group, sums.shape[1])
    return sums


def z_sums(z: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """(n_groups, 3) float64 sums (count, sum z, sum z^2) of the values ``z`` (N,) per group
    ``group`` (N,) long, in [0, n_groups); :func:`z_moments` reads them."""
    z = z.to(torch.float64)
    return z.new_zeros((n_groups, 3)).index_add_(0, group.to(z.device), torch.stack([torch.ones_like(z), z, z * z], -1))


def z_moments(count: float, total: float, square: float) -> dict:
    """{"pixels", "mean", "sd" (ddof 1)} of z from its sums (count, sum z, sum z^2); mean and sd
    None below two pixels."""
    if count < 2:
        return {"pixels": int(count), "mean": None, "sd": None}
    mean = total / count
    return {"pixels": int(count), "mean": mean, "sd": math.sqrt(max(square / count - mean * mean, 0.0) * count / (count - 1))}


def summarise_sums(sums: Tensor, n_panel_groups: int, n_panels: int, edges: Tensor) -> dict:
    """Per panel group and resolution shell: pixels, mean and sd of z from :func:`residual_sums`
    (summed over ranks), with the group's panels and the shell's d range (A)."""

    bounds = [0.0, *edges.tolist(), math.inf]
    panels = [{"panels": [g * n_panels // n_panel_groups, (g + 1) * n_panels // n_panel_groups - 1], **z_moments(*sums[0, g].tolist())}
              for g in range(n_panel_groups)]  # fmt: skip
    shells = [{"d_max_A": (1 / bounds[s]) if bounds[s] > 0 else None, "d_min_A": (1 / bounds[s + 1]) if math.isfinite(bounds[s + 1]) else None,
               **z_moments(*sums[1, s].tolist())} for s in range(len(bounds) - 1)]  # fmt: skip
    return {"panel_groups": panels, "resolution_shells": shells}


def pool_reports(reports: list[dict]) -> dict:
    """The held-out z of several data sets' checks (:meth:`PredictiveCheck.report`, same panel
    groups and shell count) pooled per group and shell, before and after: pixels, mean and sd
    (ddof 1) from the summed moments.  The k-th shell pools each data set's k-th equal-count
    shell; its d range is the mean of theirs.

    Raises:
        ValueError: no reports, or reports of different group or shell counts.
    """
    if not reports:
        raise ValueError("no posterior predictive reports to pool")
    out: dict = {"data_sets": len(reports), "held_out_stills": [name for r in reports for name in r["held_out_stills"]]}
    for when in ("before", "after"):
        out[when] = {}
        for key in ("panel_groups", "resolution_shells"):
            groups = [r[when][key] for r in reports]
            if len({len(g) for g in groups}) != 1:
                raise ValueError(f"the reports have different numbers of {key.replace('_', ' ')}")
            pooled = []
            for parts in zip(*groups):
                count = sum(g["pixels"] for g in parts if g["mean"] is not None)
                total = sum(g["pixels"] * g["mean"] for g in parts if g["mean"] is not None)
                square = sum(g["sd"] ** 2 * (g["pixels"] - 1) + g["pixels"] * g["mean"] ** 2 for g in parts if g["mean"] is not None)
                labels = {k: parts[0][k] for k in ("panels",) if k in parts[0]}
                for k in ("d_max_A", "d_min_A"):
                    if k in parts[0]:
                        known = [g[k] for g in parts if g[k] is not None]
                        labels[k] = float(np.mean(known)) if known else None
                pooled.append({**labels, **z_moments(count, total, square)})
            out[when][key] = pooled
    return out


class PredictiveCheck:
    """The posterior predictive check of a fit over all ranks: holds round(``held_out_fraction``
    x stills) stills (:func:`held_out_stills` from ``seed``) out of the fit of the globals (their
    caches' weight set to 0), then measures their residuals when asked (:meth:`measure`: e.g.
    before and after the correction) per ``panel_groups`` contiguous panel groups and
    ``resolution_shells`` shells of equal shoebox counts, and reports them (:meth:`report`)."""

    def __init__(self, refinement, held_out_fraction: float, panel_groups: int, resolution_shells: int, seed: int) -> None:
        self.refinement, self.groups, self.fraction = refinement, panel_groups, held_out_fraction
        comm = refinement.comm
        held = set(held_out_stills(refinement.n_shots, held_out_fraction, seed))
        self.local = [k for k, g in enumerate(refinement.shot_index) if g in held]
        for k in self.local:
            refinement.caches[k] = replace(refinement.caches[k], weight=0.0)
        self.inverse_d = [inverse_resolution(shot) for shot in refinement.shots.shots]
        mine = [self.inverse_d[k].cpu() for k in self.local]
        everyone = [d for part in comm.allgather(mine) for d in part]
        self.edges = shell_edges(torch.cat(everyone) if everyone else torch.zeros(0, dtype=torch.float64), resolution_shells)
        names = [refinement.shots.shots[k].identifier for k in self.local]
        self.identifiers = [n for part in comm.allgather(names) for n in part]
        self.sums: dict[str, Tensor] = {}
        if held:
            logger.info("Posterior predictive check: %d of %d stills held out of the fit (correct.predictive.held_out_fraction = %g)",
                        len(held), refinement.n_shots, held_out_fraction)  # fmt: skip

    def measure(self, when: str) -> None:
        """Residual sums of the held-out stills at the refinement's current globals, over all ranks."""
        if not self.identifiers:
            return
        local = residual_sums(self.refinement, self.local, self.inverse_d, self.edges, self.groups)
        self.sums[when] = sum(self.refinement.comm.allgather(local))

    def report(self) -> dict | None:
        """Per panel group and resolution shell, before and after: pixels, mean and sd of z; logged.
        None before an "after" measurement."""
        if "after" not in self.sums:
            return None
        n_panels = self.refinement.shots.panels.n_panels
        parts = {w: summarise_sums(s, self.groups, n_panels, self.edges) for w, s in self.sums.items()}
        out = {"held_out_fraction": self.fraction, "held_out_stills": self.identifiers, **parts}
        for key, label in (("panel_groups", "panels {panels[0]}-{panels[1]}"), ("resolution_shells", "shell {k}")):
            for k, after in enumerate(parts["after"][key]):
                before = parts["before"][key][k] if "before" in parts else {}
                logger.info("  held-out z, %s (%d px): mean %s -> %s, sd %s -> %s", label.format(k=k + 1, **after),
                            after["pixels"], _fmt(before.get("mean")), _fmt(after["mean"]), _fmt(before.get("sd")),
                            _fmt(after["sd"]))  # fmt: skip
        return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
