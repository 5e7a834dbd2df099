"""Residual maps of dials.spread_correct: where on the detector and where inside a spot the model
misses the photons, before and after the correction (pure torch).

Each fitted pixel's standardized residual z = (k - lambda) / sqrt(variance(lambda))
(:func:`~spread_dials.refine.residuals.standardized_residuals`) is summed per panel and per
offset from its shoebox's centre (the shoebox frame, pixels, within ``FRAME_RADIUS``).  A right
model gives mean 0 and sd 1 everywhere; a missing point spread shows in the frame as z < 0 at a
bright spot's centre and z > 0 around it (the model's spot is too sharp), a gain error as a
panel whose mean is off 0.  Unlike the posterior predictive check (held-out stills), these maps
are of the stills in the fit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spread_dials.correct.predictive import z_moments, z_sums
from spread_dials.refine.residuals import standardized_residuals

__all__ = ["FRAME_RADIUS", "residual_map_sums", "model_residual_sums", "summarise_maps"]

#: half-width (pixels) of the shoebox-frame map: offsets -4..4 from the shoebox's centre
FRAME_RADIUS = 4


def residual_map_sums(z: Tensor, panel: Tensor, local: Tensor, n_panels: int, radius: int = FRAME_RADIUS) -> tuple[Tensor, Tensor]:
    """Sums (count, sum z, sum z^2) of standardized residuals per panel and per shoebox-frame offset.

    Args:
        z: (N,) standardized residuals of N pixels.
        panel: (N,) long panel of each pixel.
        local: (N, 2) fast, slow offset (pixels) of each pixel from its shoebox's centre (half
            pixels in a box of even width round up).
        n_panels: the detector's panels.
        radius: the frame map's half-width (pixels); pixels farther out are left out of it.

    Returns:
        (n_panels, 3) per panel and (2 radius + 1, 2 radius + 1, 3) per (slow, fast) offset,
        float64 on the CPU.
    """
    z = z.detach().cpu()
    offset = torch.floor(local.detach().cpu().to(torch.float64) + 0.5).long()
    inside = (offset.abs() <= radius).all(-1)
    side = 2 * radius + 1
    cell = (offset[inside, 1] + radius) * side + offset[inside, 0] + radius
    return z_sums(z, panel.cpu(), n_panels), z_sums(z[inside], cell, side * side).view(side, side, 3)


def model_residual_sums(model, physics: bool = False, radius: int = FRAME_RADIUS) -> tuple[Tensor, Tensor]:
    """:func:`residual_map_sums` over the fitted pixels of every local still in the fit (weight
    > 0) of a :class:`~spread_dials.correct.fit.CorrectedModel` at its current per-shot
    parameters: of the corrected rate lambda* (through the learned pixel noise, when there is one), or with
    ``physics`` of the physics rate."""
    r = model.refinement
    n_panels = r.shots.panels.n_panels
    per_panel = torch.zeros((n_panels, 3), dtype=torch.float64)
    frame = torch.zeros((2 * radius + 1, 2 * radius + 1, 3), dtype=torch.float64)
    for i, cache in enumerate(r.caches):
        if cache.weight == 0:
            continue
        with torch.no_grad():
            lam = model.rates(i)[1 if physics else 0]
            z = standardized_residuals(lam, cache.counts, r.settings.readout_sigma, r.settings.model_error_fraction,
                                       None if physics else r.settings.noise_flow)  # fmt: skip
        ctx, keep = model.contexts[i], cache.fitted
        p, f = residual_map_sums(z[keep], ctx.panel[keep], ctx.local[keep], n_panels, radius)
        per_panel += p
        frame += f
    return per_panel, frame


def summarise_maps(per_panel: Tensor, frame: Tensor) -> dict:
    """{"panels": [{"panel", "pixels", "mean", "sd"}] (panels with pixels), "frame": {"radius",
    "pixels", "mean", "sd" (rows slow, columns fast; None below two pixels)}} of the sums of
    :func:`residual_map_sums` (summed over ranks)."""
    panels = [{"panel": p, **z_moments(*per_panel[p].tolist())} for p in range(per_panel.shape[0]) if per_panel[p, 0] > 0]
    cells = [[z_moments(*frame[y, x].tolist()) for x in range(frame.shape[1])] for y in range(frame.shape[0])]
    return {"panels": panels,
            "frame": {"radius": (frame.shape[0] - 1) // 2, **{k: [[c[k] for c in row] for row in cells] for k in ("pixels", "mean", "sd")}}}  # fmt: skip
