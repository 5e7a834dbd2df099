"""Detector layouts as a tree of local frames (pure numpy; no dxtbx).

A layout is the dxtbx hierarchy in plain data: a root ``Group`` whose children are groups or
``PanelFrame`` leaves.  Every node has a local origin (mm), fast axis and slow axis expressed in
its parent's frame, and composes like dxtbx does: with the parent's global fast F, slow S,
normal N = F x S and origin O,

    global origin = O + x F + y S + z N,   global axis = a_x F + a_y S + a_z N

for a local origin (x, y, z) and a local axis (a_x, a_y, a_z).  The root's parent is the lab
frame.  Panels are listed depth-first, which is the order dxtbx gives panels added to a
hierarchy in that order.  All panels of a layout share one image size, pixel size and sensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from spread_dials.physics.geometry import PanelArray

__all__ = [
    "DetectorLayout",
    "FlatPanels",
    "Group",
    "PanelFrame",
    "flatten_layout",
    "layout_from_dxtbx_dict",
    "panel_array_from_layout",
    "silicon_attenuation_length_mm",
    "silicon_mu_per_mm",
]

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class PanelFrame:
    """A panel (leaf): local origin (mm, the outer corner of pixel (0, 0)) and unit axes."""

    name: str
    origin_mm: Vec3
    fast_axis: Vec3 = (1.0, 0.0, 0.0)
    slow_axis: Vec3 = (0.0, 1.0, 0.0)


@dataclass(frozen=True)
class Group:
    """A group of panels or groups with its own local frame (origin in mm)."""

    name: str
    origin_mm: Vec3
    fast_axis: Vec3 = (1.0, 0.0, 0.0)
    slow_axis: Vec3 = (0.0, 1.0, 0.0)
    children: tuple["Group | PanelFrame", ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class DetectorLayout:
    """A detector: the frame tree plus the properties shared by all its panels.

    Attributes:
        root: the root group (its frame is given in the lab frame).
        image_size: (n_fast, n_slow) pixels of every panel.
        pixel_size_mm: (fast, slow) pixel size (mm).
        thickness_mm: sensor thickness (mm); 0 means no sensor model (and no parallax).
        mu_per_mm: linear attenuation coefficient of the sensor (1/mm), as dxtbx stores it.
        material: sensor material (dxtbx ``Panel.set_material``).
        panel_type: dxtbx panel type.
    """

    root: Group
    image_size: tuple[int, int]
    pixel_size_mm: tuple[float, float]
    thickness_mm: float = 0.0
    mu_per_mm: float = 0.0
    material: str = "Si"
    panel_type: str = "SENSOR_PAD"


@dataclass(frozen=True)
class FlatPanels:
    """Global frames of a layout's panels, depth-first order.

    Attributes:
        names: panel names.
        origin_mm, fast_axis, slow_axis: (P, 3) float64 arrays in the lab frame.
    """

    names: list[str]
    origin_mm: np.ndarray
    fast_axis: np.ndarray
    slow_axis: np.ndarray


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _compose(parent_rotation: np.ndarray, parent_origin: np.ndarray, node) -> tuple[np.ndarray, np.ndarray]:
    """Global (rotation with columns fast, slow, normal; origin) of ``node`` under a parent frame."""
    fast = parent_rotation @ _unit(node.fast_axis)
    slow = parent_rotation @ _unit(node.slow_axis)
    origin = parent_origin + parent_rotation @ np.asarray(node.origin_mm, dtype=np.float64)
    return np.stack([fast, slow, np.cross(fast, slow)], axis=1), origin


def flatten_layout(layout: DetectorLayout | Group) -> FlatPanels:
    """Global panel origins and axes of a layout (or of a root group), depth-first."""
    root = layout.root if isinstance(layout, DetectorLayout) else layout
    names, origins, fasts, slows = [], [], [], []

    def visit(node, rotation: np.ndarray, origin: np.ndarray) -> None:
        rot, org = _compose(rotation, origin, node)
        if isinstance(node, PanelFrame):
            names.append(node.name)
            origins.append(org)
            fasts.append(rot[:, 0])
            slows.append(rot[:, 1])
            return
        for child in node.children:
            visit(child, rot, org)

    visit(root, np.eye(3), np.zeros(3))

    def stack(rows: list) -> np.ndarray:
        return np.array(rows, dtype=np.float64).reshape(-1, 3)

    return FlatPanels(names, stack(origins), stack(fasts), stack(slows))


def panel_array_from_layout(
    layout: DetectorLayout, n_layers: int = 1, dtype: torch.dtype = torch.float64, device=None
) -> PanelArray:
    """The physics ``PanelArray`` of a layout (attenuation length 1/mu; 0 where mu is 0)."""
    flat = flatten_layout(layout)
    n = len(flat.names)
    att = 1.0 / layout.mu_per_mm if layout.mu_per_mm > 0 else 0.0
    if layout.thickness_mm > 0 and att == 0.0:
        raise ValueError("a sensor with thickness > 0 needs mu_per_mm > 0")

    def tensor(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype, device=device)

    return PanelArray(
        origin_mm=tensor(flat.origin_mm),
        fast_axis=tensor(flat.fast_axis),
        slow_axis=tensor(flat.slow_axis),
        pixel_size_mm=tensor(np.tile(layout.pixel_size_mm, (n, 1))),
        image_size=(int(layout.image_size[0]), int(layout.image_size[1])),
        thickness_mm=tensor(np.full(n, layout.thickness_mm)),
        attenuation_length_mm=tensor(np.full(n, att)),
        n_layers=n_layers,
    )


def layout_from_dxtbx_dict(detector: dict) -> DetectorLayout:
    """A layout from a dxtbx detector dictionary (``Detector.to_dict()``, an ``.expt`` JSON entry).

    Reads the ``hierarchy`` (local frames) and ``panels`` without dxtbx.  Panels appear in
    hierarchy (depth-first) order.

    Raises:
        ValueError: if panels differ in image size, pixel size, thickness, mu or material.
    """
    panels = detector["panels"]
    shared = {
        (tuple(p["image_size"]), tuple(p["pixel_size"]), p.get("thickness", 0.0), p.get("mu", 0.0), p.get("material"))
        for p in panels
    }
    if len(shared) != 1:
        raise ValueError("a DetectorLayout needs panels of one image size, pixel size and sensor")

    def node(d: dict) -> Group | PanelFrame:
        if "panel" in d:
            d = panels[d["panel"]]
            return PanelFrame(d["name"], tuple(d["origin"]), tuple(d["fast_axis"]), tuple(d["slow_axis"]))
        children = tuple(node(c) for c in d.get("children", []))
        return Group(d["name"], tuple(d["origin"]), tuple(d["fast_axis"]), tuple(d["slow_axis"]), children)

    image_size, pixel_size, thickness, mu, material = next(iter(shared))
    return DetectorLayout(
        root=node(detector["hierarchy"]),
        image_size=image_size,
        pixel_size_mm=pixel_size,
        thickness_mm=float(thickness),
        mu_per_mm=float(mu),
        material=material or "",
        panel_type=panels[0].get("type", "SENSOR_PAD"),
    )


# NIST (Hubbell & Seltzer, XCOM) total mass attenuation coefficient of Si with coherent
# scattering, mu/rho (cm^2/g) at photon energies (keV) above the K edge (1.8389 keV).
_SI_ENERGY_KEV = np.array([1.8389, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0])
_SI_MU_RHO_CM2_G = np.array(
    [3192.0, 2777.0, 978.4, 452.9, 245.0, 147.0, 64.68, 33.89, 10.34, 4.464, 1.436, 0.7012, 0.4385]
)
_SI_DENSITY_G_CM3 = 2.33


def silicon_mu_per_mm(energy_eV: float | np.ndarray) -> np.ndarray | float:
    """Linear attenuation coefficient of Si (1/mm), log-log interpolated in the NIST table.

    Valid from the K edge (1839 eV) to 50 keV; this is the table (and the interpolation) that
    cctbx.eltbx.attenuation_coefficient uses, so it reproduces dxtbx's panel mu.
    """
    e_kev = np.asarray(energy_eV, dtype=np.float64) / 1000.0
    if np.any(e_kev < _SI_ENERGY_KEV[0]) or np.any(e_kev > _SI_ENERGY_KEV[-1]):
        raise ValueError("silicon_mu_per_mm covers 1839-50000 eV (above the Si K edge)")
    mu_rho = np.exp(np.interp(np.log(e_kev), np.log(_SI_ENERGY_KEV), np.log(_SI_MU_RHO_CM2_G)))
    mu = mu_rho * _SI_DENSITY_G_CM3 / 10.0
    return float(mu) if mu.ndim == 0 else mu


def silicon_attenuation_length_mm(energy_eV: float | np.ndarray) -> np.ndarray | float:
    """Attenuation length 1/mu of Si (mm) at ``energy_eV``."""
    return 1.0 / silicon_mu_per_mm(energy_eV)
