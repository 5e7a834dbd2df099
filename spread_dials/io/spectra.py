"""Read measured XFEL spectra kept as ``.npz`` (e.g. shared/data/spectra/sase_spectra.npz).

The file holds ``energies_eV``, either one axis (m,) shared by every shot or one per shot
(n, m), and ``weights`` (n, m) (or (m,) for a single spectrum): spectrometer intensity per bin,
arbitrary units; negative values (background-subtraction noise) are clipped to 0 when used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["read_spectra"]


def read_spectra(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(energies_eV (n, m), weights (n, m))`` from an ``.npz`` with keys energies_eV and weights.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an .npz with those arrays, shapes disagree, energies do not
            increase or a spectrum has no positive weight.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spectrum file {str(path)!r} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load reads a .npy as one plain array
            raise ValueError(f"{path.name} is a single array (.npy), not an .npz with arrays 'energies_eV' and "
                             "'weights' (np.savez)")  # fmt: skip
        with npz:
            if "energies_eV" not in npz or "weights" not in npz:
                raise ValueError(f"{path.name} needs arrays 'energies_eV' and 'weights' (has {sorted(npz.files)})")
            energies = np.asarray(npz["energies_eV"], dtype=np.float64)
            weights = np.asarray(npz["weights"], dtype=np.float64)
    except (OSError, EOFError) as e:  # not a zip archive, truncated ...
        raise ValueError(f"{path.name} is not a readable .npz file ({e})") from None
    if weights.ndim == 1:
        weights = weights[None, :]
    if energies.ndim == 1:
        energies = np.broadcast_to(energies, weights.shape)
    if weights.ndim != 2 or energies.shape != weights.shape or weights.shape[1] < 2:
        raise ValueError(f"{path.name}: energies_eV {energies.shape} and weights {weights.shape} do not match")
    if np.any(np.diff(energies, axis=1) <= 0):
        raise ValueError(f"{path.name}: energies_eV must increase along each spectrum")
    if not np.all(np.clip(weights, 0, None).sum(axis=1) > 0):
        raise ValueError(f"{path.name}: a spectrum has no positive weight")
    return np.ascontiguousarray(energies), weights
