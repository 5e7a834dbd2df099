"""The measured Fe reference curves that ship inside the package.

``spread_dials/data/anomalous`` holds the measured f'/f'' pair of *Pyrococcus furiosus*
rubredoxin from gigantocypris/kramkron (MIT, licence text in ``data/anomalous/NOTICE``):
``pf-rd-red_7000-7300eV.dat`` (reduced, Fe(II)) and ``pf-rd-ox_7000-7300eV.dat`` (oxidized,
Fe(III)).  Only the 7000-7300 eV band of the source files is shipped (values unchanged, 1 eV
grid), so a spectrum must lie inside :data:`BUILTIN_FE_BAND_EV` to use them (see
``anomalous.builtin_fe_references``).  Read them with
:func:`spread_dials.io.anomalous_tables.read_anomalous_table`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUILTIN_FE_BAND_EV", "builtin_fe_reference_paths"]

#: the energy band (eV, inclusive) the packaged Fe curves cover
BUILTIN_FE_BAND_EV = (7000.0, 7300.0)

_DIRECTORY = Path(__file__).resolve().parent.parent / "data" / "anomalous"


def builtin_fe_reference_paths() -> dict[int, Path]:
    """Paths of the packaged measured rubredoxin Fe curves by oxidation state.

    Returns:
        ``{2: .../pf-rd-red_7000-7300eV.dat, 3: .../pf-rd-ox_7000-7300eV.dat}``: the reduced
        (Fe(II)) and oxidized (Fe(III)) curves, columns energy (eV), f' (e), f'' (e), 7000-7300 eV.

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    paths = {2: _DIRECTORY / "pf-rd-red_7000-7300eV.dat", 3: _DIRECTORY / "pf-rd-ox_7000-7300eV.dat"}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"packaged reference curve {path} is missing (reinstall spread_dials)")
    return paths
