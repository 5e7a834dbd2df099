"""Per-shot planning: everything random about shot i follows from (random.seed, i) alone.

So a shot is the same whichever process simulates it and in whatever order (serial, MPI
stripes, a resumed run).  ``numpy.random.SeedSequence([seed, i])`` spawns one independent
stream per purpose: orientation, mosaic domains, spectrum and detector noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ShotPlan", "ShotSeeds", "container_shots", "n_containers", "shot_seeds", "uniform_rotation"]

_PURPOSES = ("orientation", "mosaic", "spectrum", "noise", "model_error")


@dataclass(frozen=True)
class ShotSeeds:
    """Integer seeds (0 <= s < 2^63) of one shot's random streams."""

    orientation: int
    mosaic: int
    spectrum: int
    noise: int
    model_error: int

    def as_array(self) -> np.ndarray:
        return np.array([self.orientation, self.mosaic, self.spectrum, self.noise, self.model_error], dtype=np.int64)


def shot_seeds(seed: int, shot_index: int) -> ShotSeeds:
    """The seeds of shot ``shot_index`` of a run with ``random.seed = seed``."""
    children = np.random.SeedSequence([int(seed), int(shot_index)]).spawn(len(_PURPOSES))
    values = [int(c.generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF for c in children]
    return ShotSeeds(*values)


def uniform_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix uniformly distributed over SO(3) (a normalised Gaussian quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def n_containers(n_images: int, images_per_container: int) -> int:
    """Containers needed for ``n_images`` shots."""
    return int(math.ceil(n_images / images_per_container))


def container_shots(container: int, n_images: int, images_per_container: int) -> range:
    """Shot indices held by container ``container``."""
    start = container * images_per_container
    return range(start, min(start + images_per_container, n_images))


@dataclass(frozen=True)
class ShotPlan:
    """One shot before simulation.

    Attributes:
        index: shot number in the run (0-based).
        container, slot: the container that holds it and its image index there.
        seeds: its random streams.
        rotation: (3, 3) crystal orientation U applied to the model's setting.
        energies_eV, weights: (C,) its spectrum (weights sum to 1).
        photons: photons in the pulse.
        fluence_photons_per_m2: photons per m^2.
        recorded_offset_eV: what the recorded energy axis adds to the true one (model errors:
            spectrometer offset + per-shot jitter; 0 without them).
    """

    index: int
    container: int
    slot: int
    seeds: ShotSeeds
    rotation: np.ndarray
    energies_eV: np.ndarray
    weights: np.ndarray
    photons: float
    fluence_photons_per_m2: float
    recorded_offset_eV: float = 0.0

    @property
    def mean_energy_eV(self) -> float:
        """True spectrum-weighted mean energy (eV)."""
        return float((self.weights * self.energies_eV).sum() / self.weights.sum())

    @property
    def recorded_energies_eV(self) -> np.ndarray:
        """The channel energies as the (mis)calibrated spectrometer records them (eV)."""
        return self.energies_eV + self.recorded_offset_eV
