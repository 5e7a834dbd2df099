"""Injected model errors of the in-memory stills (refine.synthetic.InjectedErrors) against
independent references: a per-pixel gain multiplies each pixel's expected photons at its
detector position (positions from an explicit loop over the boxes), and the oracle's profile
map multiplies the profiles by the same factors (pure torch, CPU)."""

from __future__ import annotations

import pytest
import torch

from spread_dials.physics.crystal import real_space_from_cell
from spread_dials.physics.detector_response import calibration_gain_map
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.profiles import CrystalModel, ShotProfiles
from spread_dials.refine.synthetic import InjectedErrors, oracle_profile_map, synthetic_shots

from ..correct.toy import CELL, ENERGY, toy_table
from ..physics.scene_factory import grid_panels
from .test_engine import _reference


def _stills(errors: InjectedErrors | None):
    table = toy_table()
    curve = _reference().at(ENERGY, 0.0)
    truth = StructureFactors(table.miller_index, table.F0, table.G, torch.stack([curve[0]] * 2), torch.stack([curve[1]] * 2))
    panels = grid_panels(n_fast=160, n_slow=160, pixel_mm=0.1, distance_mm=40.0, grid=(2, 2), gap_mm=0.5, tilt_deg=0.0)
    cell = real_space_from_cell(torch.tensor(CELL, dtype=torch.float64))
    shots, _ = synthetic_shots(panels, truth, CrystalModel((20.0,) * 3, 0.1, 6), cell, ENERGY, n_shots=2, seed=5,
                               spot_scale=2000.0, min_bragg_photons=10.0, errors=errors, poisson=False)  # fmt: skip
    return panels, shots


def _positions_by_loop(boxes) -> list[tuple[int, int, int]]:
    out = []
    for b in range(boxes.n_shoeboxes):
        for s in range(int(boxes.n_slow[b])):
            for f in range(int(boxes.n_fast[b])):
                out.append((int(boxes.panel[b]), int(boxes.slow0[b]) + s, int(boxes.fast0[b]) + f))
    return out


def test_a_pixel_gain_multiplies_each_pixels_expected_photons_at_its_position():
    panels, plain = _stills(None)
    gain = calibration_gain_map((panels.n_panels, panels.n_slow, panels.n_fast), 0.1, seed=3, dtype=torch.float64)
    _, gained = _stills(InjectedErrors(pixel_gain=gain))
    for a, b in zip(plain.shots, gained.shots):
        boxes = a.shoeboxes
        positions = _positions_by_loop(boxes)
        assert torch.equal(torch.stack(boxes.pixel_positions(), -1), torch.tensor(positions))
        expected = torch.tensor([float(gain[p, s, f]) for p, s, f in positions], dtype=torch.float64)
        assert boxes.n_pixels > 100 and torch.allclose(b.shoeboxes.counts, boxes.counts * expected, rtol=1e-12, atol=0)
        assert float((expected - 1).abs().max()) > 0.1  # the factors are not all 1


def test_the_oracle_multiplies_the_profiles_by_the_panel_and_pixel_gain():
    panels, stills = _stills(None)
    gain = calibration_gain_map((panels.n_panels, panels.n_slow, panels.n_fast), 0.1, seed=3, dtype=torch.float64)
    panel_gain = torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=torch.float64)
    oracle = oracle_profile_map(stills, InjectedErrors(panel_gain=panel_gain, pixel_gain=gain))
    boxes = stills.shots[0].shoeboxes
    positions = _positions_by_loop(boxes)
    factors = torch.tensor([float(gain[p, s, f] * panel_gain[p]) for p, s, f in positions], dtype=torch.float64)
    profile = torch.rand(boxes.n_pixels, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mapped = oracle(0, ShotProfiles(torch.zeros(3, dtype=torch.float64), profile, None, None))
    assert torch.allclose(mapped.profile, profile * factors.unsqueeze(-1), rtol=1e-12, atol=0)


def test_an_anisotropic_mosaic_spread_about_orthogonal_axes_reduces_to_the_isotropic_one():
    """Spreads (s, s, s) about an orthorhombic crystal's a, b, c are the isotropic spread s (the
    axes are orthonormal): the same stills to 1e-12; (2s, s, s/2) makes other stills."""
    _, plain = _stills(None)
    _, same = _stills(InjectedErrors(mosaic_spread_abc_deg=(0.1, 0.1, 0.1)))
    _, other = _stills(InjectedErrors(mosaic_spread_abc_deg=(0.2, 0.1, 0.05)))
    for a, b, c in zip(plain.shots, same.shots, other.shots):
        assert torch.equal(a.shoeboxes.miller_index, b.shoeboxes.miller_index)
        assert torch.allclose(b.shoeboxes.counts, a.shoeboxes.counts, rtol=1e-12, atol=1e-12)
        assert c.shoeboxes.n_pixels != a.shoeboxes.n_pixels or not torch.allclose(c.shoeboxes.counts, a.shoeboxes.counts, rtol=1e-2)


def test_the_profiles_kernel_refuses_an_anisotropic_model():
    """One domain set turns every still's crystal in the profiles' kernel, so a model whose
    domains depend on the crystal's axes is refused, not silently made isotropic."""
    model = CrystalModel((20.0,) * 3, 0.1, 6, anisotropic_spread_deg=(0.2, 0.1, 0.05))
    with pytest.raises(ValueError, match="anisotropic"):
        model.domain_rotations()
