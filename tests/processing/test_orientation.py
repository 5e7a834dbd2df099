"""spread_dials.validation.orientation against rotations and settings built independently here
(scipy rotations, dxtbx crystal models)."""

from __future__ import annotations

import numpy as np
import pytest
from dxtbx.model import Crystal
from scipy.spatial.transform import Rotation

from spread_dials.validation.orientation import basis_settings, cell_parameters, match_setting, rotation_angle_deg

CELL = (34.123, 34.874, 43.683)


def _a_matrix(rotation: np.ndarray, cell=CELL) -> np.ndarray:
    """dxtbx A of a P 21 21 21 crystal with ``cell`` rotated by ``rotation``."""
    real = rotation @ np.diag(cell)  # columns: a, b, c in the lab frame
    crystal = Crystal(tuple(real[:, 0]), tuple(real[:, 1]), tuple(real[:, 2]), space_group_symbol="P 21 21 21")
    return np.array(crystal.get_A()).reshape(3, 3)


def test_basis_settings_are_the_24_proper_signed_permutations():
    settings = basis_settings()
    assert settings.shape == (24, 3, 3)
    assert np.array_equal(settings[0], np.eye(3))
    assert len({m.tobytes() for m in settings}) == 24
    for m in settings:
        assert round(np.linalg.det(m)) == 1 and np.array_equal(np.abs(m).sum(0), [1, 1, 1])


@pytest.mark.parametrize("angle_deg", [0.0, 0.003, 0.05, 1.0, 30.0])
def test_rotation_angle(angle_deg):
    r = Rotation.from_rotvec(np.radians(angle_deg) * np.array([0.3, -0.5, 0.81]) / np.linalg.norm([0.3, -0.5, 0.81]))
    assert rotation_angle_deg(r.as_matrix()) == pytest.approx(angle_deg, abs=1e-9)


def test_cell_parameters_of_a_dxtbx_crystal():
    rotation = Rotation.random(random_state=1).as_matrix()
    assert cell_parameters(_a_matrix(rotation)) == pytest.approx([*CELL, 90, 90, 90], abs=1e-9)


@pytest.mark.parametrize("setting", range(24))
def test_every_setting_and_a_small_misorientation_are_recovered(setting):
    """An indexed crystal = the true one rotated by 0.04 deg, then described in another basis
    (two-fold axes of 222, axis swaps): the angle, the setting, the cell and Miller indices come back."""
    rng = np.random.default_rng(setting)
    u_true = Rotation.random(random_state=setting).as_matrix()
    a_true = _a_matrix(u_true)
    axis = rng.normal(size=3)
    tilt = Rotation.from_rotvec(np.radians(0.04) * axis / np.linalg.norm(axis)).as_matrix()
    m = basis_settings()[setting]
    # the same lattice, reciprocal basis changed: A' = A M^-1 (h' = M h)
    a_indexed = tilt @ a_true @ np.linalg.inv(m)
    match = match_setting(a_indexed, a_true)
    assert match.angle_deg == pytest.approx(0.04, abs=1e-6)
    assert np.array_equal(match.setting, m)
    assert match.cell == pytest.approx([*CELL, 90, 90, 90], abs=1e-6)
    hkl_true = rng.integers(-10, 11, size=(20, 3))
    hkl_indexed = hkl_true @ m.T  # h' = M h
    assert np.array_equal(match.to_true_indices(hkl_indexed), hkl_true)


def test_cell_error_is_reported_in_the_matched_setting():
    u = Rotation.random(random_state=5).as_matrix()
    a_true = _a_matrix(u)
    a_indexed = _a_matrix(u, cell=(34.2, 34.8, 43.7))
    match = match_setting(a_indexed, a_true)
    assert match.is_identity
    assert match.cell[:3] == pytest.approx([34.2, 34.8, 43.7], abs=1e-9)
    assert match.angle_deg < 1e-6
