"""The incident beam as a list of sources: spectral channels x divergence directions.

A source carries a propagation direction (unit vector, source -> sample; dxtbx's
``-beam.get_direction()``), a photon energy (eV), a weight (fraction of the pulse's photons)
and the index of its spectral channel (which selects F(h, channel)).  Weights of all sources
sum to 1, so a pixel is r_e^2 * fluence * sum_sources(weight * ...): the total fluence is split
over the sources (nanoBragg divides by the number of sources instead, which is the same when
its per-source intensities average to 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from spread_dials.physics.constants import HC_EV_A
from spread_dials.physics.crystal import rotation_from_vector
from spread_dials.physics.tensors import TensorFields

__all__ = ["Sources", "make_sources", "gaussian_spectrum", "divergence_directions"]


@dataclass(frozen=True)
class Sources(TensorFields):
    """Beam sources.

    Attributes:
        direction: (C, 3) unit propagation directions.
        energy_eV: (C,) photon energies (eV).
        weight: (C,) fractions of the photons (sum 1).
        channel: (C,) long, spectral channel of each source (indexes F(h, channel)).
        e_vector: (3,) unit polarization (electric field) axis.
        polarization_fraction: Kahn factor (0.999 for an XFEL).
        fluence_photons_per_m2: photons per m^2 of the whole pulse.
        n_directions: divergence directions; sources run channel-major, so source i travels
            along ``direction[i % n_directions]`` (1: every source shares one direction, which
            lets the kernels compute direction-dependent factors once per pixel).
    """

    direction: Tensor
    energy_eV: Tensor
    weight: Tensor
    channel: Tensor
    e_vector: Tensor
    polarization_fraction: Tensor | float
    fluence_photons_per_m2: Tensor | float
    n_directions: int = 1

    @property
    def n_sources(self) -> int:
        return int(self.energy_eV.shape[0])

    @property
    def wavenumber(self) -> Tensor:
        """(C,) k = 1 / wavelength (1/A)."""
        return self.energy_eV / HC_EV_A

    def collapsed(self) -> "Sources":
        """One source at the weighted mean energy and direction (for smooth background)."""
        w = self.weight / self.weight.sum()
        d = (w.unsqueeze(-1) * self.direction).sum(0)
        return Sources(
            direction=(d / d.norm()).unsqueeze(0),
            energy_eV=(w * self.energy_eV).sum().reshape(1),
            weight=self.weight.sum().reshape(1),
            channel=self.channel[:1],
            e_vector=self.e_vector,
            polarization_fraction=self.polarization_fraction,
            fluence_photons_per_m2=self.fluence_photons_per_m2,
            n_directions=1,
        )

    def direction_of(self, source: Tensor | slice) -> Tensor:
        """Directions of the selected sources: (..., 3) shaped like ``source``, or (1, 3) (which
        broadcasts against any selection) when all sources share one direction."""
        return self.direction[:1] if self.n_directions == 1 else self.direction[source]


def gaussian_spectrum(mean_eV: float, fwhm_eV: float, n_channels: int, channel_width_eV: float) -> tuple[Tensor, Tensor]:
    """Channel energies (eV) centred on ``mean_eV`` and Gaussian weights of the given FWHM (sum 1).

    One channel is a monochromatic beam.

    Raises:
        ValueError: ``fwhm_eV`` not > 0 (a band of zero width is one energy, not a flat band).
    """
    if not fwhm_eV > 0:
        raise ValueError(f"the Gaussian band's FWHM must be > 0 eV, not {fwhm_eV}")
    offsets = (torch.arange(n_channels, dtype=torch.float64) - (n_channels - 1) / 2.0) * channel_width_eV
    sigma = fwhm_eV / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    weight = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return mean_eV + offsets, weight / weight.sum()


def divergence_directions(beam_direction: Tensor, divergence_mrad: float, n_steps: int) -> Tensor:
    """Directions of a square grid of n_steps x n_steps sources spanning +-divergence/2.

    The grid tilts ``beam_direction`` about two axes perpendicular to it; one step (or zero
    divergence) returns the beam direction itself.  Returns (n, 3) unit vectors.
    """
    if n_steps <= 1 or divergence_mrad == 0:
        return beam_direction.reshape(1, 3)
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=beam_direction.dtype)
    if abs(float(beam_direction @ helper)) > 0.9:
        helper = torch.tensor([0.0, 1.0, 0.0], dtype=beam_direction.dtype)
    u = torch.linalg.cross(beam_direction, helper)
    u = u / u.norm()
    v = torch.linalg.cross(beam_direction, u)
    half = 0.5e-3 * divergence_mrad
    t = torch.linspace(-half, half, n_steps, dtype=beam_direction.dtype)
    tu, tv = torch.meshgrid(t, t, indexing="ij")
    rotvec = tu.reshape(-1, 1) * v + tv.reshape(-1, 1) * u
    return (rotation_from_vector(rotvec) @ beam_direction).reshape(-1, 3)


def make_sources(
    energy_eV: Tensor,
    weight: Tensor,
    fluence_photons_per_m2: float | Tensor,
    beam_direction: Tensor | None = None,
    e_vector: Tensor | None = None,
    polarization_fraction: float | Tensor = 0.999,
    divergence_mrad: float = 0.0,
    divergence_steps: int = 1,
) -> Sources:
    """Sources for spectral channels (energy, weight) times a grid of divergence directions.

    Defaults follow dxtbx: beam along -z (sample_to_source (0, 0, 1)), polarization normal
    (0, 1, 0), i.e. the electric field along x, fraction 0.999.
    """
    dtype = energy_eV.dtype if energy_eV.is_floating_point() else torch.float64
    if beam_direction is None:
        beam_direction = torch.tensor([0.0, 0.0, -1.0], dtype=dtype)
    if e_vector is None:
        e_vector = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    beam_direction = beam_direction / beam_direction.norm()
    directions = divergence_directions(beam_direction, divergence_mrad, divergence_steps).to(dtype)
    n_dir = directions.shape[0]
    n_chan = energy_eV.shape[0]
    w = weight / weight.sum()
    return Sources(
        direction=directions.repeat(n_chan, 1),
        energy_eV=energy_eV.repeat_interleave(n_dir),
        weight=w.repeat_interleave(n_dir) / n_dir,
        channel=torch.arange(n_chan).repeat_interleave(n_dir),
        e_vector=e_vector.to(dtype),
        polarization_fraction=polarization_fraction,
        fluence_photons_per_m2=fluence_photons_per_m2,
        n_directions=n_dir,
    )
