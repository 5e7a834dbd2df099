"""The sparse, reflection-centric kernel: evaluate only pixel windows around predicted spots.

Prediction (not differentiable; discrete choices) finds every (Miller index h, source c, mosaic
domain m) whose reciprocal-lattice point q = U_m A^-1 h lies within dq of the Ewald sphere of
source c, where dq = min(r_cut / sigma_min(diag(N) A), r_cell), r_cut = ``cutoff_radius(shape,
tolerance)``: any term of that triple farther than r_cut / sigma_min from q has F_latt^2 <=
tolerance * peak^2, because |N * (h - h0)| >= sigma_min * |S - q|; and no term farther than
r_cell, the circumradius of h's own cell (fractional index within 1/2 of h), belongs to h at all,
so shapes whose tails fall slowly (square, round) never get windows past the neighbouring
spots.  The table's 000, if it holds one, gets no window (the direct beam; ``bragg_term``
leaves it out in both kernels).  Each kept triple gets a square window on every panel it
can reach, centred on the ray through the Ewald-sphere point nearest q (at the sensor's mean
absorption depth), with a half-width that covers every point of the sphere within dq of q.
The windows of one (h, m) pair on one panel are merged into their bounding box: a window is
one (reflection, mosaic domain) pair and every source is summed inside it, so the pixel
geometry is computed once per window pixel and the sum over the spectrum is a fused inner loop.

The truncation bound (tested): every (pixel, sub-pixel, layer, source, domain) term that the
sparse kernel leaves out has F_latt^2 <= tolerance * F_latt(0)^2, i.e. it is at most
``tolerance`` times what the same term would be at the exact Bragg condition.

Evaluation (differentiable) runs the same per-term physics as the dense kernel
(``bragg.bragg_term``) on the window pixels for every source, keeping only terms whose nearest
integer index is the window's h, so a pixel's terms are never counted twice (terms of sources
whose own window would not reach a pixel are evaluated too: they only add accuracy).  Windows are arbitrary rectangles
on a panel, so refinement evaluates shoebox pixels through the same ``window_photons``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.physics.bragg import (
    Scene,
    SensorPoints,
    bragg_term,
    photon_scale,
    sensor_points,
    subpixel_offsets,
    window_term_and_gradient,
)
from spread_dials.physics.crystal import max_rotation_angle_rad
from spread_dials.physics.fusion import fused
from spread_dials.physics.geometry import PanelArray, dot3, layer_mean_depth_mm
from spread_dials.physics.lattice import cutoff_radius
from spread_dials.physics.tensors import TensorFields

__all__ = [
    "BraggWindows",
    "detector_d_max",
    "detector_d_min",
    "miller_indices_within",
    "predict_windows",
    "window_channel_profiles",
    "window_photon_chunks",
    "window_photons",
    "simulate_sparse",
    "simulate_sparse_windows",
]

# window edges (pixels) are rounded up to these sizes so windows batch into a few groups
_SIZES = (1, 2, 3, 4, 5, 7, 9, 11, 13, 17, 21, 25, 29, 33, 41, 49, 57, 65, 81, 97, 113, 129, 161, 193, 257, 321, 385, 513)


@dataclass(frozen=True)
class BraggWindows(TensorFields):
    """Rectangular pixel windows, one (reflection, mosaic domain) pair each, all sources.

    Attributes:
        miller_index: (W, 3) long Miller index of the window's reflection.
        row: (W,) long row of that index in the structure-factor table (H if absent).
        domain: (W,) long mosaic domain index.
        panel: (W,) long panel index.
        fast0, slow0: (W,) long first pixel of the window, on the panel.
        n_fast, n_slow: (W,) long window size in pixels (rounded up to a few sizes, so a window
            may run past the panel's far edge; those pixels are masked when evaluated).
    """

    miller_index: Tensor
    row: Tensor
    domain: Tensor
    panel: Tensor
    fast0: Tensor
    slow0: Tensor
    n_fast: Tensor
    n_slow: Tensor

    @property
    def n_windows(self) -> int:
        return int(self.row.shape[0])

    def select(self, index: Tensor) -> "BraggWindows":
        """The windows picked by a boolean mask or an index tensor."""
        return BraggWindows(*(getattr(self, name)[index] for name in self.__dataclass_fields__))


def _cell_radius(reciprocal: Tensor) -> float:
    """Largest distance (1/A) from a reciprocal-lattice point to a point whose nearest Miller
    index is that point's: the circumradius of the cell |h - h0| <= 1/2 per index, whose corners
    sit at reciprocal @ (+-1/2, +-1/2, +-1/2) from it (``reciprocal``: (3, 3), q = reciprocal @ h)."""
    signs = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [1.0, -1.0, -1.0]], dtype=torch.float64)
    return float(0.5 * (signs @ reciprocal.double().T).norm(dim=-1).max())


def _ewald_offset(q: Tensor, direction: Tensor, k: Tensor) -> Tensor:
    """Signed distance (1/A) of q from the Ewald sphere |k s + q| = k: |k s + q| - k."""
    return (k.unsqueeze(-1) * direction + q).norm(dim=-1) - k


def detector_d_min(panels: PanelArray, direction: Tensor, wavenumber_max: float, compiled: bool = False) -> float:
    """Smallest d-spacing (A) any pixel of the detector records for the given beam direction."""
    return float(1.0 / (2.0 * wavenumber_max * _stage(_max_sin_theta, compiled)(panels, direction)))


def detector_d_max(panels: PanelArray, direction: Tensor, wavenumber_min: float) -> float:
    """Largest d-spacing (A) any pixel of the detector records for the given beam direction
    (inf where the beam itself meets a panel)."""
    sin_theta = float(_min_sin_theta(panels, direction))
    return math.inf if sin_theta == 0.0 else 1.0 / (2.0 * wavenumber_min * sin_theta)


def _min_sin_theta(panels: PanelArray, direction: Tensor) -> Tensor:
    """Smallest sin(theta) over the panels: 0 where the beam meets one, else the smallest over
    the panels' edges (a cone about the beam meets a panel's plane in a convex set, so a panel
    the beam misses comes closest to it on its border), sampled at every pixel corner."""
    direction = direction.double()
    origin, fast, slow = panels.origin_mm.double(), panels.fast_axis.double(), panels.slow_axis.double()
    px = panels.pixel_size_mm.double()
    n_fast, n_slow = panels.image_size
    # where the beam meets each panel's plane: origin + a fast px + b slow px = t direction
    system = torch.stack([fast * px[:, :1], slow * px[:, 1:], -direction.expand_as(fast)], -1)
    a, b, t = torch.linalg.solve(system, -origin).unbind(-1)
    if bool(((t > 0) & (a >= 0) & (a <= n_fast) & (b >= 0) & (b <= n_slow)).any()):
        return torch.zeros((), dtype=torch.float64)
    f = torch.arange(n_fast + 1, dtype=torch.float64)
    s = torch.arange(n_slow + 1, dtype=torch.float64)
    edge_f = torch.cat([f, f, torch.zeros_like(s), torch.full_like(s, n_fast)])
    edge_s = torch.cat([torch.zeros_like(f), torch.full_like(f, n_slow), s, s])
    points = (origin.unsqueeze(1) + (edge_f.view(1, -1, 1) * px[:, None, :1]) * fast.unsqueeze(1)
              + (edge_s.view(1, -1, 1) * px[:, None, 1:]) * slow.unsqueeze(1))  # fmt: skip
    cos2theta = dot3(points / points.norm(dim=-1, keepdim=True), direction)
    return torch.sqrt((1.0 - cos2theta.max().clamp(-1.0, 1.0)) / 2.0)


def _max_sin_theta(panels: PanelArray, direction: Tensor) -> Tensor:
    """Largest sin(theta) of the panels' corners (the detector's reach)."""
    px = panels.pixel_size_mm.unsqueeze(0)  # (1, P, 2)
    f = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=px.dtype, device=px.device).view(4, 1, 1) * panels.n_fast
    s = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=px.dtype, device=px.device).view(4, 1, 1) * panels.n_slow
    corners = panels.origin_mm + (f * px[..., :1]) * panels.fast_axis + (s * px[..., 1:]) * panels.slow_axis
    corners = corners.double()
    cos2theta = dot3(corners / corners.norm(dim=-1, keepdim=True), direction.double())
    return torch.sqrt((1.0 - cos2theta.min().clamp(-1.0, 1.0)) / 2.0)


def _stage(fn, compiled: bool):
    """``fn`` itself, or compiled for every size (prediction's stages change size with every still)."""
    return fused(fn, dynamic=True) if compiled else fn


def miller_indices_within(real_space: Tensor, d_min: float, chunk: int = 1 << 22) -> Tensor:
    """All Miller indices h != 0 with d(h) >= d_min (A), as a (H, 3) long tensor (Friedel mates kept)."""
    a = real_space.detach().double()
    inv = torch.linalg.inv(a)
    limits = [int(math.floor(float(a[i].norm()) / d_min)) for i in range(3)]
    hh = torch.arange(-limits[0], limits[0] + 1, device=a.device)
    kk = torch.arange(-limits[1], limits[1] + 1, device=a.device)
    ll = torch.arange(-limits[2], limits[2] + 1, device=a.device)
    out = []
    per_h = kk.numel() * ll.numel()
    step = max(1, chunk // per_h)
    kg, lg = torch.meshgrid(kk, ll, indexing="ij")
    kl = torch.stack([kg.reshape(-1), lg.reshape(-1)], -1)
    for start in range(0, hh.numel(), step):
        h_part = hh[start : start + step]
        hkl = torch.cat([h_part.repeat_interleave(kl.shape[0]).unsqueeze(-1), kl.repeat(h_part.numel(), 1)], -1)
        q = hkl.double() @ inv.T
        keep = (q.norm(dim=-1) <= 1.0 / d_min) & (hkl != 0).any(-1)
        out.append(hkl[keep])
    return torch.cat(out, 0)


def _panel_frames(panels: PanelArray) -> dict[str, Tensor]:
    """Float64 panel frames for prediction: depth axis, plane distance, dual fast/slow bases."""
    fast = panels.fast_axis.double()
    slow = panels.slow_axis.double()
    origin = panels.origin_mm.double()
    depth = panels.depth_axis.double()
    # dual basis: basis (basis^T basis)^-1, the 2 x 2 inverse written out
    ff, fs, ss = dot3(fast, fast), dot3(fast, slow), dot3(slow, slow)
    det = ff * ss - fs * fs
    dual = torch.stack([(ss.unsqueeze(-1) * fast - fs.unsqueeze(-1) * slow) / det.unsqueeze(-1),
                        (ff.unsqueeze(-1) * slow - fs.unsqueeze(-1) * fast) / det.unsqueeze(-1)], -1)  # fmt: skip
    px = panels.pixel_size_mm.double()
    return {
        "depth": depth,
        "distance": (origin * depth).sum(-1),
        "dual_f": dual[..., 0] / px[:, :1],  # pixel coordinate per mm
        "dual_s": dual[..., 1] / px[:, 1:],
        "origin_f": (origin * dual[..., 0]).sum(-1) / px[:, 0],
        "origin_s": (origin * dual[..., 1]).sum(-1) / px[:, 1],
        "pixel_min": px.min(-1).values,
        "thickness": panels.thickness_mm.double(),
        "att_len": panels.attenuation_length_mm.double(),
    }


def _bucket(size: Tensor) -> Tensor:
    """Round window edges up to one of _SIZES (fewer, larger batches); beyond the list, to 128s."""
    buckets = torch.tensor(_SIZES, device=size.device)
    pos = torch.searchsorted(buckets, size.clamp(max=_SIZES[-1]))
    return torch.where(size > _SIZES[-1], (size + 127) // 128 * 128, buckets[pos])


def _clip_to_panel(start: Tensor, size: Tensor, n_pixels: int) -> tuple[Tensor, Tensor]:
    """Clip windows [start, start + size) to the panel [0, n_pixels) and round their size up."""
    lo = start.clamp(min=0)
    hi = (start + size).clamp(max=n_pixels)
    return lo, _bucket((hi - lo).clamp(min=1))


@torch.no_grad()
def predict_windows(
    scene: Scene, tolerance: float = 1e-6, max_pairs_per_chunk: int | None = None, compiled: bool = False
) -> BraggWindows:
    """Every window the sparse kernel evaluates for ``scene`` (see the module docstring).

    Args:
        scene: the still.
        tolerance: largest F_latt^2 / peak^2 of a term that may be left out.
        max_pairs_per_chunk: (reflection, domain) pairs processed at once (memory bound;
            default 2^18 on a GPU, 2^13 on the CPU).
        compiled: fuse the element-wise stages with torch.compile (on a GPU prediction is
            otherwise bound by launching a few thousand small kernels).
    """
    panels, sources, crystal, sf = scene.panels, scene.sources, scene.crystal, scene.structure_factors
    device = panels.origin_mm.device
    if max_pairs_per_chunk is None:
        max_pairs_per_chunk = 1 << (18 if device.type == "cuda" else 13)
    stage = functools.partial(_stage, compiled=compiled)
    # 3 x 3 linear algebra on the host (a GPU solver call costs more than it saves)
    real_space = crystal.real_space.detach().double().cpu()
    inv = torch.linalg.inv(real_space).to(device)
    ncells = crystal.ncells_abc.detach().double().cpu()
    sigma_min = float(torch.linalg.svdvals(ncells.unsqueeze(-1) * real_space).min())
    dq = min(cutoff_radius(crystal.shape, tolerance) / sigma_min, _cell_radius(torch.linalg.inv(real_space)))
    real_space = real_space.to(device)
    k = sources.wavenumber.detach().double()
    directions = sources.direction.detach().double()
    weight = sources.weight.detach().double()
    mean_dir = (weight.unsqueeze(-1) * directions).sum(0)
    mean_dir = mean_dir / mean_dir.norm()
    theta_div = float(torch.acos((directions @ mean_dir).clamp(-1.0, 1.0)).max())
    rotations = crystal.domain_rotations.detach().double()
    theta_mos = max_rotation_angle_rad(rotations)
    k_range = torch.stack([k.min(), k.max()])

    # candidate reflections: within the detector's reach
    d_min = detector_d_min(panels, mean_dir, float(k_range[1]), compiled)
    q_max = 1.0 / d_min + dq + 2.0 * float(k_range[1]) * math.sin(theta_div)
    if sf.default_F != 0:
        hkl = miller_indices_within(real_space, 1.0 / q_max)
    else:  # a table may hold 000 (a P1 hkl file, as nanoBragg takes): never a window
        hkl = sf.miller_index.to(device)
        hkl = hkl[(hkl != 0).any(-1)]
    q = hkl.double() @ inv.T

    def scalar(x: float) -> Tensor:  # per-still values reach compiled stages as tensors
        return torch.tensor(x, dtype=torch.float64, device=device)

    dq_t, theta_div_t = scalar(dq), scalar(theta_div)
    keep = stage(_reflections_near_sphere)(q, mean_dir, k_range, scalar(q_max), scalar(theta_mos + theta_div), dq_t)
    kept = keep.nonzero().squeeze(1)  # one synchronisation, then plain gathers
    hkl, q = hkl[kept], q[kept]
    rows = sf.index_of(hkl)
    if sf.default_F == 0:
        kept = (rows < sf.n_reflections).nonzero().squeeze(1)
        hkl, q, rows = hkl[kept], q[kept], rows[kept]

    # (reflection, domain) pairs
    q_dom, pair_lit = stage(_pairs_near_sphere)(q, rotations, mean_dir, k_range, theta_div_t, dq_t)
    pair_h, pair_m = torch.nonzero(pair_lit, as_tuple=True)

    frames = stage(_panel_frames)(panels)
    pieces = []
    for start in range(0, pair_h.numel(), max_pairs_per_chunk):
        ph, pm = pair_h[start : start + max_pairs_per_chunk], pair_m[start : start + max_pairs_per_chunk]
        piece = _windows_for_pairs(
            q_dom[ph, pm], q[ph], ph, k, directions, mean_dir, dq_t, theta_div_t, scalar(theta_mos), frames, panels,
            stage,
        )  # fmt: skip
        if piece[0].numel():
            w_pair, w_panel, fast0, slow0, n_fast, n_slow = piece
            pieces.append((hkl[ph[w_pair]], rows[ph[w_pair]], pm[w_pair], w_panel, fast0, slow0, n_fast, n_slow))
    if not pieces:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return BraggWindows(torch.zeros((0, 3), dtype=torch.long, device=device), *([empty] * 7))
    cols = [torch.cat(c, 0) for c in zip(*pieces)]
    order = torch.argsort(cols[-1] * (cols[-2].max() + 1) + cols[-2], stable=True)  # group equal sizes
    return BraggWindows(*(c[order] for c in cols))


def _within_band(q: Tensor, mean_dir: Tensor, k_range: Tensor, margin: Tensor) -> Tensor:
    """q within ``margin`` of some Ewald sphere of wavenumber k_range[0] ... k_range[1] (epsilon
    decreases monotonically with k, so the two end spheres bound the band)."""
    eps_hi = _ewald_offset(q, mean_dir, k_range[:1])
    eps_lo = _ewald_offset(q, mean_dir, k_range[1:])
    return (eps_hi >= -margin) & (eps_lo <= margin)


def _reflections_near_sphere(q, mean_dir, k_range, q_max, angle, dq) -> Tensor:
    """Coarse test over all domains and sources: |q| <= q_max and q within |q| angle + dq of the
    band of Ewald spheres."""
    q_norm = q.norm(dim=-1)
    return (q_norm <= q_max) & _within_band(q, mean_dir, k_range, q_norm * angle + dq)


def _pairs_near_sphere(q, rotations, mean_dir, k_range, theta_div, dq) -> tuple[Tensor, Tensor]:
    """Rotated q of every (reflection, domain) pair, (H, M, 3), and which pairs come within
    |q| theta_div + dq of the band of Ewald spheres."""
    q_dom = torch.einsum("mij,hj->hmi", rotations, q)
    margin = (q.norm(dim=-1) * theta_div + dq).unsqueeze(-1)
    return q_dom, _within_band(q_dom, mean_dir, k_range, margin)


def _lit_wavenumbers(q, directions, k, dq) -> tuple[Tensor, Tensor]:
    """Smallest and largest source wavenumber whose Ewald sphere passes within dq of each q
    (inf / -inf where none does)."""
    eps = _ewald_offset(q.unsqueeze(1), directions.unsqueeze(0), k.unsqueeze(0))  # (Np, C)
    lit = eps.abs() <= dq
    inf = torch.full_like(eps, float("inf"))
    return torch.where(lit, k, inf).amin(1), torch.where(lit, k, -inf).amax(1)


def _windows_for_pairs(q, q_central, pair_h, k, directions, mean_dir, dq, theta_div, theta_mos, frames, panels, stage):
    """Windows of (reflection, domain) pairs: on each panel, a box holding the windows of every
    (pair, source) triple within dq of the Ewald sphere.

    For one incident direction the spot centres of a pair over its lit wavenumbers lie on one
    line segment on a flat panel (the plane through the origin spanned by the beam and q), so
    the box of the segment's two ends padded by the largest window radius (that of eps = 0)
    holds them all; other incident directions (divergence) move the centres by at most
    theta_div, which pads the radius.  Panels are first found per reflection (all its domains
    at once, from the unrotated q padded by twice the largest domain rotation).
    """
    k_lo, k_hi = stage(_lit_wavenumbers)(q, directions, k, dq)
    reflection, pair_reflection = torch.unique_consecutive(pair_h, return_inverse=True)
    n_refl = reflection.numel()
    pair_counts = torch.bincount(pair_reflection, minlength=n_refl)
    first_pair = torch.cumsum(pair_counts, 0) - pair_counts
    # the extreme wavenumbers lit by each reflection (any domain)
    inf_r = torch.full((n_refl,), float("inf"), dtype=k.dtype, device=k.device)
    r_lo = inf_r.scatter_reduce(0, pair_reflection, k_lo, "amin")
    r_hi = (-inf_r).scatter_reduce(0, pair_reflection, k_hi, "amax")
    all_panels = torch.arange(panels.n_panels, device=k.device).unsqueeze(0)
    reach = stage(_segment_box)
    box = reach(q_central[first_pair].unsqueeze(1), r_lo.unsqueeze(1), r_hi.unsqueeze(1), all_panels,
                mean_dir, dq, theta_div + 2.0 * theta_mos, frames, panels.n_layers, panels.image_size)  # fmt: skip
    cand_r, cand_panel = torch.nonzero(box[-1], as_tuple=True)
    # (reflection, panel) -> (pair, panel): pairs of one reflection are consecutive
    rep, cand_pair = _expand(cand_r, first_pair, pair_counts)
    cand_panel = cand_panel[rep]
    *window, keep = stage(_pair_windows)(q[cand_pair], k_lo[cand_pair], k_hi[cand_pair], cand_panel, mean_dir, dq,
                                         theta_div, frames, panels.n_layers, panels.image_size)  # fmt: skip
    kept = keep.nonzero().squeeze(1)
    return (cand_pair[kept], cand_panel[kept], *(x[kept] for x in window))


def _pair_windows(q, k_lo, k_hi, panel, mean_dir, dq, extra_angle, frames, n_layers, image_size):
    """``_segment_box`` clipped to the panel: (fast0, slow0, n_fast, n_slow, on_panel)."""
    lo_f, hi_f, lo_s, hi_s, on_panel = _segment_box(q, k_lo, k_hi, panel, mean_dir, dq, extra_angle, frames,
                                                    n_layers, image_size)  # fmt: skip
    fast0, n_fast = _clip_to_panel(lo_f, hi_f - lo_f, image_size[0])
    slow0, n_slow = _clip_to_panel(lo_s, hi_s - lo_s, image_size[1])
    return fast0, slow0, n_fast, n_slow, on_panel


def _segment_box(q, k_lo, k_hi, panel, mean_dir, dq, extra_angle, frames, n_layers, image_size):
    """Pixel box (lo_f, hi_f, lo_s, hi_s, on_panel) on ``panel`` holding the windows of the spots
    of reciprocal vectors ``q`` (..., 3) for wavenumbers in [k_lo, k_hi] (broadcast with ``panel``).

    Spot centres sit at the sensor's mean absorption depth; each end is padded by the window
    radius of a spot on the sphere (eps = 0) widened by ``extra_angle`` (rad), by 10 %, by the
    spread of the layers' depths and by one pixel.  ``on_panel`` is False where the box misses
    the panel's (n_fast, n_slow) ``image_size`` pixels, nothing is lit or a ray misses the
    panel's side of the sample.
    """
    ends = []
    ok = torch.isfinite(k_lo) & torch.isfinite(k_hi)
    depth = frames["depth"][panel]
    for k_end in (k_lo, k_hi):
        k_end = torch.where(ok, k_end, torch.ones_like(k_end))
        u = k_end.unsqueeze(-1) * mean_dir + q
        u = u / u.norm(dim=-1, keepdim=True)
        cos = dot3(u, depth)
        ok = ok & (cos > 1e-6)
        cos = torch.where(cos > 1e-6, cos, torch.ones_like(cos))
        _, z_mean = layer_mean_depth_mm(cos, frames["thickness"][panel], frames["att_len"][panel], n_layers)
        z_c = 0.5 * (z_mean[..., 0] + z_mean[..., -1])
        z_spread = 0.5 * (z_mean[..., -1] - z_mean[..., 0])
        t = (frames["distance"][panel] + z_c) / cos
        uf = dot3(u, frames["dual_f"][panel])
        us = dot3(u, frames["dual_s"][panel])
        f_c = t * uf - frames["origin_f"][panel]
        s_c = t * us - frames["origin_s"][panel]
        lateral = z_spread / cos * torch.sqrt(uf * uf + us * us)
        alpha = _window_angle(k_end, torch.zeros_like(k_end), dq) + extra_angle
        half = torch.ceil(1.1 * alpha * t / (cos * frames["pixel_min"][panel]) + lateral) + 1.0
        ok = ok & torch.isfinite(f_c) & torch.isfinite(s_c)
        ends.append((f_c, s_c, half))
    (f0, s0, h0), (f1, s1, h1) = ends
    big = 1e12  # boxes of rays that miss are dropped through ok; keep the arithmetic finite
    lo_f = torch.floor(torch.minimum(f0 - h0, f1 - h1)).clamp(-big, big).long()
    hi_f = torch.floor(torch.maximum(f0 + h0, f1 + h1)).clamp(-big, big).long() + 1
    lo_s = torch.floor(torch.minimum(s0 - h0, s1 - h1)).clamp(-big, big).long()
    hi_s = torch.floor(torch.maximum(s0 + h0, s1 + h1)).clamp(-big, big).long() + 1
    n_fast, n_slow = image_size
    on_panel = ok & (hi_f > 0) & (lo_f < n_fast) & (hi_s > 0) & (lo_s < n_slow) & (hi_f > lo_f)
    return lo_f, hi_f, lo_s, hi_s, on_panel


def _expand(group: Tensor, starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """For each entry of ``group``, every member index starts[g] ... starts[g] + counts[g] - 1.

    Returns (which entry each member came from, member index)."""
    n_each = counts[group]
    rep = torch.repeat_interleave(torch.arange(group.numel(), device=group.device), n_each)
    offset = torch.repeat_interleave(torch.cumsum(n_each, 0) - n_each, n_each)
    return rep, starts[group][rep] + torch.arange(rep.numel(), device=group.device) - offset


def _window_angle(k: Tensor, eps: Tensor, dq: float) -> Tensor:
    """Largest angle (rad) from the spot centre to an Ewald-sphere point within dq of q.

    On the sphere |x - q|^2 = eps^2 + 4 k (k + eps) sin^2(alpha / 2), eps = |k s + q| - k.
    """
    reach = (dq * dq - eps * eps).clamp(min=0.0).sqrt()
    arg = reach / (2.0 * torch.sqrt(k * (k + eps).clamp(min=1e-12)))
    return 2.0 * torch.asin(arg.clamp(max=1.0))


def window_photons(
    scene: Scene, windows: BraggWindows, max_terms_per_chunk: int | None = None, compiled: bool = False
) -> tuple[Tensor, Tensor]:
    """Expected photons of every window pixel, as (flat pixel index, photons) of all window pixels.

    Flat index = (panel * n_slow + slow) * n_fast + fast; pixels off their panel carry 0
    photons and index 0.  Differentiable in the scene tensors.  ``compiled=True`` fuses the
    per-pixel physics with torch.compile into one kernel (see ``window_photon_chunks``).
    """
    indices, values = [], []
    for flat, photons, _ in window_photon_chunks(scene, windows, max_terms_per_chunk, compiled):
        indices.append(flat)
        values.append(photons)
    if not indices:
        empty = torch.zeros(0, device=scene.panels.origin_mm.device)
        return empty.long(), empty.to(scene.panels.origin_mm.dtype)
    return torch.cat(indices), torch.cat(values)


def _pixel_chunks(
    scene: Scene, windows: BraggWindows, max_terms_per_chunk: int | None
) -> Iterator[tuple[Tensor, Tensor, Tensor, int]]:
    """Window pixels in consecutive flat chunks of equal length (the last one padded), as
    (window, local pixel index in it, padding mask, number of real pixels) per chunk; at most
    ``max_terms_per_chunk`` (pixel, sub-pixel, layer, source) terms per chunk (default 2^29 on
    a GPU, 2^22 on the CPU).  Equal lengths keep a torch.compile'd evaluation from recompiling."""
    device = scene.panels.origin_mm.device
    if max_terms_per_chunk is None:
        max_terms_per_chunk = 1 << (29 if device.type == "cuda" else 22)
    area = windows.n_fast * windows.n_slow
    end = torch.cumsum(area, 0)
    total = int(end[-1]) if area.numel() else 0
    per_pixel = scene.oversample**2 * scene.panels.n_layers * scene.sources.n_sources
    chunk = min(max(1, max_terms_per_chunk // per_pixel), max(total, 1))
    for start in range(0, total, chunk):
        pixel = torch.arange(start, start + chunk, device=device)
        window = torch.searchsorted(end, pixel, right=True).clamp(max=windows.n_windows - 1)
        local = pixel - (end[window] - area[window])
        yield window, local, pixel >= total, min(chunk, total - start)


def window_photon_chunks(
    scene: Scene, windows: BraggWindows, max_terms_per_chunk: int | None = None, compiled: bool = False
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``window_photons`` in consecutive chunks of window pixels (bounded memory), as
    (flat pixel index, photons, window index) of each pixel.

    Window pixels are processed as flat chunks of equal length (the last one padded and cut),
    so a torch.compile'd evaluation never recompiles per chunk.
    """
    sources = scene.sources
    # |F(h, channel)|^2 once per window and source (complex arithmetic stays out of the fused part)
    f_sq = scene.structure_factors.intensity(windows.row.unsqueeze(-1), sources.channel.unsqueeze(0))
    evaluate = fused(_pixel_photons) if compiled else _pixel_photons
    for window, local, pad, n in _pixel_chunks(scene, windows, max_terms_per_chunk):
        flat, photons = evaluate(scene, windows, f_sq, window, local, pad)
        yield flat[:n], photons[:n], window[:n]


def _pixel_points(
    scene: Scene, windows: BraggWindows, window: Tensor, local: Tensor, pad: Tensor
) -> tuple[SensorPoints, Tensor, Tensor]:
    """Sensor points of the ``local``-th pixel of each ``window`` (flat arrays of equal length),
    shaped (n, o2, T, 1) for a trailing source axis, each pixel's flat index and validity."""
    panels = scene.panels
    dtype = panels.origin_mm.dtype
    n_fast = windows.n_fast[window]
    fast_pix = windows.fast0[window] + local % n_fast
    slow_pix = windows.slow0[window] + local // n_fast
    panel = windows.panel[window]
    valid = (fast_pix >= 0) & (fast_pix < panels.n_fast) & (slow_pix >= 0) & (slow_pix < panels.n_slow) & ~pad
    offsets = subpixel_offsets(scene.oversample, dtype, fast_pix.device)
    fast = fast_pix.to(dtype).unsqueeze(-1) + offsets[:, 0]
    slow = slow_pix.to(dtype).unsqueeze(-1) + offsets[:, 1]
    pts = sensor_points(panels, panel.unsqueeze(-1).expand_as(fast), fast, slow)  # (n, o2, T)
    pts = SensorPoints(diffracted=pts.diffracted.unsqueeze(-2), omega_capture=pts.omega_capture.unsqueeze(-1))
    flat = (panel * panels.n_slow + slow_pix) * panels.n_fast + fast_pix
    return pts, torch.where(valid, flat, torch.zeros_like(flat)), valid


def _pixel_terms(
    scene: Scene, windows: BraggWindows, window: Tensor, local: Tensor, pad: Tensor, domain_real_space: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Terms of the ``local``-th pixel of each ``window`` (flat arrays of equal length): the
    (n, o2, T, n_sources) Bragg terms without |F|^2, each pixel's flat index and validity.
    ``domain_real_space``: (D, 3, 3) rows a, b, c (A) that ``windows.domain`` indexes instead of
    the scene crystal's domains (several crystals in one call)."""
    pts, flat, valid = _pixel_points(scene, windows, window, local, pad)
    if domain_real_space is None:
        domain_real_space = scene.crystal.domain_real_space()
    real_space = domain_real_space[windows.domain[window]].view(-1, 1, 1, 1, 3, 3)
    source = torch.arange(scene.sources.n_sources, device=flat.device)
    terms = bragg_term(
        pts, scene.sources, source, real_space, scene.crystal, scene.structure_factors,
        miller_index=windows.miller_index[window].view(-1, 1, 1, 1, 3),
    )  # fmt: skip  (n, o2, T, C)
    return terms, flat, valid


def _pixel_photons(
    scene: Scene, windows: BraggWindows, f_sq: Tensor, window: Tensor, local: Tensor, pad: Tensor
) -> tuple[Tensor, Tensor]:
    """Photons of the ``local``-th pixel of each ``window`` (flat arrays of equal length), summed
    over sub-pixels, sensor layers and every source; ``f_sq`` is (W, n_sources) |F|^2."""
    terms, flat, valid = _pixel_terms(scene, windows, window, local, pad)
    photons = (terms * f_sq[window].view(-1, 1, 1, scene.sources.n_sources)).sum(dim=(1, 2, 3)) * photon_scale(scene)
    return flat, torch.where(valid, photons, torch.zeros_like(photons))


def _pixel_source_photons(
    scene: Scene, windows: BraggWindows, window: Tensor, local: Tensor, pad: Tensor, domain_real_space: Tensor | None = None
) -> Tensor:
    """Photons per unit |F|^2 of the ``local``-th pixel of each ``window`` for every source,
    (n, n_sources), summed over sub-pixels and sensor layers (``domain_real_space``: as
    :func:`_pixel_terms`)."""
    terms, _, valid = _pixel_terms(scene, windows, window, local, pad, domain_real_space)
    photons = terms.sum(dim=(1, 2)) * photon_scale(scene)
    return torch.where(valid.unsqueeze(-1), photons, torch.zeros_like(photons))


def _pixel_source_gradient(
    scene: Scene, windows: BraggWindows, window: Tensor, local: Tensor, pad: Tensor, domain_real_space: Tensor,
    domain_rotations: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`_pixel_source_photons` (n, n_sources) and its derivatives (n, n_sources, 3, 3) in
    the real space A of the crystal whose domain d has real space ``domain_real_space``[d] =
    A ``domain_rotations``[d]^T, in closed form
    (:func:`~spread_dials.physics.bragg.window_term_and_gradient`), summed over sub-pixels and
    layers."""
    pts, _, valid = _pixel_points(scene, windows, window, local, pad)
    domain = windows.domain[window]
    terms, gradient = window_term_and_gradient(
        pts, scene.sources, torch.arange(scene.sources.n_sources, device=domain.device),
        domain_real_space[domain].view(-1, 1, 1, 1, 3, 3), scene.crystal, windows.miller_index[window].view(-1, 1, 1, 1, 3),
        domain_rotations[domain].view(-1, 1, 1, 1, 3, 3),
    )  # fmt: skip  (n, o2, T, C), (n, o2, T, C, 3, 3)
    scale = photon_scale(scene)
    photons = terms.sum(dim=(1, 2)) * scale
    moved = gradient.sum(dim=(1, 2)) * scale
    return photons.masked_fill(~valid.unsqueeze(-1), 0.0), moved.masked_fill(~valid.view(-1, 1, 1, 1), 0.0)


def window_channel_profiles(
    scene: Scene, windows: BraggWindows, max_terms_per_chunk: int | None = None, domain_real_space: Tensor | None = None,
    domain_rotations: Tensor | None = None, compiled: bool = False,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Each window pixel's photons per unit |F(h, channel)|^2, per spectral channel: (N, n_channels),
    and (``domain_rotations``) their derivatives (N, n_channels, 3, 3) in the crystal's real space.

    N runs over the window pixels in ``window_photons``' order (pixels off their panel are 0);
    sources of one channel (divergence) are summed.  ``window_photons`` equals
    ``(profiles * |F(h_window, channel)|^2).sum(-1)`` pixel by pixel: the sum over channels is
    the only step left out, so refinement can cache these profiles and reweight channels when
    f', f'' change (Sauter et al. 2020).  Differentiable in the scene tensors.

    ``domain_real_space``: (D, 3, 3) rows a, b, c (A) per value of ``windows.domain``, in place of
    the scene crystal's domains: several crystals (stills) of the same lattice shape, Ncells and
    domain count in one call (the photon scale stays the scene crystal's, per domain).
    ``domain_rotations``: (D, 3, 3) the rotation R_d with ``domain_real_space``[d] = A R_d^T
    (A the real space of domain d's crystal): the derivatives d profile / d A_ij then come in
    closed form in the same pass (not differentiable further; a parameter x that moves a
    crystal moves its pixels by sum_ij (d profile / d A_ij) (d A_ij / d x)); requires
    ``domain_real_space``.  ``compiled``: the per-pixel evaluation fused by torch.compile with
    dynamic shapes (a GPU's path; the eager one on the CPU).

    Raises:
        ValueError: ``domain_rotations`` without ``domain_real_space``.
    """
    if domain_rotations is not None and domain_real_space is None:
        raise ValueError("domain_rotations need the domain_real_space they turn")
    sources = scene.sources
    dtype, device = scene.panels.origin_mm.dtype, scene.panels.origin_mm.device
    n_channels = int(sources.channel.max()) + 1 if sources.n_sources else 0
    # one source per channel, in order (no divergence): the channel sum is the identity
    identity = sources.n_sources == n_channels and torch.equal(sources.channel.cpu(), torch.arange(n_channels))
    values = [torch.zeros((0, n_channels), dtype=dtype, device=device)]
    moved = [torch.zeros((0, n_channels, 3, 3), dtype=dtype, device=device)]

    def by_channel(x: Tensor, n: int) -> Tensor:
        if identity:
            return x[:n]
        return x.new_zeros((x.shape[0], n_channels, *x.shape[2:])).index_add(1, sources.channel, x)[:n]

    with_gradient = domain_rotations is not None
    evaluate = _pixel_source_gradient if with_gradient else _pixel_source_photons
    if compiled:  # compiled once for all sizes (every still's windows differ), without inductor's tuning
        evaluate = fused(evaluate, dynamic=True)
    extra = (domain_rotations,) if with_gradient else ()
    for window, local, pad, n in _pixel_chunks(scene, windows, max_terms_per_chunk):
        made = evaluate(scene, windows, window, local, pad, domain_real_space, *extra)
        photons, gradient = made if with_gradient else (made, None)
        values.append(by_channel(photons, n))
        if with_gradient:
            moved.append(by_channel(gradient, n))
    return torch.cat(values), (torch.cat(moved) if with_gradient else None)


def simulate_sparse(
    scene: Scene,
    windows: BraggWindows | None = None,
    tolerance: float = 1e-6,
    compiled: bool = False,
    max_terms_per_chunk: int | None = None,
) -> Tensor:
    """Expected Bragg photons per pixel, (P, n_slow, n_fast), from the windows of ``scene``.

    ``max_terms_per_chunk`` bounds the (pixel, sub-pixel, layer, source) terms evaluated at once;
    the default is 2^29 on a GPU (the fused kernel keeps terms in registers) and 2^22 on the CPU.
    """
    if windows is None:
        windows = predict_windows(scene, tolerance, compiled=compiled)
    return simulate_sparse_windows(scene, windows, compiled, max_terms_per_chunk, moments=False)[0]


def simulate_sparse_windows(
    scene: Scene,
    windows: BraggWindows,
    compiled: bool = False,
    max_terms_per_chunk: int | None = None,
    moments: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``simulate_sparse`` plus each window's photon moments.

    Returns:
        (image, sums): the (P, n_slow, n_fast) expected photons and (if ``moments``) a (W, 3)
        float64 tensor of each window's photons, photons * (fast + 0.5) and photons *
        (slow + 0.5) (so sums[:, 1:] / sums[:, :1] is the window's intensity-weighted centroid
        in pixels); None otherwise.
    """
    panels = scene.panels
    dtype, device = panels.origin_mm.dtype, panels.origin_mm.device
    image = torch.zeros(panels.n_panels * panels.n_slow * panels.n_fast, dtype=dtype, device=device)
    sums = torch.zeros((windows.n_windows, 3), dtype=torch.float64, device=device) if moments else None
    for flat, photons, window in window_photon_chunks(scene, windows, max_terms_per_chunk, compiled):
        if photons.requires_grad:
            image = image.index_add(0, flat, photons)  # out of place: autograd needs each step
        else:
            image.index_add_(0, flat, photons)
        if sums is None:
            continue
        p = photons.detach().double()
        fast = (flat % panels.n_fast).double() + 0.5
        slow = ((flat // panels.n_fast) % panels.n_slow).double() + 0.5
        sums.index_add_(0, window, torch.stack([p, p * fast, p * slow], -1))
    return image.reshape(panels.n_panels, panels.n_slow, panels.n_fast), sums
