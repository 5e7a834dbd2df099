"""What the learned correction may see of a pixel: its geometry, never the anomalous signal
(pure torch).

The f'/f'' signal lives in each reflection's integrated intensity, varying pseudo-randomly with
the Miller index (through each site's phase) and with the shot's spectrum.  The correction is
therefore fed only quantities derived from the pixel's position, the detector, the nominal beam
and the still's given crystal: nothing here reads a Miller index, F0, G, |F|^2, the recorded
spectrum or a derivative in the edge shifts (``tests/correct`` perturbs each and checks that the
context does not move).  The reflection's direction in the crystal frame and its resolution are
those of the pixel's own scattering vector at the nominal energy, averaged over its shoebox:
geometry, not the table's Miller index.

The intensity head's features (:attr:`PixelContext.head_features`) do not vary inside a shoebox:
in a pink beam each pixel of a spot is diffracted by its own energy, so a feature that resolves
positions inside a spot is a proxy for the energy, and the mean anomalous intensity
|f' + i f''|^2 |G|^2 of every reflection steps with the energy at the edge (the part of the
signal that does not change sign with the Miller index).  Measured: with the excitation error
of each pixel as a feature, the intensity head took up part of the edge shift (toy, 8 stills,
PSF: +0.26 eV, 2.6 sigma; stencil alone, as the oracle, 0.2 sigma).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.physics.constants import HC_EV_A
from spread_dials.physics.geometry import pixel_surface_position_mm
from spread_dials.refine.shots import Shot, ShotSet

__all__ = ["PixelContext", "pixel_context", "HEAD_FEATURES"]

#: the features of :attr:`PixelContext.head_features`, in column order
HEAD_FEATURES = ("direction_a", "direction_b", "direction_c", "resolution")


@dataclass(frozen=True)
class PixelContext:
    """The correction's inputs for the N shoebox pixels of one still.

    Attributes:
        panel: (N,) long panel of each pixel.
        panel_xy: (N, 2) pixel centre on its panel, fast then slow, scaled to [-1, 1] (the
            gain field's coordinates).
        two_theta: (N,) scattering angle (rad) at the nominal energy.
        azimuth: (N,) azimuth of the diffracted ray about the beam (rad).
        obliquity: (N,) cosine of the angle between the diffracted ray and the panel normal.
        shoebox: (N,) long shoebox of each pixel; local: (N, 2) fast, slow offsets (pixels)
            from the shoebox centre.
        neighbours: (K, N) long, for each stencil offset (:attr:`offsets`) the index of the
            pixel at that offset in the same shoebox, -1 where it falls outside.
        offsets: the K (d_fast, d_slow) stencil offsets (pixels), the centre excluded.
        direction: (N, 3) unit scattering vector in the crystal's orthonormal frame (the Q of
            the QR decomposition of the given real-space rows, so a, b, c-aligned for an
            orthorhombic cell), the mean over the pixel's shoebox, normalised.
        resolution: (N,) 1 / d (1/A) of the scattering vector, the mean over the shoebox.
    """

    panel: Tensor
    panel_xy: Tensor
    two_theta: Tensor
    azimuth: Tensor
    obliquity: Tensor
    shoebox: Tensor
    local: Tensor
    neighbours: Tensor
    offsets: tuple[tuple[int, int], ...]
    direction: Tensor
    resolution: Tensor

    @property
    def head_features(self) -> Tensor:
        """(N, 4) the intensity head's inputs (:data:`HEAD_FEATURES`), unscaled: one value per
        shoebox."""
        return torch.cat([self.direction, self.resolution.unsqueeze(-1)], -1)


def stencil_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """The (2 radius + 1)^2 - 1 offsets (d_fast, d_slow) of a square stencil, centre excluded."""
    r = range(-radius, radius + 1)
    return tuple((dx, dy) for dy in r for dx in r if (dx, dy) != (0, 0))


def stencil_orbits(offsets: tuple[tuple[int, int], ...], symmetry: str = "none") -> Tensor:
    """(K,) long: the free weight each stencil offset takes.  ``none``: one per offset; ``d4``:
    one per orbit of the square's symmetry group (offsets equal up to sign changes and the swap
    of fast and slow share one: a point spread that is the same along and across rows and in
    every direction), numbered by (min |d|, max |d|).

    Raises:
        ValueError: an unknown symmetry.
    """
    if symmetry == "none":
        return torch.arange(len(offsets))
    if symmetry != "d4":
        raise ValueError(f"unknown stencil symmetry {symmetry!r} (none or d4)")
    keys = [tuple(sorted((abs(dx), abs(dy)))) for dx, dy in offsets]
    order = {k: i for i, k in enumerate(sorted(set(keys)))}
    return torch.tensor([order[k] for k in keys])


def _neighbours(shot: Shot, offsets: tuple[tuple[int, int], ...]) -> Tensor:
    """(K, N) index of the pixel at each offset inside the same shoebox (-1 outside)."""
    sb = shot.shoeboxes
    b = sb.pixel_shoebox()
    area = sb.n_fast * sb.n_slow
    start = torch.cumsum(area, 0) - area
    local = torch.arange(sb.n_pixels, device=area.device) - start[b]
    nf, ns = sb.n_fast[b], sb.n_slow[b]
    ix, iy = local % nf, local // nf
    out = []
    for dx, dy in offsets:
        jx, jy = ix + dx, iy + dy
        inside = (jx >= 0) & (jx < nf) & (jy >= 0) & (jy < ns)
        out.append(torch.where(inside, start[b] + jy * nf + jx, torch.full_like(ix, -1)))
    return torch.stack(out) if out else torch.zeros((0, sb.n_pixels), dtype=torch.long, device=area.device)


#: the redistribution stencil's default half-width (pixels; CorrectionSettings.stencil_radius)
DEFAULT_STENCIL_RADIUS = 2


def pixel_context(shots: ShotSet, shot: Shot, nominal_energy_eV: float, stencil_radius: int = DEFAULT_STENCIL_RADIUS) -> PixelContext:
    """The :class:`PixelContext` of ``shot``'s shoebox pixels.

    Args:
        shots: the stills' shared detector and beam.
        shot: the still (its given crystal and shoebox layout; its counts, Miller indices and
            spectrum are not read).
        nominal_energy_eV: one energy for the whole data set (the beam model's), never the
            shot's recorded spectrum.
        stencil_radius: half-width (pixels) of the redistribution stencil.
    """
    sb = shot.shoeboxes
    panels = shots.panels
    dtype = panels.origin_mm.dtype
    b = sb.pixel_shoebox()
    fast_off, slow_off = sb.pixel_coordinates()
    fast = sb.fast0[b].to(dtype) + fast_off.to(dtype) + (sb.n_fast[b].to(dtype) - 1) / 2 + 0.5
    slow = sb.slow0[b].to(dtype) + slow_off.to(dtype) + (sb.n_slow[b].to(dtype) - 1) / 2 + 0.5
    panel = sb.panel[b]
    position = pixel_surface_position_mm(panels, panel, fast, slow)
    s1 = position / position.norm(dim=-1, keepdim=True)
    s0 = shots.beam_direction.to(dtype)
    cos2t = (s1 * s0).sum(-1).clamp(-1.0, 1.0)
    # azimuth about the beam, measured from the polarization axis
    e1 = shots.e_vector.to(dtype)
    e2 = torch.linalg.cross(s0, e1)
    azimuth = torch.atan2((s1 * e2).sum(-1), (s1 * e1).sum(-1))
    normal = torch.linalg.cross(panels.fast_axis[panel], panels.slow_axis[panel])
    obliquity = (s1 * normal).sum(-1).abs()
    wavelength = HC_EV_A / float(nominal_energy_eV)
    q = (s1 - s0) / wavelength  # (N, 3) 1/A, lab frame
    real_space = shot.real_space.to(dtype)
    frame, _ = torch.linalg.qr(real_space.T)  # columns: orthonormal crystal axes (a first)
    frame = frame * torch.sign(torch.diagonal(frame.T @ real_space.T)).unsqueeze(0)
    per_box = torch.zeros((sb.n_shoeboxes, 3), dtype=dtype, device=q.device).index_add(0, b, q @ frame)
    area = (sb.n_fast * sb.n_slow).to(dtype)
    resolution = (torch.zeros(sb.n_shoeboxes, dtype=dtype, device=q.device).index_add(0, b, q.norm(dim=-1)) / area)[b]
    direction = per_box[b] / per_box[b].norm(dim=-1, keepdim=True).clamp(min=1e-300)
    n_fast, n_slow = panels.n_fast, panels.n_slow
    panel_xy = torch.stack([2 * fast / n_fast - 1, 2 * slow / n_slow - 1], -1)
    offsets = stencil_offsets(stencil_radius)
    return PixelContext(
        panel=panel, panel_xy=panel_xy, two_theta=torch.acos(cos2t), azimuth=azimuth, obliquity=obliquity,
        shoebox=b, local=torch.stack([fast_off, slow_off], -1), neighbours=_neighbours(shot, offsets),
        offsets=offsets, direction=direction, resolution=resolution,
    )  # fmt: skip
