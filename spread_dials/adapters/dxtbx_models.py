"""Converters between dxtbx models (Detector, Beam, Crystal) and the physics tensors.

dxtbx lab frame, mm, A, eV throughout.  dxtbx stores a panel's mu in 1/mm (the NIST table
value / 10), and the physics keeps the attenuation length 1/mu in mm.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from dxtbx.model import Beam, Crystal, Detector, ParallaxCorrectedPxMmStrategy, SimplePxMmStrategy
from torch import Tensor

from spread_dials.detectors.layout import DetectorLayout, Group, PanelFrame
from spread_dials.physics.beam import Sources, make_sources
from spread_dials.physics.constants import HC_EV_A
from spread_dials.physics.geometry import PanelArray

__all__ = [
    "DEFAULT_TRUSTED_RANGE",
    "crystal_from_real_space",
    "detector_from_layout",
    "detector_from_panel_array",
    "panel_array_from_detector",
    "real_space_from_crystal",
    "sources_from_beam",
]

logger = logging.getLogger("dials.spread.adapters")

#: trusted range given to built panels (the one the Jungfrau 16M file carries)
DEFAULT_TRUSTED_RANGE = (-2147483647.0, 2147483647.0)


def panel_array_from_detector(
    detector: Detector, n_layers: int = 1, dtype: torch.dtype = torch.float64, device=None
) -> PanelArray:
    """The panels of a dxtbx Detector (any hierarchy), in dxtbx panel order, as a PanelArray.

    Thickness and mu come from each panel (``get_thickness``, ``get_mu`` in 1/mm); a panel
    with thickness 0 has no sensor model.

    Raises:
        ValueError: if panels differ in image size, or a panel has a thickness but no mu.
    """
    sizes = {tuple(p.get_image_size()) for p in detector}
    if len(sizes) != 1:
        raise ValueError(f"all panels must have one image size to form a PanelArray; found {sorted(sizes)}")
    thickness, att_len = [], []
    for i, panel in enumerate(detector):
        t, mu = panel.get_thickness(), panel.get_mu()
        if t > 0 and mu <= 0:
            raise ValueError(f"panel {i} ({panel.get_name()!r}) has thickness {t} mm but mu = {mu}; set its mu (1/mm)")
        if t > 0 and not isinstance(panel.get_px_mm_strategy(), ParallaxCorrectedPxMmStrategy):
            logger.warning("panel %d has a %g mm sensor but no parallax correction in dxtbx", i, t)
        thickness.append(t)
        att_len.append(1.0 / mu if mu > 0 else 0.0)

    def tensor(values) -> Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype, device=device)

    n_fast, n_slow = next(iter(sizes))
    return PanelArray(
        origin_mm=tensor([p.get_origin() for p in detector]),
        fast_axis=tensor([p.get_fast_axis() for p in detector]),
        slow_axis=tensor([p.get_slow_axis() for p in detector]),
        pixel_size_mm=tensor([p.get_pixel_size() for p in detector]),
        image_size=(int(n_fast), int(n_slow)),
        thickness_mm=tensor(thickness),
        attenuation_length_mm=tensor(att_len),
        n_layers=n_layers,
    )


def _configure_panel(
    panel,
    name: str,
    image_size: tuple[int, int],
    pixel_size_mm: tuple[float, float],
    thickness_mm: float,
    mu_per_mm: float,
    material: str,
    panel_type: str,
    trusted_range: tuple[float, float],
) -> None:
    """Set a dxtbx panel's data: sizes, sensor and px<->mm strategy (parallax when t > 0)."""
    panel.set_name(name)
    panel.set_type(panel_type)
    panel.set_image_size((int(image_size[0]), int(image_size[1])))
    panel.set_pixel_size((float(pixel_size_mm[0]), float(pixel_size_mm[1])))
    panel.set_trusted_range(tuple(float(x) for x in trusted_range))
    panel.set_thickness(float(thickness_mm))
    panel.set_material(material)
    panel.set_mu(float(mu_per_mm))
    if thickness_mm > 0:
        if mu_per_mm <= 0:
            raise ValueError(f"panel {name!r}: a sensor of thickness {thickness_mm} mm needs mu > 0")
        panel.set_px_mm_strategy(ParallaxCorrectedPxMmStrategy(float(mu_per_mm), float(thickness_mm)))
    else:
        panel.set_px_mm_strategy(SimplePxMmStrategy())


def _floats(v) -> tuple[float, float, float]:
    return tuple(float(x) for x in v)


def detector_from_layout(
    layout: DetectorLayout, trusted_range: tuple[float, float] = DEFAULT_TRUSTED_RANGE
) -> Detector:
    """A dxtbx Detector with the layout's hierarchy: groups as nodes, panels as leaves.

    Panel order is the layout's depth-first order (as ``flatten_layout``).
    """
    detector = Detector()
    root = detector.hierarchy()
    root.set_name(layout.root.name)
    root.set_local_frame(_floats(layout.root.fast_axis), _floats(layout.root.slow_axis), _floats(layout.root.origin_mm))

    def add(parent, node: Group | PanelFrame) -> None:
        frame = (_floats(node.fast_axis), _floats(node.slow_axis), _floats(node.origin_mm))
        if isinstance(node, PanelFrame):
            panel = parent.add_panel()
            _configure_panel(
                panel, node.name, layout.image_size, layout.pixel_size_mm, layout.thickness_mm,
                layout.mu_per_mm, layout.material, layout.panel_type, trusted_range,
            )  # fmt: skip
            panel.set_local_frame(*frame)
            return
        group = parent.add_group()
        group.set_name(node.name)
        group.set_local_frame(*frame)
        for child in node.children:
            add(group, child)

    for child in layout.root.children:
        add(root, child)
    return detector


def detector_from_panel_array(
    panels: PanelArray,
    names: Sequence[str] | None = None,
    material: str = "Si",
    panel_type: str = "SENSOR_PAD",
    trusted_range: tuple[float, float] = DEFAULT_TRUSTED_RANGE,
) -> Detector:
    """A dxtbx Detector with the PanelArray's panels as leaves of the root (lab frame), same order.

    mu = 1 / attenuation_length (1/mm); panels with thickness > 0 get the parallax strategy.
    """
    origin = panels.origin_mm.detach().cpu().double().numpy()
    fast = panels.fast_axis.detach().cpu().double().numpy()
    slow = panels.slow_axis.detach().cpu().double().numpy()
    pixel = panels.pixel_size_mm.detach().cpu().double().numpy()
    thickness = panels.thickness_mm.detach().cpu().double().numpy()
    att_len = panels.attenuation_length_mm.detach().cpu().double().numpy()
    names = list(names) if names is not None else [f"panel{i}" for i in range(panels.n_panels)]
    if len(names) != panels.n_panels:
        raise ValueError(f"{len(names)} names for {panels.n_panels} panels")
    detector = Detector()
    root = detector.hierarchy()
    for i in range(panels.n_panels):
        panel = root.add_panel()
        mu = 1.0 / att_len[i] if att_len[i] > 0 else 0.0
        _configure_panel(
            panel, names[i], panels.image_size, tuple(pixel[i]), float(thickness[i]), mu, material, panel_type,
            trusted_range,
        )  # fmt: skip
        panel.set_local_frame(_floats(fast[i]), _floats(slow[i]), _floats(origin[i]))
    return detector


def sources_from_beam(
    beam: Beam,
    fluence_photons_per_m2: float | Tensor,
    energy_eV: Tensor | Sequence[float] | None = None,
    weight: Tensor | Sequence[float] | None = None,
    divergence_mrad: float = 0.0,
    divergence_steps: int = 1,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> Sources:
    """Physics Sources for a dxtbx Beam and a spectrum (energies in eV, relative weights).

    Without a spectrum the beam is monochromatic at the beam's wavelength.  The propagation
    direction is -beam.get_sample_to_source_direction(); the electric field is
    polarization_normal x sample_to_source (dxtbx's default normal (0, 1, 0) with the beam
    along -z gives E along +x); the polarization fraction is the beam's.

    Args:
        beam: the dxtbx beam.
        fluence_photons_per_m2: photons per m^2 in the pulse (dxtbx beams carry no area).
        energy_eV, weight: the spectrum's channels; weights are normalised to sum 1.
        divergence_mrad, divergence_steps: optional square grid of directions (physics.beam).
    """
    if energy_eV is None:
        energy_eV = [HC_EV_A / beam.get_wavelength()]
        weight = [1.0]
    elif weight is None:
        raise ValueError("a spectrum needs weights as well as energies")
    energy = torch.as_tensor(energy_eV, dtype=dtype).reshape(-1)
    w = torch.as_tensor(weight, dtype=dtype).reshape(-1)
    if energy.shape != w.shape:
        raise ValueError(f"{energy.numel()} energies but {w.numel()} weights")
    to_source = np.asarray(beam.get_sample_to_source_direction(), dtype=np.float64)
    to_source /= np.linalg.norm(to_source)
    e_vector = np.cross(np.asarray(beam.get_polarization_normal(), dtype=np.float64), to_source)
    e_vector /= np.linalg.norm(e_vector)
    sources = make_sources(
        energy,
        w,
        fluence_photons_per_m2,
        beam_direction=torch.as_tensor(-to_source, dtype=dtype),
        e_vector=torch.as_tensor(e_vector, dtype=dtype),
        polarization_fraction=float(beam.get_polarization_fraction()),
        divergence_mrad=divergence_mrad,
        divergence_steps=divergence_steps,
    )
    return sources.to(device=device) if device is not None else sources


def real_space_from_crystal(crystal: Crystal, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """(3, 3) tensor with rows a, b, c (A, lab frame) from ``crystal.get_real_space_vectors()``."""
    vectors = np.array([tuple(v) for v in crystal.get_real_space_vectors()], dtype=np.float64)
    return torch.as_tensor(vectors, dtype=dtype, device=device)


def crystal_from_real_space(real_space: Tensor | np.ndarray, space_group="P 1") -> Crystal:
    """A dxtbx Crystal from rows a, b, c (A) and a space group (symbol or cctbx space_group)."""
    rows = torch.as_tensor(real_space).detach().cpu().double().numpy() if isinstance(real_space, Tensor) else real_space
    a, b, c = (_floats(r) for r in np.asarray(rows, dtype=np.float64))
    return Crystal(a, b, c, space_group)
