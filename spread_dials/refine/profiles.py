"""Per-channel Bragg profiles of a still's shoeboxes from the round-1 kernel (pure torch).

A shoebox is a kernel window (:class:`~spread_dials.physics.sparse.BraggWindows`), one per
mosaic domain; ``window_channel_profiles`` gives each pixel's photons per unit |F(h, E_c)|^2
for every channel, summed here over the domains.  f' and f'' only reweight the channels, so
refinement caches these profiles (Sauter et al. 2020) at the current per-shot parameters,
together with their derivatives with respect to the three small orientation angles (forward-mode
autograd), and evaluates the pixel rate from the cache (:mod:`spread_dials.refine.model`).

Per-shot crystal offsets: a small rotation vector r (3,) (rad, lab frame) and, optionally, the
log changes of the unit-cell lengths (k,), one per set of lengths that the lattice symmetry ties
(``CrystalModel.cell_ties``): the still's rows a, b, c become
diag(exp(cell[ties])) A0 R(r)^T.  Cell angles are kept (stills_process refines them only as far
as the lattice symmetry allows; for the orthorhombic to cubic lattices of the use cases they are
fixed at 90 degrees).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from spread_dials.physics.beam import make_sources
from spread_dials.physics.bragg import Scene
from spread_dials.physics.crystal import Crystal, rotation_from_vector
from spread_dials.physics.mosaic_quadrature import domain_rotations
from spread_dials.physics.sparse import BraggWindows, window_channel_profiles
from spread_dials.physics.structure_factors import constant_structure_factors
from spread_dials.refine.shots import Shot, ShotSet

#: most bytes of (domains, pixels, channels) profiles and their tangents made in one kernel call on a GPU
PROFILE_GROUP_BYTES = 1 << 30

__all__ = ["CrystalModel", "ShotProfiles", "crystal_real_space", "shot_profiles", "shot_scene", "shoebox_windows"]


@dataclass(frozen=True)
class CrystalModel:
    """What the refinement assumes of every crystal (fixed, from PHIL).

    Attributes:
        ncells_abc: (3,) unit cells per mosaic domain along a, b, c.
        mosaic_spread_deg: rms rotation angle of the mosaic domains (degrees).
        mosaic_domains: number of domains.
        shape: lattice shape (gauss, square, round, tophat).
        seed: seed of the domain draw (``domain_set = random``; the same draw for every shot).
        fluence_photons_per_m2: nominal fluence; the per-shot scale G multiplies it, so G is
            the crystal's ``spot_scale`` when the fluence is the true one.
        oversample: sub-pixels per pixel edge.
        domain_set: ``quadrature`` (deterministic, approximates a crystal of very many domains)
            or ``random`` (seeded draw).
        cell_ties: (3,) the cell parameter that scales each of a, b, c: (0, 1, 2) three free
            lengths (orthorhombic and lower), (0, 0, 1) a = b (tetragonal, trigonal, hexagonal),
            (0, 0, 0) cubic.
    """

    ncells_abc: tuple[float, float, float]
    mosaic_spread_deg: float
    mosaic_domains: int
    shape: str = "gauss"
    seed: int = 0
    fluence_photons_per_m2: float = 1.2732395447351627e24
    oversample: int = 1
    domain_set: str = "quadrature"
    cell_ties: tuple[int, int, int] = (0, 1, 2)

    @property
    def n_cell_parameters(self) -> int:
        """Free unit-cell length parameters under the lattice symmetry."""
        return max(self.cell_ties) + 1

    def domain_rotations(self, seed: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        """(mosaic_domains, 3, 3) domain rotations: the deterministic quadrature of the mosaic
        distribution (:mod:`spread_dials.physics.mosaic_quadrature`; ``domain_set = quadrature``)
        or a random draw from ``seed`` (default this model's)."""
        return domain_rotations(self.domain_set, self.mosaic_spread_deg, self.mosaic_domains,
                                self.seed if seed is None else seed, dtype=dtype)  # fmt: skip


def shoebox_windows(shot: Shot, n_domains: int) -> BraggWindows:
    """The shot's shoeboxes as kernel windows, domain-major: window m * B + b is shoebox b in
    domain m (so window pixels come as n_domains blocks of the shot's N pixels)."""
    sb = shot.shoeboxes
    rep = lambda t: t.repeat(n_domains)  # noqa: E731
    domain = torch.arange(n_domains, device=sb.panel.device).repeat_interleave(sb.n_shoeboxes)
    return BraggWindows(
        miller_index=sb.miller_index.repeat(n_domains, 1),
        row=torch.zeros_like(rep(sb.panel)),
        domain=domain,
        panel=rep(sb.panel),
        fast0=rep(sb.fast0),
        slow0=rep(sb.slow0),
        n_fast=rep(sb.n_fast),
        n_slow=rep(sb.n_slow),
    )


def crystal_real_space(real_space: Tensor, rotation: Tensor, cell: Tensor | None, cell_ties: tuple[int, int, int]) -> Tensor:
    """(3, 3) rows a, b, c (A) of a crystal ``real_space`` (3, 3) turned by the rotation vector
    ``rotation`` (3,) (rad, lab frame) with its lengths scaled by exp(``cell``[ties]) (``cell``:
    (k,) log length changes, or None / empty for the given cell)."""
    turned = real_space.to(rotation.dtype) @ rotation_from_vector(rotation).transpose(-1, -2)
    if cell is None or cell.numel() == 0:
        return turned
    return torch.exp(cell[list(cell_ties)]).unsqueeze(-1) * turned


def shot_scene(shots: ShotSet, shot: Shot, model: CrystalModel, rotation: Tensor, cell: Tensor | None = None) -> Scene:
    """The kernel scene of ``shot`` with its crystal turned by the rotation vector ``rotation`` (3,)
    (rad, lab frame) and its cell lengths changed by ``cell`` (:func:`crystal_real_space`), with
    |F| = 1 everywhere (profiles are per unit |F|^2)."""
    dtype = shots.panels.origin_mm.dtype
    real_space = crystal_real_space(shot.real_space, rotation, cell, model.cell_ties)
    rotations = model.domain_rotations(dtype=dtype)
    crystal = Crystal(
        real_space=real_space,
        ncells_abc=torch.tensor(model.ncells_abc, dtype=dtype),
        domain_rotations=rotations.to(rotation.device),
        shape=model.shape,
    )
    sources = make_sources(
        shot.energy_eV.to(dtype), shot.weight.to(dtype), model.fluence_photons_per_m2,
        beam_direction=shots.beam_direction.to(dtype), e_vector=shots.e_vector.to(dtype),
        polarization_fraction=shots.polarization_fraction,
    )  # fmt: skip
    sf = constant_structure_factors(1.0, dtype=dtype.to_complex())
    return Scene(shots.panels, sources.to(device=rotation.device), crystal, sf.to(device=rotation.device), model.oversample)


@dataclass(frozen=True)
class ShotProfiles:
    """Cached per-channel profiles of one shot at crystal offsets ``rotation``, ``cell``.

    Attributes:
        rotation: (3,) rotation vector (rad) at which the cache was made.
        profile: (N, C) photons per unit |F|^2 of every shoebox pixel and channel (all domains).
        jacobian: (N, C, 3 + k) d profile / d (rotation (per rad), cell (per unit log length)),
            or None.
        cell: (k,) log cell-length changes at which the cache was made (None: cell not refined).
    """

    rotation: Tensor
    profile: Tensor
    jacobian: Tensor | None
    cell: Tensor | None = None

    @property
    def offsets(self) -> Tensor:
        """(3 + k,) the cache point: rotation then cell."""
        return self.rotation if self.cell is None else torch.cat([self.rotation, self.cell.to(self.rotation)])


def shot_profiles(shots: ShotSet, shot: Shot, model: CrystalModel, rotation: Tensor, jacobian: bool = True,
                  cell: Tensor | None = None) -> ShotProfiles:  # fmt: skip
    """The kernel's per-channel profiles of the shot's shoebox pixels at ``rotation`` (3,) (rad)
    and ``cell`` (k,) (log length changes; None: the given cell, not refined), and
    (``jacobian``) their derivatives with respect to both by forward-mode autograd."""
    # the kernel's GPU chunks (2^29 terms) hold float64 intermediates for 3 tangents at once
    # under jacfwd: 2^25 keeps a PSII still's recomputation within a few GB
    chunk = (1 << 25) if rotation.device.type == "cuda" else None
    n_domains = model.mosaic_domains
    n_pixels, n_channels = int(shot.shoeboxes.n_pixels), int(shot.energy_eV.numel())
    n_boxes = int(shot.shoeboxes.n_shoeboxes)
    tangents = (3 + (0 if cell is None else int(cell.numel()))) if jacobian else 0
    group = 1
    if rotation.device.type == "cuda":  # launch-bound there; on the CPU bigger blocks only miss the caches (3x slower)
        group = max(1, min(n_domains, PROFILE_GROUP_BYTES // max(1, 8 * n_pixels * n_channels * (1 + tangents))))
    windows = shoebox_windows(shot, group)

    def profile(x: Tensor) -> Tensor:
        """(N, C) at offsets x = (rotation, cell), summed over the domains ``group`` at a time
        (all of a PSII still's (domains, N, C) tensor and its tangents would not fit: 25 x 636k
        pixels x 100 channels x 8 B x 4; a rubredoxin still's take one kernel call)."""
        scene = shot_scene(shots, shot, model, x[:3], x[3:] if cell is not None else None)
        total = None
        for first in range(0, n_domains, group):
            size = min(group, n_domains - first)
            part = window_channel_profiles(scene, _domain_block(windows, first, size, n_boxes), chunk)
            part = part.view(size, n_pixels, -1).sum(0)
            total = part if total is None else total + part
        return total

    rotation = rotation.detach()
    cell = None if cell is None else cell.detach().to(rotation)
    x = rotation if cell is None else torch.cat([rotation, cell])
    if not jacobian:
        with torch.no_grad():
            return ShotProfiles(rotation, profile(x), None, cell)
    value, jac = _value_and_jacfwd(profile, x)
    return ShotProfiles(rotation, value, jac, cell)


def _domain_block(windows: BraggWindows, first: int, size: int, n_boxes: int) -> BraggWindows:
    """Domains first .. first + size - 1 as windows: the first ``size`` domain blocks of the
    domain-major ``windows`` (:func:`shoebox_windows`, ``n_boxes`` shoeboxes a domain) with
    their domain numbers moved up by ``first``."""
    block = windows.select(torch.arange(size * n_boxes, device=windows.domain.device))
    return replace(block, domain=block.domain + first)


def _value_and_jacfwd(fn, x: Tensor) -> tuple[Tensor, Tensor]:
    """fn(x) and its Jacobian (..., dim x) in one vectorised forward-mode pass (torch.func.jacfwd
    batches the tangents of every component of x; 3-4x faster than one pass per component)."""

    def with_value(v: Tensor) -> tuple[Tensor, Tensor]:
        out = fn(v)
        return out, out

    jacobian, value = torch.func.jacfwd(with_value, has_aux=True)(x)
    return value, jacobian
