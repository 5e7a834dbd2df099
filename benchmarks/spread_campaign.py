"""SPREAD campaign harness (issue 12, SPREAD at scale): replicate refinements of N in-memory
stills with a known truth, one JSON line per (N, replicate), from one PHIL file.

Usage (repository root; on the GPU machines with PYTHONPATH=$PWD, bench_data carried):
    python benchmarks/spread_campaign.py phil/campaign/rubredoxin_ladder.phil [key=value ...]
    mpirun -n 8 python benchmarks/spread_campaign.py phil/campaign/psii_20k.phil mpi=True
                                                 (stills striped over ranks, one GPU per rank)
    python benchmarks/spread_campaign.py --summarise campaign/campaign_rubredoxin.jsonl
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$((i % 2)) python benchmarks/spread_campaign.py \
        phil/campaign/rubredoxin_ladder_exact.phil mpi=False ladder.shards=4 ladder.shard=$i & done; wait
    python benchmarks/spread_campaign.py --summarise campaign/campaign_rubredoxin_shift2.shard*.jsonl
    python benchmarks/spread_campaign.py --show-phil          (the parameters, their defaults)
    python benchmarks/spread_campaign.py phil/campaign/ferredoxin_ladder.phil --plan
                          (each site's and site pair's sigma at every ladder.n predicted from the
                           Fisher information of plan.probe_stills noise-free stills, no refinement:
                           spread_dials.refine.planning)

Parameters come from PHIL files (phil/campaign/*.phil) and ``key=value`` arguments (a path or a
unique trailing part: ``n=300,1000``, ``ladder.replicates=8``), read with libtbx.phil where it
imports and otherwise with spread_dials.util.phil_lite (the GPU machines have no libtbx; both
give the same values, tests/util/test_phil_lite.py).  The earlier flags still work and map to
PHIL: --case (case.name), --data, --n, --replicates, --seed, --macrocycles, --bootstrap,
--cell-error, --truth-shift, --device, --mpi, --out (output.directory).

The stills come from the physics core in memory (spread_dials.refine.synthetic, the simulator's
sparse kernel; no DIALS): the structure factors are cctbx's, precomputed by
benchmarks/refine_tables.py into <case.data>/<case.name>.npz (F0 and the per-site bases G; the
sites already tied by name where the case groups them); the physical crystal and beam of the
presets (docs/brightness.md: Ncells and spot scale derived from 4000 A domains, a 4 um path,
1e12 photons in a 1 um beam) unless ``crystal.ncells_abc`` / ``crystal.spot_scale`` are given;
each still's crystal drawn from the SAME domain set as the refinement's model (quadrature: so the
spread measures the statistics, not a domain misfit), handed on with the orientation and cell
errors that dials.spread_stills_process leaves (orientation: the measured median
misorientation, benchmarks/RESULTS.md; cell: ``stills.cell_error`` rms).  Every draw comes from
``ladder.seed``, N, the replicate and the still.  Refinement: the engine of dials.spread_refine
with its defaults (cell refined, resolution ramp, Gauss-Newton stage 1, scoring stage 2).

Cases (``case.name``; what the table holds and the truth):
  rubredoxin  built-in 1BRF, one Fe; truth Fe(III) (packaged oxidized curve), reference Fe(II)
              (packaged reduced curve); 7120 eV, 40 channels of 1 eV, 10 domains, Jungfrau 16M.
  ferredoxin  1m2a.pdb (Sauter 2020), two sites tied across the two chains by atom name: FE1
              truth Fe(III), FE2 truth Fe(II), both against the reduced curve; as rubredoxin
              otherwise (its misorientation assumed to be rubredoxin's: not yet measured).
  psii        psii_oec.pdb, MN1..MN4 (both monomers each), S1 = Mn(III, IV, IV, III) against
              Mn(III); 6550 eV, 100 channels of 1 eV, 25 domains, Jungfrau 16M, d_min 3.4 A.
  tiny        rubredoxin to 3.5 A (the CI smoke case, phil/campaign/ci_smoke.phil sets a small
              grid detector, 10 channels, 4 domains and a bright crystal: seconds per still).
``case.truth_states`` replaces the truth (one oxidation state per site, e.g. ``2 2`` for the null
control of ferredoxin), ``case.truth_shift`` makes every site's truth its reference moved by
exactly that many eV (one value, or one per site: ``2 0`` for ferredoxin's FE1, FE2); ``case.truth_prior_sigma_eV`` draws each replicate's shifts from N(0, s)
(seeded by the replicate; the refinement's prior then has the same width: the calibration
design, whose coverage and SBC ranks need the truth drawn from the prior).  ``control`` = spoil_hkl / shuffle_channels: the negative controls of
make_caches (F0, G looked up at l + 1; the channel energies of f', f'' permuted per still);
mean_spectrum: the model given the data set's mean spectrum for every still (what a channel
permutation leaves on average: the band-averaged f', f'', which still move with an edge shift).
``stills.energy_jitter_eV`` offsets each still's recorded energies by a N(0, s^2) jitter the
refinement is not told; ``refine.energy_jitter_sigma_eV`` refines each still's jitter under that
prior (the line then holds ``energy_jitter_found_eV``, in still order).

Each line: the estimates ``theta`` (eV), the ``truth`` (rigid shift of each site's true curve
onto its reference over the band, as dials.spread_refine's truth= report), ``sigma_fisher`` (the
profiled Fisher sigma at the optimum: the Cramer-Rao bound of these pixels when the model is
right), ``sigma_sandwich``, ``sigma_bootstrap`` (with refine.bootstrap > 0), with two or more
sites the pairwise ``differences`` (estimate, truth, Fisher and sandwich sigma from the
covariance), shoeboxes, pixels, seconds, peak GPU memory (``peak_gpu_bytes``), device and ``parameters`` (a hash of the PHIL
values that decide a replicate's answer: :func:`design_fingerprint`).  Resumable: an (N, replicate, seed)
already in the output file is skipped, and a replicate cut off mid-way resumes after its last
finished macrocycle (a checkpoint beside the output, <output.name>.<parameters>.N<n>.r<replicate>.checkpoint.pt,
removed once its line is written; the line's ``resumed_from_macrocycle``), whatever the shards,
ranks or device of the rerun: a replicate longer than one job spans several.  Shards
(``ladder.shards``, ``ladder.shard``): independent processes that split the (N, replicate)
pairs round-robin, one file each (several per GPU: a rubredoxin still is launch-bound, one
process leaves the GPU mostly idle); a still's seed depends only on (seed, N, replicate, still),
so the shards' lines are the unsharded run's.  --summarise
gives per (case, N) the bias, spread and mean Fisher sigma of every site and site pair, and the mean
sandwich / Fisher sigma ratio (~1 where the model fits; a misfit such as a negative control
raises it 20-1500x).  CI runs
phil/campaign/ci_smoke.phil (tests/benchmarks/test_campaign_smoke.py).  Each line also holds
the Figure 9 metric (CC, RMSD of f', f'' over the edge window) and, with refine.conventional,
the conventional route's result on the same stills; with refine.bootstrap the refits.
--summarise --plots DIR [--plan-file plan.json] draws the ladder against the planned bound and,
for prior-drawn truths, the coverage curve and SBC rank histograms
(spread_dials.validation.calibration).  The planning program for users is dials.spread_plan.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root (no install needed)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import append_record, gpu_peak_bytes, read_records, reset_gpu_peak

from spread_dials.util import phil_lite

MASTER_PHIL = """
case {
  name = *rubredoxin ferredoxin psii tiny
    .type = choice
    .help = "The case (module docstring): its table is <data>/<name>.npz (benchmarks/refine_tables.py)"
  data = bench_data
    .type = str
    .help = "Directory of the cctbx tables"
  truth_states = None
    .type = ints
    .help = "One oxidation state per site (Fe: 2 or 3; Mn: 3 or 4) instead of the case's truth"
  truth_shift = None
    .type = floats
    .help = "eV: every site's truth is its reference moved by exactly this (one value for all sites, or one per site; overrides truth_states)"
  truth_prior_sigma_eV = None
    .type = float
    .help = "eV: each replicate draws every site's truth shift from N(0, this) (its reference moved by it: the calibration design) and the refinement's edge-shift prior has this width"
}
beam {
  energy_eV = None
    .type = float
    .help = "Mean energy (eV); None: the case's (7120 Fe, 6550 Mn)"
  channels = None
    .type = int
    .help = "Spectral channels; None: the case's (40 Fe, 100 Mn)"
  channel_width_eV = 1.0
    .type = float
  photons = 1e12
    .type = float
    .help = "Photons per pulse"
  diameter_um = 1.0
    .type = float
    .help = "Diameter of the round top-hat beam (um)"
}
crystal {
  mosaic_domains = None
    .type = int
    .help = "Mosaic domains (quadrature); None: the case's (10 Fe, 25 Mn)"
  mosaic_spread_deg = 0.05
    .type = float
  domain_size_A = 4000
    .type = float
  length_um = 4
    .type = float
  ncells_abc = None
    .type = floats
    .help = "Unit cells per domain; None: derived from domain_size_A"
  spot_scale = None
    .type = float
    .help = "Domains in the beam; None: derived from the crystal and the beam"
}
detector {
  type = *jungfrau16m grid
    .type = choice
    .help = "jungfrau16m: the ideal Jungfrau 16M; grid: detector.grid's panels facing the beam"
  grid {
    n_fast = 128
      .type = int
    n_slow = 128
      .type = int
    pixel_mm = 0.1
      .type = float
    distance_mm = 40
      .type = float
    panels = 2
      .type = int
      .help = "panels x panels"
    gap_mm = 0.5
      .type = float
  }
}
stills {
  background_photons = 6.0
    .type = float
    .help = "Flat background per pixel (photons; 6: the presets' 5 um water)"
  misorientation_deg = None
    .type = float
    .help = "Median misorientation left by stills_process (deg); None: measured (rubredoxin 0.037, psii 0.072)"
  cell_error = 0.001
    .type = float
    .help = "rms fractional error of each given cell length (0: cell not refined)"
  min_bragg_photons = 20
    .type = float
  energy_jitter_eV = 0.0
    .type = float(value_min=0)
    .help = "rms of each still's recorded-energy jitter (eV; synthetic.InjectedErrors: the refinement is not told)"
}
ladder {
  n = 30
    .type = ints(value_min=1)
    .help = "Numbers of stills"
  replicates = 4
    .type = int(value_min=1)
  seed = 1
    .type = int
  shards = 1
    .type = int(value_min=1)
    .help = "Split the ladder's (N, replicate) pairs round-robin over this many independent processes (no MPI; several per GPU keep a launch-bound GPU busy); each writes <name>.shard<i>of<shards>.jsonl"
  shard = 0
    .type = int(value_min=0)
    .help = "Which of the shards this process runs (0 .. shards - 1)"
}
refine {
  macrocycles = 6
    .type = int(value_min=1)
  energy_jitter_sigma_eV = None
    .type = float
    .help = "Refine each still's energy jitter under N(0, sigma^2) (eV; the engine's energy_jitter_sigma_eV; needs stills.cell_error > 0: the cell refined)"
  sum_channels = False
    .type = bool
    .help = "Hold each still's profiles summed over the channels (the engine's sum_channels: 30-60x less GPU memory, the same converged estimates)"
  bootstrap = 0
    .type = int(value_min=0)
    .help = "Bootstrap resamples (0: none)"
  conventional = False
    .type = bool
    .help = "Also the conventional route on the same stills (spread_dials.refine.conventional: summation intensities, one energy per reflection, energy bins, per-bin f'/f'', the reference shifted to them), with the pixel route's refined crystals as its partialities"
  conventional_bin_eV = 1.0
    .type = float
    .help = "Width of the conventional route's energy bins (eV)"
  conventional_min_reflections = 20
    .type = int(value_min=1)
    .help = "Fewest reflections per energy bin (sparser bins are merged or dropped)"
}
control = *none spoil_hkl shuffle_channels mean_spectrum
  .type = choice
  .help = "Negative controls: F0, G looked up at l + 1, or f', f'' at permuted channel energies; mean_spectrum (what shuffle_channels leaves): every still's spectrum in the model replaced by the data set's mean spectrum (the stills keep their own), so only the band-averaged f', f'' inform the fit"
plan {
  probe_stills = 5
    .type = int(value_min=1)
    .help = "--plan: noise-free stills at the truth whose mean Fisher information predicts sigma(N)"
  same_stills_as_n = None
    .type = int
    .help = "--plan: probe with the ladder's own stills of this N (replicate 0) instead of independent ones (a check)"
}
output {
  directory = campaign
    .type = str
  name = None
    .type = str
    .help = "File stem; None: campaign_<case>[_<control>]"
}
device = *auto cpu cuda
  .type = choice
  .help = "auto: CUDA where torch sees a GPU (with mpi, rank r takes GPU r % n)"
mpi = False
  .type = bool
  .help = "Ranks of mpirun share each replicate's stills"
"""

# the case's own settings where PHIL leaves None
PRESETS = {
    "rubredoxin": dict(element="Fe", energy_eV=7120.0, channels=40, mosaic_domains=10, misorientation_deg=0.037),
    "ferredoxin": dict(element="Fe", energy_eV=7120.0, channels=40, mosaic_domains=10, misorientation_deg=0.037),
    "psii": dict(element="Mn", energy_eV=6550.0, channels=100, mosaic_domains=25, misorientation_deg=0.072),
    "tiny": dict(element="Fe", energy_eV=7120.0, channels=40, mosaic_domains=10, misorientation_deg=0.037),
}
# median of a Maxwell distribution is 1.538 sigma (per-axis sigma of synthetic_shots' rotation error)
MAXWELL_MEDIAN = 1.538
# the ferredoxin sites of Sauter 2020: FE1 oxidized, FE2 reduced
FERREDOXIN_TRUTH = {"FE1": 3, "FE2": 2}


class CampaignError(Exception):
    """Bad input: printed as one ``Sorry:`` line, exit status 1."""


def read_params(files: list[str], overrides: list[str], use_libtbx: bool | None = None) -> dict:
    """Flat ``{path: value}`` of :data:`MASTER_PHIL` with the PHIL ``files`` and ``key=value``
    ``overrides`` applied, through libtbx.phil where it imports (``use_libtbx`` None), else (or
    with ``use_libtbx=False``) through :mod:`spread_dials.util.phil_lite`.

    Raises:
        CampaignError: an unreadable file, an unknown parameter or a bad value.
    """
    texts = []
    for f in files:
        try:
            texts.append((Path(f).read_text(), str(f)))
        except OSError as e:
            raise CampaignError(f"cannot read the PHIL file {f}: {e.strerror}") from None
    if use_libtbx is None:
        try:
            import libtbx.phil  # noqa: F401
        except ImportError:
            use_libtbx = False
        else:
            use_libtbx = True
    if use_libtbx:
        return _read_libtbx(texts, overrides)
    try:
        master = phil_lite.parse_master(MASTER_PHIL)
        return phil_lite.apply_overrides(master, phil_lite.fetch(master, texts), overrides)
    except phil_lite.PhilError as e:
        raise CampaignError(str(e)) from None


def _read_libtbx(texts: list[tuple[str, str]], overrides: list[str]) -> dict:
    import libtbx
    import libtbx.phil
    from libtbx.utils import Sorry

    master = libtbx.phil.parse(MASTER_PHIL)
    try:
        sources = [libtbx.phil.parse(text, source_info=origin) for text, origin in texts]
        interpreter = master.command_line_argument_interpreter()
        sources += [interpreter.process(arg) for arg in overrides]
        working, unused = master.fetch(sources=sources, track_unused_definitions=True)
        if unused:
            raise CampaignError(f"unknown parameter {unused[0].path!r} ({unused[0].object.where_str.strip()})")
        values = {d.path: d.object.extract() for d in working.all_definitions()}
        return {k: "auto" if v is libtbx.Auto else v for k, v in values.items()}  # as phil_lite gives it
    except (Sorry, RuntimeError) as e:
        raise CampaignError(str(e).splitlines()[0]) from None


def _still_seed(seed: int, n: int, replicate: int, index: int) -> int:
    """A reproducible seed per still, distinct across (seed, N, replicate, still)."""
    return int(np.random.SeedSequence([seed, n, replicate, index]).generate_state(1)[0])


def _curve(z, prefix: str, label: str):
    from spread_dials.physics.anomalous import TabulatedCurve

    return TabulatedCurve(torch.as_tensor(z[f"{prefix}_energy"]), torch.as_tensor(z[f"{prefix}_fp"]),
                          torch.as_tensor(z[f"{prefix}_fdp"]), label)  # fmt: skip


def _panels(params, energy_eV: float):
    from spread_dials.detectors.jungfrau import jungfrau16m_panel_array
    from spread_dials.detectors.layout import panel_array_from_layout
    from spread_dials.detectors.simple import simple_detector

    if params.detector.type == "jungfrau16m":
        return jungfrau16m_panel_array(energy_eV=energy_eV)
    g = params.detector.grid
    return panel_array_from_layout(simple_detector(g.n_fast, g.n_slow, g.pixel_mm, g.distance_mm, g.panels, g.panels,
                                                   gap_mm=g.gap_mm))  # fmt: skip


def build_case(params) -> dict:
    """Everything a replicate needs, on the CPU, from the parameters (a :func:`phil_lite.as_namespace`).

    Returns a dict: name, labels (S,), energy (C,) eV, table / truth StructureFactors (the
    truth with f', f'' (S, C)), references and truth_curves (S TabulatedCurves), model (the
    refinement's CrystalModel, also the stills'), real_space (3, 3) A, spot_scale, panels,
    orientation_error_deg (per-axis sigma, deg).

    Raises:
        CampaignError: a missing table, truth states that do not fit the case, or a jitter
            prior that is not positive or comes without the cell refined.
    """
    jitter = params.refine.energy_jitter_sigma_eV
    if jitter is not None and not jitter > 0:
        raise CampaignError(f"refine.energy_jitter_sigma_eV must be > 0 eV (or None), not {jitter}")
    if jitter is not None and not params.stills.cell_error > 0:
        raise CampaignError("refine.energy_jitter_sigma_eV needs the cell refined (stills.cell_error > 0): a jitter moves "
                            "every spot's Bragg condition, which only a cell scale absorbs")  # fmt: skip
    from spread_dials.io.anomalous_tables import read_anomalous_table
    from spread_dials.io.builtin_references import builtin_fe_reference_paths
    from spread_dials.physics.crystal import real_space_from_cell
    from spread_dials.physics.microcrystal import brightness
    from spread_dials.physics.structure_factors import StructureFactors
    from spread_dials.refine.profiles import CrystalModel

    name = params.case.name
    preset = PRESETS[name]
    path = Path(params.case.data) / f"{name}.npz"
    if not path.is_file():
        raise CampaignError(f"no table {path}: make it with benchmarks/refine_tables.py --out {params.case.data} "
                            f"--cases {name}")  # fmt: skip
    z = np.load(path)
    cell = tuple(float(x) for x in z["cell"])
    hkl = torch.as_tensor(z["miller_index"].astype(np.int64))
    F0 = torch.as_tensor(z["F0"]).to(torch.complex128)
    G = torch.as_tensor(z["G"]).to(torch.complex128)
    labels = [str(x) for x in z["site_labels"]]
    n_sites = G.shape[1]
    mean_eV = params.beam.energy_eV or preset["energy_eV"]
    channels = params.beam.channels or preset["channels"]
    energy = mean_eV + (torch.arange(channels, dtype=torch.float64) - (channels - 1) / 2) * params.beam.channel_width_eV
    if preset["element"] == "Fe":
        paths = builtin_fe_reference_paths()
        states = {s: read_anomalous_table(p) for s, p in paths.items()}
        reference_state = 2
        if name == "ferredoxin":
            truth_states = [FERREDOXIN_TRUTH[label.split()[0]] for label in labels]
        else:
            truth_states = [3] * n_sites
    else:
        states = {3: _curve(z, "mn3", "Mn(III)"), 4: _curve(z, "mn4", "Mn(IV)")}
        reference_state = 3
        truth_states = [3, 4, 4, 3][:n_sites]  # S1: MN1(III) MN2(IV) MN3(IV) MN4(III)
    if params.case.truth_states is not None:
        truth_states = list(params.case.truth_states)
        if len(truth_states) != n_sites or any(s not in states for s in truth_states):
            raise CampaignError(f"case.truth_states: give one of the states {sorted(states)} for each of the "
                                f"{n_sites} sites {labels}, not {truth_states}")  # fmt: skip
    references = [states[reference_state]] * n_sites
    truth_curves = [states[s] for s in truth_states]
    if params.case.truth_shift is not None:  # each site's truth: its reference moved by exactly this
        shifts = list(params.case.truth_shift)
        if len(shifts) not in (1, n_sites):
            raise CampaignError(f"case.truth_shift: give one shift (eV) for all sites or one for each of the "
                                f"{n_sites} sites {labels}, not {shifts}")  # fmt: skip
        truth_curves = [r.shifted(d) for r, d in zip(references, shifts * n_sites if len(shifts) == 1 else shifts)]
        truth_states = None
    table = StructureFactors(hkl, F0, G)
    c = params.crystal
    bright = brightness(cell, c.domain_size_A, c.length_um, params.beam.diameter_um, ncells_abc=c.ncells_abc,
                        spot_scale=c.spot_scale)  # fmt: skip
    fluence = params.beam.photons / (math.pi / 4.0 * (params.beam.diameter_um * 1e-6) ** 2)
    domains = c.mosaic_domains or preset["mosaic_domains"]
    model = CrystalModel(bright.ncells_abc, c.mosaic_spread_deg, domains, "gauss", 7, fluence, 1, "quadrature")
    misorientation = params.stills.misorientation_deg or preset["misorientation_deg"]
    return dict(
        name=name, cell=cell, real_space=real_space_from_cell(torch.tensor(cell, dtype=torch.float64)),
        truth=_with_curves(table, truth_curves, energy), table=table, energy=energy,
        references=references, truth_curves=truth_curves, truth_states=truth_states, labels=labels, model=model,
        spot_scale=bright.spot_scale, ncells=bright.ncells_abc, panels=_panels(params, mean_eV),
        orientation_error_deg=misorientation / MAXWELL_MEDIAN,
    )  # fmt: skip


def _with_curves(table, curves: list, energy: torch.Tensor):
    """``table``'s F0 and G with f', f'' (S, C) of the curves (one per site) at ``energy`` (C,) eV."""
    from spread_dials.physics.structure_factors import StructureFactors

    fp = torch.stack([c.at(energy)[0] for c in curves])
    fdp = torch.stack([c.at(energy)[1] for c in curves])
    return StructureFactors(table.miller_index, table.F0, table.G, fp, fdp)


def pair_differences(theta: list[float], truth: list[float], covariances: dict, labels: list[str]) -> list[dict]:
    """Every pair i < j of sites: theta_i - theta_j, its truth, and its sigma from each
    covariance (P, P) in ``covariances`` (``{"fisher": C, ...}``; C None: sigma None):
    sqrt(C_ii + C_jj - 2 C_ij)."""
    from spread_dials.refine.planning import difference_variance, site_pairs

    out = []
    for i, j in site_pairs(len(theta)):
        row = {"sites": [labels[i], labels[j]], "estimate": theta[i] - theta[j], "truth": truth[i] - truth[j]}
        for key, cov in covariances.items():
            row[f"sigma_{key}"] = None if cov is None else math.sqrt(max(difference_variance(cov, i, j), 0.0))
        out.append(row)
    return out


def truth_shifts(case: dict) -> list[float]:
    """Each site's true edge shift (eV): the rigid shift of its true curve onto its reference over
    the band inside the outer channels (as dials.spread_refine's truth= report)."""
    from spread_dials.refine.references import rigid_shift_eV

    band = (float(case["energy"][1]), float(case["energy"][-2]))
    return [rigid_shift_eV(c, r, *band) for c, r in zip(case["truth_curves"], case["references"])]


def plan(case: dict, params, device: torch.device) -> dict:
    """Predicted sigma of every site and pairwise difference at each ``ladder.n`` from the mean
    profiled Fisher information of ``plan.probe_stills`` noise-free stills at the truth
    (:mod:`spread_dials.refine.planning`), and the pseudo-true edge shifts (the refinement on
    those noise-free stills: what the estimates converge to, against which a bias is measured
    when the truth is not a moved reference)."""
    from spread_dials.refine.engine import RefineSettings
    from spread_dials.refine.planning import predicted_covariance, probe_stills, pseudo_true, still_information
    from spread_dials.refine.sites import EdgeShiftSites

    t0 = time.perf_counter()
    reset_gpu_peak(device)
    seed, k = params.ladder.seed, params.plan.probe_stills
    probe_n = params.plan.same_stills_as_n
    seeds = [_still_seed(seed, probe_n, 0, i) if probe_n else _still_seed(seed, 0, 0, i) for i in range(k)]  # (N = 0: never a ladder point)
    shot_set = probe_stills(case["panels"], case["truth"], case["model"], case["real_space"], case["energy"], seeds,
                            case["spot_scale"], params.stills.background_photons, params.stills.min_bragg_photons,
                            device)  # fmt: skip
    sites = EdgeShiftSites(case["references"], list(range(len(case["references"]))), case["labels"])
    truth = truth_shifts(case)
    settings = RefineSettings(refine_cell=params.stills.cell_error > 0)
    info = still_information(shot_set, case["table"], case["model"], sites, torch.tensor(truth, dtype=torch.float64),
                             case["spot_scale"], params.stills.background_photons, settings)  # fmt: skip
    per_still = [float(x) for x in info.per_still[:, 0, 0]]
    limit = pseudo_true(shot_set, case["table"], case["model"], sites,
                        RefineSettings(refine_cell=settings.refine_cell, macrocycles=12, parameter_tolerance=1e-5))  # fmt: skip
    rows = {}
    for n in params.ladder.n:
        cov = predicted_covariance(info, n)
        rows[str(n)] = {"sigma_eV": cov.diagonal().sqrt().tolist(),
                        "differences": pair_differences(truth, truth, {"predicted": cov}, case["labels"])}  # fmt: skip
        for d in rows[str(n)]["differences"]:
            del d["estimate"]
    return {"case": case["name"], "sites": case["labels"], "truth": truth, "pseudo_true": limit.tolist(), "probe_stills": k,
            "probe_seeds_of_n": probe_n, "information_per_still_site0_eV-2": per_still,
            "mean_information_per_still": info.mean.tolist(), "predicted": rows,
            "seconds": time.perf_counter() - t0, "peak_gpu_bytes": gpu_peak_bytes(device)}  # fmt: skip


def run_replicate(case: dict, n: int, replicate: int, params, comm, device: torch.device,
                  checkpoint: tuple[Path, str] | None = None) -> dict | None:  # fmt: skip
    """Refine one replicate of ``n`` stills (this rank's share); the record on the root rank.
    ``checkpoint`` (path, fingerprint): written after every macrocycle, and resumed from when it
    is there (dials.spread_refine's checkpoint: spread_dials.refine.run), so a replicate longer
    than one job goes on where the last stopped."""
    from spread_dials.refine.engine import (
        MissingReflectionsError,
        Refinement,
        RefineSettings,
        channel_summer,
        make_caches,
    )
    from spread_dials.refine.run import (
        StillsProgress,
        checkpoint_saver,
        load_checkpoint,
        restore_checkpoint,
        saved_cache_points,
        saved_summed_points,
    )
    from spread_dials.refine.shots import ShotSet
    from spread_dials.refine.sites import EdgeShiftSites
    from spread_dials.refine.synthetic import InjectedErrors, synthetic_shots
    from spread_dials.refine.uncertainty import bootstrap, curvature
    from spread_dials.util.errors import SpreadError
    from spread_dials.validation.anomalous import figure9_report

    t0 = time.perf_counter()
    reset_gpu_peak(device)
    seed = params.ladder.seed
    cell_error = params.stills.cell_error
    prior_sigma = params.case.truth_prior_sigma_eV
    case = dict(case)
    if prior_sigma is not None:  # this replicate's truth, drawn from the prior
        rng = np.random.default_rng(np.random.SeedSequence([seed, n, replicate, 2**31 - 1]))
        shifts = rng.normal(0.0, prior_sigma, size=len(case["references"]))
        case["truth_curves"] = [r.shifted(float(d)) for r, d in zip(case["references"], shifts)]
        case["truth"] = _with_curves(case["truth"], case["truth_curves"], case["energy"])
    mine = list(range(comm.rank, n, comm.size))
    model = case["model"]
    jitter = params.stills.energy_jitter_eV
    errors = InjectedErrors(energy_jitter_eV=jitter) if jitter > 0 else None
    shots, base = [], None
    simulated = StillsProgress(len(mine), "simulated")
    for k, i in enumerate(mine):
        made, _ = synthetic_shots(case["panels"], case["truth"], model, case["real_space"], case["energy"], 1,
                                  seed=_still_seed(seed, n, replicate, i), spot_scale=case["spot_scale"],
                                  background_photons=params.stills.background_photons,
                                  orientation_error_deg=case["orientation_error_deg"], cell_error_fraction=cell_error,
                                  min_bragg_photons=params.stills.min_bragg_photons, device=device, errors=errors)  # fmt: skip
        shots.append(made.shots[0])
        base = made
        simulated(k + 1, len(mine))
    if base is None:
        raise CampaignError(f"ladder.n = {n} gives rank {comm.rank} of {comm.size} no still: use n >= ranks")
    control = params.control
    if control == "mean_spectrum":  # the model sees the data set's mean spectrum, each still's data its own
        mean = torch.as_tensor(comm.allreduce(sum(s.weight.cpu().numpy() for s in shots)) / n)
        shots = [replace(s, weight=mean.to(s.weight)) for s in shots]
    shot_set = ShotSet(base.panels, base.beam_direction, base.e_vector, base.polarization_fraction, shots,
                       [f"still {i}" for i in mine]).to(device)  # fmt: skip
    saved = None
    if checkpoint is not None:
        try:
            saved = load_checkpoint(*checkpoint)
        except SpreadError as e:
            raise CampaignError(str(e)) from None
    rotations, cells = saved_cache_points(saved, shot_set, cell_error > 0, device) if saved is not None else (None, None)
    sites = EdgeShiftSites(case["references"], list(range(len(case["references"]))), case["labels"],
                           prior_sigma_eV=10.0 if prior_sigma is None else prior_sigma)  # (10: the engine's default)
    settings = RefineSettings(macrocycles=params.refine.macrocycles, refine_cell=cell_error > 0,
                              energy_jitter_sigma_eV=params.refine.energy_jitter_sigma_eV,
                              sum_channels=params.refine.sum_channels)  # fmt: skip
    summed = saved_summed_points(saved, shot_set) if saved is not None else None
    try:
        caches = make_caches(shot_set, case["table"], model, rotations, refine_cell=cell_error > 0, cells=cells,
                             spoil_hkl=control == "spoil_hkl",
                             shuffle_seed=_still_seed(seed, n, replicate, n) if control == "shuffle_channels" else None,
                             reduce=channel_summer(sites, sites.initial(), settings, summed))  # fmt: skip
    except MissingReflectionsError as e:
        raise CampaignError(f"{e} (make the table to the detector's reach)") from None
    if comm.is_root:
        print(f"N={n} replicate {replicate}: {len(mine)} stills' caches made, {time.perf_counter() - t0:.0f} s", flush=True)
    refinement = Refinement(shot_set, mine, n, caches, [], sites, sites.initial(), model, comm, settings)
    start = restore_checkpoint(refinement, saved, cell_error > 0, device) if saved is not None else 0
    if saved is None:
        refinement.initialise_states()
    refinement.run(start, on_macrocycle=None if checkpoint is None else checkpoint_saver(*checkpoint, comm),
                   progress=StillsProgress(len(mine)))
    cov = curvature(refinement, observed=False)
    draws = bootstrap(refinement, params.refine.bootstrap, seed) if params.refine.bootstrap else None
    counts = comm.allreduce(np.array([sum(s.shoeboxes.n_shoeboxes for s in shots), sum(s.shoeboxes.n_pixels for s in shots)]))
    conventional = conventional_route(refinement, case, params, comm) if params.refine.conventional else None
    found_jitter = None  # each still's refined jitter (eV), in still order
    if params.refine.energy_jitter_sigma_eV is not None:
        pairs = comm.allgather([(i, float(s.energy_offset)) for i, s in zip(mine, refinement.states)])
        found_jitter = [value for _, value in sorted(pair for part in pairs for pair in part)]
    if not comm.is_root:
        return None
    elements = [PRESETS[case["name"]]["element"]] * len(case["labels"])
    figure9 = figure9_report(sites, refinement.theta, case["truth_curves"], case["labels"], elements, case["references"])
    truth = truth_shifts(case)
    theta = refinement.theta.tolist()
    boot = None if draws is None or draws.shape[0] < 2 else torch.cov(draws.T).reshape(len(theta), len(theta))
    sigma = lambda m: None if m is None else m.diag().clamp(min=0).sqrt().tolist()  # noqa: E731
    return {
        "case": case["name"], "n": n, "replicate": replicate, "seed": seed, "sites": case["labels"],
        "truth_states": None if prior_sigma is not None else case["truth_states"], "control": control,
        "theta": theta, "truth": truth, "sigma_fisher": sigma(cov.profiled), "sigma_sandwich": sigma(cov.sandwich),
        "sigma_bootstrap": sigma(boot),
        "bootstrap_draws": None if draws is None else draws.tolist(),
        "differences": pair_differences(theta, truth, {"fisher": cov.profiled, "sandwich": cov.sandwich,
                                                       "bootstrap": boot}, case["labels"]),
        "figure9": figure9, "conventional": conventional, "shoeboxes": int(counts[0]), "pixels": int(counts[1]),
        "macrocycles": len(refinement.history), "ranks": comm.size, "device": str(device),
        "cell_error": cell_error, "truth_shift": params.case.truth_shift, "truth_prior_sigma_eV": prior_sigma,
        "energy_jitter_eV": jitter, "energy_jitter_sigma_eV": params.refine.energy_jitter_sigma_eV, "sum_channels": params.refine.sum_channels,
        "energy_jitter_found_eV": found_jitter,
        "seconds": time.perf_counter() - t0, "peak_gpu_bytes": gpu_peak_bytes(device), "resumed_from_macrocycle": start,
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


#: stills whose per-channel profiles the conventional route holds at once (~37 MB each for rubredoxin)
CONVENTIONAL_STILLS = 256


def conventional_route(refinement, case: dict, params, comm) -> dict | None:
    """The conventional route (spread_dials.refine.conventional) on this replicate's stills:
    summation intensities with partialities and energies from the profiles at the pixel route's
    refined crystals, gathered on the root rank; there its edge shifts, their sigma (counting
    noise only) and the bins, or the reason it could not fit (too few reflections per bin)."""
    from spread_dials.refine.conventional import (
        Reflections,
        edge_shifts_from_bins,
        energy_bins,
        fit_binned,
        summation_reflections,
    )
    from spread_dials.refine.engine import make_caches

    shots, states, pieces = refinement.shots, refinement.states, []
    for start in range(0, len(shots.shots), CONVENTIONAL_STILLS):  # per-channel profiles of a few hundred stills at a time
        part = range(start, min(start + CONVENTIONAL_STILLS, len(shots.shots)))
        sub = shots.select(part)
        caches = make_caches(sub, case["table"], case["model"], [states[i].rotation for i in part],
                             refine_cell=params.stills.cell_error > 0, cells=[states[i].cell for i in part])  # fmt: skip
        piece = summation_reflections(caches, [s.shoeboxes for s in sub.shots])
        pieces.append(replace(piece, still=torch.as_tensor(refinement.shot_index)[piece.still + start]))  # the global still index
    parts = comm.gather(Reflections.concatenate(pieces))
    if not comm.is_root:
        return None
    refl = Reflections.concatenate(parts)
    references = case["references"]
    try:
        edges = energy_bins(refl.energy_eV, params.refine.conventional_bin_eV, params.refine.conventional_min_reflections)
        centres = 0.5 * (edges[1:] + edges[:-1])
        start = tuple(torch.stack([c.at(centres)[k] for c in references], -1) for k in (0, 1))
        fit = fit_binned(refl, refinement.n_shots, edges, start)
        theta, cov = edge_shifts_from_bins(fit, references)
    except (ValueError, RuntimeError) as e:  # too few reflections, or a singular bin
        return {"error": str(e).splitlines()[0], "reflections": int(refl.intensity.numel())}
    return {"theta": theta.tolist(), "sigma": cov.diagonal().clamp(min=0).sqrt().tolist(),
            "bins_eV": edges.tolist(), "reflections_per_bin": fit.reflections.tolist(),
            "reflections": int(refl.intensity.numel()), "bin_width_eV": params.refine.conventional_bin_eV}  # fmt: skip


def _stats(error: np.ndarray, fisher: np.ndarray) -> dict:
    """Bias, spread (ddof 1; NaN from one replicate), mean Fisher sigma, their ratio and the
    fractions of |z| < 1, 2 of errors (R, K) against their Fisher sigmas (R, K)."""
    spread = error.std(0, ddof=1) if error.shape[0] > 1 else np.full(error.shape[1], np.nan)
    z = error / fisher
    return {
        "bias_eV": error.mean(0).round(4).tolist(), "spread_eV": spread.round(4).tolist(),
        "sigma_fisher_eV": fisher.mean(0).round(4).tolist(), "spread_over_fisher": (spread / fisher.mean(0)).round(3).tolist(),
        "within_1_fisher_sigma": (np.abs(z) < 1).mean(0).round(3).tolist(),
        "within_2_fisher_sigma": (np.abs(z) < 2).mean(0).round(3).tolist(),
    }  # fmt: skip


def _records(paths: list[Path]) -> list[dict]:
    """Every line of the campaign files ``paths`` (e.g. the shards of one ladder)."""
    return [r for path in paths for r in read_records(path)]


def summarise(paths: list[Path], plan: dict | None = None) -> dict:
    """Per (case, N, control, truth): replicates, bias and spread of each site's estimate, mean Fisher sigma,
    the spread over the mean Fisher sigma, the fraction of |z| < 1, 2 and the Figure 9 metric's means; with two or more
    sites the same for every pairwise difference, plus its mean estimate and truth and
    ``z_mean`` = mean difference / mean Fisher sigma (how many sigma one data set separates them).
    With a --plan output ``plan`` that has ``pseudo_true``: the bias of each site and pair from
    the pseudo-true values too (eV and in mean Fisher sigmas; what to judge the refinement by
    when the truth is a curve the edge-shift model cannot reach)."""
    from spread_dials.refine.planning import site_pairs
    from spread_dials.validation.calibration import calibration_summary

    rows = _records(paths)
    out = {}
    design = lambda r: (r["case"], r["n"], r.get("control", "none"), json.dumps(r.get("truth_states")))  # noqa: E731
    keys = sorted({design(r) for r in rows})
    for key in keys:
        group = [r for r in rows if design(r) == key]
        label = f"{key[0]} N={key[1]}" + ("" if key[2] == "none" else f" {key[2]}")
        if sum(k[:3] == key[:3] for k in keys) > 1:  # other truths beside in these files
            label += f" truth_states={key[3]}"
        theta = np.array([r["theta"] for r in group])
        truth = np.array([r["truth"] for r in group])
        fisher = np.array([r["sigma_fisher"] for r in group], dtype=float)
        entry = {"replicates": len(group), "sites": group[0]["sites"], **_stats(theta - truth, fisher)}
        sandwich = [r.get("sigma_sandwich") for r in group]
        if all(s is not None for s in sandwich):  # ~1 where the model fits; the negative controls: 20-1500
            entry["sandwich_over_fisher"] = (np.array(sandwich, dtype=float) / fisher).mean(0).round(2).tolist()
        limit = np.array(plan["pseudo_true"]) if plan and plan.get("pseudo_true") else None
        if limit is not None:
            bias = theta.mean(0) - limit
            entry["bias_from_pseudo_true_eV"] = bias.round(4).tolist()
            entry["bias_from_pseudo_true_sigma"] = (bias / fisher.mean(0)).round(2).tolist()
        conv = [r.get("conventional") for r in group]
        if all(c and "theta" in c for c in conv):  # the conventional route beside
            err = np.array([c["theta"] for c in conv]) - truth
            entry["conventional"] = _stats(err, np.array([c["sigma"] for c in conv], dtype=float))
        if all(r.get("figure9") for r in group):  # Sauter 2020 Figure 9: CC, RMSD of f', f'' over the edge window
            metrics = ("cc_f_prime", "rmsd_f_prime_e", "cc_f_double_prime", "rmsd_f_double_prime_e")
            entry["figure9_mean"] = {label: {m: round(float(np.mean([r["figure9"][label][m] for r in group])), 4)
                                             for m in metrics} for label in group[0]["figure9"]}  # fmt: skip
        diffs = [r.get("differences") or [] for r in group]
        if diffs and diffs[0]:
            est = np.array([[d["estimate"] for d in row] for row in diffs])
            tru = np.array([[d["truth"] for d in row] for row in diffs])
            sig = np.array([[d["sigma_fisher"] for d in row] for row in diffs], dtype=float)
            entry["differences"] = {
                "pairs": [d["sites"] for d in diffs[0]], "estimate_eV": est.mean(0).round(4).tolist(),
                "truth_eV": tru.mean(0).round(4).tolist(), **_stats(est - tru, sig),
                "z_mean": (est.mean(0) / sig.mean(0)).round(2).tolist(),
            }  # fmt: skip
            if limit is not None:
                bias = est.mean(0) - np.array([limit[i] - limit[j] for i, j in site_pairs(len(limit))])
                entry["differences"]["bias_from_pseudo_true_eV"] = bias.round(4).tolist()
                entry["differences"]["bias_from_pseudo_true_sigma"] = (bias / sig.mean(0)).round(2).tolist()
        if all(r.get("truth_prior_sigma_eV") is not None for r in group):
            entry["calibration"] = {k: calibration_summary(pit) for k, pit in calibration_pits(group).items()}
        out[label] = entry
    return out


def calibration_pits(group: list[dict]) -> dict[str, np.ndarray]:
    """{"<site or pair> <method>": (R,) PIT of the truth} over the replicates in ``group`` (one
    (case, N)): the curvature (N(theta, sigma_fisher^2)), the sandwich where every replicate has
    one, and the bootstrap's refits (rank of the truth among them) where every replicate has them;
    pairwise differences likewise (bootstrap: differences of the refits)."""
    from spread_dials.validation.calibration import draws_pit, gaussian_pit

    rng = np.random.default_rng(np.random.SeedSequence([group[0]["seed"], group[0]["n"], 12]))  # the jitter of tied ranks
    theta = np.array([r["theta"] for r in group])
    truth = np.array([r["truth"] for r in group])
    out = {}
    for j, label in enumerate(group[0]["sites"]):
        for method in ("fisher", "sandwich"):
            sig = [r[f"sigma_{method}"] for r in group]
            if all(s is not None for s in sig):
                out[f"{label} {method}"] = gaussian_pit(theta[:, j], np.array(sig)[:, j], truth[:, j])
        if all(r.get("bootstrap_draws") for r in group):
            out[f"{label} bootstrap"] = draws_pit(np.array([np.array(r["bootstrap_draws"])[:, j] for r in group]), truth[:, j], rng)
    for k, pair in enumerate((group[0].get("differences") or [])):
        name = " - ".join(pair["sites"])
        i, j = (group[0]["sites"].index(s) for s in pair["sites"])
        rows = [r["differences"][k] for r in group]
        est, tru = np.array([d["estimate"] for d in rows]), np.array([d["truth"] for d in rows])
        for method in ("fisher", "sandwich"):
            if all(d[f"sigma_{method}"] is not None for d in rows):
                out[f"{name} {method}"] = gaussian_pit(est, np.array([d[f"sigma_{method}"] for d in rows]), tru)
        if all(r.get("bootstrap_draws") for r in group):
            draws = np.array([np.array(r["bootstrap_draws"])[:, i] - np.array(r["bootstrap_draws"])[:, j] for r in group])
            out[f"{name} bootstrap"] = draws_pit(draws, tru, rng)
    return out


def plot_campaign(paths: list[Path], directory: Path, plan: dict | None = None) -> list[Path]:
    """PNGs of campaign files into ``directory`` (named after the first path): for a ladder of
    two or more N (each with replicates) the measured spread and mean Fisher sigma against N per
    site and pair, beside the planned bound of ``plan`` (a --plan output); per (case, N) with a
    prior-drawn truth the coverage curve and the SBC rank histograms of every interval."""
    from spread_dials.plots.calibration import plot_coverage, plot_rank_histograms
    from spread_dials.plots.planning import plot_ladder

    path = paths[0]
    rows = _records(paths)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    summary = summarise(paths)
    predicted = {}
    if plan is not None:
        predicted = {int(n): entry for n, entry in plan["predicted"].items()}
    for case in sorted({r["case"] for r in rows}):
        entries = {int(k.split("N=")[1]): v for k, v in summary.items()  # (the ladder: no control, one truth)
                   if k.startswith(f"{case} N=") and " " not in k.split("N=")[1]}  # fmt: skip
        entries = {n: e for n, e in entries.items() if e["replicates"] > 1}
        if len(entries) < 2:
            continue
        sites = next(iter(entries.values()))["sites"]
        for j, label in enumerate(sites):
            ladder = {n: {"spread": e["spread_eV"][j], "fisher": e["sigma_fisher_eV"][j], "replicates": e["replicates"]}
                      for n, e in entries.items()}  # fmt: skip
            bound = {n: p["sigma_eV"][j] for n, p in predicted.items()} if predicted else None
            name = label.replace("/", "_").replace(" ", "_")
            written.append(plot_ladder(ladder, directory / f"{path.stem}_ladder_{name}.png", bound, f"{case}: {label}"))
        pairs = next(iter(entries.values())).get("differences")
        for k, pair in enumerate(pairs["pairs"] if pairs else []):
            ladder = {n: {"spread": e["differences"]["spread_eV"][k], "fisher": e["differences"]["sigma_fisher_eV"][k],
                          "replicates": e["replicates"]} for n, e in entries.items()}  # fmt: skip
            bound = {n: p["differences"][k]["sigma_predicted"] for n, p in predicted.items()} if predicted else None
            name = "-".join(s.split()[0].replace("/", "_") for s in pair)
            written.append(plot_ladder(ladder, directory / f"{path.stem}_ladder_{name}.png", bound, f"{case}: {' - '.join(pair)}"))
    for case, n in sorted({(r["case"], r["n"]) for r in rows}):
        group = [r for r in rows if (r["case"], r["n"]) == (case, n)]
        if not all(r.get("truth_prior_sigma_eV") is not None for r in group):
            continue
        pits = calibration_pits(group)
        title = f"{case}, {n} stills per data set, truth ~ N(0, {group[0]['truth_prior_sigma_eV']} eV)"
        written.append(plot_coverage(pits, directory / f"{path.stem}_N{n}_coverage.png", title))
        written.append(plot_rank_histograms(pits, directory / f"{path.stem}_N{n}_sbc.png", title=title))
    return written


FLAG_TO_PHIL = {
    "case": "case.name", "data": "case.data", "n": "ladder.n", "replicates": "ladder.replicates", "seed": "ladder.seed",
    "macrocycles": "refine.macrocycles", "bootstrap": "refine.bootstrap", "cell_error": "stills.cell_error",
    "truth_shift": "case.truth_shift", "device": "device", "out": "output.directory",
}  # fmt: skip


def _output_stem(params) -> str:
    return params.output.name or f"campaign_{params.case.name}" + ("" if params.control == "none" else f"_{params.control}")


def output_path(params) -> Path:
    stem, shards = _output_stem(params), params.ladder.shards
    return Path(params.output.directory) / (f"{stem}.jsonl" if shards == 1 else f"{stem}.shard{params.ladder.shard}of{shards}.jsonl")


def checkpoint_path(params, design: str, n: int, replicate: int) -> Path:
    """The mid-replicate checkpoint of (N, replicate) beside the output, named without the shard
    so that a rerun with other shards finds it."""
    return Path(params.output.directory) / f"{_output_stem(params)}.{design}.N{n}.r{replicate}.checkpoint.pt"


#: PHIL values that do not change a replicate's answer: where it is written, how the ladder is
#: split into jobs, and where it runs (ranks sum in still order, so any number gives the serial answer)
NOT_IN_FINGERPRINT = ("output.", "ladder.n", "ladder.replicates", "ladder.shard", "ladder.shards", "mpi", "device")


def design_fingerprint(flat: dict) -> str:
    """10 hex digits of a hash of the PHIL values ``flat`` (name -> value) that decide a
    replicate's answer (all but :data:`NOT_IN_FINGERPRINT`): the records' ``parameters`` and the
    checkpoints' key.  (Until session 15 every value was hashed, so a checkpoint moved to
    another output.directory was not resumed.)"""
    kept = {k: v for k, v in flat.items() if not any(k == x or (x.endswith(".") and k.startswith(x)) for x in NOT_IN_FINGERPRINT)}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="PHIL files (*.phil) and key=value arguments set the parameters (--show-phil)")  # fmt: skip
    ap.add_argument("phil", nargs="*", help="PHIL files and key=value overrides")
    for flag in FLAG_TO_PHIL:
        ap.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=f"= {FLAG_TO_PHIL[flag]}")
    ap.add_argument("--mpi", action="store_true", help="= mpi=True")
    ap.add_argument("--summarise", nargs="+", default=None, help="print the summary of campaign files (e.g. a ladder's shards) and stop")
    ap.add_argument("--plots", default=None, help="with --summarise: write the ladder and calibration PNGs into this directory")
    ap.add_argument("--plan-file", default=None, help="with --summarise: a --plan output (JSON): biases from its pseudo-true shifts; with --plots its bound in the ladder plots")
    ap.add_argument("--show-phil", action="store_true", help="print the parameters with their values and stop")
    ap.add_argument("--plan", action="store_true",
                    help="print each site's predicted sigma at every ladder.n from the Fisher information and stop")
    ap.add_argument("--phil-reader", choices=("auto", "libtbx", "lite"), default="auto")
    args = ap.parse_intermixed_args(argv)
    try:
        if args.summarise:
            paths = [Path(p) for p in args.summarise]
            for path in paths:
                if not path.is_file():
                    raise CampaignError(f"no campaign file {path}")
            plan = None
            if args.plan_file:
                try:
                    plan = json.loads(Path(args.plan_file).read_text())
                except (OSError, ValueError) as e:
                    raise CampaignError(f"cannot read the plan {args.plan_file}: {e}") from None
            print(json.dumps(summarise(paths, plan), indent=1))
            if args.plots:
                for png in plot_campaign(paths, Path(args.plots), plan):
                    print(f"wrote {png}")
            return 0
        files = [a for a in args.phil if "=" not in a]
        overrides = [a for a in args.phil if "=" in a]
        overrides += [f"{FLAG_TO_PHIL[k]}={getattr(args, k)}" for k in FLAG_TO_PHIL if getattr(args, k) is not None]
        overrides += ["mpi=True"] if args.mpi else []
        reader = {"auto": None, "libtbx": True, "lite": False}[args.phil_reader]
        flat = read_params(files, overrides, use_libtbx=reader)
        if args.show_phil:
            print("\n".join(f"{k} = {v}" for k, v in flat.items()))
            return 0
        return run_campaign(flat, plan_only=args.plan)
    except CampaignError as e:
        print(f"Sorry: {e}", file=sys.stderr)
        return 1


def run_campaign(flat: dict, plan_only: bool = False) -> int:
    """Every (N, replicate) of the ladder not yet in the output file, appended as JSON lines
    (``plan_only``: print the planning prediction, :func:`plan`, and stop)."""
    from spread_dials.parallel import mpi_context
    from spread_dials.util.device import select_device
    from spread_dials.util.errors import SpreadError

    params = phil_lite.as_namespace(flat)
    comm = mpi_context("mpi" if params.mpi else "serial")
    try:
        device = select_device(params.device, rank=comm.rank)
    except SpreadError as e:
        raise CampaignError(str(e)) from None
    case = build_case(params)
    if plan_only:
        if comm.is_root:
            print(json.dumps(plan(case, params, device), indent=1))
        return 0
    if comm.is_root:  # the engine's macrocycle lines (NLL, edge shifts, seconds) as progress
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    out = output_path(params)
    done = {(r["n"], r["replicate"], r["seed"]) for r in read_records(out, repair=comm.is_root)}
    if comm.is_root:
        out.parent.mkdir(parents=True, exist_ok=True)
    design = design_fingerprint(flat)
    seed = params.ladder.seed
    if not 0 <= params.ladder.shard < params.ladder.shards:
        raise CampaignError(f"ladder.shard = {params.ladder.shard} is not one of the {params.ladder.shards} shards (0 .. shards - 1)")
    pairs = [(n, r) for n in params.ladder.n for r in range(params.ladder.replicates)]
    work = [p for k, p in enumerate(pairs) if k % params.ladder.shards == params.ladder.shard and (*p, seed) not in done]
    if comm.is_root:
        print(f"{out}: {len(work)} replicates to run ({len(done)} already there; parameters {design})", flush=True)
    t_start = time.perf_counter()
    for k, (n, replicate) in enumerate(work):
        checkpoint = checkpoint_path(params, design, n, replicate)
        record = run_replicate(case, n, replicate, params, comm, device, (checkpoint, f"{design}:{n}:{replicate}:{seed}"))
        if record is not None:
            record["parameters"] = design
            append_record(out, record)
            checkpoint.unlink(missing_ok=True)  # (the line holds the replicate now)
            rate = (k + 1) / (time.perf_counter() - t_start)
            print(f"N={n} replicate {replicate}: theta {np.round(record['theta'], 3).tolist()} truth "
                  f"{np.round(record['truth'], 3).tolist()} fisher {np.round(record['sigma_fisher'], 3).tolist()} "
                  f"({record['seconds']:.1f} s; {k + 1}/{len(work)}, ETA {(len(work) - k - 1) / rate:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
