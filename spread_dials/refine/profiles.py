"""Per-channel Bragg profiles of a still's shoeboxes from the round-1 kernel (pure torch).

A shoebox is a kernel window (:class:`~spread_dials.physics.sparse.BraggWindows`), one per
mosaic domain; ``window_channel_profiles`` gives each pixel's photons per unit |F(h, E_c)|^2
for every channel, summed here over the domains.  f' and f'' only reweight the channels, so
refinement caches these profiles (Sauter et al. 2020) at the current per-shot parameters,
together with their derivatives with respect to the crystal offsets (in closed form, in the
kernel's own pass: :func:`~spread_dials.physics.bragg.window_term_and_gradient`), and evaluates
the pixel rate from the cache (:mod:`spread_dials.refine.model`).

Per-shot crystal offsets: a small rotation vector r (3,) (rad, lab frame) and, optionally, the
log changes of the unit-cell lengths (k,), one per set of lengths that the lattice symmetry ties
(``CrystalModel.cell_ties``): the still's rows a, b, c become
diag(exp(cell[ties])) A0 R(r)^T.  Cell angles are kept (stills_process refines them only as far
as the lattice symmetry allows; for the orthorhombic to cubic lattices of the use cases they are
fixed at 90 degrees).  With ``CrystalModel.mosaic_latent`` three more offsets follow the cell
lengths: m (3,), log factors of the still's rms mosaic spread about its crystal's a, b, c axes
(its domains are the anisotropic set of spreads s exp(m), s the model's); their derivatives come
from the kernel's per-domain derivatives in A before the domain sum (:func:`_group_profile`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from spread_dials.physics.beam import make_sources
from spread_dials.physics.bragg import Scene
from spread_dials.physics.crystal import Crystal, rotation_from_vector
from spread_dials.physics.mosaic_quadrature import domain_rotations
from spread_dials.physics.sparse import BraggWindows, window_channel_profiles
from spread_dials.physics.structure_factors import constant_structure_factors
from spread_dials.refine.derivatives import value_and_jacobian
from spread_dials.refine.shots import Shot, ShotSet

#: most bytes of (domains, pixels, channels) profiles and their tangents made in one kernel call on a GPU
PROFILE_GROUP_BYTES = 1 << 30

__all__ = ["CrystalModel", "ShotProfiles", "crystal_real_space", "shot_profiles", "stills_profiles", "shot_scene", "shoebox_windows"]


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
        anisotropic_spread_deg: None, or rms mosaic angles about the crystal's a, b, c axes
            (degrees) instead of ``mosaic_spread_deg``: each still's domains then turn about
            the axes of its given (.expt) crystal, which the refined offsets do not move.
        mosaic_latent: each still's crystal offsets end with 3 log factors m of its mosaic
            spreads about a, b, c (``anisotropic_spread_deg``, else ``mosaic_spread_deg``
            thrice, times exp(m)); the caches then carry a cell vector (k + 3,) even when the
            cell lengths are held.
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
    anisotropic_spread_deg: tuple[float, float, float] | None = None
    mosaic_latent: bool = False

    @property
    def n_cell_parameters(self) -> int:
        """Free unit-cell length parameters under the lattice symmetry."""
        return max(self.cell_ties) + 1

    @property
    def n_mosaic_parameters(self) -> int:
        """Mosaic-spread log factors among each still's crystal offsets (3 with ``mosaic_latent``)."""
        return 3 if self.mosaic_latent else 0

    def mosaic_spreads_deg(self, mosaic: Tensor) -> Tensor:
        """(3,) rms mosaic angles (degrees) about a, b, c at log factors ``mosaic`` (3,):
        ``anisotropic_spread_deg`` (else ``mosaic_spread_deg`` thrice) times exp(mosaic)."""
        base = self.anisotropic_spread_deg or (self.mosaic_spread_deg,) * 3
        return torch.tensor(base, dtype=mosaic.dtype, device=mosaic.device) * torch.exp(mosaic)

    def domain_rotations(self, seed: int | None = None, dtype: torch.dtype = torch.float64,
                         real_space: Tensor | None = None, mosaic: Tensor | None = None) -> Tensor:  # fmt: skip
        """(mosaic_domains, 3, 3) domain rotations: the deterministic quadrature of the mosaic
        distribution (:mod:`spread_dials.physics.mosaic_quadrature`; ``domain_set = quadrature``)
        or a random draw from ``seed`` (default this model's); with ``anisotropic_spread_deg``
        or ``mosaic`` (3,) (log factors of the spreads about a, b, c; differentiable) about the
        axes of the crystal ``real_space`` (3, 3) (rows a, b, c; A).

        Raises:
            ValueError: an anisotropic spread without ``real_space``.
        """
        device = None if real_space is None else real_space.device  # the spreads beside the axes (a GPU's crystal)
        aniso = None if self.anisotropic_spread_deg is None else torch.tensor(self.anisotropic_spread_deg, dtype=dtype, device=device)
        if mosaic is not None:
            aniso = self.mosaic_spreads_deg(mosaic)
        return domain_rotations(self.domain_set, self.mosaic_spread_deg, self.mosaic_domains,
                                self.seed if seed is None else seed, real_space, aniso, dtype=dtype)  # fmt: skip


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
    rotations = model.domain_rotations(dtype=dtype, real_space=shot.real_space.to(dtype))
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
    # every tensor on the rotation's device: a fused (torch.compile) kernel takes no CPU scalars
    return Scene(shots.panels, sources, crystal, sf, model.oversample).to(device=rotation.device)


@dataclass(frozen=True)
class ShotProfiles:
    """Cached per-channel profiles of one shot at crystal offsets ``rotation``, ``cell``.

    Attributes:
        rotation: (3,) rotation vector (rad) at which the cache was made.
        profile: (N, C) photons per unit |F|^2 of every shoebox pixel and channel (all domains).
        jacobian: (N, C, 3 + k [+ 3]) d profile / d (rotation (per rad), cell (per unit log
            length) [, mosaic log factors]), or None.
        cell: (k [+ 3],) log cell-length changes [and mosaic log factors,
            ``CrystalModel.mosaic_latent``] at which the cache was made (None: neither refined).
        summed_at: None for per-channel profiles; for profiles summed over the channels
            (:func:`~spread_dials.refine.model.sum_channels`) the global parameters theta0 (P,)
            they were summed at: ``profile`` is then (N, 1 + P [+ 1]) "virtual channels" (the
            Bragg term per unit scale, its derivatives in theta [and in the energy jitter]) and
            ``jacobian`` (N, 1, 3 + k) the first one's derivative in the crystal offsets.
        summed_jitter: () the energy jitter delta0 (eV) they were summed at, when they carry its
            column, else None.
    """

    rotation: Tensor
    profile: Tensor
    jacobian: Tensor | None
    cell: Tensor | None = None
    summed_at: Tensor | None = None
    summed_jitter: Tensor | None = None

    @property
    def offsets(self) -> Tensor:
        """(3 + k,) the cache point: rotation then cell."""
        return self.rotation if self.cell is None else torch.cat([self.rotation, self.cell.to(self.rotation)])


def shot_profiles(shots: ShotSet, shot: Shot, model: CrystalModel, rotation: Tensor, jacobian: bool = True,
                  cell: Tensor | None = None) -> ShotProfiles:  # fmt: skip
    """The kernel's per-channel profiles of the shot's shoebox pixels at ``rotation`` (3,) (rad)
    and ``cell`` (k,) (log length changes; None: the given cell, not refined), and
    (``jacobian``) their derivatives with respect to both (closed form, one block of mosaic
    domains at a time; :func:`stills_profiles` of one still)."""
    return stills_profiles(shots, [shot], model, [rotation], [cell], jacobian)[0]


def stills_profiles(shots: ShotSet, stills: list[Shot], model: CrystalModel, rotations: list[Tensor],
                    cells: list[Tensor | None], jacobian: bool = True, together: bool | None = None) -> list[ShotProfiles]:  # fmt: skip
    """:func:`shot_profiles` of several stills (all on one device, all with or all without a cell).

    ``together`` (default: on a GPU, where the kernel is launch-bound for a small still):
    stills with the same channel energies are made together, all their domains in one kernel
    call (each still's crystal its own block of domains: ``domain_real_space`` of
    :func:`~spread_dials.physics.sparse.window_channel_profiles`), up to ``PROFILE_GROUP_BYTES``
    of profiles and tangents a call.  The channel weights enter linearly, so a group is made
    at unit weights and each still's columns scaled after.  The derivatives: the kernel gives
    each pixel's derivatives in its own still's real space A (3 x 3), summed over the domains
    and then multiplied by that still's d A / d offsets.  Otherwise one still a call, its
    domains ``PROFILE_GROUP_BYTES`` at a time on a GPU (PSII: one) and one at a time on the CPU
    (larger blocks only missed its caches: 3x slower).
    """
    if not stills:
        return []
    device = rotations[0].device
    together = device.type == "cuda" if together is None else together
    with_cell = cells[0] is not None
    tangents = 9 if jacobian else 0  # a block's derivatives in the real space A (3 x 3)
    still_bytes = [_still_bytes(s, model, tangents) for s in stills]
    out, start = [], 0
    while start < len(stills):
        end, used = start + 1, still_bytes[start]
        while (together and end < len(stills) and used + still_bytes[end] <= PROFILE_GROUP_BYTES
               and torch.equal(stills[end].energy_eV, stills[start].energy_eV)):  # fmt: skip
            used += still_bytes[end]
            end += 1
        group = list(range(start, end))
        x0 = torch.stack([rotations[k].detach() if not with_cell else torch.cat([rotations[k].detach(), cells[k].detach().to(rotations[k])])
                          for k in group])  # fmt: skip
        per_call = _domains_per_call(model, device, len(group), still_bytes[start])
        block, starts = _group_profile(shots, [stills[k] for k in group], model, x0, with_cell, per_call)
        value, jac = 0, (0 if jacobian else None)
        for d0 in starts:  # block by block, each block's terms summed before the next
            v, j = block(d0, jacobian)
            value = value + v
            jac = None if j is None else jac + j
        sizes = [int(stills[k].shoeboxes.n_pixels) for k in group]
        jacs = torch.split(jac, sizes) if jac is not None else [None] * len(group)
        for k, v, j in zip(group, torch.split(value, sizes), jacs):
            out.append(ShotProfiles(rotations[k].detach(), v, j, cells[k].detach().to(rotations[k]) if with_cell else None))
        start = end
    return out


def _still_bytes(still: Shot, model: CrystalModel, tangents: int) -> int:
    """Bytes of one still's (domains, pixels, channels) float64 profiles and their tangents."""
    return 8 * int(still.shoeboxes.n_pixels) * int(still.energy_eV.numel()) * (1 + tangents) * model.mosaic_domains


def _domains_per_call(model: CrystalModel, device: torch.device, n_stills: int, still_bytes: int) -> int:
    """Mosaic domains of every still in one kernel call (:func:`stills_profiles`): all of them for
    a group of stills, as many as ``PROFILE_GROUP_BYTES`` holds for one still on a GPU, one on the CPU."""
    if n_stills > 1:
        return model.mosaic_domains
    if device.type == "cuda":
        return max(1, min(model.mosaic_domains, PROFILE_GROUP_BYTES * model.mosaic_domains // still_bytes))
    return 1


def _group_profile(shots: ShotSet, stills: list[Shot], model: CrystalModel, x0: Tensor, with_cell: bool,
                   per_call: int) -> tuple[Callable[[int, bool], tuple[Tensor, Tensor | None]], list[int]]:  # fmt: skip
    """(block, starts): block(d0, jacobian) -> the (the stills' pixels, C) profiles of ``stills``
    (one channel grid) from their domains d0 .. d0 + ``per_call`` - 1 (one kernel call), each
    still's crystal offsets at its row of ``x0`` (K, 3 + k), and (``jacobian``) their
    derivatives (pixels, C, 3 + k) in the offsets: the kernel's closed-form derivatives in the
    crystal's real space A, in the same pass, summed over the domains, then times d A / d
    offsets (autograd on the (3, 3) matrix alone); the profiles are the sum of the blocks over
    ``starts``.  With ``model.mosaic_latent`` the last 3 offsets m turn the domains: domain d's
    crystal is A R_d(m)^T, so d profile / d m_j = sum_d (d profile / d A)_d : (A (d R_d / d m_j)^T R_d),
    each domain's kernel derivative contracted before the domain sum (d R_d / d m by autograd on
    the (domains, 3, 3) rotations alone).  On a GPU the kernel is fused (torch.compile)."""
    device, n_domains = x0.device, model.mosaic_domains
    n_cell = model.n_cell_parameters if with_cell else 0
    n_mosaic = model.n_mosaic_parameters
    if n_mosaic and not with_cell:
        raise ValueError("a mosaic latent needs each still's cell vector (cell lengths, then mosaic factors)")
    # kernel chunks of 2^25 terms on a GPU: (pixels, C, 1 + 9) float64 outputs of ~2.7 GB at most
    chunk = (1 << 25) if device.type == "cuda" else None
    n_boxes = [int(s.shoeboxes.n_shoeboxes) for s in stills]
    n_pixels = [int(s.shoeboxes.n_pixels) for s in stills]
    windows = [shoebox_windows(s, per_call) for s in stills]
    scales = [s.weight.to(x0) * (s.weight.numel() / s.weight.to(x0).sum()) for s in stills]  # unit weights are 1 / C
    unit = replace(stills[0], weight=torch.ones_like(stills[0].weight))
    scene = shot_scene(shots, unit, model, x0[0, :3], x0[0, 3:] if with_cell else None)
    def still_domains(still: Shot, mosaic: Tensor | None = None) -> Tensor:
        return model.domain_rotations(dtype=x0.dtype, real_space=still.real_space.to(x0), mosaic=mosaic).to(device)

    turned = [None] * len(stills)  # with the latent: each still's (domains, 9, 3) A (d R_d / d m)^T R_d
    if n_mosaic:
        domain_sets = []
        for k, still in enumerate(stills):
            x_mosaic = x0[k, 3 + n_cell :]
            rotations, d_rotations = value_and_jacobian(lambda m, still=still: still_domains(still, m), x_mosaic)
            a = crystal_real_space(still.real_space.to(x0), x0[k, :3], x0[k, 3 : 3 + n_cell], model.cell_ties)
            turned[k] = torch.einsum("ab,dcbm,dce->daem", a, d_rotations, rotations).reshape(-1, 9, n_mosaic)
            domain_sets.append(rotations)
    else:  # each still's own set only where it depends on the crystal's axes
        domain_sets = ([still_domains(s) for s in stills] if model.anisotropic_spread_deg is not None
                       else [still_domains(stills[0])] * len(stills))  # fmt: skip

    def block(d0: int, jacobian: bool) -> tuple[Tensor, Tensor | None]:
        size = min(per_call, n_domains - d0)
        turns = [domains[d0 : d0 + size] for domains in domain_sets]
        blocks, real, moves = [], [], []
        for k, (still, rotations) in enumerate(zip(stills, turns)):
            a0 = still.real_space.to(x0)

            def crystal(x: Tensor, a0: Tensor = a0) -> Tensor:
                return crystal_real_space(a0, x[:3], x[3 : 3 + n_cell] if with_cell else None, model.cell_ties)

            if jacobian:
                a, da = value_and_jacobian(crystal, x0[k])  # (3, 3), (3, 3, 3 + k)
                moves.append(da.reshape(9, -1))
            else:
                a = crystal(x0[k])
            real.append(a @ rotations.transpose(-1, -2))
            selected = windows[k].select(torch.arange(size * n_boxes[k], device=device))
            blocks.append(replace(selected, domain=selected.domain + k * size))
        merged = BraggWindows(**{f.name: torch.cat([getattr(b, f.name) for b in blocks]) for f in fields(BraggWindows)})
        with torch.no_grad():
            channel, gradient = window_channel_profiles(scene, merged, chunk, torch.cat(real), torch.cat(turns) if jacobian else None,
                                                        compiled=device.type == "cuda")  # fmt: skip

        def per_still(values: Tensor) -> list[Tensor]:
            """Each still's (pixels, C, ...) sum over this block's domains, its channels weighted."""
            pieces = torch.split(values, [size * n for n in n_pixels])
            return [p.view(size, n_pixels[k], *p.shape[1:]).sum(0) * w.view(-1, *([1] * (p.dim() - 2)))
                    for k, (p, w) in enumerate(zip(pieces, scales))]  # fmt: skip

        profile = torch.cat(per_still(channel))
        if not jacobian:
            return profile, None
        # d profile / d A summed over the domains, then through d A / d offsets (the same for every domain)
        jac = [g.flatten(-2) @ m for g, m in zip(per_still(gradient), moves)]
        if n_mosaic:  # each domain's d profile / d A through its own d real_d / d m, then the domain sum
            pieces = torch.split(gradient, [size * n for n in n_pixels])
            for k, (p, w) in enumerate(zip(pieces, scales)):
                by_domain = p.view(size, n_pixels[k], p.shape[1], 9)
                jac[k][..., 3 + n_cell :] = torch.einsum("dncq,dqm->ncm", by_domain, turned[k][d0 : d0 + size]) * w.view(-1, 1)
        return profile, torch.cat(jac)

    return block, list(range(0, n_domains, per_call))
