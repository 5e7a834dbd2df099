"""Injected model errors of the in-memory stills (refine.synthetic.InjectedErrors) against
independent references: a per-pixel gain multiplies each pixel's expected photons at its
detector position (positions from an explicit loop over the boxes), and the oracle's profile
map multiplies the profiles by the same factors (pure torch, CPU)."""

from __future__ import annotations

from dataclasses import replace

import torch

from spread_dials.physics.crystal import real_space_from_cell
from spread_dials.physics.detector_response import calibration_gain_map
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.profiles import CrystalModel, ShotProfiles, stills_profiles
from spread_dials.refine.synthetic import InjectedErrors, oracle_profile_map, synthetic_shots

from ..correct.toy import CELL, ENERGY, toy_table
from ..physics.scene_factory import grid_panels
from .test_engine import _reference


def _stills(errors: InjectedErrors | None, poisson: bool = False, noise_seed: int | None = None):
    table = toy_table()
    curve = _reference().at(ENERGY, 0.0)
    truth = StructureFactors(table.miller_index, table.F0, table.G, torch.stack([curve[0]] * 2), torch.stack([curve[1]] * 2))
    panels = grid_panels(n_fast=160, n_slow=160, pixel_mm=0.1, distance_mm=40.0, grid=(2, 2), gap_mm=0.5, tilt_deg=0.0)
    cell = real_space_from_cell(torch.tensor(CELL, dtype=torch.float64))
    shots, _ = synthetic_shots(panels, truth, CrystalModel((20.0,) * 3, 0.1, 6), cell, ENERGY, n_shots=2, seed=5,
                               spot_scale=2000.0, min_bragg_photons=10.0, errors=errors, poisson=poisson,
                               noise_seed=noise_seed)  # fmt: skip
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


def test_profiles_of_an_anisotropic_model_against_the_isotropic_limit_and_finite_differences():
    """The profiles' kernel turns each still's crystal by its own domain set about its axes:
    spreads (s, s, s) give the isotropic profiles (orthorhombic toy); for (2s, s, s/2) stills
    made together (one kernel call, each still its own block of domains) equal stills made one
    by one, and the closed-form derivatives in the orientation match central differences."""
    _, shots = _stills(None)
    iso = CrystalModel((20.0,) * 3, 0.1, 6)
    zero = [torch.zeros(3, dtype=torch.float64)] * 2

    def profiles(model, rotations=zero, together=False, jacobian=True):
        return stills_profiles(shots, shots.shots, model, rotations, [None, None], jacobian, together)

    for a, b in zip(profiles(iso), profiles(replace(iso, anisotropic_spread_deg=(0.1, 0.1, 0.1)))):
        assert torch.allclose(b.profile, a.profile, rtol=1e-12, atol=1e-15) and torch.allclose(b.jacobian, a.jacobian, rtol=1e-10, atol=1e-12)
    aniso = replace(iso, anisotropic_spread_deg=(0.2, 0.1, 0.05))
    alone, together = profiles(aniso), profiles(aniso, together=True)
    for a, b, c in zip(alone, together, profiles(iso)):
        assert torch.allclose(b.profile, a.profile, rtol=1e-12, atol=1e-15) and torch.allclose(b.jacobian, a.jacobian, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(a.profile, c.profile, rtol=1e-2)  # the anisotropy shows
    h = 1e-6
    for axis in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[axis] = h
        up, down = profiles(aniso, [step] * 2, jacobian=False), profiles(aniso, [-step] * 2, jacobian=False)
        for a, u, d in zip(alone, up, down):
            difference = (u.profile - d.profile) / (2 * h)
            scale = float(difference.abs().max())
            assert scale > 0 and torch.allclose(a.jacobian[..., axis], difference, rtol=1e-4, atol=1e-5 * scale)


def test_a_noise_seed_redraws_only_the_photon_noise():
    """The parametric bootstrap's stills: with a noise seed, the same boxes, crystals and spectra
    as the data set's own draw; counts Poisson about the same expected photons (standardized
    mean 0 and sd 1 against the noise-free stills), another seed other counts, the same seed
    the same counts."""
    panels, expected = _stills(InjectedErrors(psf_fwhm_px=1.5))
    _, own = _stills(InjectedErrors(psf_fwhm_px=1.5), poisson=True)
    _, one = _stills(InjectedErrors(psf_fwhm_px=1.5), poisson=True, noise_seed=1)
    _, again = _stills(InjectedErrors(psf_fwhm_px=1.5), poisson=True, noise_seed=1)
    _, two = _stills(InjectedErrors(psf_fwhm_px=1.5), poisson=True, noise_seed=2)
    z = []
    for e, a, b, c, d in zip(expected.shots, own.shots, one.shots, again.shots, two.shots):
        for s in (a, b, d):
            assert torch.equal(s.shoeboxes.miller_index, e.shoeboxes.miller_index) and torch.equal(s.shoeboxes.fast0, e.shoeboxes.fast0)
            assert torch.equal(s.real_space, e.real_space) and torch.equal(s.weight, e.weight) and torch.equal(s.energy_eV, e.energy_eV)
        assert torch.equal(b.shoeboxes.counts, c.shoeboxes.counts)
        assert not torch.equal(b.shoeboxes.counts, a.shoeboxes.counts) and not torch.equal(b.shoeboxes.counts, d.shoeboxes.counts)
        z.append((b.shoeboxes.counts - e.shoeboxes.counts) / e.shoeboxes.counts.sqrt())
    z = torch.cat(z)
    assert z.numel() > 5000 and abs(float(z.mean())) < 4 / z.numel() ** 0.5 and abs(float(z.std()) - 1) < 0.05
