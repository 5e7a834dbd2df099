"""The Jungfrau 16M as an ideal layout (pure numpy): 4 quadrants x 8 modules x 8 ASIC panels.

Each ASIC panel is 254 x 254 pixels of 0.075 mm (Si, 0.32 mm).  The numbers below are the ideal
layout read off the refined SwissFEL Bernina geometry (shared/data/detectors/jungfrau16M.expt),
from the global panel centres after composing its hierarchy:

* ASICs in a module: 2 rows x 4 columns at a pitch of 19.35 mm (254 + 4 pixels: a 0.3 mm gap),
  all with fast along +x and slow along +y of the module.  ASIC ``A{k}`` sits in row k // 4,
  column k % 4.
* Modules in a quadrant: 4 rows x 2 columns at pitches 40.88 mm (slow) and 77.65 mm (fast),
  unrotated.  The detector numbers modules 0..31 row by row over 8 rows x 4 columns
  (m = 4 * row + column); quadrant q holds rows 4 (q // 2) .. +3 and columns 2 (q % 2) .. +1.
* Quadrants: centred at (+-77.72, +-82.08) mm from the detector centre (Q0 at -x -y, Q1 +x -y,
  Q2 -x +y, Q3 +x +y), each shifted by 2.55 mm at right angles to its direction from the
  centre (a pinwheel that leaves a small hole around the beam).
* Panel numbers (dxtbx panel index, NXmx module order) are the real file's: quadrant Q0..Q3,
  then its modules in the text order of their panel names (ARRAY_D0Q0M12A0 sorts before
  ARRAY_D0Q0M1A0, so Q0 holds M0, M12, M13, M1, M4, M5, M8, M9), then ASIC A0..A7.  A per-panel mask or a reference geometry
  made for the real detector therefore applies by index.
* The detector plane is normal to the beam, ``distance_mm`` (119.5) from the sample, and the
  beam passes through the centre of the pinwheel.

Group and panel names follow the NeXus file (``AXIS_D0``, ``AXIS_D0Q0``, ``AXIS_D0Q0M0``,
``ARRAY_D0Q0M0A0``).
"""

from __future__ import annotations

import torch

from spread_dials.detectors.layout import DetectorLayout, Group, PanelFrame, panel_array_from_layout, silicon_mu_per_mm
from spread_dials.physics.geometry import PanelArray

__all__ = [
    "ASIC_PIXELS",
    "PIXEL_MM",
    "SENSOR_THICKNESS_MM",
    "DISTANCE_MM",
    "jungfrau16m_layout",
    "jungfrau16m_panel_array",
]

ASIC_PIXELS = 254  # pixels per ASIC along fast and slow
PIXEL_MM = 0.075
SENSOR_THICKNESS_MM = 0.32
DISTANCE_MM = 119.5
ASIC_GAP_MM = 0.3  # between ASICs of a module (4 pixels)
MODULE_PITCH_MM = (77.65, 40.88)  # (fast, slow) between module centres in a quadrant
QUADRANT_HALF_PITCH_MM = (77.72, 82.08)  # |x|, |y| of the quadrant centres before the pinwheel shift
PINWHEEL_SHIFT_MM = 2.55
QUADRANT_SIGNS = ((-1, -1), (1, -1), (-1, 1), (1, 1))  # direction of Q0..Q3 from the centre


def _module(q: int, row: int, col: int, pixel_mm: float) -> Group:
    """Module at local (row, col) of quadrant q, its ASICs centred on the module origin."""
    m = 4 * (row + 4 * (q // 2)) + col + 2 * (q % 2)
    asic_mm = ASIC_PIXELS * pixel_mm
    pitch = asic_mm + ASIC_GAP_MM
    panels = []
    for k in range(8):
        cx = (k % 4 - 1.5) * pitch
        cy = (k // 4 - 0.5) * pitch
        origin = (cx - asic_mm / 2, cy - asic_mm / 2, 0.0)
        panels.append(PanelFrame(f"ARRAY_D0Q{q}M{m}A{k}", origin))
    centre = ((col - 0.5) * MODULE_PITCH_MM[0], (row - 1.5) * MODULE_PITCH_MM[1], 0.0)
    return Group(f"AXIS_D0Q{q}M{m}", centre, children=tuple(panels))


def _quadrant(q: int, pixel_mm: float) -> Group:
    sx, sy = QUADRANT_SIGNS[q]
    x = sx * QUADRANT_HALF_PITCH_MM[0] - sy * PINWHEEL_SHIFT_MM
    y = sy * QUADRANT_HALF_PITCH_MM[1] + sx * PINWHEEL_SHIFT_MM
    # the real detector's module order: its panel names as text (ARRAY_D0Q0M12A0 < ARRAY_D0Q0M1A0)
    modules = sorted((_module(q, row, col, pixel_mm) for row in range(4) for col in range(2)),
                     key=lambda module: module.children[0].name)  # fmt: skip
    return Group(f"AXIS_D0Q{q}", (x, y, 0.0), children=tuple(modules))


def jungfrau16m_layout(
    distance_mm: float = DISTANCE_MM,
    pixel_mm: float = PIXEL_MM,
    thickness_mm: float = SENSOR_THICKNESS_MM,
    mu_per_mm: float | None = None,
    energy_eV: float = 6550.0,
    beam_offset_mm: tuple[float, float] = (0.0, 0.0),
) -> DetectorLayout:
    """The ideal Jungfrau 16M (256 panels of 254 x 254 pixels) as a 4-level layout tree.

    Args:
        distance_mm: sample to detector plane along the beam (mm).
        pixel_mm: pixel size (mm); ASIC gaps and module pitches stay in mm.
        thickness_mm: Si sensor thickness (mm).
        mu_per_mm: sensor attenuation coefficient (1/mm); None takes Si at ``energy_eV``.
        energy_eV: photon energy for the default mu.
        beam_offset_mm: (x, y) of the detector centre from the beam axis in the lab (mm).
    """
    if mu_per_mm is None:
        mu_per_mm = float(silicon_mu_per_mm(energy_eV))
    quadrants = tuple(_quadrant(q, pixel_mm) for q in range(4))
    root = Group("AXIS_D0", (beam_offset_mm[0], beam_offset_mm[1], -distance_mm), children=quadrants)
    return DetectorLayout(
        root=root,
        image_size=(ASIC_PIXELS, ASIC_PIXELS),
        pixel_size_mm=(pixel_mm, pixel_mm),
        thickness_mm=thickness_mm,
        mu_per_mm=mu_per_mm,
    )


def jungfrau16m_panel_array(
    n_layers: int = 1, dtype: torch.dtype = torch.float64, device=None, **layout_kwargs
) -> PanelArray:
    """The ideal Jungfrau 16M as a ``PanelArray`` (``layout_kwargs`` go to jungfrau16m_layout)."""
    return panel_array_from_layout(jungfrau16m_layout(**layout_kwargs), n_layers=n_layers, dtype=dtype, device=device)
