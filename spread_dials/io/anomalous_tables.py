"""Read measured anomalous-scattering curves: columns energy (eV), f' (e), f'' (e).

The files kept in ``shared/data/anomalous`` come in two layouts that one reader handles:
``pf-rd-ox_fftkk.out`` / ``pf-rd-red_fftkk.out`` (tab-separated, CRLF line ends, a uniform
1 eV grid) and ``Fe_fake.dat`` (fixed-width whitespace columns, CRLF, a non-uniform grid).
Blank lines and lines starting with ``#`` are skipped; any other line must hold at least three
numbers.  Rows are returned sorted by energy; duplicate energies are an error (an edge must be
written as two distinct energies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spread_dials.physics.anomalous import TabulatedCurve

__all__ = ["read_anomalous_table", "write_anomalous_table"]

#: |f'| and f'' (electrons) beyond this belong to no atom (Z <= 100 bounds both)
MAX_ELECTRONS = 100.0
#: f'' is an absorption, >= 0; measured curves dip a little below 0 at most
MIN_F_DOUBLE_PRIME = -1.0
#: a table of the hard X-ray energies the simulation uses, in eV, reaches at least this
MIN_ENERGY_EV = 1000.0


def read_anomalous_table(path: str | Path, label: str | None = None) -> TabulatedCurve:
    """Read a three-column f'/f'' table.

    Arguments:
        path: text file with columns energy_eV, f_prime, f_double_prime (electrons);
            tabs or spaces, LF or CRLF line ends.
        label: name stored on the curve (default: the file name without suffix).

    Returns:
        A float64 :class:`TabulatedCurve` sorted by energy.

    Raises:
        ValueError: a line that does not start with three numbers, fewer than two rows, a
            repeated energy, a value that is not finite, a value no atom has (a placeholder
            such as -9999: |f'| and f'' above MAX_ELECTRONS, or f'' below MIN_F_DOUBLE_PRIME), or
            energies that are not in eV (all below MIN_ENERGY_EV: keV or wavelengths).
    """
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        try:
            rows.append([float(p) for p in parts[:3]])
        except ValueError as error:
            raise ValueError(f"{path}:{number}: expected 'energy_eV f_prime f_double_prime', got {line!r}") from error
        if len(parts) < 3:
            raise ValueError(f"{path}:{number}: expected three columns, got {len(parts)}")
    if len(rows) < 2:
        raise ValueError(f"{path}: fewer than two rows of energy_eV f_prime f_double_prime")
    table = np.asarray(rows, dtype=np.float64)
    table = table[np.argsort(table[:, 0], kind="stable")]
    if np.any(np.diff(table[:, 0]) <= 0):
        raise ValueError(f"{path}: repeated energies in the table")
    bad = ~np.isfinite(table).all(1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} rows hold values that are not finite (NaN or inf), e.g. "
                         f"{table[bad][0].tolist()}")  # fmt: skip
    bad = (np.abs(table[:, 1]) > MAX_ELECTRONS) | (table[:, 2] > MAX_ELECTRONS) | (table[:, 2] < MIN_F_DOUBLE_PRIME)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} rows hold f', f'' no atom has (placeholders?), e.g. "
                         f"{table[bad][0].tolist()}; f' and f'' are in electrons, |f'| and f'' <= {MAX_ELECTRONS:g}")  # fmt: skip
    if table[:, 0].max() < MIN_ENERGY_EV:
        raise ValueError(f"{path}: energies {table[0, 0]:g}-{table[-1, 0]:g} are not X-ray energies in eV "
                         "(keV or wavelengths?); the first column must be the energy in eV")  # fmt: skip
    return TabulatedCurve(
        energy_eV=torch.from_numpy(table[:, 0].copy()),
        f_prime=torch.from_numpy(table[:, 1].copy()),
        f_double_prime=torch.from_numpy(table[:, 2].copy()),
        label=label if label is not None else path.stem,
    )


def write_anomalous_table(curve: TabulatedCurve, path: str | Path) -> Path:
    """Write ``curve`` as tab-separated ``energy_eV f_prime f_double_prime`` lines (LF)."""
    path = Path(path)
    table = torch.stack([curve.energy_eV, curve.f_prime, curve.f_double_prime], 1).detach().cpu().double().numpy()
    np.savetxt(path, table, fmt="%.6f\t%.10g\t%.10g")
    return path
