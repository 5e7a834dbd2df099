"""Per-shot seeds and orientations: reproducible, independent of the order of evaluation."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from spread_dials.simulation.plan import container_shots, n_containers, shot_seeds, uniform_rotation


def test_shot_seeds_depend_on_seed_and_shot_only():
    assert shot_seeds(3, 41) == shot_seeds(3, 41)
    values = {v for i in range(200) for v in shot_seeds(3, i).as_array().tolist()}
    assert len(values) == 200 * 5  # all streams (orientation, mosaic, spectrum, noise, model_error) distinct
    assert shot_seeds(3, 0) != shot_seeds(4, 0)
    assert all(0 <= v < 2**63 for v in shot_seeds(9, 9).as_array().tolist())


def test_uniform_rotation_is_haar_distributed():
    """Proper rotations whose mean is 0 and whose angle follows (1 - cos t) / pi (scipy's reference)."""
    rng = np.random.default_rng(0)
    mats = np.stack([uniform_rotation(rng) for _ in range(4000)])
    assert np.allclose(mats @ mats.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(mats), 1.0)
    assert np.abs(mats.mean(0)).max() < 0.05
    angles = np.linalg.norm(Rotation.from_matrix(mats).as_rotvec(), axis=1)
    reference = np.linalg.norm(Rotation.random(20000, random_state=1).as_rotvec(), axis=1)
    assert abs(np.median(angles) - np.median(reference)) < 0.05
    assert abs(np.mean(angles) - (np.pi / 2 + 2 / np.pi)) < 0.03  # E[t] for the Haar measure


def test_containers_partition_the_shots():
    assert n_containers(10, 3) == 4
    shots = [s for c in range(4) for s in container_shots(c, 10, 3)]
    assert shots == list(range(10))
