"""Plan SPREAD beam time: each metal site's edge-shift sigma for N stills, from the Fisher
information alone (no data set is simulated or refined).

Takes what dials.spread_simulate takes (the same PHIL files: rubredoxin.phil, psii.phil; the
model and its sites, their oxidation states, the spectrum, the crystal, the beam and the
detector) and makes ``plan.probe_stills`` noise-free stills at the truth in memory: random
orientations, SASE-like channel weights, shoeboxes of reflections with at least
``plan.min_bragg_photons`` expected Bragg photons, the water and air background as a flat rate
(its mean per pixel).  For each probe still it computes the Poisson Fisher information of the
sites' edge shifts with the still's scale, orientation, cell lengths (``plan.refine_cell``) and
shoebox background planes profiled out (what dials.spread_refine reports as its Fisher sigma;
spread_dials.refine.planning).  Stills are exchangeable, so N stills carry N times the mean, and

    sigma_N(site) = sqrt([(N I)^-1]_ss),   sigma_N(s - t) = sqrt(C_ss + C_tt - 2 C_st),

the Cramer-Rao bound of an unbiased estimate from N such stills when the pixel model is right.
Each site's information is that of its own true curve moved by an edge shift (an oxidized
site's measured curve, not the reduced reference moved).  The stills differ (orientation,
spectrum): the probes' spread gives the prediction's own standard error (in the log and JSON).
benchmarks/spread_campaign.py --plan is the same calculation for the campaign's cases; the
campaign's ladders measure the spread of real refinements against it (benchmarks/RESULTS.md).

Writes ``<prefix>.json`` (per site and pair: sigma at every plan.n_stills, the stills needed for
plan.target.sigma_eV and to separate plan.target.difference_eV at plan.target.z sigma, the
per-probe information), ``<prefix>.png`` (sigma against N) and dials.spread_plan.log.

Examples::

  dials.spread_plan rubredoxin.phil
  dials.spread_plan psii.phil structure.file=psii_oec.pdb plan.n_stills=1000,5000,20000
  dials.spread_plan structure.file=1m2a.pdb structure.sites.group_by=name anomalous.reference_states=3,2 \\
      plan.target.difference_eV=1.0 plan.probe_stills=10
"""

from __future__ import annotations

import json
import logging
import math
import sys

from libtbx.phil import parse

from spread_dials.util.atomic import write_text_atomic
from spread_dials.util.errors import SpreadError
from spread_dials.util.program import Program, handle_errors

logger = logging.getLogger("dials.spread.plan")

plan_phil = """
plan
  .help = "What to predict"
{
  n_stills = 100 300 1000 3000 10000 20000
    .type = ints(value_min=1)
    .help = "Numbers of stills at which to predict each site's and site pair's sigma"
  probe_stills = 5
    .type = int(value_min=1)
    .help = "Noise-free stills at the truth whose mean information is one still's (more: a"
            "smaller standard error of the prediction, about 1/sqrt(probe_stills) of the"
            "stills' spread)"
  min_bragg_photons = 20
    .type = float(value_min=0)
    .help = "A reflection gets a shoebox when it expects at least this many Bragg photons"
  max_shoebox_px = 25
    .type = int(value_min=3)
    .help = "Shoeboxes larger than this (pixels a side) are cut to it about their centre, as"
            "dials.spread_refine's refinement.max_shoebox_px cuts DIALS' shoeboxes (broad spots"
            "keep their core)"
  refine_cell = True
    .type = bool
    .help = "Profile each still's cell lengths out too (dials.spread_refine refines them)"
  energy_jitter_sigma_eV = None
    .type = float
    .help = "Profile each still's energy jitter out too, under the prior N(0, sigma^2) (eV):"
            "what dials.spread_refine does with refinement.energy_jitter_sigma_eV.  A jitter"
            "moves every site alike, so it widens each site's sigma (by about sigma / sqrt(N)"
            "from N stills) and leaves the differences between sites alone (None: no jitter)"
  target
    .help = "Stills needed for"
  {
    sigma_eV = 0.25
      .type = float
      .help = "an edge-shift sigma of this (eV) at every site"
    difference_eV = 1.0
      .type = float
      .help = "telling apart two sites whose edge shifts differ by this (eV) ..."
    z = 5
      .type = float
      .help = "... at this many sigma"
  }
}
"""


def _phil_scope():
    """dials.spread_simulate's scope (its defaults for this program: output here, no noise)
    with the ``plan`` scope."""
    from spread_dials.command_line.simulate import phil_scope as simulate_scope

    master = simulate_scope.fetch(sources=[parse("output.directory=.\noutput.prefix=spread_plan\nnoise.enable=False")])
    master.adopt_scope(parse(plan_phil))
    return master


phil_scope = _phil_scope()

program = Program(
    name="dials.spread_plan",
    usage="dials.spread_plan [options] [params.phil] [key=value ...]",
    help=__doc__,
    phil=phil_scope,
)


def check_plan(plan) -> None:
    """Refuse targets that mean nothing (SpreadError, one line)."""
    for name, value in (("plan.target.sigma_eV", plan.target.sigma_eV), ("plan.target.difference_eV",
                        plan.target.difference_eV), ("plan.target.z", plan.target.z)):  # fmt: skip
        if value is None or not value > 0 or not math.isfinite(value):
            raise SpreadError(f"{name} must be a positive number, not {value}")
    jitter = plan.energy_jitter_sigma_eV
    if jitter is not None and not (jitter > 0 and math.isfinite(jitter)):
        raise SpreadError(f"plan.energy_jitter_sigma_eV must be a positive number (or None), not {jitter}")


def predict(setup, params, device) -> dict:
    """The plan (see the module docstring) from a dials.spread_simulate RunSetup."""
    import numpy as np
    import torch

    from spread_dials.adapters.anomalous_setup import site_edge_shifts, site_references
    from spread_dials.physics.crystal import real_space_from_cell
    from spread_dials.physics.structure_factors import StructureFactors
    from spread_dials.refine.engine import RefineSettings
    from spread_dials.refine.planning import (
        difference_variance,
        predicted_covariance,
        probe_stills,
        site_pairs,
        still_information,
        stills_needed,
    )
    from spread_dials.refine.profiles import CrystalModel
    from spread_dials.refine.sites import EdgeShiftSites

    plan, structure = params.plan, setup.structure
    sites = list(structure.sites)
    if not sites:
        raise SpreadError("the model has no anomalous site to plan for (structure.sites)")
    channels = torch.as_tensor(setup.channels_eV, dtype=torch.float64)
    references = site_references(params.anomalous, sites, channels, params.structure.free_atom_table)
    shifts = site_edge_shifts(params.anomalous, len(sites)).tolist()
    curves = [r.shifted(s) for r, s in zip(references, shifts)]  # each site's true curve
    labels = [s.label for s in sites]
    truth = StructureFactors(structure.miller_index, structure.F0, structure.G, setup.f_prime.cpu().double(),
                             setup.f_double_prime.cpu().double())  # fmt: skip
    table = StructureFactors(structure.miller_index, structure.F0, structure.G)
    c = params.crystal
    model = CrystalModel(tuple(setup.brightness.ncells_abc), c.mosaic_spread_deg, c.mosaic_domains, c.shape,
                         params.random.seed, setup.fluence_photons_per_m2, params.detector.oversample, "quadrature")  # fmt: skip
    background = 0.0
    if setup.background_per_photon is not None:
        background = float(setup.background_per_photon.double().mean()) * params.beam.photons
    seeds = [int(x) for x in np.random.SeedSequence([params.random.seed, 17]).generate_state(plan.probe_stills)]
    real_space = real_space_from_cell(torch.tensor(setup.unit_cell, dtype=torch.float64))
    logger.info("%d probe stills (%d channels %.1f-%.1f eV, %s, %d mosaic domains, Ncells %s, %.4g domains in the "
                "beam, background %.3g photons per pixel) ...", plan.probe_stills, channels.numel(), channels[0],
                channels[-1], setup.detector_description, c.mosaic_domains,
                " x ".join(f"{n:g}" for n in setup.brightness.ncells_abc), setup.brightness.spot_scale, background)  # fmt: skip
    shots = probe_stills(setup.panels.to(dtype=torch.float64), truth, model, real_space, channels, seeds,
                         setup.brightness.spot_scale, background, plan.min_bragg_photons, device,
                         max_box_px=plan.max_shoebox_px)  # fmt: skip
    boxes = [int(s.shoeboxes.n_shoeboxes) for s in shots.shots]
    if min(boxes) == 0:
        raise SpreadError(f"a probe still has no reflection with >= {plan.min_bragg_photons:g} expected Bragg photons: "
                          "the crystal is too faint for this plan (plan.min_bragg_photons, crystal, beam.photons)")  # fmt: skip
    edge_sites = EdgeShiftSites(curves, list(range(len(curves))), labels)
    info = still_information(shots, table, model, edge_sites, torch.zeros(len(curves), dtype=torch.float64),
                             setup.brightness.spot_scale, background,
                             RefineSettings(refine_cell=plan.refine_cell, energy_jitter_sigma_eV=plan.energy_jitter_sigma_eV))  # fmt: skip
    one = predicted_covariance(info, 1)
    diag = info.per_still.diagonal(dim1=-2, dim2=-1)  # (K, S)
    k = plan.probe_stills
    rel_se = (diag.std(0) / diag.mean(0) / math.sqrt(k)).tolist() if k > 1 else [None] * len(labels)
    pairs = site_pairs(len(labels))
    var_pair = {(i, j): difference_variance(one, i, j) for i, j in pairs}
    predicted = {}
    for n in plan.n_stills:
        cov = one / n
        predicted[str(n)] = {
            "sigma_eV": cov.diagonal().sqrt().tolist(),
            "differences": [{"sites": [labels[i], labels[j]], "sigma_eV": math.sqrt(var_pair[(i, j)] / n)} for i, j in pairs],
        }  # fmt: skip
    target = plan.target
    return {
        "program": "dials.spread_plan",
        "sites": [{"label": lab, "state": st, "curve": cur.label, "stills_for_target_sigma": stills_needed(float(one[i, i]), target.sigma_eV),
                   "sigma_one_still_eV": math.sqrt(float(one[i, i])), "information_relative_standard_error": rel_se[i]}
                  for i, (lab, st, cur) in enumerate(zip(labels, setup.site_states, curves))],
        "pairs": [{"sites": [labels[i], labels[j]], "sigma_one_still_eV": math.sqrt(var_pair[(i, j)]),
                   "stills_to_separate": stills_needed(var_pair[(i, j)], target.difference_eV / target.z)} for i, j in pairs],
        "target": {"sigma_eV": target.sigma_eV, "difference_eV": target.difference_eV, "z": target.z},
        "predicted": predicted,
        "probe_stills": k, "probe_seeds": seeds, "shoeboxes_per_probe": boxes,
        "information_per_probe_eV-2": diag.tolist(), "mean_information_eV-2": info.mean.tolist(),
        "channels_eV": [float(channels[0]), float(channels[-1]), int(channels.numel())],
        "detector": setup.detector_description, "ncells_abc": list(setup.brightness.ncells_abc),
        "spot_scale": setup.brightness.spot_scale, "background_photons_per_pixel": background,
        "refine_cell": plan.refine_cell, "energy_jitter_sigma_eV": plan.energy_jitter_sigma_eV,
        "structure": setup.structure_source,
    }  # fmt: skip


def log_plan(result: dict) -> None:
    """The plan as tables in the log."""
    t = result["target"]
    lines = [f"{'site':<22} {'state':>5} {'sigma(1 still) eV':>18} {'+- (probes)':>11} {'stills for ' + format(t['sigma_eV'], 'g') + ' eV':>18}"]
    for s in result["sites"]:
        se = s["information_relative_standard_error"]
        lines.append(f"{s['label']:<22} {str(s['state']):>5} {s['sigma_one_still_eV']:>18.4g} "
                     f"{'-' if se is None else format(se / 2, '.0%'):>11} {s['stills_for_target_sigma']:>18d}")  # fmt: skip
    for p in result["pairs"]:
        lines.append(f"{' - '.join(p['sites']):<28} sigma(1 still) {p['sigma_one_still_eV']:.4g} eV; stills to separate "
                     f"{t['difference_eV']:g} eV at {t['z']:g} sigma: {p['stills_to_separate']}")  # fmt: skip
    logger.info("Predicted from %d probe stills (the sigma's standard error from their spread in brackets):\n  %s",
                result["probe_stills"], "\n  ".join(lines))  # fmt: skip
    rows = [f"{'N':>8} " + " ".join(f"{s['label'][:14]:>14}" for s in result["sites"])
            + "".join(f" {' - '.join(p['sites'])[:20]:>20}" for p in result["pairs"])]  # fmt: skip
    for n, entry in result["predicted"].items():
        rows.append(f"{n:>8} " + " ".join(f"{x:>14.4f}" for x in entry["sigma_eV"])
                    + "".join(f" {d['sigma_eV']:>20.4f}" for d in entry["differences"]))  # fmt: skip
    logger.info("sigma (eV) at N stills:\n  %s", "\n  ".join(rows))


@handle_errors
def run(args=None, phil=phil_scope) -> None:
    """Parse the command line and plan (see the module docstring)."""
    from spread_dials.command_line.simulate import shipped_phil_files

    ctx = program.start(shipped_phil_files(sys.argv[1:] if args is None else args), phil=phil)
    run_plan(ctx)


def run_plan(ctx) -> dict:
    """Predict, log, and write the JSON and PNG for ``ctx.params``; return the plan."""
    import torch

    from spread_dials.simulation.setup import build_setup, check_parameters

    params = ctx.params
    if not params.output.prefix or "/" in params.output.prefix:
        raise SpreadError(f"output.prefix must be a plain file name prefix, not {params.output.prefix!r}")
    check_plan(params.plan)
    check_parameters(params)
    setup = build_setup(params, ctx.device, torch.float64)
    result = predict(setup, params, ctx.device)
    ctx.accept_inputs()
    log_plan(result)
    from spread_dials.plots.planning import plot_plan

    png = plot_plan(result, ctx.output_path(f"{params.output.prefix}.png"))
    json_path = write_text_atomic(ctx.output_path(f"{params.output.prefix}.json"), json.dumps(result, indent=1))
    logger.info("Wrote %s, %s", json_path, png)
    return result


if __name__ == "__main__":
    run()
