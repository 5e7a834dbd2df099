"""Correct the physics model of SPREAD refinement with a learned, guarded correction and report
calibrated per-site posteriors (issue 13; Ganapati et al., arXiv 2307.01901).

Starts from dials.spread_refine's results (its refined stills and edge shifts) and fits, beside
the edge shifts, a correction of the pixel model that sees only pixel geometry, never the
anomalous signal (no Miller index, F0, G, |F|^2 or spectrum): a smooth gain field per panel, a
flux-conserving redistribution inside each shoebox (point spread, spot shape) and a
Lipschitz-bounded intensity factor over the reflection's direction in the crystal frame,
excitation error and resolution.  It is zero at the start (the physics model exactly), anchored
to the physics by a Poisson KL penalty and Gaussian priors, and fitted by Fisher scoring of the
profile likelihood jointly with the edge shifts (every still's scale, orientation, cell and
backgrounds profiled out).  The reported sigma includes the correction's own uncertainty (its
weights profiled out of the information).  Inter-site differences are the headline: a
spectrometer offset is indistinguishable from a common edge shift.  Pass the .phil of the
dials.spread_refine run: every scope of dials.spread_refine is read the same way.

Examples::

  dials.spread_correct spread_refine.expt spread_refine.refl spread_refine.h5 refine_rubredoxin.phil
  dials.spread_correct ... truth=sim/images_run.json correct.epochs=10
  mpirun -n 4 dials.spread_correct spread_refine.expt spread_refine.refl spread_refine.h5 mp.method=mpi

Outputs (output.directory): spread_posterior.csv (per site and site pair: physics-only and
corrected edge shift, sigma, quantiles, P(oxidation state), truth), spread_posterior.h5 (draws,
covariances, f'/f'' quantile bands on a 1 eV grid, the correction's weights), <prefix>.json,
<prefix>.expt/.refl (the stills; columns spread.bragg_photons with the correction and
spread.bragg_photons_physics without), <prefix>_edge_shifts.png, <prefix>_loss.png,
<prefix>_correction.png, <prefix>_predictive.png (held-out residuals before and after;
correct.predictive), <prefix>.checkpoint.pt (a killed run resumes from its last epoch) and
dials.spread_correct.log.
"""

from __future__ import annotations

import sys

from libtbx.phil import parse

from spread_dials.command_line.refine import phil_str as refine_phil_str
from spread_dials.command_line.simulate import shipped_phil_files
from spread_dials.util.errors import SpreadError
from spread_dials.util.program import Program, handle_errors

correct_phil_str = """
correct
  .help = "The learned correction and its fit"
{
  epochs = 8
    .type = int(value_min=1)
    .help = "The most epochs (each: stage 1 per still, then one joint Fisher-scoring step of the edge"
            "shifts and the correction's weights, a backtracking line search on the profile"
            "objective); the fit stops earlier once converged.  Not converged: rerun with more"
            "epochs and it resumes from the checkpoint"
  theta_tolerance_eV = 0.001
    .type = float(value_min=0)
    .help = "Converged: an epoch past the warm-up moved no edge shift or spectrometer latent by more"
            "than this (eV) and no correction weight by more than phi_tolerance"
  phi_tolerance = 0.0001
    .type = float(value_min=0)
    .help = "The convergence tolerance of the correction's weights (stencil fractions, log gains)"
  warmup_epochs = 2
    .type = int(value_min=0)
    .help = "The first epochs move the correction only (edge shifts held at the warm start)"
  anchor_beta = 0.001
    .type = float(value_min=0)
    .help = "Weight of the anchor sum_pixels KL(Poisson(corrected) || Poisson(physics)). It shrinks"
            "the correction by ~beta / (1 + beta) at any data size: 0.01 left a point spread 0.6 %"
            "short and bright held-out spots 13 % overdispersed (benchmarks/RESULTS.md session 23)"
  nominal_energy_eV = None
    .type = float(value_min=0)
    .help = "The one energy (eV) at which the correction's geometry (excitation error, direction)"
            "is computed, never a still's spectrum. None: the middle of the spectra's band"
  posterior_draws = 2000
    .type = int(value_min=10)
    .help = "Draws of the edge shifts from the posterior for the f'/f'' quantile bands"
  resume = True
    .type = bool
    .help = "Continue from <prefix>.checkpoint.pt when it exists for these inputs"
  min_shoeboxes_per_weight = 50
    .type = float(value_min=0)
    .help = "A part of the correction is switched off (and the log says so) unless the data have"
            "this many shoeboxes per weight (the gain: per panel hit): a weight informed by few"
            "reflections can follow their anomalous differences"
  spectrometer
    .help = "The spectrometer's calibration as physics latents: E_true = E_nom + (1 + dispersion)"
            "(E_recorded - E_nom) - offset, with zero-mean Gaussian calibration priors"
  {
    offset_sigma_eV = 1.0
      .type = float
      .help = "Calibration prior sd (eV) of a global energy offset; None: no offset latent. The"
              "offset is indistinguishable from a common edge shift: it widens the absolute edge"
              "shifts' intervals by about this much and leaves inter-site differences alone"
    dispersion_sigma = 0.005
      .type = float
      .help = "Calibration prior sd of the relative error of the spectrometer's eV per channel;"
              "None: no dispersion latent"
  }
  predictive
    .help = "The posterior predictive check: stills held out of the fit, their standardized"
            "residuals before and after the correction per panel group and resolution shell"
  {
    held_out_fraction = 0.1
      .type = float(value_min=0, value_max=0.99)
      .help = "Fraction of the stills (at least one when > 0; drawn from random.seed) left out of"
              "the fit of the edge shifts and the correction; their own scale, crystal and"
              "backgrounds are fitted. 0: every still in the fit, no check"
    panel_groups = 4
      .type = int(value_min=1)
      .help = "The detector's panels in this many contiguous groups"
    resolution_shells = 4
      .type = int(value_min=1)
      .help = "Resolution shells of equal numbers of held-out shoeboxes"
  }
  noise_flow
    .help = "The pixel noise of a charge-integrating detector (JUNGFRAU, ePix, a CCD) learned: a"
            "normalizing flow (zuko) on the standardized residuals of the Gaussian likelihood,"
            "conditioned on the pixel's rate only, starting as N(0, 1) and refitted after the"
            "first epochs' stage 1 where it predicts held-out pixels better; every NLL and Fisher"
            "weight then uses its variance. Needs"
            "likelihood=gaussian_readout or likelihood.model_error_fraction > 0 (photon-counting"
            "pixels are Poisson)"
  {
    enable = False
      .type = bool
      .help = "Learn the pixel noise (docs/correct.md: a 100 % charge spread per photon, 40 toy"
              "data sets)"
    epochs = 3
      .type = int(value_min=1)
      .help = "The flow is refitted after each of the first this many epochs' stage 1, then held"
              "(its optimum is flat: refitting it every epoch kept moving the edge shifts and"
              "2 of 6 toy fits did not converge)"
    beta = 1.0
      .type = float(value_min=0)
      .help = "Weight of the flow's anchor: its KL to N(0, 1) summed over 16 rates spanning the data"
    steps = 200
      .type = int(value_min=1)
      .help = "Adam steps of each refit"
    pixels = 20000
      .type = int(value_min=100)
      .help = "Fitted pixels the flow is fitted to (every k-th over the stills; the same on every"
              "MPI rank)"
    significance = 3.0
      .type = float(value_min=0)
      .help = "Each refit learns from every other pixel of the sample and is kept only if its"
              "variance predicts the other half better than the Gaussian readout's by this many"
              "standard errors of the mean log-likelihood gain; otherwise the flow is reset to"
              "N(0, 1) (on data with nothing to learn an unchecked flow moved edge shifts by up"
              "to 0.9 sigma)"
  }
  correction {
    gain = True
      .type = bool
      .help = "A smooth gain field per panel (bicubic over gain_nodes x gain_nodes nodes)"
    gain_nodes = 2
      .type = int(value_min=1)
      .help = "Nodes per panel edge of the gain field (1: one gain per panel, e.g. a module's gain"
              "calibration error; needs gain_nodes^2 x min_shoeboxes_per_weight shoeboxes per panel)"
    gain_prior_sigma = 0.05
      .type = float(value_min=0)
      .help = "Prior sd of the log gain at a node (0.05: 5 %)"
    redistribution = True
      .type = bool
      .help = "A flux-conserving redistribution of photons between neighbouring pixels (PSF, spot shape)"
    shoebox_boundary = *open closed
      .type = choice
      .help = "open: photons the redistribution moves off a shoebox leave it (a point spread's"
            "light lost through the box's edges; conserved on the detector); closed: they stay,"
            "every shoebox's total kept. Closed boxes left a 20-26 sigma edge-shift bias under a"
            "1.5 px PSF (docs/correct.md)"
    stencil_radius = 2
      .type = int(value_min=1)
      .help = "Half-width (pixels) of the redistribution stencil. With 1 a 1.5 px PSF left a"
            "common +0.18 eV (7 sigma) on 20 rubredoxin stills; with 2 (and d4) +0.045"
    stencil_prior_sigma = 0.1
      .type = float(value_min=0)
      .help = "Prior sd of the fraction of a pixel's photons moved to each neighbour"
    stencil_symmetry = none *d4
      .type = choice
      .help = "none: a weight per stencil offset (a spot-shape error that differs by direction;"
            "24 weights at radius 2); d4: one per orbit of the square's symmetries (2 weights for"
            "radius 1, 5 for radius 2): a point spread that is the same in every direction along"
            "and across rows, so a wider stencil passes the capacity guard"
    head = False
      .type = bool
      .help = "An intensity factor per shoebox, smooth in the reflection's direction in the crystal"
            "frame and its resolution (partiality, anisotropic mosaic spread). Off by default: with"
            "a PSF in toy data it moved an edge shift 2.4 sigma from the oracle's (docs/correct.md)"
    head_prior_sigma = 0.05
      .type = float(value_min=0)
      .help = "Prior sd of each of the head's 14 coefficients"
  }
}
"""

phil_scope = parse(refine_phil_str + correct_phil_str, process_includes=True).fetch(parse("output.prefix = spread_correct"))

program = Program(
    "dials.spread_correct",
    usage="dials.spread_correct spread_refine.expt spread_refine.refl spread_refine.h5 [refine.phil] [options]",
    help=__doc__,
    phil=phil_scope,
)


@handle_errors
def run(args=None, phil=phil_scope) -> None:
    """Parse the command line and correct (see the module docstring)."""
    args = sys.argv[1:] if args is None else list(args)
    experiments = [a for a in args if a.endswith(".expt")]
    reflections = [a for a in args if a.endswith(".refl")]
    warm = [a for a in args if a.endswith((".h5", ".hdf5"))]
    rest = shipped_phil_files([a for a in args if not a.endswith((".expt", ".refl", ".h5", ".hdf5"))])
    ctx = program.start(rest, phil=phil)
    if not ctx.params.output.prefix or "/" in ctx.params.output.prefix:
        raise SpreadError(f"output.prefix must be a plain file name prefix, not {ctx.params.output.prefix!r}")
    if len(warm) > 1:
        raise SpreadError(f"give one warm start (.h5 of dials.spread_refine), not {len(warm)}")
    from spread_dials.correct.run import run_correction

    run_correction(ctx, experiments, reflections, warm[0] if warm else None)


if __name__ == "__main__":
    run()
