"""Mosaic domains as the seed draws them: rotation about a uniformly random axis by an angle
~ N(0, mosaic_spread_deg), so the rms rotation angle is the spread itself.  The references are
closed forms of that distribution, measured on the rotation matrices (numpy only)."""

from __future__ import annotations

import math

import numpy as np
import torch

from spread_dials.physics.crystal import mosaic_domain_rotations, real_space_from_cell

N_DOMAINS = 100000  # N/2 independent draws (antithetic pairs): the rms angle's relative standard error is
# 1/sqrt(2 N/2) = 0.32 % (of the mean |angle| 0.34 %, of a rocking component 0.47 %: more kurtosis),
# so the tolerances below are about 5 standard errors


def _axis_angle(rotations: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Unit axes (M, 3) and angles (M,) (rad, >= 0) of rotation matrices, from trace and skew part."""
    r = rotations.numpy()
    angle = np.arccos(np.clip((np.trace(r, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0))
    skew = np.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], -1)
    return skew / np.linalg.norm(skew, axis=1, keepdims=True), angle


def test_rms_rotation_angle_is_the_spread():
    """rms angle = spread (the old per-axis draw gave sqrt(3) x); |angle| is half-normal
    (mean spread * sqrt(2/pi)); the rocking rms about any fixed axis is spread / sqrt(3); the
    axes are uniform on the sphere (|u . z| uniform on [0, 1])."""
    spread = 0.3
    axis, angle = _axis_angle(mosaic_domain_rotations(spread, N_DOMAINS, seed=11))
    angle_deg = np.degrees(angle)
    assert abs(np.sqrt(np.mean(angle_deg**2)) / spread - 1.0) < 0.015
    assert abs(np.mean(angle_deg) / (spread * math.sqrt(2.0 / math.pi)) - 1.0) < 0.015
    rotvec_deg = axis * angle_deg[:, None]
    for direction in (np.array([0.0, 0.0, 1.0]), np.array([1.0, 2.0, -2.0]) / 3.0):
        rocking = rotvec_deg @ direction
        assert abs(np.sqrt(np.mean(rocking**2)) / (spread / math.sqrt(3.0)) - 1.0) < 0.025
    cos_z = np.abs(axis[:, 2])
    assert abs(np.mean(cos_z < 0.5) - 0.5) < 0.01
    assert abs(np.mean(cos_z) - 0.5) < 0.005


def test_antithetic_pairs_seeded_and_identity():
    """Domain i + M/2 undoes domain i; a seed gives one draw; one domain is the identity."""
    rotations = mosaic_domain_rotations(0.1, 8, seed=4)
    np.testing.assert_allclose(rotations[4:].numpy(), rotations[:4].transpose(-1, -2).numpy(), atol=1e-15)
    np.testing.assert_array_equal(rotations.numpy(), mosaic_domain_rotations(0.1, 8, seed=4).numpy())
    assert not np.allclose(rotations.numpy(), mosaic_domain_rotations(0.1, 8, seed=5).numpy())
    np.testing.assert_array_equal(mosaic_domain_rotations(0.1, 1, seed=4)[0].numpy(), np.eye(3))


def test_anisotropic_spread():
    """Equal spreads about orthogonal a, b, c give the isotropic draw; a spread about a only
    turns every domain about a, with rms angle spread / sqrt(3) (one component of the draw)."""
    orientation = torch.tensor([[0.36, 0.48, -0.8], [-0.8, 0.6, 0.0], [0.48, 0.64, 0.6]], dtype=torch.float64)
    real_space = real_space_from_cell(torch.tensor([30.0, 40.0, 50.0, 90.0, 90.0, 90.0], dtype=torch.float64),
                                      orientation)  # fmt: skip
    iso = mosaic_domain_rotations(0.2, 50, seed=2)
    equal = mosaic_domain_rotations(0.0, 50, seed=2, real_space=real_space,
                                    anisotropic_spread_deg=torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64))  # fmt: skip
    np.testing.assert_allclose(equal.numpy(), iso.numpy(), atol=1e-14)
    about_a = mosaic_domain_rotations(0.0, N_DOMAINS, seed=2, real_space=real_space,
                                      anisotropic_spread_deg=torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64))  # fmt: skip
    axis, angle = _axis_angle(about_a)
    a_unit = real_space[0].numpy() / np.linalg.norm(real_space[0].numpy())
    turned = angle > 1e-9
    np.testing.assert_allclose(np.abs(axis[turned] @ a_unit), 1.0, atol=1e-6)
    assert abs(np.sqrt(np.mean(np.degrees(angle) ** 2)) / (0.3 / math.sqrt(3.0)) - 1.0) < 0.025
