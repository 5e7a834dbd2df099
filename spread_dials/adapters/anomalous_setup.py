"""From the ``structure`` / ``anomalous`` PHIL scopes to a prepared model and a site f'/f'' model.

The glue a program needs: resolve the preset, load the model, pick the sites, compute F0 and
G with cctbx, and build the per-site anomalous model (edge shift, tabulated, free atom or
free channel) from oxidation states and reference curves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spread_dials.adapters.free_atom import free_atom_curve
from spread_dials.adapters.structure_factors import (
    AnomalousSite,
    PreparedStructure,
    load_model,
    prepare_structure_factors,
    select_sites,
)
from spread_dials.io.anomalous_tables import read_anomalous_table
from spread_dials.io.builtin_references import BUILTIN_FE_BAND_EV, builtin_fe_reference_paths
from spread_dials.phil.structure import PRESETS
from spread_dials.physics.anomalous import EdgeShiftModel, FreeChannelModel, TabulatedCurve
from spread_dials.physics.oxidation_states import DEFAULT_OEC_S1_STATES, ROMAN, mn_oxidation_state_curves

__all__ = [
    "StructureChoice",
    "atom_name",
    "resolve_structure_params",
    "prepare_from_params",
    "measured_reference_files",
    "site_oxidation_states",
    "site_references",
    "site_edge_shifts",
    "anomalous_model_from_params",
]


@dataclass(frozen=True)
class StructureChoice:
    """The ``structure`` scope with the preset's defaults filled in."""

    file: str | None
    preset: str
    d_min: float | None  # None: the program decides (dials.spread_simulate: the detector's reach)
    element: str | None
    selections: tuple[str, ...]
    group_by: str
    free_atom_table: str
    form_factor_table: str
    algorithm: str
    mean_energy_eV: float | None


def resolve_structure_params(structure) -> StructureChoice:
    """Fill every None of the extracted ``structure`` scope from its preset."""
    preset = PRESETS[structure.preset]
    if structure.preset == "psii" and structure.file is None:
        raise ValueError("the psii preset needs the model file: structure.file=/path/to/psii_oec.pdb")
    selections = tuple(s for s in (structure.sites.selection or []) if s)
    return StructureChoice(
        file=structure.file,
        preset=structure.preset,
        d_min=structure.d_min,
        element=None if selections else (structure.sites.element or preset["element"]),
        selections=selections,
        group_by=structure.sites.group_by or preset["group_by"],
        free_atom_table=structure.free_atom_table,
        form_factor_table=structure.form_factor_table,
        algorithm=structure.algorithm,
        mean_energy_eV=structure.mean_energy_eV,
    )


def prepare_from_params(structure, mean_energy_eV: float) -> PreparedStructure:
    """Load the model, select sites and compute F0, G (``structure.mean_energy_eV`` wins if set)."""
    choice = resolve_structure_params(structure)
    xrs, hierarchy = load_model(choice.file)
    sites = select_sites(hierarchy, element=choice.element, selections=choice.selections, group_by=choice.group_by)
    return prepare_structure_factors(
        xrs,
        sites,
        d_min=choice.d_min,
        mean_energy_eV=choice.mean_energy_eV or mean_energy_eV,
        table=choice.free_atom_table,
        algorithm=choice.algorithm,
        form_factor_table=choice.form_factor_table,
    )


def _per_site(values, n: int, what: str) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{what}: give one value or one per site ({n}), got {len(values)}")
    return values


def atom_name(site: AnomalousSite) -> str:
    """The atom name of a site's label, upper case (e.g. "MN1" of "A/OEC601/MN1")."""
    return site.label.split("/")[-1].split(" ")[0].upper()


def _uses_builtin_fe(anomalous) -> bool:
    """``anomalous.builtin_fe_references`` is on and no ``reference_files`` are given."""
    files = [f for f in (anomalous.reference_files or []) if f]
    return bool(getattr(anomalous, "builtin_fe_references", False)) and not files


def measured_reference_files(anomalous) -> tuple[list, list[int]]:
    """(files, oxidation states) of the measured reference curves the ``anomalous`` scope asks for.

    ``reference_files`` with ``reference_states`` when given; else, with
    ``builtin_fe_references``, the packaged rubredoxin pair (Fe(II), Fe(III), 7000-7300 eV);
    else none.
    """
    if _uses_builtin_fe(anomalous):
        paths = builtin_fe_reference_paths()
        return [paths[2], paths[3]], [2, 3]
    files = [f for f in (anomalous.reference_files or []) if f]
    file_states = list(anomalous.reference_states or [])
    if len(files) != len(file_states):
        raise ValueError("anomalous.reference_files and anomalous.reference_states need one state per file")
    return files, file_states


def site_oxidation_states(anomalous, sites: Sequence[AnomalousSite]) -> list[int | None]:
    """Each site's oxidation state: ``anomalous.oxidation_state`` or the defaults (see the PHIL help)."""
    given = _per_site(anomalous.oxidation_state, len(sites), "anomalous.oxidation_state")
    fe_iii_given = _uses_builtin_fe(anomalous) or bool(anomalous.reference_states and 3 in anomalous.reference_states)
    states = []
    for site, state in zip(sites, given):
        if state is None:
            if site.element == "Mn":
                state = DEFAULT_OEC_S1_STATES.get(atom_name(site))
            elif site.element == "Fe" and fe_iii_given:
                state = 3
        states.append(state)
    return states


def site_references(
    anomalous, sites: Sequence[AnomalousSite], energy_eV: Tensor, free_atom_table: str = "sasaki", margin_eV: float = 300.0
) -> list[TabulatedCurve]:
    """One reference curve per site, for its element and oxidation state.

    Measured files (``reference_files`` with ``reference_states``, or with
    ``builtin_fe_references`` the packaged rubredoxin Fe(II)/Fe(III) pair) serve their states;
    Mn states without a file are the free-atom Mn curve moved to ``mn_edge_eV``; a site with
    no state gets its element's free-atom curve.  Free-atom curves are tabulated at 0.1 eV
    over the band +- ``margin_eV``.
    """
    files, file_states = measured_reference_files(anomalous)
    measured = {state: read_anomalous_table(path) for state, path in zip(file_states, files)}
    lo = float(energy_eV.min()) - margin_eV
    hi = float(energy_eV.max()) + margin_eV
    grid = np.arange(lo, hi, 0.1)
    free_atom: dict[str, TabulatedCurve] = {}
    mn_edges = {2: anomalous.mn_edge_eV.ii, 3: anomalous.mn_edge_eV.iii, 4: anomalous.mn_edge_eV.iv}
    states = site_oxidation_states(anomalous, sites) if anomalous.model != "free_atom" else [None] * len(sites)
    references = []
    for site, state in zip(sites, states):
        element = site.element
        if element not in free_atom:
            free_atom[element] = free_atom_curve(element, grid, free_atom_table)
        if state is None:
            references.append(free_atom[element])
        elif state in measured:
            curve = measured[state]
            references.append(TabulatedCurve(curve.energy_eV, curve.f_prime, curve.f_double_prime, f"{element}({ROMAN.get(state, state)})"))
        elif element == "Mn" and state in mn_edges:
            references.append(mn_oxidation_state_curves(free_atom[element], (state,), mn_edges)[state])
        else:
            raise ValueError(
                f"site {site.label}: no reference curve for {element} oxidation state {state}; "
                "give anomalous.reference_files with anomalous.reference_states"
            )
    return references


def _check_coverage(anomalous, sites, references, shift: Tensor, energy_eV: Tensor) -> None:
    """Every site's curve must cover the channels (minus its edge shift): outside its grid the
    interpolation would silently hold the end values."""
    if energy_eV.numel() == 0:
        return
    lo_e, hi_e = float(energy_eV.min()), float(energy_eV.max())
    for site, curve, s in zip(sites, references, shift.tolist()):
        lo, hi = lo_e - s, hi_e - s
        first, last = float(curve.energy_eV[0]), float(curve.energy_eV[-1])
        if lo < first - 1e-9 or hi > last + 1e-9:
            moved = f" minus its edge shift {s:g} eV" if s else ""
            hint = (
                f"; the packaged rubredoxin curves (builtin_fe_references) cover only "
                f"{BUILTIN_FE_BAND_EV[0]:g}-{BUILTIN_FE_BAND_EV[1]:g} eV: move the spectrum or give "
                "anomalous.reference_files"
                if _uses_builtin_fe(anomalous) and site.element == "Fe"
                else ""
            )
            raise ValueError(
                f"site {site.label}: the reference curve {curve.label} covers {first:g}-{last:g} eV but the "
                f"channels{moved} span {lo:g}-{hi:g} eV{hint}"
            )


def site_edge_shifts(anomalous, n_sites: int) -> Tensor:
    """(S,) each site's edge shift (eV) against its reference (``anomalous.edge_shift_eV``: one
    value for all or one per site; None 0)."""
    shifts = _per_site(anomalous.edge_shift_eV, n_sites, "anomalous.edge_shift_eV")
    return torch.tensor([0.0 if s is None else float(s) for s in shifts], dtype=torch.float64)


def anomalous_model_from_params(
    anomalous, sites: Sequence[AnomalousSite], energy_eV: Tensor, free_atom_table: str = "sasaki"
) -> nn.Module:
    """The per-site f'/f'' model: call it with channel energies (C,) for two (S, C) tensors."""
    references = site_references(anomalous, sites, energy_eV, free_atom_table)
    shift = site_edge_shifts(anomalous, len(sites))
    _check_coverage(anomalous, sites, references, shift, energy_eV)
    if anomalous.model == "edge_shift":
        return EdgeShiftModel(references, shift, refine=True)
    if anomalous.model in ("tabulated", "free_atom"):
        return EdgeShiftModel(references, shift, refine=False)
    if anomalous.model == "free_channel":
        moved = [c.shifted(float(s)) for c, s in zip(references, shift)]
        return FreeChannelModel(energy_eV.to(torch.float64), moved)
    raise ValueError(f"unknown anomalous.model {anomalous.model!r}")
