"""The ideal Jungfrau 16M built in code against the real refined geometry (jungfrau16M_single.expt).

The file is read with json only (no dxtbx: spread_dials.detectors must work without DIALS).
Its hierarchy is composed to global coordinates with ``flatten_layout``, which
tests/adapters/test_dxtbx_models.py checks against dxtbx for all 256 panels; here the composed
geometry must also reproduce the figures that shared/data/MANIFEST.md states for the file.

Tolerances: the real geometry is refined (every quadrant, module and ASIC carries its own small
shift and tilt: module rows scatter by 0.26 mm rms, quadrants sit 0.6 mm apart in z, ASICs are
rotated 0.1 degree in their modules) while ours is ideal.  Measured: panel centres within
1.19 mm (0.83 mm in the detector plane, median 0.52 mm), normals within 0.34 degree, fast/slow
axes within 0.39 degree, outer extent within 0.41 mm, central hole radius 3.060 vs 3.061 mm.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spread_dials.detectors.jungfrau import jungfrau16m_layout, jungfrau16m_panel_array
from spread_dials.detectors.layout import (
    DetectorLayout,
    FlatPanels,
    Group,
    flatten_layout,
    layout_from_dxtbx_dict,
    silicon_attenuation_length_mm,
    silicon_mu_per_mm,
)
from spread_dials.physics.constants import HC_EV_A


@pytest.fixture(scope="module")
def real_file(shared_data) -> dict:
    with open(shared_data / "detectors" / "jungfrau16M_single.expt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def real(real_file) -> tuple[DetectorLayout, FlatPanels]:
    layout = layout_from_dxtbx_dict(real_file["detector"][0])
    return layout, flatten_layout(layout)


@pytest.fixture(scope="module")
def ours() -> tuple[DetectorLayout, FlatPanels]:
    layout = jungfrau16m_layout()
    return layout, flatten_layout(layout)


def _short(name: str) -> str:
    return name.split("/")[-1]


def _matched(real, ours) -> tuple[FlatPanels, FlatPanels, DetectorLayout, DetectorLayout]:
    """Real panels reordered to our order, matched by name."""
    (real_layout, r), (our_layout, o) = real, ours
    index = {_short(n): i for i, n in enumerate(r.names)}
    perm = [index[n] for n in o.names]
    r = FlatPanels([r.names[i] for i in perm], r.origin_mm[perm], r.fast_axis[perm], r.slow_axis[perm])
    return r, o, real_layout, our_layout


def _centres(flat: FlatPanels, layout: DetectorLayout) -> np.ndarray:
    half = np.array(layout.image_size) * np.array(layout.pixel_size_mm) / 2
    return flat.origin_mm + half[0] * flat.fast_axis + half[1] * flat.slow_axis


def _corners(flat: FlatPanels, layout: DetectorLayout) -> np.ndarray:
    size = np.array(layout.image_size) * np.array(layout.pixel_size_mm)
    return np.concatenate(
        [flat.origin_mm + a * size[0] * flat.fast_axis + b * size[1] * flat.slow_axis for a in (0, 1) for b in (0, 1)]
    )


def _angle_deg(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def test_composed_real_geometry_matches_manifest(real):
    """Our composition of the real file gives MANIFEST.md's figures (z, distance, extent)."""
    layout, flat = real
    corners = _corners(flat, layout)
    normal = np.cross(flat.fast_axis, flat.slow_axis)
    distance = np.abs((flat.origin_mm * normal).sum(-1))
    assert corners[:, 2].min() == pytest.approx(-120.0, abs=0.05)
    assert corners[:, 2].max() == pytest.approx(-118.4, abs=0.05)
    assert distance.min() == pytest.approx(119.2, abs=0.05) and distance.max() == pytest.approx(119.8, abs=0.05)
    assert corners[:, 0].min() == pytest.approx(-158.0, abs=0.05)
    assert corners[:, 0].max() == pytest.approx(158.2, abs=0.05)
    assert corners[:, 1].min() == pytest.approx(-165.3, abs=0.05)
    assert corners[:, 1].max() == pytest.approx(165.2, abs=0.05)


def test_panels_pixels_and_sensor(real, ours):
    (real_layout, r), (our_layout, o) = real, ours
    assert len(o.names) == len(r.names) == 256
    assert sorted(o.names) == sorted(_short(n) for n in r.names)
    assert our_layout.image_size == tuple(real_layout.image_size) == (254, 254)
    assert np.allclose(our_layout.pixel_size_mm, real_layout.pixel_size_mm, rtol=1e-5)  # 0.075 vs 0.07500019
    assert our_layout.thickness_mm == real_layout.thickness_mm == 0.32
    assert our_layout.material == real_layout.material == "Si"


def test_hierarchy_matches(real, ours):
    """Root -> 4 quadrants -> 8 modules -> 8 panels (depth 4), with the real group names."""

    def depth(node) -> int:
        return 1 + max((depth(c) for c in node.children), default=0) if isinstance(node, Group) else 1

    def names(node, level: int) -> set[str]:
        if level == 0:
            return {_short(node.name)}
        return set().union(*(names(c, level - 1) for c in node.children)) if isinstance(node, Group) else set()

    (real_layout, _), (our_layout, _) = real, ours
    assert depth(our_layout.root) == depth(real_layout.root) == 4
    for level in range(4):
        assert names(our_layout.root, level) == names(real_layout.root, level)
    assert [len(q.children) for q in our_layout.root.children] == [8, 8, 8, 8]
    assert {len(m.children) for q in our_layout.root.children for m in q.children} == {8}


def test_panel_centres_and_orientation(real, ours):
    r, o, real_layout, our_layout = _matched(real, ours)
    delta = _centres(o, our_layout) - _centres(r, real_layout)
    distance = np.linalg.norm(delta, axis=1)
    assert distance.max() < 1.5  # measured 1.19 mm
    assert np.median(distance) < 0.75  # measured 0.52 mm
    assert np.linalg.norm(delta[:, :2], axis=1).max() < 1.0  # measured 0.83 mm
    assert _angle_deg(np.cross(o.fast_axis, o.slow_axis), np.cross(r.fast_axis, r.slow_axis)).max() < 0.5  # 0.34
    assert _angle_deg(o.fast_axis, r.fast_axis).max() < 0.5  # measured 0.37 degree
    assert _angle_deg(o.slow_axis, r.slow_axis).max() < 0.5  # measured 0.39 degree


def test_panel_numbers_are_the_real_detectors(shared_data, ours):
    """Panel i of ours is panel i of the real metrology file (jungfrau16M.expt, every detector in
    it): same name and the same place, so a real per-panel mask or geometry applies by index."""
    with open(shared_data / "detectors" / "jungfrau16M.expt") as f:
        detectors = json.load(f)["detector"]
    our_layout, o = ours
    for detector in detectors:
        layout = layout_from_dxtbx_dict(detector)
        r = flatten_layout(layout)
        assert [_short(n) for n in r.names] == o.names
        assert [_short(p["name"]) for p in detector["panels"]] == o.names  # dxtbx's own panel list
        distance = np.linalg.norm(_centres(o, our_layout) - _centres(r, layout), axis=1)
        assert distance.max() < 1.5  # as matched by name (test_panel_centres_and_orientation)


def test_extent_distance_and_central_hole(real, ours):
    (real_layout, r), (our_layout, o) = real, ours
    kr, ko = _corners(r, real_layout), _corners(o, our_layout)
    assert np.abs(ko[:, :2].min(0) - kr[:, :2].min(0)).max() < 1.0  # measured 0.40 mm
    assert np.abs(ko[:, :2].max(0) - kr[:, :2].max(0)).max() < 1.0  # measured 0.54 mm
    normal_r = np.cross(r.fast_axis, r.slow_axis)
    distance_r = np.abs((r.origin_mm * normal_r).sum(-1))
    distance_o = np.abs((o.origin_mm * np.cross(o.fast_axis, o.slow_axis)).sum(-1))
    assert np.allclose(distance_o, 119.5)
    assert distance_r.min() <= 119.5 <= distance_r.max()
    assert abs(distance_r.mean() - 119.5) < 0.3
    # the pinwheel leaves a hole around the beam: the nearest pixel corner to the beam axis
    hole_r, hole_o = np.hypot(kr[:, 0], kr[:, 1]).min(), np.hypot(ko[:, 0], ko[:, 1]).min()
    assert abs(hole_o - hole_r) < 0.2  # measured 3.060 vs 3.061 mm
    # the beam passes close to the centre of the real detector too
    assert np.linalg.norm(_centres(r, real_layout)[:, :2].mean(0)) < 0.5


def test_silicon_mu_matches_stored_value(real_file, real):
    """The Si attenuation coefficient at the file's wavelength matches the mu the file stores (1/mm)."""
    energy = HC_EV_A / real_file["beam"][0]["wavelength"]
    assert silicon_mu_per_mm(energy) == pytest.approx(real[0].mu_per_mm, rel=5e-3)  # measured 0.07 %
    assert silicon_attenuation_length_mm(energy) == pytest.approx(1.0 / real[0].mu_per_mm, rel=5e-3)


def test_panel_array(ours):
    layout, flat = ours
    panels = jungfrau16m_panel_array(n_layers=2, dtype=torch.float32, distance_mm=100.0, energy_eV=9000.0)
    assert panels.n_panels == 256 and panels.image_size == (254, 254) and panels.n_layers == 2
    assert panels.origin_mm.dtype == torch.float32
    assert torch.allclose(panels.origin_mm[:, 2], torch.full((256,), -100.0))
    assert torch.allclose(panels.attenuation_length_mm, torch.full((256,), 1.0 / silicon_mu_per_mm(9000.0)))
    assert torch.allclose(panels.depth_axis, torch.tensor([0.0, 0.0, -1.0]).expand(256, 3))
    default = jungfrau16m_panel_array()
    assert np.allclose(default.origin_mm.numpy(), flat.origin_mm)
