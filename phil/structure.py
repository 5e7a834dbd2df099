"""PHIL scopes for the atomic model (``structure``) and the anomalous scattering (``anomalous``).

libtbx.phil strings, importable without cctbx; include them in a program's scope::

    phil_scope = libtbx.phil.parse('''
    include scope spread_dials.phil.structure.structure_phil
    include scope spread_dials.phil.structure.anomalous_phil
    ''', process_includes=True)

:func:`spread_dials.adapters.anomalous_setup.resolve_structure_params` fills the preset's
defaults (every ``None`` below that a preset decides).
"""

from __future__ import annotations

__all__ = ["structure_phil", "anomalous_phil", "structure_and_anomalous_phil", "PRESETS"]

#: preset -> defaults used where the parameter is None
PRESETS = {
    "rubredoxin": {"element": "Fe", "group_by": "atom"},
    "psii": {"element": "Mn", "group_by": "atom"},
}

structure_phil = """
structure
  .help = "The atomic model, its structure factors and its anomalous sites"
{
  file = None
    .type = path
    .help = "Coordinate model, PDB or mmCIF. None: the built-in default structure (P. furiosus"
            "rubredoxin, PDB 1BRF, shipped with cctbx as mmtbx/regression/pdbs/"
            "Fe_1brf_snip_reduced.pdb). The psii preset needs a file (e.g. psii_oec.pdb)."
  preset = *rubredoxin psii
    .type = choice
    .help = "Defaults for the parameters left at None: rubredoxin (Fe sites) or psii (the"
            "production preset: Mn sites of the oxygen-evolving complex)"
  unit_cell = None
    .type = floats(size=6, value_min=0)
    .help = "Unit cell (a, b, c in A; alpha, beta, gamma in degrees) with space_group, for a"
            "model without a usable CRYST1 record (none, or the 1 1 1 placeholder; such a model"
            "is refused without them); it replaces the model's own"
  space_group = None
    .type = str
    .help = "Space group (e.g. P 21 21 21) that goes with unit_cell"
  d_min = None
    .type = float(value_min=0.5)
    .help = "High-resolution limit (A) of the Miller-index table. None: the detector's reach"
            "(the smallest d any pixel records at the highest channel energy; the atomic"
            "B-factors make the fall-off). A larger value leaves the detector empty beyond"
            "it (a warning); a smaller one is refused"
  mean_energy_eV = None
    .type = float(value_min=1000)
    .help = "Energy (eV) at which non-site atoms get their free-atom f', f''. None: the"
            "spectrum's weighted mean energy"
  free_atom_table = *sasaki henke
    .type = choice
    .help = "Free-atom f'/f'' tables (cctbx.eltbx): sasaki (4.3-124 keV, fine at edges) or"
            "henke (10 eV-30 keV)"
  form_factor_table = *n_gaussian it1992 wk1995
    .type = choice
    .help = "cctbx table of the normal scattering factors f0(sin(theta)/lambda) (electrons)"
    .expert_level = 1
  algorithm = *auto direct fft
    .type = choice
    .help = "How cctbx computes F0: direct summation (exact, slow for large models), FFT with"
            "tight accuracy settings (relative error ~1e-5), or auto (direct up to 2e8"
            "atom x reflection terms)"
    .expert_level = 1
  sites
    .help = "Anomalous sites: groups of atoms that share f'(E), f''(E)"
  {
    element = None
      .type = str
      .help = "With no selection: every atom of this element is anomalous (one site per atom"
              "unless group_by=name). None: the preset's (Fe, or Mn for psii)"
    selection = None
      .type = str
      .multiple = True
      .help = "iotbx atom-selection syntax; each one defines one site holding all the atoms"
              "it selects, e.g. chain A and resname OEC and name MN1"
    group_by = *atom name
      .type = choice
      .help = "For element sites: one site per atom, or one per atom name (e.g. MN1 of both"
              "PSII monomers together)"
  }
}
"""

anomalous_phil = """
anomalous
  .help = "f'(E) and f''(E) of the anomalous sites (electrons)"
{
  model = *edge_shift tabulated free_atom free_channel
    .type = choice
    .help = "edge_shift: each site follows its oxidation state's reference curve moved by"
            "edge_shift_eV (refinable). tabulated: the reference curves as they are."
            "free_atom: the free-atom table of the site's element, no oxidation state."
            "free_channel: a free f', f'' per site and channel (starting from the references)"
            "with a smoothness and a Kramers-Kronig prior"
  reference_files = None
    .type = path
    .multiple = True
    .help = "Measured curves (columns: energy (eV), f' (e), f'' (e); tabs or spaces), one"
            "per entry of reference_states, e.g. pf-rd-red_fftkk.out and pf-rd-ox_fftkk.out"
            "for Fe(II) and Fe(III)"
  reference_states = None
    .type = ints
    .help = "Oxidation state of each reference file, in the same order (e.g. 2 3)"
  builtin_fe_references = False
    .type = bool
    .help = "When true and no reference_files are given, the packaged measured P. furiosus"
            "rubredoxin pair (gigantocypris/kramkron, MIT; only 7000-7300 eV) serves Fe(II)"
            "and Fe(III), and Fe sites default to Fe(III). The spectrum's channels (minus"
            "any edge_shift_eV) must lie inside 7000-7300 eV"
  oxidation_state = None
    .type = ints
    .help = "Oxidation state per site in site order, or one value for all sites. None: Fe"
            "sites 3 (oxidized rubredoxin) when a Fe(III) reference is given (reference_states"
            "holding 3, or builtin_fe_references), else the free atom; Mn sites of residue OEC"
            "by atom name, the S1 state Mn1(III) Mn2(IV) Mn3(IV) Mn4(III); other sites the free"
            "atom"
  edge_shift_eV = None
    .type = floats
    .help = "Extra edge shift (eV) per site (or one for all) added to the state's reference;"
            "the starting point of refinement"
  mn_edge_eV
    .help = "Mn K-edge energies (eV) of the Mn oxidation states: the free-atom Mn curve is"
            "moved so that its edge lies here (docs/anomalous.md: Roelofs et al. 1996 anchor,"
            "2 eV per oxidation state)"
  {
    ii = 6548.7
      .type = float
      .help = "Mn(II) edge (eV)"
    iii = 6550.7
      .type = float
      .help = "Mn(III) edge (eV)"
    iv = 6552.7
      .type = float
      .help = "Mn(IV) edge (eV)"
  }
  free_channel
    .help = "Priors of the free per-channel model"
    .expert_level = 1
  {
    smoothness_sigma_e = 0.05
      .type = float(value_min=0)
      .help = "Width (electrons) of the Gaussian prior on second differences of f', f''"
              "between neighbouring channels"
    kramers_kronig_sigma_e = 0.05
      .type = float(value_min=0)
      .help = "Width (electrons) of the Gaussian prior on the Kramers-Kronig residual"
              "Delta f' - KK(Delta f'') per channel"
  }
  plot = None
    .type = path
    .help = "If set, write a PNG of f', f'' of every site over the spectrum band"
}
"""

structure_and_anomalous_phil = structure_phil + anomalous_phil
