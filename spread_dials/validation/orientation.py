"""Misorientation between an indexed crystal and the true one, over the settings DIALS may pick.

An indexer that is told the space group and cell still chooses one of several equivalent bases:
the rotations of the crystal's point group (for P 2_1 2_1 2_1: two-fold axes along a, b, c, i.e.
sign flips of two axes) and, for nearly equal axes, permutations of a, b, c.  Every right-handed
signed permutation of the reciprocal basis (24 matrices) is tried; the one that brings the
indexed A matrix closest to the true one is the setting used for the angle, the cell and the
Miller indices.  Pure numpy (no cctbx).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = ["SettingMatch", "basis_settings", "cell_parameters", "match_setting", "rotation_angle_deg"]


def basis_settings() -> np.ndarray:
    """The 24 signed permutation matrices with determinant +1, identity first: (24, 3, 3) int."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3), dtype=np.int64)
            for row, (col, sign) in enumerate(zip(perm, signs)):
                m[row, col] = sign
            if round(np.linalg.det(m)) == 1:
                out.append(m)
    out.sort(key=lambda m: (not np.array_equal(m, np.eye(3, dtype=np.int64)), -np.trace(m)))
    return np.stack(out)


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """The angle (degrees) of the rotation nearest to ``matrix`` (polar decomposition).

    Accurate for small angles: 2 arcsin(|R - I|_F / sqrt(8)).
    """
    u, _, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64))
    r = u @ vt
    if np.linalg.det(r) < 0:  # not a proper rotation: no setting of a right-handed crystal
        return 180.0
    return float(np.degrees(2.0 * np.arcsin(min(1.0, np.linalg.norm(r - np.eye(3)) / np.sqrt(8.0)))))


def cell_parameters(a_matrix: np.ndarray) -> np.ndarray:
    """(a, b, c, alpha, beta, gamma) in A and degrees of the crystal with dxtbx ``A`` = UB
    (columns a*, b*, c*)."""
    real = np.linalg.inv(np.asarray(a_matrix, dtype=np.float64))  # rows a, b, c
    lengths = np.linalg.norm(real, axis=1)

    def angle(i: int, j: int) -> float:
        return float(np.degrees(np.arccos(np.clip(real[i] @ real[j] / (lengths[i] * lengths[j]), -1, 1))))

    return np.array([*lengths, angle(1, 2), angle(0, 2), angle(0, 1)])


@dataclass(frozen=True)
class SettingMatch:
    """The setting of an indexed crystal closest to the truth.

    Attributes:
        angle_deg: misorientation between the indexed (in this setting) and the true crystal.
        setting: M (3, 3) int with ``A_indexed @ M ~ R @ A_true``; a Miller index h of the
            indexed crystal is ``M.T @ h`` in the true crystal's indexing.
        cell: (6,) the indexed cell in this setting (A, degrees).
        a_matrix: the indexed A matrix in this setting (``A_indexed @ M``).
    """

    angle_deg: float
    setting: np.ndarray
    cell: np.ndarray
    a_matrix: np.ndarray

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.setting, np.eye(3, dtype=np.int64)))

    def to_true_indices(self, miller_index: np.ndarray) -> np.ndarray:
        """(n, 3) Miller indices of the indexed crystal in the true crystal's indexing."""
        return np.asarray(miller_index, dtype=np.int64) @ self.setting


def match_setting(a_indexed: np.ndarray, a_true: np.ndarray) -> SettingMatch:
    """The basis setting M of the indexed crystal with the smallest misorientation to the truth.

    Arguments:
        a_indexed: (3, 3) dxtbx A = UB of the indexed crystal.
        a_true: (3, 3) A of the true crystal.
    """
    a_indexed = np.asarray(a_indexed, dtype=np.float64)
    inverse_true = np.linalg.inv(np.asarray(a_true, dtype=np.float64))
    best = None
    for m in basis_settings():
        a_setting = a_indexed @ m
        angle = rotation_angle_deg(a_setting @ inverse_true)
        if best is None or angle < best[0] - 1e-12:
            best = (angle, m, a_setting)
    angle, m, a_setting = best
    return SettingMatch(angle, m, cell_parameters(a_setting), a_setting)
