"""Compare dials.stills_process results with the ground truth of dials.spread_simulate.

Reads the simulation's truth (``<prefix>.expt``: the true crystal of every shot; ``<prefix>.refl``:
the true Bragg spots) and the processing results (``idx-*_integrated.expt/.refl`` in
``processed``; images matched by container file name and image index) and reports, per still
and overall:

* whether it indexed (fraction of stills indexed);
* the misorientation (degrees) between the indexed and the true crystal, in the basis setting
  closest to the truth (P 2_1 2_1 2_1 indexing allows axis sign flips, and swaps of nearly
  equal axes; all 24 right-handed settings are tried) and the cell error;
* of the integrated reflections, the fraction that lie on a true spot: same panel, predicted
  centroid within ``max_separation_px`` of the true centroid, and the same Miller index up to
  the space group's symmetry; their position error and the correlation of integrated
  (summation) and true intensities (expected photons).

Writes a table to the log, ``<prefix>.json`` (summary, targets, per-still rows) and, with
``plots=True``, ``<prefix>_misorientation.png`` and ``<prefix>_intensities.png``.

Examples::

  dials.spread_validate truth=sim/images.expt processed=proc
  dials.spread_validate truth=sim processed=proc output.directory=validation   # sim/<prefix>_run.json
  dials.spread_validate truth=sim/images.expt processed=proc targets.max_median_misorientation_deg=0.1
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from libtbx.phil import parse

from spread_dials.util.atomic import write_text_atomic
from spread_dials.util.errors import SpreadError
from spread_dials.util.program import Program, handle_errors

logger = logging.getLogger("dials.spread.validate")

phil_str = """
input {
  truth = None
    .type = path
    .help = "The simulation's <prefix>.expt (its <prefix>.refl beside it), or the simulation's"
            "output directory when it holds one run (<prefix>_run.json)"
  processed = None
    .type = path
    .help = "The dials.stills_process output directory (idx-*_integrated.expt/.refl)"
}
space_group = None
  .type = str
  .help = "Space group for comparing Miller indices up to symmetry; None: the truth's"
  .expert_level = 1
max_separation_px = 5.0
  .type = float(value_min=0)
  .help = "An integrated reflection lies on a true spot when its predicted centroid is within"
          "this distance (pixels, same panel) of the true centroid"
targets
  .help = "Pass/fail marks in the summary (they do not change the exit status)"
{
  min_indexed_fraction = 0.8
    .type = float(value_min=0, value_max=1)
    .help = "Fraction of stills that should index"
  max_median_misorientation_deg = 0.05
    .type = float(value_min=0)
    .help = "Median misorientation to the truth should be below this (degrees)"
  min_matched_fraction = None
    .type = float(value_min=0, value_max=1)
    .help = "Fraction of integrated reflections that should lie on a true spot"
}
plots = True
  .type = bool
  .help = "Write <prefix>_misorientation.png and <prefix>_intensities.png"
include scope spread_dials.phil.common.output_phil
"""

phil_scope = parse(phil_str, process_includes=True).fetch(parse("output.prefix = validation"))

program = Program(
    "dials.spread_validate",
    usage="dials.spread_validate truth=sim/images.expt processed=proc [options]",
    help=__doc__,
    phil=phil_scope,
)


def truth_files(truth: str | Path) -> tuple[Path, Path]:
    """(<prefix>.expt, <prefix>.refl) from a truth .expt or a simulation directory.

    Raises:
        SpreadError: no such file, or a directory without exactly one run.
    """
    path = Path(truth)
    if path.is_dir():
        runs = sorted(path.glob("*_run.json"))
        if len(runs) != 1:
            raise SpreadError(f"{path} holds {len(runs)} simulation runs (*_run.json); give input.truth=<prefix>.expt")
        path = runs[0].with_name(runs[0].name[: -len("_run.json")] + ".expt")
    if path.suffix != ".expt":
        raise SpreadError(f"input.truth must be the simulation's <prefix>.expt or its directory, not {truth}")
    if not path.is_file():
        raise SpreadError(f"truth file not found: {path}")
    refl = path.with_suffix(".refl")
    if not refl.is_file():
        raise SpreadError(f"truth reflections not found beside {path}: {refl}")
    return path, refl


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def log_table(reports) -> None:
    """One line per still."""
    header = (f"{'image':<22} {'indexed':>7} {'misor.deg':>9} {'cell err %':>10} {'strong':>6} {'indexed':>7} "
              f"{'integr.':>7} {'matched':>7} {'frac':>5} {'rmsd px':>7} {'r(I)':>6}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in reports:
        lines.append(
            f"{r.image + ':' + str(r.index):<22} {'yes' if r.indexed else 'no':>7} {_fmt(r.misorientation_deg, '.4f'):>9} "
            f"{_fmt(r.cell_error_max_pct, '.3f'):>10} {_fmt(r.n_strong, 'd'):>6} {_fmt(r.n_indexed if r.indexed else None, 'd'):>7} "
            f"{r.n_integrated:>7d} {r.n_matched:>7d} {_fmt(r.matched_fraction, '.2f'):>5} "
            f"{_fmt(r.position_rmsd_px, '.2f'):>7} {_fmt(r.intensity_correlation, '.3f'):>6}"
        )  # fmt: skip
    logger.info("Per still (misorientation in the setting closest to the truth; matched: integrated reflections "
                "on a true spot with the same Miller index up to symmetry):\n%s", "\n".join(lines))  # fmt: skip


def log_summary(summary: dict) -> None:
    m = summary["misorientation_deg"]
    lines = [
        f"Stills indexed:          {summary['stills_indexed']} of {summary['stills']} ({summary['indexed_fraction']:.0%})",
        f"Misorientation (deg):    median {_fmt(m['median'], '.4f')}, mean {_fmt(m['mean'], '.4f')}, max {_fmt(m['max'], '.4f')}",
        f"Cell error (max axis):   median {_fmt(summary['cell_error_max_pct']['median'], '.3f')} %",
        f"Integrated reflections:  {summary['integrated_reflections']} ({_fmt(summary['integrated_per_indexed_still'], '.1f')} per indexed still)",
        f"On a true spot:          {summary['matched_reflections']} ({_fmt(summary['matched_fraction'], '.1%')}); "
        f"same Miller index without symmetry: {_fmt(summary['index_exact_fraction'], '.1%')}",
        f"  of those with I/sigma >= 2: {_fmt(summary['significant_matched_fraction'], '.1%')} of "
        f"{summary['significant_reflections']} (the others are mostly predictions with no true photons)",
        f"True spots recovered:    {summary['true_spots_found']} of {summary['true_spots']} simulated (most are weak)",
        f"Position error (median rmsd, predicted vs true centroid): {_fmt(summary['position_rmsd_px'], '.2f')} px",
        f"Intensity vs truth:      Pearson r {_fmt(summary['intensity_correlation'], '.4f')}, "
        f"Spearman {_fmt(summary['intensity_rank_correlation'], '.4f')}",
    ]  # fmt: skip
    targets = summary.get("targets")
    if targets:
        for name, passed in targets["passed"].items():
            lines.append(f"Target {name:<24} {'PASSED' if passed else 'MISSED'}")
    logger.info("Summary:\n  %s", "\n  ".join(lines))


@handle_errors
def run(args=None, phil=phil_scope) -> None:
    """Parse the command line and validate (see the module docstring)."""
    ctx = program.start(sys.argv[1:] if args is None else args, phil=phil)
    run_validation(ctx)


def run_validation(ctx) -> dict:
    """Compare, log, and write the JSON and PNGs for ``ctx.params``; return the summary."""
    params = ctx.params
    if params.input.truth is None or params.input.processed is None:
        raise SpreadError("give input.truth=<simulation>/<prefix>.expt and input.processed=<stills_process directory>")
    if not params.output.prefix or "/" in params.output.prefix:
        raise SpreadError(f"output.prefix must be a plain file name prefix, not {params.output.prefix!r}")
    from spread_dials.validation.compare import find_processed, report_rows, summarize, validate

    expt, refl = truth_files(params.input.truth)
    if not find_processed(params.input.processed):
        raise SpreadError(f"input.processed {str(params.input.processed)!r} holds no *_integrated.expt: nothing was "
                          "indexed and integrated there (dials.stills_process exits 0 even then; see its log), so "
                          "there is nothing to validate")  # fmt: skip
    reports, _ = validate(expt, refl, params.input.processed, params.space_group, params.max_separation_px)
    targets = {
        "min_indexed_fraction": params.targets.min_indexed_fraction,
        "max_median_misorientation_deg": params.targets.max_median_misorientation_deg,
        "min_matched_fraction": params.targets.min_matched_fraction,
    }
    summary = summarize(reports, {k: v for k, v in targets.items() if v is not None})
    ctx.accept_inputs()  # the truth and the processing results agree: from here on this run writes
    logger.info("Truth %s (%d stills); processed %s", expt, len(reports), params.input.processed)
    log_table(reports)
    log_summary(summary)
    record = {
        "program": "dials.spread_validate",
        "truth": str(expt),
        "processed": str(params.input.processed),
        "max_separation_px": params.max_separation_px,
        "summary": summary,
        "stills": report_rows(reports),
    }
    json_path = ctx.output_path(f"{params.output.prefix}.json")
    written = []
    if params.plots:
        import numpy as np

        from spread_dials.plots.processing import plot_intensity_agreement, plot_misorientation

        labels = [f"{Path(r.image).stem}:{r.index}" for r in reports]
        written.append(plot_misorientation(
            [r.misorientation_deg for r in reports], labels, ctx.output_path(f"{params.output.prefix}_misorientation.png"),
            target_deg=params.targets.max_median_misorientation_deg,
            title=f"{summary['stills_indexed']} of {summary['stills']} stills indexed",
        ))  # fmt: skip
        true = np.array([v for r in reports if r.matched_intensities for v in r.matched_intensities["true"]])
        observed = np.array([v for r in reports if r.matched_intensities for v in r.matched_intensities["integrated"]])
        written.append(plot_intensity_agreement(
            true, observed, ctx.output_path(f"{params.output.prefix}_intensities.png"),
            title=f"integrated reflections on true spots (Pearson r {_fmt(summary['intensity_correlation'], '.3f')})",
        ))  # fmt: skip
    write_text_atomic(json_path, json.dumps(record, indent=1))  # last: its presence means a complete report
    written.insert(0, json_path)
    logger.info("Wrote %s", ", ".join(str(p) for p in written))
    return summary


if __name__ == "__main__":
    run()
