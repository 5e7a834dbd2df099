"""dxtbx models <-> physics tensors, checked against dxtbx itself and the real Jungfrau 16M file."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from cctbx.eltbx import attenuation_coefficient
from dxtbx.model import Beam, Detector, ParallaxCorrectedPxMmStrategy, SimplePxMmStrategy
from dxtbx.model.experiment_list import Experiment, ExperimentList, ExperimentListFactory

from spread_dials.adapters.dxtbx_models import (
    crystal_from_real_space,
    detector_from_layout,
    detector_from_panel_array,
    panel_array_from_detector,
    real_space_from_crystal,
    sources_from_beam,
)
from spread_dials.detectors.jungfrau import jungfrau16m_layout, jungfrau16m_panel_array
from spread_dials.detectors.layout import (
    flatten_layout,
    layout_from_dxtbx_dict,
    panel_array_from_layout,
    silicon_mu_per_mm,
)
from spread_dials.detectors.simple import simple_detector
from spread_dials.physics.constants import HC_EV_A

FIELDS = ("origin_mm", "fast_axis", "slow_axis", "pixel_size_mm", "thickness_mm", "attenuation_length_mm")


@pytest.fixture(scope="module")
def real_experiments(shared_data) -> ExperimentList:
    return ExperimentListFactory.from_json_file(
        str(shared_data / "detectors" / "jungfrau16M_single.expt"), check_format=False
    )


def _depth(node) -> int:
    return 1 + max((_depth(c) for c in node), default=0) if node.is_group() else 1


def _assert_same_panels(a, b, tol: float) -> None:
    assert a.image_size == b.image_size and a.n_layers == b.n_layers
    for name in FIELDS:
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=0.0, atol=tol), name


def test_panel_array_round_trip():
    """PanelArray -> dxtbx Detector -> PanelArray is exact (1e-9), panel by panel."""
    layout = simple_detector(64, 48, 0.172, 90.0, 2, 2, gap_mm=1.5, thickness_mm=0.45, mu_per_mm=3.0, tilt_deg=7.0)
    panels = panel_array_from_layout(layout, n_layers=3)
    panels = dataclasses.replace(panels, thickness_mm=torch.tensor([0.45, 0.3, 0.0, 1.0], dtype=torch.float64))
    names = [f"asic{i}" for i in range(4)]
    detector = detector_from_panel_array(panels, names=names)
    assert list(detector.get_names()) == names
    _assert_same_panels(panel_array_from_detector(detector, n_layers=3), panels, 1e-9)
    for panel, t in zip(detector, [0.45, 0.3, 0.0, 1.0]):
        kind = ParallaxCorrectedPxMmStrategy if t > 0 else SimplePxMmStrategy
        assert isinstance(panel.get_px_mm_strategy(), kind)
    jungfrau = jungfrau16m_panel_array()
    _assert_same_panels(panel_array_from_detector(detector_from_panel_array(jungfrau)), jungfrau, 1e-9)


def test_real_file_to_panel_array(real_experiments, shared_data):
    """The real 256-panel file: PanelArray and our json composition equal dxtbx's global frames."""
    detector = real_experiments[0].detector
    panels = panel_array_from_detector(detector)
    assert panels.n_panels == 256 and panels.image_size == (254, 254)
    for i, panel in enumerate(detector):
        assert np.allclose(panels.origin_mm[i].numpy(), panel.get_origin(), rtol=0, atol=1e-9)
        assert np.allclose(panels.fast_axis[i].numpy(), panel.get_fast_axis(), rtol=0, atol=1e-12)
        assert np.allclose(panels.slow_axis[i].numpy(), panel.get_slow_axis(), rtol=0, atol=1e-12)
    assert torch.allclose(panels.thickness_mm, torch.full((256,), 0.32, dtype=torch.float64))
    assert torch.allclose(panels.attenuation_length_mm, torch.full((256,), 1 / 26.564973172071888, dtype=torch.float64))
    # flatten_layout (pure numpy, used by tests/detectors) composes the hierarchy as dxtbx does
    with open(shared_data / "detectors" / "jungfrau16M_single.expt") as f:
        flat = flatten_layout(layout_from_dxtbx_dict(json.load(f)["detector"][0]))
    by_name = {n: i for i, n in enumerate(flat.names)}
    for panel in detector:
        i = by_name[panel.get_name()]
        assert np.allclose(flat.origin_mm[i], panel.get_origin(), rtol=0, atol=1e-9)
        assert np.allclose(flat.fast_axis[i], panel.get_fast_axis(), rtol=0, atol=1e-12)
        assert np.allclose(flat.slow_axis[i], panel.get_slow_axis(), rtol=0, atol=1e-12)


def test_built_jungfrau_detector(real_experiments, tmp_path):
    """Our Jungfrau as a dxtbx Detector: depth-4 hierarchy like the real file, parallax px<->mm."""
    layout = jungfrau16m_layout(energy_eV=6557.0)
    detector = detector_from_layout(layout)
    real = real_experiments[0].detector
    assert len(detector) == 256
    assert _depth(detector.hierarchy()) == _depth(real.hierarchy()) == 4
    assert [len(q) for q in detector.hierarchy()] == [8, 8, 8, 8]
    flat = flatten_layout(layout)
    assert list(detector.get_names()) == flat.names
    for i, panel in enumerate(detector):  # dxtbx's own composition of our local frames
        assert np.allclose(panel.get_origin(), flat.origin_mm[i], rtol=0, atol=1e-9)
        assert np.allclose(panel.get_fast_axis(), flat.fast_axis[i], rtol=0, atol=1e-12)
    panel, ref = detector[100], real[100]
    assert panel.get_material() == ref.get_material() == "Si"
    assert panel.get_thickness() == ref.get_thickness()
    assert panel.get_type() == ref.get_type() == "SENSOR_PAD"
    assert panel.get_mu() == pytest.approx(ref.get_mu(), rel=5e-3)
    strategy = panel.get_px_mm_strategy()
    assert isinstance(strategy, ParallaxCorrectedPxMmStrategy)
    assert strategy.mu() == pytest.approx(layout.mu_per_mm) and strategy.t0() == pytest.approx(0.32)
    # px -> mm goes through the parallax correction: it differs from the plain pixel scale
    xy_px = (200.0, 30.0)
    mm = panel.pixel_to_millimeter(xy_px)
    plain = SimplePxMmStrategy().to_millimeter(panel, xy_px)
    assert math.hypot(mm[0] - plain[0], mm[1] - plain[1]) > 0.005
    assert np.allclose(panel.millimeter_to_pixel(mm), xy_px, atol=1e-3)
    # the detector survives DIALS serialisation with its hierarchy
    path = tmp_path / "jungfrau.expt"
    ExperimentList([Experiment(detector=detector, beam=real_experiments[0].beam)]).as_file(str(path))
    reread = ExperimentListFactory.from_json_file(str(path), check_format=False)[0].detector
    assert _depth(reread.hierarchy()) == 4
    assert isinstance(reread[5].get_px_mm_strategy(), ParallaxCorrectedPxMmStrategy)
    _assert_same_panels(panel_array_from_detector(reread), panel_array_from_detector(detector), 1e-9)


def test_simple_detector_in_dxtbx():
    """A 2 x 2 grid with its last panel tilted 5 degrees, as dxtbx sees it."""
    detector = detector_from_layout(simple_detector(100, 80, 0.1, 120.0, 2, 2, gap_mm=1.0, tilt_deg=5.0))
    beam = Beam((0.0, 0.0, 1.0), 1.0)
    for i, panel in enumerate(detector):
        tilt = math.degrees(math.acos(abs(np.dot(panel.get_normal(), beam.get_sample_to_source_direction()))))
        assert tilt == pytest.approx(5.0 if i == 3 else 0.0, abs=1e-9)
        assert isinstance(panel.get_px_mm_strategy(), SimplePxMmStrategy)
    assert detector[0].get_distance() == pytest.approx(120.0)
    # 1 mm gap between panel 0's last pixel edge and panel 1's first, along x
    right_edge = detector[0].get_pixel_lab_coord((100, 0))
    left_edge = detector[1].get_pixel_lab_coord((0, 0))
    assert left_edge[0] - right_edge[0] == pytest.approx(1.0)
    # the beam passes through the gap cross at the centre of the grid
    with pytest.raises(RuntimeError):
        detector.get_ray_intersection(beam.get_s0())


def test_mixed_image_sizes_and_missing_mu_are_errors():
    detector = Detector()
    for size in ((10, 10), (12, 10)):
        panel = detector.add_panel()
        panel.set_image_size(size)
        panel.set_pixel_size((0.1, 0.1))
    with pytest.raises(ValueError, match="image size"):
        panel_array_from_detector(detector)
    detector[1].set_image_size((10, 10))
    detector[1].set_thickness(0.3)
    with pytest.raises(ValueError, match="mu"):
        panel_array_from_detector(detector)


def test_silicon_mu_matches_cctbx():
    """Our Si table reproduces cctbx's NIST table (what dxtbx uses for panel mu), in 1/mm."""
    table = attenuation_coefficient.get_table("Si")
    for energy_eV in (2000.0, 4500.0, 6550.0, 7120.0, 9537.0, 12660.0, 17000.0, 25000.0, 40000.0):
        assert silicon_mu_per_mm(energy_eV) == pytest.approx(table.mu_at_ev(energy_eV) / 10.0, rel=1e-6)


def test_sources_from_beam():
    beam = Beam((0.0, 0.0, 1.0), 1.3)  # dxtbx default polarization normal (0, 1, 0)
    sources = sources_from_beam(beam, fluence_photons_per_m2=2e24)
    s0 = np.array(beam.get_s0())
    assert np.allclose((sources.direction[0] * sources.wavenumber[0]).numpy(), s0, atol=1e-12)
    assert np.allclose(sources.e_vector.numpy(), [1.0, 0.0, 0.0])
    assert float(sources.energy_eV[0]) == pytest.approx(HC_EV_A / 1.3)
    assert sources.polarization_fraction == pytest.approx(beam.get_polarization_fraction())
    assert sources.fluence_photons_per_m2 == 2e24
    # an inclined beam with another polarization normal and a 3-channel spectrum
    beam = Beam((0.1, -0.05, 1.0), 1.89)
    beam.set_polarization_normal(tuple(np.cross(beam.get_sample_to_source_direction(), (1.0, 0.0, 0.0))))
    beam.set_polarization_fraction(0.9)
    sources = sources_from_beam(beam, 1e24, energy_eV=[6550.0, 6551.0, 6552.0], weight=[1.0, 2.0, 1.0])
    s0 = np.array(beam.get_unit_s0())
    assert np.allclose(sources.direction.numpy(), np.tile(s0, (3, 1)), atol=1e-12)
    e = sources.e_vector.numpy()
    assert abs(e @ s0) < 1e-12 and abs(e @ np.array(beam.get_polarization_normal())) < 1e-12
    assert np.allclose(sources.weight.numpy(), [0.25, 0.5, 0.25])
    assert sources.polarization_fraction == pytest.approx(0.9)


def test_crystal_round_trip(real_experiments):
    """real_space rows are dxtbx's a, b, c: real_space @ A = I; back to a Crystal unchanged."""
    crystal = real_experiments[0].crystal
    real_space = real_space_from_crystal(crystal)
    a_matrix = np.array(crystal.get_A()).reshape(3, 3)
    assert np.allclose(real_space.numpy() @ a_matrix, np.eye(3), atol=1e-12)
    assert np.allclose(real_space.norm(dim=1).numpy(), crystal.get_unit_cell().parameters()[:3])
    back = crystal_from_real_space(real_space, crystal.get_space_group())
    assert np.allclose(back.get_A(), crystal.get_A(), rtol=0, atol=1e-15)
    assert back.get_space_group().type().lookup_symbol() == "P 21 21 21"
    by_symbol = crystal_from_real_space(real_space.numpy(), "P 21 21 21")
    assert by_symbol.get_unit_cell().is_similar_to(crystal.get_unit_cell())
