"""What the refinement reads: shoebox pixels, spectra and starting crystals of integrated stills.

Pure torch (no dxtbx): :mod:`spread_dials.refine.loader` fills these from DIALS files, the
campaign harness from the physics core in memory.  One layout serves refinement and
correction alike.

Shoebox pixels are stored flat: shoebox b owns ``n_fast[b] * n_slow[b]`` consecutive pixels in
row-major (slow, fast) order, the same order in which the kernel's ``window_photons`` lays out a
window, so a shoebox is a kernel window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from spread_dials.physics.geometry import PanelArray
from spread_dials.physics.tensors import TensorFields

__all__ = ["Shoeboxes", "Shot", "ShotSet"]


@dataclass(frozen=True)
class Shoeboxes(TensorFields):
    """The integrated reflections of one still and their pixels.

    Attributes:
        miller_index: (B, 3) long Miller indices (in the .expt crystal's setting).
        panel: (B,) long panel of each shoebox.
        fast0, slow0: (B,) long first pixel (bbox x0, y0) on the panel.
        n_fast, n_slow: (B,) long shoebox size in pixels (bbox x1 - x0, y1 - y0).
        counts: (N,) float64 measured photons per pixel (ADU / quantum gain), N = sum of the
            shoebox areas, flat in shoebox order, row-major inside each.
        valid: (N,) bool, pixels inside the detector mask and trusted range (others are ignored).
        reflection: (B,) long row of each shoebox in its still's reflection table.
    """

    miller_index: Tensor
    panel: Tensor
    fast0: Tensor
    slow0: Tensor
    n_fast: Tensor
    n_slow: Tensor
    counts: Tensor
    valid: Tensor
    reflection: Tensor

    @property
    def n_shoeboxes(self) -> int:
        return int(self.panel.shape[0])

    @property
    def n_pixels(self) -> int:
        return int(self.counts.shape[0])

    def pixel_shoebox(self) -> Tensor:
        """(N,) long: the shoebox of every pixel."""
        area = self.n_fast * self.n_slow
        return torch.repeat_interleave(torch.arange(self.n_shoeboxes, device=area.device), area)

    def _pixel_in_box(self) -> tuple[Tensor, Tensor, Tensor]:
        """(N,) long shoebox, fast and slow index inside it (row-major) of every pixel."""
        area = self.n_fast * self.n_slow
        sb = self.pixel_shoebox()
        start = torch.cumsum(area, 0) - area
        local = torch.arange(self.n_pixels, device=area.device) - start[sb]
        nf = self.n_fast[sb]
        return sb, local % nf, local // nf

    def pixel_coordinates(self) -> tuple[Tensor, Tensor]:
        """(N,) fast and slow offsets (pixels) of every pixel from its shoebox centre."""
        sb, fast, slow = self._pixel_in_box()
        dtype = self.counts.dtype
        return fast.to(dtype) - (self.n_fast[sb].to(dtype) - 1) / 2, slow.to(dtype) - (self.n_slow[sb].to(dtype) - 1) / 2

    def pixel_positions(self) -> tuple[Tensor, Tensor, Tensor]:
        """(N,) long panel, slow and fast pixel index (on the panel) of every pixel."""
        sb, fast, slow = self._pixel_in_box()
        return self.panel[sb], self.slow0[sb] + slow, self.fast0[sb] + fast


@dataclass(frozen=True)
class Shot(TensorFields):
    """One still: its starting crystal, recorded spectrum and shoeboxes.

    Attributes:
        identifier: the experiment identifier (DIALS) or any unique name.
        real_space: (3, 3) float64 rows a, b, c (A, lab frame) of the integrated crystal.
        energy_eV: (C,) recorded spectrum channel energies (eV).
        weight: (C,) recorded fraction of the pulse's photons per channel (sum 1).
        shoeboxes: the integrated reflections and their pixels.
        sensor_mu_per_mm: (P,) the sensor's linear attenuation coefficient per panel that dxtbx
            gives this still (1/mm), or None (stills made in memory).
    """

    identifier: str
    real_space: Tensor
    energy_eV: Tensor
    weight: Tensor
    shoeboxes: Shoeboxes
    sensor_mu_per_mm: Tensor | None = None


@dataclass(frozen=True)
class ShotSet:
    """Stills sharing one detector and beam geometry.

    Attributes:
        panels: the detector (physics panels, dxtbx panel order).
        beam_direction: (3,) unit propagation direction of the beam (lab frame).
        e_vector: (3,) unit polarization axis.
        polarization_fraction: Kahn factor.
        shots: the stills.
        sources: where each shot came from (file and image index), parallel to ``shots``.
        cell_ties: (3,) which unit-cell length parameter scales a, b, c under the crystals'
            lattice symmetry ((0, 1, 2) three free lengths, (0, 0, 1) a = b, (0, 0, 0) cubic).
    """

    panels: PanelArray
    beam_direction: Tensor
    e_vector: Tensor
    polarization_fraction: float
    shots: list[Shot]
    sources: list[str]
    cell_ties: tuple[int, int, int] = (0, 1, 2)

    def to(self, device) -> "ShotSet":
        """A copy with every tensor on ``device`` (a GPU for the kernel)."""
        return ShotSet(self.panels.to(device=device), self.beam_direction.to(device), self.e_vector.to(device),
                       self.polarization_fraction, [s.to(device=device) for s in self.shots], list(self.sources),
                       self.cell_ties)  # fmt: skip

    def select(self, indices) -> "ShotSet":
        """The stills at ``indices`` (positions in ``shots``, in that order) with their sources."""
        return replace(self, shots=[self.shots[i] for i in indices], sources=[self.sources[i] for i in indices])
