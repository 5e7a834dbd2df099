"""A coordinate model (PDB or mmCIF) -> F0(h) and the per-site bases G_s(h), computed with cctbx.

F(h, E) = F0(h) + sum_s (f'_s(E) + i f''_s(E)) G_s(h), where

- F0 holds every atom with its f0(|Q|) (cctbx scattering-type registry, default
  ``n_gaussian``) and, for atoms that are not in an anomalous site, the free-atom f', f''
  at the band's mean energy (Sasaki or Henke);
- G_s = sum over the atoms of site s (and their symmetry mates) of
  occupancy * Debye-Waller * exp(2 pi i h.x), i.e. a structure factor with a scattering
  factor of exactly 1 (a constant cctbx Gaussian, f' = f'' = 0).

Both are computed on the anomalous asymmetric unit (Friedel mates distinct) and expanded to
the full sphere of Miller indices to d_min (P1, every index the kernel may look up), with
systematic absences included as exact zeros.  F0 uses cctbx's direct summation for small
jobs and its FFT with tightened accuracy settings (:data:`ACCURATE_FFT`) for large ones; G
always uses direct summation (few atoms).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from spread_dials.physics.constants import HC_EV_A
from spread_dials.physics.structure_factors import StructureFactors

logger = logging.getLogger("dials.spread.structure")

__all__ = [
    "ACCURATE_FFT",
    "RUBREDOXIN_RELATIVE_PATH",
    "AnomalousSite",
    "PreparedStructure",
    "default_model_path",
    "load_model",
    "select_sites",
    "prepare_structure_factors",
    "anomalous_miller_set",
]

#: cctbx FFT settings used for F0 of large models.  Against direct summation for PSII
#: (52,542 atoms) at 3.4 A: mean relative error 1.2e-5, max 1.7e-4 (300 random reflections),
#: 16 s on this project's 2-core CPU; cctbx's defaults give a mean of 8e-3.
ACCURATE_FFT = dict(wing_cutoff=1e-10, exp_table_one_over_step_size=0, quality_factor=1e6, grid_resolution_factor=0.25)
#: above this many (atoms x asymmetric-unit reflections), "auto" uses the FFT for F0 (~10 s direct).
DIRECT_WORK_LIMIT = 2e8
RUBREDOXIN_RELATIVE_PATH = "mmtbx/regression/pdbs/Fe_1brf_snip_reduced.pdb"


@dataclass(frozen=True)
class AnomalousSite:
    """One anomalous site: a group of atoms sharing f'(E), f''(E).

    Attributes:
        label: a readable name, e.g. ``"A/OEC601/MN1"`` or ``"MN1 (2 atoms)"``.
        element: element symbol of its atoms (e.g. "Mn").
        atom_indices: indices into the model's atoms (== xray_structure scatterers).
        atom_labels: cctbx atom id strings, for logs.
    """

    label: str
    element: str
    atom_indices: tuple[int, ...]
    atom_labels: tuple[str, ...]


@dataclass(frozen=True)
class PreparedStructure:
    """F0 and G of a model on the full sphere of Miller indices to d_min.

    Attributes:
        miller_index: (H, 3) long, every index with d >= d_min (Friedel mates distinct).
        F0: complex128 (H,) non-anomalous part (electrons).
        G: complex128 (H, S) basis per site (electrons per electron of f'/f'').
        sites: the S sites, in G's column order.
        d_min: resolution limit (A).
        mean_energy_eV: energy (eV) of the non-site atoms' free-atom f', f''.
        algorithm: "direct" or "fft" (how F0 was computed).
        n_atoms: atoms in the model.
    """

    miller_index: Tensor
    F0: Tensor
    G: Tensor
    sites: tuple[AnomalousSite, ...]
    d_min: float
    mean_energy_eV: float
    algorithm: str
    n_atoms: int

    def structure_factors(
        self, f_prime: Tensor, f_double_prime: Tensor, default_F: float = 0.0, dtype: torch.dtype = torch.complex128
    ) -> StructureFactors:
        """The kernel's container with per-site f', f'' (S, C) (electrons) for each channel."""
        if f_prime.shape != f_double_prime.shape or f_prime.shape[0] != len(self.sites):
            raise ValueError(f"f_prime, f_double_prime must be (S={len(self.sites)}, C), got {tuple(f_prime.shape)}")
        return StructureFactors(
            miller_index=self.miller_index,
            F0=self.F0.to(dtype),
            G=self.G.to(dtype),
            f_prime=f_prime,
            f_double_prime=f_double_prime,
            default_F=default_F,
        )


def default_model_path() -> Path:
    """The built-in default structure: P. furiosus rubredoxin (PDB 1BRF) shipped with cctbx's mmtbx.

    Raises:
        FileNotFoundError: mmtbx's regression file is not installed; pass ``structure.file=``.
    """
    candidates = []
    try:
        import libtbx.load_env  # noqa: F401
        from libtbx import env

        found = env.find_in_repositories(relative_path=RUBREDOXIN_RELATIVE_PATH, test=os.path.isfile)
        if found:
            candidates.append(Path(found))
    except Exception:  # noqa: BLE001  libtbx without a build environment: fall back to the package path
        pass
    try:
        import mmtbx

        candidates.append(Path(mmtbx.__file__).resolve().parent.parent / RUBREDOXIN_RELATIVE_PATH)
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default structure (rubredoxin, {RUBREDOXIN_RELATIVE_PATH}) was not found in the installed cctbx/mmtbx; "
        "give a model with structure.file=/path/to/model.pdb (PDB or mmCIF)"
    )


def load_model(path: str | Path | None = None, crystal_symmetry=None):
    """(xray_structure, pdb_hierarchy) of a PDB or mmCIF file (the default structure if None).

    Arguments:
        crystal_symmetry: a ``cctbx.crystal.symmetry`` (unit cell and space group) that replaces
            the file's; needed for a model without a usable one.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the model has no usable unit cell and space group (no CRYST1 record, or the
            1 1 1 placeholder of non-crystal models, which cctbx reads as none) and none is given:
            cctbx would invent a P1 box around the atoms.
    """
    import iotbx.pdb

    path = default_model_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found (structure.file=)")
    model_input = iotbx.pdb.input(file_name=str(path))
    hierarchy = model_input.construct_hierarchy()
    symmetry = crystal_symmetry or model_input.crystal_symmetry()
    if symmetry is None or symmetry.unit_cell() is None or symmetry.space_group_info() is None:
        raise ValueError(f"the model {path.name} has no usable unit cell and space group (no CRYST1 record, or a "
                         "placeholder cell): give structure.unit_cell and structure.space_group")  # fmt: skip
    xrs = model_input.xray_structure_simple(crystal_symmetry=symmetry)
    if xrs.scatterers().size() != hierarchy.atoms_size():
        raise ValueError(f"{path}: {xrs.scatterers().size()} scatterers but {hierarchy.atoms_size()} atoms")
    return xrs, hierarchy


def _element(atom) -> str:
    """The atom's element as the PDB format and cctbx read it (and as cctbx scatters it): the
    element columns, else the alignment of the atom name (" CA " is a C-alpha, "CA  " calcium)."""
    e = atom.element.strip() or (atom.determine_chemical_element_simple() or "").strip()
    return e[:1].upper() + e[1:].lower()


def _site_label(atom) -> str:
    """chain/residue/atom, plus the alternate conformation (``A/FE1001/FE alt B``), so that the
    sites of an atom's conformers have labels of their own."""
    ag = atom.parent()
    rg = ag.parent()
    chain = rg.parent().id.strip()
    alt = f" alt {ag.altloc.strip()}" if ag.altloc.strip() else ""
    return f"{chain}/{ag.resname.strip()}{rg.resseq.strip()}{rg.icode.strip()}/{atom.name.strip()}{alt}"


def select_sites(
    hierarchy, element: str | None = None, selections: Sequence[str] = (), group_by: str = "atom"
) -> list[AnomalousSite]:
    """Anomalous sites from iotbx atom selections.

    Arguments:
        hierarchy: the model's pdb hierarchy.
        element: with no ``selections``, every atom of this element is anomalous.
        selections: iotbx selection strings (e.g. ``"resname OEC and name MN1"``); each one
            defines one site holding all the atoms it selects.
        group_by: for ``element`` sites: ``"atom"`` (one site per atom, the default) or
            ``"name"`` (one site per atom name, e.g. MN1 of both PSII monomers together).

    Raises:
        ValueError: an empty or overlapping selection, or neither argument given.
    """
    cache = hierarchy.atom_selection_cache()
    atoms = hierarchy.atoms()
    sites: list[AnomalousSite] = []
    if selections:
        for text in selections:
            isel = list(cache.selection(text).iselection())
            if not isel:
                raise ValueError(f"anomalous site selection {text!r} selects no atoms")
            elements = sorted({_element(atoms[i]) for i in isel})
            label = _site_label(atoms[isel[0]]) if len(isel) == 1 else f"{text} ({len(isel)} atoms)"
            sites.append(AnomalousSite(label, "/".join(elements), tuple(isel), tuple(atoms[i].id_str() for i in isel)))
    elif element:
        symbol = element.strip()
        isel = [i for i in range(atoms.size()) if _element(atoms[i]).lower() == symbol.lower()]
        if not isel:
            raise ValueError(f"the model has no atom of element {symbol!r} (sites.element=)")
        symbol = _element(atoms[isel[0]])
        if group_by == "atom":
            for i in isel:
                sites.append(AnomalousSite(_site_label(atoms[i]), symbol, (i,), (atoms[i].id_str(),)))
        elif group_by == "name":
            groups: dict[str, list[int]] = {}
            for i in isel:
                groups.setdefault(atoms[i].name.strip(), []).append(i)
            for name, members in groups.items():
                label = _site_label(atoms[members[0]]) if len(members) == 1 else f"{name} ({len(members)} atoms)"
                sites.append(AnomalousSite(label, symbol, tuple(members), tuple(atoms[i].id_str() for i in members)))
        else:
            raise ValueError(f"group_by must be 'atom' or 'name', got {group_by!r}")
    else:
        raise ValueError("give sites.element or at least one sites.selection")
    seen: set[int] = set()
    for site in sites:
        overlap = seen.intersection(site.atom_indices)
        if overlap:
            raise ValueError(f"site {site.label} shares atoms with an earlier site: {sorted(overlap)[:5]}")
        seen.update(site.atom_indices)
        if all(atoms[i].occ == 0 for i in site.atom_indices):
            logger.warning("Anomalous site %s has occupancy 0: it adds nothing to the structure factors, so no "
                           "image carries its f'/f''", site.label)  # fmt: skip
    return sites


def anomalous_miller_set(crystal_symmetry, d_min: float):
    """The anomalous asymmetric unit (Friedel mates distinct) to ``d_min`` (A)."""
    from cctbx import miller

    return miller.build_set(crystal_symmetry, anomalous_flag=True, d_min=d_min)


def _indices_numpy(indices) -> np.ndarray:
    """flex.miller_index -> (N, 3) int64 (through vec3_double: fast, exact for |h| < 2^53)."""
    return np.rint(indices.as_vec3_double().as_numpy_array()).astype(np.int64).reshape(-1, 3)


def _complex_numpy(data) -> np.ndarray:
    """flex.complex_double -> complex128 array."""
    real, imag = data.parts()
    return real.as_numpy_array() + 1j * imag.as_numpy_array()


def _f_calc(miller_set, xrs, algorithm: str):
    if algorithm == "direct":
        return miller_set.structure_factors_from_scatterers(xrs, algorithm="direct").f_calc()
    return miller_set.structure_factors_from_scatterers(xrs, algorithm="fft", **ACCURATE_FFT).f_calc()


def _unit_basis_structure(xrs, site: AnomalousSite):
    """The site's atoms with a scattering factor of exactly 1 (constant Gaussian), f' = f'' = 0."""
    from cctbx import xray
    from cctbx.eltbx import xray_scattering
    from scitbx.array_family import flex

    scatterers = xrs.scatterers().select(flex.size_t(list(site.atom_indices))).deep_copy()
    for sc in scatterers:
        sc.fp = 0.0
        sc.fdp = 0.0
    sub = xray.structure(crystal_symmetry=xrs.crystal_symmetry(), scatterers=scatterers)
    types = {sc.scattering_type for sc in scatterers}
    sub.scattering_type_registry(custom_dict={t: xray_scattering.gaussian(1.0) for t in types})
    return sub


def prepare_structure_factors(
    xrs,
    sites: Sequence[AnomalousSite],
    d_min: float | None = None,
    mean_energy_eV: float = 6550.0,
    table: str = "sasaki",
    algorithm: str = "auto",
    form_factor_table: str = "n_gaussian",
    miller_set=None,
) -> PreparedStructure:
    """F0 and G_s for ``sites`` of the model ``xrs``, on all Miller indices to ``d_min``.

    Arguments:
        xrs: cctbx ``xray.structure`` (left unchanged: a copy is modified).
        sites: from :func:`select_sites`.
        d_min: resolution limit (A); or give ``miller_set``.
        mean_energy_eV: energy (eV) of the free-atom f', f'' of the non-site atoms.
        table: free-atom table for them, "sasaki" or "henke".
        algorithm: "direct", "fft" (:data:`ACCURATE_FFT`) or "auto" (direct when
            atoms x reflections <= 2e8).
        form_factor_table: cctbx scattering-type table for f0 (e.g. "n_gaussian", "it1992").
        miller_set: an anomalous asymmetric-unit ``miller.set`` to use instead of ``d_min``
            (e.g. a subset, for tests); expanded to P1 all the same.

    Returns:
        :class:`PreparedStructure` (complex128 F0 (H,), G (H, S)).
    """
    from cctbx import miller
    from scitbx.array_family import flex

    if miller_set is None:
        if d_min is None:
            raise ValueError("give d_min (A) or a miller_set")
        miller_set = anomalous_miller_set(xrs.crystal_symmetry(), d_min)
    if not miller_set.anomalous_flag():
        raise ValueError("the miller_set must be anomalous (Friedel mates distinct)")
    n_atoms = xrs.scatterers().size()
    if algorithm == "auto":
        algorithm = "direct" if n_atoms * miller_set.size() <= DIRECT_WORK_LIMIT else "fft"
    if algorithm not in ("direct", "fft"):
        raise ValueError(f"algorithm must be direct, fft or auto, got {algorithm!r}")

    work = xrs.deep_copy_scatterers()
    work.scattering_type_registry(table=form_factor_table)
    work.set_inelastic_form_factors(photon=HC_EV_A / mean_energy_eV, table=table)
    site_atoms = flex.bool(n_atoms, False)
    for site in sites:
        for i in site.atom_indices:
            site_atoms[i] = True
    for i, sc in enumerate(work.scatterers()):
        if site_atoms[i]:
            sc.fp = 0.0
            sc.fdp = 0.0

    f0 = _f_calc(miller_set, work, algorithm).expand_to_p1()
    columns = [_f_calc(miller_set, _unit_basis_structure(xrs, site), "direct").expand_to_p1() for site in sites]

    # every index to d_min in P1: the expansion misses the systematic absences (F = 0 exactly)
    d_limit = miller_set.d_min() if d_min is None else d_min
    full = miller.build_set(xrs.crystal_symmetry().cell_equivalent_p1(), anomalous_flag=True, d_min=d_limit)
    absent = full.lone_set(f0) if d_min is not None else None

    indices = _indices_numpy(f0.indices())
    F0 = _complex_numpy(f0.data())
    G = np.stack([_complex_numpy(c.data()) for c in columns], 1) if sites else np.zeros((len(F0), 0), np.complex128)
    for c in columns:
        if c.indices().size() != f0.indices().size() or not (c.indices() == f0.indices()).all_eq(True):
            raise RuntimeError("P1 expansion of a site basis does not match F0's Miller indices")
    if absent is not None and absent.size():
        extra = _indices_numpy(absent.indices())
        indices = np.concatenate([indices, extra])
        F0 = np.concatenate([F0, np.zeros(len(extra), dtype=np.complex128)])
        G = np.concatenate([G, np.zeros((len(extra), G.shape[1]), dtype=np.complex128)])
    return PreparedStructure(
        miller_index=torch.from_numpy(indices),
        F0=torch.from_numpy(F0),
        G=torch.from_numpy(G),
        sites=tuple(sites),
        d_min=float(d_limit),
        mean_energy_eV=float(mean_energy_eV),
        algorithm=algorithm,
        n_atoms=n_atoms,
    )
