"""The differentiable forward model: pure torch (and numpy), no cctbx/dxtbx imports.

Public pieces: ``Scene`` (panels, sources, crystal, structure factors), the dense and sparse
kernels, background and detector response.  See DESIGN.md for the physics.
"""

from spread_dials.physics.anomalous import EdgeShiftModel, FreeChannelModel, TabulatedCurve
from spread_dials.physics.assembly import assemble_structure_factors
from spread_dials.physics.beam import Sources, gaussian_spectrum, make_sources
from spread_dials.physics.bragg import Scene
from spread_dials.physics.crystal import Crystal, mosaic_domain_rotations, real_space_from_cell, rotation_from_vector
from spread_dials.physics.dense import simulate_dense
from spread_dials.physics.geometry import PanelArray
from spread_dials.physics.kramers_kronig import kramers_kronig
from spread_dials.physics.sparse import BraggWindows, predict_windows, simulate_sparse, window_photons
from spread_dials.physics.spectra import channel_energies, rebin_spectrum, sase_spectrum, spectrum_centroid
from spread_dials.physics.structure_factors import StructureFactors, constant_structure_factors

__all__ = [
    "BraggWindows",
    "EdgeShiftModel",
    "FreeChannelModel",
    "TabulatedCurve",
    "assemble_structure_factors",
    "channel_energies",
    "rebin_spectrum",
    "sase_spectrum",
    "spectrum_centroid",
    "kramers_kronig",
    "Crystal",
    "PanelArray",
    "Scene",
    "Sources",
    "StructureFactors",
    "constant_structure_factors",
    "gaussian_spectrum",
    "make_sources",
    "mosaic_domain_rotations",
    "predict_windows",
    "real_space_from_cell",
    "rotation_from_vector",
    "simulate_dense",
    "simulate_sparse",
    "window_photons",
]
