"""Small test detectors: a grid of equal panels facing the beam, one optionally tilted (pure numpy)."""

from __future__ import annotations

import math

from spread_dials.detectors.layout import DetectorLayout, Group, PanelFrame

__all__ = ["simple_detector"]


def simple_detector(
    n_fast: int,
    n_slow: int,
    pixel_mm: float,
    distance_mm: float,
    n_panels_x: int = 1,
    n_panels_y: int = 1,
    gap_mm: float = 0.0,
    thickness_mm: float = 0.0,
    mu_per_mm: float = 0.0,
    tilt_deg: float = 0.0,
    tilt_panel: int = -1,
    beam_offset_mm: tuple[float, float] = (0.0, 0.0),
) -> DetectorLayout:
    """A grid of n_panels_x x n_panels_y panels (fast along +x, slow along +y) at ``distance_mm``.

    The grid is centred on the beam (plus ``beam_offset_mm``, lab x and y in mm), panels are
    separated by ``gap_mm`` and numbered row by row (x fastest) as ``panel0``, ``panel1``, ...
    Panel ``tilt_panel`` (default the last) is rotated by ``tilt_deg`` about its own slow axis
    through its centre, so its fast axis gains a +z component.  The root group sits at the grid
    centre; the panels are its leaves (a 2-level hierarchy).

    Args:
        n_fast, n_slow: pixels per panel.
        pixel_mm: square pixel size (mm).
        distance_mm: sample to detector plane (mm).
        n_panels_x, n_panels_y: grid size.
        gap_mm: gap between neighbouring panels (mm).
        thickness_mm, mu_per_mm: sensor thickness (mm) and attenuation coefficient (1/mm).
        tilt_deg: tilt of one panel (degrees).
        tilt_panel: index of the tilted panel.
        beam_offset_mm: lab (x, y) of the grid centre (mm).
    """
    width, height = n_fast * pixel_mm, n_slow * pixel_mm
    n_panels = n_panels_x * n_panels_y
    tilted = tilt_panel % n_panels
    panels = []
    for iy in range(n_panels_y):
        for ix in range(n_panels_x):
            k = iy * n_panels_x + ix
            cx = (ix - (n_panels_x - 1) / 2) * (width + gap_mm)
            cy = (iy - (n_panels_y - 1) / 2) * (height + gap_mm)
            t = math.radians(tilt_deg) if k == tilted else 0.0
            fast = (math.cos(t), 0.0, math.sin(t))
            slow = (0.0, 1.0, 0.0)
            origin = (cx - 0.5 * width * fast[0], cy - 0.5 * height, -0.5 * width * fast[2])
            panels.append(PanelFrame(f"panel{k}", origin, fast, slow))
    root = Group("grid", (beam_offset_mm[0], beam_offset_mm[1], -distance_mm), children=tuple(panels))
    return DetectorLayout(
        root=root,
        image_size=(n_fast, n_slow),
        pixel_size_mm=(pixel_mm, pixel_mm),
        thickness_mm=thickness_mm,
        mu_per_mm=mu_per_mm,
    )
