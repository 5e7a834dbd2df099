"""The dense kernel: every pixel x sub-pixel x layer x source x mosaic domain (for validation)."""

from __future__ import annotations

import torch
from torch import Tensor

from spread_dials.physics.bragg import Scene, SensorPoints, bragg_term, photon_scale, sensor_points, subpixel_offsets

__all__ = ["simulate_dense"]


def simulate_dense(scene: Scene, max_terms_per_chunk: int = 1 << 22) -> Tensor:
    """Expected Bragg photons in every pixel, brute force.

    Args:
        scene: the still to simulate.
        max_terms_per_chunk: bound on terms evaluated at once (memory ~ 100 bytes per term).
    Returns:
        (P, n_slow, n_fast) expected photons per pixel.
    """
    panels, sources, crystal = scene.panels, scene.sources, scene.crystal
    dtype, device = panels.origin_mm.dtype, panels.origin_mm.device
    n_f, n_s, n_p = panels.n_fast, panels.n_slow, panels.n_panels
    offsets = subpixel_offsets(scene.oversample, dtype, device)
    n_sub = offsets.shape[0]
    real_space = crystal.domain_real_space()  # (M, 3, 3)
    n_src, n_dom = sources.n_sources, crystal.n_domains
    per_pixel = n_sub * panels.n_layers * n_src * n_dom
    chunk = max(1, max_terms_per_chunk // per_pixel)
    source = torch.arange(n_src, device=device).unsqueeze(-1)  # (C, 1)
    n_pix = n_p * n_s * n_f
    out = []
    for start in range(0, n_pix, chunk):
        flat = torch.arange(start, min(start + chunk, n_pix), device=device)
        panel = (flat // (n_s * n_f)).unsqueeze(-1)
        slow = ((flat // n_f) % n_s).unsqueeze(-1).to(dtype) + offsets[:, 1]
        fast = (flat % n_f).unsqueeze(-1).to(dtype) + offsets[:, 0]
        pts = sensor_points(panels, panel.expand_as(fast), fast, slow)  # (n, o2, T)
        pts = SensorPoints(
            diffracted=pts.diffracted[..., None, None, :], omega_capture=pts.omega_capture[..., None, None]
        )
        terms = bragg_term(pts, sources, source, real_space, crystal, scene.structure_factors)
        out.append(terms.sum(dim=(1, 2, 3, 4)))
    return (torch.cat(out) * photon_scale(scene)).reshape(n_p, n_s, n_f)
