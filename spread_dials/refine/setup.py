"""The cctbx side of dials.spread_refine: F0 and G of the model's sites, reference curves.

Sites are chosen with the ``structure`` scope of dials.spread_simulate.  Each site gets a
reference curve (the axis its edge shift is measured on) and the curves of its element's
oxidation states (for the call), each placed on that axis by its rigid shift:

- Fe: reference Fe(II) and states Fe(II)/Fe(III) from the packaged measured rubredoxin pair
  (7000-7300 eV), unless ``reference.curve`` / ``reference.state_files`` are given;
- Mn: the free-atom Mn curve moved to the Mn(II)/(III)/(IV) edges (physics.oxidation_states;
  the reference is Mn(III));
- other elements: their free-atom curve, no states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.physics.oxidation_states import ROMAN, mn_oxidation_state_curves
from spread_dials.physics.structure_factors import StructureFactors
from spread_dials.refine.references import rigid_shift_eV
from spread_dials.util.errors import SpreadError

__all__ = ["SiteReferences", "prepare_structure", "site_references"]

logger = logging.getLogger("dials.spread.refine")


@dataclass(frozen=True)
class SiteReferences:
    """Per site: the reference curve, and each oxidation state's curve and shift (eV) on its axis."""

    reference: list[TabulatedCurve]
    state_curves: list[dict[int, TabulatedCurve]]
    state_shifts_eV: list[dict[int, float]]


def prepare_structure(structure, d_min: float, mean_energy_eV: float):
    """(PreparedStructure, StructureFactors table without f'/f'') of the model to ``d_min`` (A).

    Raises:
        SpreadError: an unreadable model, or a site selection that matches nothing.
    """
    from pathlib import Path

    from spread_dials.adapters.anomalous_setup import resolve_structure_params
    from spread_dials.adapters.structure_factors import (
        default_model_path,
        load_model,
        prepare_structure_factors,
        select_sites,
    )

    try:
        choice = resolve_structure_params(structure)
    except ValueError as e:
        raise SpreadError(str(e)) from None
    path = Path(choice.file) if choice.file else default_model_path()
    try:
        xrs, hierarchy = load_model(path)
    except FileNotFoundError as e:
        raise SpreadError(str(e)) from None
    except Exception as e:  # noqa: BLE001  iotbx raises Sorry or RuntimeError for a bad file
        raise SpreadError(f"cannot read the model {str(path)!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        sites = select_sites(hierarchy, element=choice.element, selections=choice.selections, group_by=choice.group_by)
    except (ValueError, RuntimeError) as e:
        raise SpreadError(f"structure.sites: {e}") from None
    if not sites:
        raise SpreadError(f"structure.sites: no anomalous site selected in {path.name} (element {choice.element}, "
                          f"selections {list(choice.selections)})")  # fmt: skip
    logger.info("Structure factors of %s (%d atoms, %d sites) to %.3f A ...", path.name, xrs.scatterers().size(), len(sites), d_min)
    prepared = prepare_structure_factors(
        xrs, sites, d_min=d_min, mean_energy_eV=choice.mean_energy_eV or mean_energy_eV, table=choice.free_atom_table,
        algorithm=choice.algorithm, form_factor_table=choice.form_factor_table,
    )  # fmt: skip
    table = StructureFactors(miller_index=prepared.miller_index, F0=prepared.F0, G=prepared.G)
    return prepared, table, choice.free_atom_table


def _read(path: str, label: str) -> TabulatedCurve:
    from spread_dials.io.anomalous_tables import read_anomalous_table

    try:
        curve = read_anomalous_table(path)
    except (OSError, ValueError) as e:
        raise SpreadError(f"reference curve {path}: {e}") from None
    return TabulatedCurve(curve.energy_eV, curve.f_prime, curve.f_double_prime, label)


def site_references(reference, sites, band_eV: tuple[float, float], free_atom_table: str) -> SiteReferences:
    """Reference and state curves per site from the ``reference`` scope (module docstring).

    Raises:
        SpreadError: unreadable files, states without files, or curves that do not cover the
            spectrum's band ``band_eV`` (eV).
    """
    from spread_dials.adapters.free_atom import free_atom_curve
    from spread_dials.io.builtin_references import builtin_fe_reference_paths

    curves = [c for c in (reference.curve or []) if c]
    if curves and len(curves) not in (1, len(sites)):
        raise SpreadError(f"reference.curve: give one curve for all sites or one per site ({len(sites)}), not {len(curves)}")
    files = [f for f in (reference.state_files or []) if f]
    states = list(reference.states or [])
    if len(files) != len(states):
        raise SpreadError("reference.state_files and reference.states need one oxidation state per file")
    given_states = {s: _read(f, f"state {s}") for s, f in zip(states, files)}
    lo, hi = band_eV
    grid = np.arange(lo - 300.0, hi + 300.0, 0.1)
    out_ref, out_curves, out_shifts = [], [], []
    free: dict[str, TabulatedCurve] = {}
    for i, site in enumerate(sites):
        element = site.element
        if given_states:
            state_curves = {s: TabulatedCurve(c.energy_eV, c.f_prime, c.f_double_prime, f"{element}({ROMAN.get(s, s)})")
                            for s, c in given_states.items()}  # fmt: skip
        elif element == "Fe" and reference.builtin_fe:
            paths = builtin_fe_reference_paths()
            state_curves = {s: _read(str(p), f"Fe({ROMAN[s]})") for s, p in paths.items()}
        elif element == "Mn":
            if element not in free:
                free[element] = free_atom_curve(element, grid, free_atom_table)
            state_curves = mn_oxidation_state_curves(free[element], (2, 3, 4))
        else:
            state_curves = {}
        if curves:
            ref = _read(curves[0] if len(curves) == 1 else curves[i], f"reference ({element})")
        elif state_curves:
            ref = state_curves[sorted(state_curves)[len(state_curves) // 2 - (1 if len(state_curves) % 2 == 0 else 0)]]
        else:
            if element not in free:
                free[element] = free_atom_curve(element, grid, free_atom_table)
            ref = free[element]
        e = ref.energy_eV
        if float(e[0]) > lo - 20 or float(e[-1]) < hi + 20:
            raise SpreadError(f"reference curve {ref.label} for site {site.label} covers {float(e[0]):.0f}-{float(e[-1]):.0f} eV "
                              f"but the spectra span {lo:.0f}-{hi:.0f} eV (and edge shifts need 20 eV either side)")  # fmt: skip
        shifts = {s: rigid_shift_eV(c, ref, lo, hi) for s, c in state_curves.items()}
        out_ref.append(ref)
        out_curves.append(state_curves)
        out_shifts.append(shifts)
    return SiteReferences(out_ref, out_curves, out_shifts)
