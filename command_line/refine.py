"""Refine the anomalous scattering of individual metal sites from integrated XFEL stills (SPREAD).

Reads the integrated stills of dials.stills_process (``idx-*_integrated.expt/.refl``), the
pixels of every shoebox from the images they point to, each still's recorded spectrum, and the
atomic model; models every shoebox pixel as a background plane plus the still's scale times the
sum over spectral channels and mosaic domains of the round-1 kernel's Bragg term with
|F_h(E)|^2 = |F0 + sum_s (f'_s(E) + i f''_s(E)) G_s|^2 (Sauter et al., Acta Cryst D76:176,
2020), and refines per-site f'/f'' (an edge shift per site against a reference curve, free
curves, or a smooth change of f'' with f' from its Kramers-Kronig transform) by alternating
per-still and global L-BFGS on the Poisson likelihood.  Reports each
site's edge shift with its uncertainty (curvature with per-still parameters profiled out, and a
bootstrap over stills), every pairwise difference, and the probability of each oxidation state;
with truth=, each site's error and the CC and RMSD of its refined f' and f'' against the truth
over an edge window (Sauter 2020 Figure 9).

Examples::

  dials.spread_refine proc/idx-*_integrated.expt proc/idx-*_integrated.refl refine_rubredoxin.phil
  dials.spread_refine proc/idx-*_integrated.expt proc/idx-*_integrated.refl structure.file=1m2a.pdb \\
      sites.element=Fe reference.curve=pf-rd-red_fftkk.out truth=sim/images_run.json
  mpirun -n 4 dials.spread_refine proc/idx-*_integrated.expt proc/idx-*_integrated.refl mp.method=mpi

Outputs (output.directory): <prefix>_sites.json/.csv (per site and site pair), <prefix>.h5
(f', f'' per site on a 1 eV grid with sigma, covariance, bootstrap draws), <prefix>.expt (the
refined stills: crystals turned by their refined rotations) and <prefix>.refl (one row per
refined shoebox with the model's Bragg photons, sigma_Z, the still's scale and the
flag_sigma_z flag: columns spread.*), <prefix>_fp_fdp.png, <prefix>_edge_shifts.png,
<prefix>_nll.png, <prefix>_residuals.png (standardized residuals per panel),
<prefix>.checkpoint.pt (a killed run resumes from its last finished macrocycle) and
dials.spread_refine.log.
"""

from __future__ import annotations

import logging
import sys

from libtbx.phil import parse

from spread_dials.command_line.simulate import shipped_phil_files
from spread_dials.util.errors import SpreadError
from spread_dials.util.program import Program, handle_errors

logger = logging.getLogger("dials.spread.refine")

phil_str = """
input {
  quantum_gain = 1.0
    .type = float(value_min=0)
    .help = "Detector ADU per photon: counts = pixel value / quantum_gain"
  spectra_file = None
    .type = path
    .help = "Per-still spectra (.npz: identifiers, energies_eV, weights) for data whose"
            "containers hold no /entry/spread spectra"
}
include scope spread_dials.phil.structure.structure_phil
reference
  .help = "The curves edge shifts are measured against, and the oxidation states' curves"
{
  curve = None
    .type = path
    .multiple = True
    .help = "Reference f'/f'' file (energy eV, f', f''): one for all sites or one per site."
            "None: Fe sites the packaged Fe(II) rubredoxin curve; Mn sites Mn(III); others"
            "their free-atom curve"
  state_files = None
    .type = path
    .multiple = True
    .help = "Curves of oxidation states for the call (one per entry of states)"
  states = None
    .type = ints
    .help = "Oxidation state of each state file, e.g. 2 3"
  builtin_fe = True
    .type = bool
    .help = "Without state files, Fe sites use the packaged measured rubredoxin pair"
            "(Fe(II), Fe(III); 7000-7300 eV)"
}
model
  .help = "The global f'/f'' parameters"
{
  anomalous = *edge_shift free spline_kk
    .type = choice
    .help = "edge_shift: one edge shift (eV) per site group against its reference curve"
            "(KK-consistent by construction). free: f' and f'' per group on an energy grid"
            "with smoothness and Kramers-Kronig priors (Sauter 2020). spline_kk: a smooth"
            "change of f'' per group given at nodes over the band (zero beyond them), f'"
            "changed by its exact Kramers-Kronig transform; the edge shift reported is the"
            "reference's rigid shift that best matches the refined curves"
  tie = *none atom_name
    .type = choice
    .help = "atom_name: sites with one atom name share parameters (e.g. FE1 of every chain)"
  start_edge_shift_eV = 0
    .type = floats
    .help = "Starting edge shift (eV): one value, or one per site group"
  edge_shift_prior_sigma_eV = 10
    .type = float(value_min=0.01)
    .help = "Width (eV) of the zero-mean Gaussian prior on each edge shift"
  free {
    grid_step_eV = 1
      .type = float(value_min=0.1)
      .help = "Spacing (eV) of the free model's energy grid"
    smoothness_sigma_e = 0.1
      .type = float(value_min=0)
      .help = "Width (electrons) of the prior on second differences of f', f''"
    kramers_kronig_sigma_e = 0.1
      .type = float(value_min=0)
      .help = "Width (electrons) of the prior on the Kramers-Kronig residual per grid point"
  }
  spline_kk {
    node_step_eV = 2
      .type = float(value_min=0.25)
      .help = "Spacing (eV) of the nodes of the f'' change (from the band's low end to past"
              "its high end)"
    smoothness_sigma_e = 0.5
      .type = float(value_min=0)
      .help = "Width (electrons) of the prior on second differences of neighbouring node"
              "changes (the measured Fe(II)/Fe(III) rubredoxin pair: rms 0.3, largest 0.9 at"
              "2 eV)"
    change_sigma_e = 2
      .type = float(value_min=0)
      .help = "Width (electrons) of the weak prior on each node's change of f''"
  }
}
crystal
  .help = "What the model assumes of every crystal (not refined)"
{
  ncells_abc = 30 30 30
    .type = floats(size=3, value_min=1)
    .help = "Unit cells per mosaic domain along a, b, c"
  mosaic_spread_deg = 0.05
    .type = float(value_min=0)
    .help = "rms rotation angle of the mosaic domains (degrees; each domain turns about a"
            "random axis by an angle ~ N(0, spread), as dials.spread_simulate)"
  mosaic_domains = 40
    .type = int(value_min=1)
    .help = "Number of mosaic domains the model sums over"
  domain_set = *quadrature random
    .type = choice
    .help = "quadrature: a deterministic equal-weight quadrature of the mosaic distribution"
            "(the limit of a crystal of very many domains; 40 reproduce 100 to well within"
            "the statistics in benchmarks/refine_misfit.py). random: one seeded draw"
            "(random.seed) used for every still"
  shape = *gauss square round tophat
    .type = choice
    .help = "Lattice transform shape"
  oversample = 1
    .type = int(value_min=1)
    .help = "Sub-pixels per pixel edge"
}
beam
  .help = "Nominal fluence: the per-still scale multiplies it (with the true fluence the"
          "scale is the crystal's spot_scale)"
{
  photons = 1e12
    .type = float(value_min=0)
    .help = "Photons per pulse"
  diameter_um = 1
    .type = float(value_min=0)
    .help = "Beam diameter (um)"
}
likelihood = *poisson gaussian_readout
  .type = choice
  .help = "poisson: photon-counting pixels. gaussian_readout: variance lambda + sigma^2"
readout_sigma_photons = None
  .type = float(value_min=0)
  .help = "Readout noise (photons) of the gaussian_readout likelihood"
model_error_fraction = 0
  .type = float(value_min=0)
  .help = "Fractional error f of the pixel model itself: > 0 uses the Gaussian likelihood with"
          "variance lambda + sigma_readout^2 + (f lambda)^2, so that bright pixels, whose"
          "Poisson noise is far below any model's accuracy, do not dominate (0: Poisson)"
refinement {
  macrocycles = 5
    .type = int(value_min=1)
    .help = "Most macrocycles (stage 1 per still, then stage 2 global)"
  nll_tolerance = 0.05
    .type = float(value_min=0)
    .help = "Converged when the total NLL changes less than this between macrocycles"
  parameter_tolerance = 0.01
    .type = float(value_min=0)
    .help = "... or when no global parameter moves more than this between macrocycles"
            "(eV for edge shifts, electrons for free f', f'')"
  stage1_iterations = 50
    .type = int(value_min=1)
    .help = "Most Gauss-Newton steps per still and stage-1 pass (a pass ends earlier when a step"
            "lowers the NLL by less than 1e-3)"
  stage2 = *scoring lbfgs
    .type = choice
    .help = "Stage 2: one Fisher-scoring step of the profile likelihood per macrocycle (the"
            "per-shot parameters profiled out) with a backtracking line search, or L-BFGS with"
            "the per-shot parameters fixed (slower: steps shrink by the ratio of conditional to"
            "profiled information)"
  max_global_step = 2.0
    .type = float(value_min=0)
    .help = "Largest change of any global parameter in one scoring step (eV for edge shifts,"
            "electrons for f', f'' and spline nodes)"
  stage2_iterations = 50
    .type = int(value_min=1)
    .help = "L-BFGS iterations of the global parameters per macrocycle (stage2=lbfgs)"
  refine_orientation = True
    .type = bool
    .help = "Refine three small rotation angles per still (else only scale and background)"
  rotation_step_mrad = 1.0
    .type = float(value_min=0.01)
    .help = "Trust radius (mrad) of one stage-1 pass: each angle moves at most this far from"
            "where the profiles were last computed"
  refine_cell = True
    .type = bool
    .help = "Refine each still's unit-cell lengths (a, b, c; tied as the lattice symmetry of"
            "the integrated crystals requires; angles kept)"
  cell_step_permille = 1.0
    .type = float(value_min=0.01)
    .help = "Trust radius of one stage-1 pass for each cell length (parts per thousand)"
  refine_mosaic = False
    .type = bool
    .help = "Refine each still's mosaic spreads about its crystal's a, b, c axes in stage 1:"
            "three log factors of crystal.mosaic_spread_deg (an anisotropic mosaic the"
            "isotropic model would turn into edge-shift bias), under the prior"
            "N(0, mosaic_sigma^2) each"
  mosaic_step_percent = 20.0
    .type = float(value_min=0.1)
    .help = "Trust radius of one stage-1 pass for each mosaic log factor (per cent)"
  mosaic_sigma = 0.5
    .type = float(value_min=0.01)
    .help = "Prior sd of each mosaic log factor (0.5: a spread within a factor 1.65 of"
            "crystal.mosaic_spread_deg at one sd)"
  resolution_ramp = 0.3 0.5 0.7 0.85
    .type = floats(value_min=0.01, value_max=1)
    .help = "Fractions of each still's shoeboxes, lowest resolution first, that the first"
            "macrocycle's stage 1 fits (one relinearised pass each) before all of them: an"
            "orientation or cell error moves high-resolution spots by more than their width,"
            "out of reach of the linearised profiles.  Empty: all shoeboxes from the start"
  relinearisations = 3
    .type = int(value_min=1)
    .help = "Most stage-1 passes per still and macrocycle, the profiles recomputed after each"
  flag_sigma_z = 3
    .type = float(value_min=0)
    .help = "Flag shoeboxes whose sigma_Z (rms over their valid pixels of the standardized"
            "residual (k - lambda) / sqrt(v), v the likelihood's variance: lambda, plus"
            "sigma^2 for gaussian_readout, plus (f lambda)^2 with model_error_fraction f)"
            "exceeds this: they stay in the refinement, are counted in the"
            "log and the sites .json, and marked in the column spread.flagged of the output"
            "reflections (~1 where the model fits)"
  energy_jitter_sigma_eV = None
    .type = float
    .help = "Refine each still's energy jitter delta (eV: its recorded spectrum's offset from the"
            "true energies, an XFEL spectrometer's shot-to-shot calibration error) in stage 1"
            "under the prior N(0, sigma^2) with this sigma (eV, > 0); f', f'' of the still are"
            "then evaluated at the recorded energies minus delta, and delta is profiled out of"
            "the uncertainty like the scale and orientation.  Written per still (log, sites"
            ".json refined_stills, column spread.energy_jitter_eV).  None: not refined"
  sum_channels = False
    .type = bool
    .help = "Hold each still's kernel profiles summed over the spectrum's channels (at the"
            "current f'/f'' and energy jitter, with their derivatives in the global parameters)"
            "instead of per channel: 30x (40 channels) to 60x (100 channels) less memory, for"
            "data sets whose per-channel profiles do not fit the GPU (PSII, 10k+ stills).  The"
            "sums are made again wherever the kernel recomputes the profiles, so a converged"
            "refinement reaches the same estimates; between recomputations the Bragg terms are"
            "first order in the global parameters.  dials.spread_correct ignores it (its"
            "correction needs the channels)"
  reject_sigma_z = None
    .type = float(value_min=1)
    .help = "After each stage 1, shoeboxes whose sigma_Z (rms standardized residual over their"
            "valid pixels) exceeds this leave the fit for good: a neighbour's spot in the box,"
            "a model far off.  Counted in the log, column spread.rejected of the output"
            "reflections (None: keep every shoebox).  On the demo's bright stills 30 and 300"
            "both left out 25 % of the shoeboxes, mostly the brightest, and the sigma grew 3x"
  max_shoebox_px = 15
    .type = int(value_min=3)
    .help = "Each shoebox is cut to at most this many pixels per side about its bbox centre"
            "(None: whole bboxes; dials.stills_process boxes are ~30 px wide around spots"
            "of a few pixels, and the kernel's cost grows with the pixels)"
  min_shoeboxes = 3
    .type = int(value_min=1)
    .help = "Stills with fewer integrated shoeboxes are left out (counted in the log)"
  resume = True
    .type = bool
    .help = "Continue from <prefix>.checkpoint.pt when it exists for these inputs"
}
uncertainty {
  sigma = *robust fisher sandwich
    .type = choice
    .help = "The reported sigma and intervals. fisher: the curvature (Fisher information,"
            "per-still parameters profiled out): right when the pixel model is. sandwich:"
            "the curvature around the spread of the stills' scores: right when it is not."
            "robust: for each parameter the largest of Fisher, sandwich, the sandwich with the"
            "observed Hessian, and the bootstrap (with >= 10 resamples); needs >= 3 stills"
  bootstrap = 20
    .type = int(value_min=0)
    .help = "Bootstrap resamples of the stills (0: none)"
  observed_hessian = True
    .type = bool
    .help = "Also report the observed (autograd) Hessian's sigma, per-still parameters fixed"
}
controls
  .help = "Negative controls: refinement must NOT recover the truth with these"
{
  spoil_hkl = False
    .type = bool
    .help = "Look structure factors up at (h, k, l+1)"
  shuffle_channels = False
    .type = bool
    .help = "Evaluate f', f'' at permuted channel energies"
}
truth = None
  .type = path
  .help = "A simulation's <prefix>_run.json: report each site's error against the truth"
validation
  .help = "What is reported against the truth"
{
  window_eV = None
    .type = floats(size=2)
    .help = "Energy window (eV, low high) of the CC and RMSD of refined f', f'' against the"
            "truth (Sauter 2020 Figure 9; 1 eV steps). None: 7105 7135 for Fe sites, the"
            "31 eV centred on the reference's edge (largest df''/dE) for others"
}
include scope spread_dials.phil.common.device_phil
include scope spread_dials.phil.common.mp_phil
include scope spread_dials.phil.common.output_phil
include scope spread_dials.phil.common.random_phil
plots = True
  .type = bool
  .help = "Write the PNG plots"
"""

phil_scope = parse(phil_str, process_includes=True).fetch(parse("output.prefix = spread_refine"))

program = Program(
    "dials.spread_refine",
    usage="dials.spread_refine idx-*_integrated.expt idx-*_integrated.refl [refine.phil] [options]",
    help=__doc__,
    phil=phil_scope,
)


@handle_errors
def run(args=None, phil=phil_scope) -> None:
    """Parse the command line and refine (see the module docstring)."""
    args = sys.argv[1:] if args is None else list(args)
    experiments = [a for a in args if a.endswith(".expt")]
    reflections = [a for a in args if a.endswith(".refl")]
    rest = shipped_phil_files([a for a in args if not a.endswith((".expt", ".refl"))])
    ctx = program.start(rest, phil=phil)
    if not ctx.params.output.prefix or "/" in ctx.params.output.prefix:
        raise SpreadError(f"output.prefix must be a plain file name prefix, not {ctx.params.output.prefix!r}")
    from spread_dials.refine.run import run_refinement

    run_refinement(ctx, experiments, reflections)


if __name__ == "__main__":
    run()
