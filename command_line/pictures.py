"""Pictures of a simulated still and of its processing: the still, its spots and shoeboxes, a
zoom on single shoeboxes, the pulse spectra and f'/f'' of every anomalous site over the pulse.

Reads the simulation (``<prefix>.expt`` with its containers and ``<prefix>_run.json``) and,
optionally, the dials.stills_process output directory (``idx-*_strong.refl`` for the spots
found, ``idx-*_integrated.refl`` with shoeboxes, from ``integration.debug.output=True``).
Writes, for the still chosen with ``still`` (its place in the truth list, i.e. the shot number):

  still_NNNNN.png             all panels at their lab positions, log scale
  still_NNNNN_spots.png       the same with true spots, found spots, predictions and integration
                              shoeboxes, next to the busiest panel in pixels (needs processed)
  still_NNNNN_shoeboxes.png   a few integrated shoeboxes, weak to strong, with the foreground
                              mask and the predicted, observed and true centroids (needs processed)
  spectrum.png                the pulse spectra of the still's container, the still's highlighted
  anomalous.png               f' and f'' of every anomalous site on the channels, with the spectrum

Examples::

  dials.spread_pictures truth=sim/images.expt processed=proc output.directory=pictures
  dials.spread_pictures truth=sim still=3 shoeboxes=12
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
from libtbx.phil import parse

from spread_dials.util.errors import SpreadError
from spread_dials.util.program import Program, handle_errors

logger = logging.getLogger("dials.spread.pictures")

phil_str = """
input {
  truth = None
    .type = path
    .help = "The simulation's <prefix>.expt (containers and <prefix>_run.json beside it), or the"
            "simulation's output directory when it holds one run"
  processed = None
    .type = path
    .help = "The dials.stills_process output directory (optional: without it only the still,"
            "the spectra and f'/f'' are drawn)"
}
still = 0
  .type = int(value_min=0)
  .help = "The still to draw: its place in the truth list (the shot number)"
shoeboxes = 8
  .type = int(value_min=1)
  .help = "Shoeboxes in the zoom, chosen from weak to strong among those on true spots"
canvas_px = 1400
  .type = int(value_min=200)
  .help = "Pixels across the assembled detector picture"
  .expert_level = 1
include scope spread_dials.phil.common.output_phil
"""

phil_scope = parse(phil_str, process_includes=True)

program = Program(
    "dials.spread_pictures",
    usage="dials.spread_pictures truth=sim/images.expt [processed=proc] [options]",
    help=__doc__,
    phil=phil_scope,
)


def _container_path(stored: str, truth_dir: Path) -> Path:
    """The container as stored in the truth, or the file of that name beside the truth."""
    path = Path(stored)
    if path.is_file():
        return path
    beside = truth_dir / path.name
    if beside.is_file():
        return beside
    raise SpreadError(f"image container not found: {stored} (nor {beside})")


def _panel_frames(detector) -> tuple[np.ndarray, ...]:
    origin = np.array([p.get_origin() for p in detector], dtype=np.float64)
    fast = np.array([p.get_fast_axis() for p in detector], dtype=np.float64)
    slow = np.array([p.get_slow_axis() for p in detector], dtype=np.float64)
    pixel = np.array([p.get_pixel_size() for p in detector], dtype=np.float64)
    return origin, fast, slow, pixel


def _load_image(container: Path, index: int):
    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_filenames([str(container)])
    if index >= len(experiments):
        raise SpreadError(f"{container} holds {len(experiments)} images, not image {index}")
    expt = experiments[index]
    raw = expt.imageset.get_raw_data(0)
    return np.stack([r.as_numpy_array() for r in raw]), expt.detector


def _xy(table, column: str) -> np.ndarray:
    return np.asarray(table[column].as_numpy_array()).reshape(-1, 3)[:, :2]


def _processed_files(processed: Path, container: str, index: int) -> dict[str, Path]:
    """The stills_process files of one image (found through the experiments' image keys)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from spread_dials.validation.compare import find_processed, image_key

    for expt_file in find_processed(processed):
        experiments = ExperimentListFactory.from_json_file(str(expt_file), check_format=False)
        if any(image_key(e) == (container, index) for e in experiments):
            stem = expt_file.name[: -len("_integrated.expt")]
            files = {"experiments": expt_file}
            for name in ("integrated", "strong", "indexed"):
                path = expt_file.with_name(f"{stem}_{name}.refl")
                if path.is_file():
                    files[name] = path
            return files
    return {}


def _shoebox_panels(table, picks, true_lookup) -> list[dict]:
    from dials.algorithms.shoebox import MaskCode

    out = []
    predicted = _xy(table, "xyzcal.px")
    observed = _xy(table, "xyzobs.px.value") if "xyzobs.px.value" in table else None
    hkl = table["miller_index"]
    for i in picks:
        sb = table["shoebox"][int(i)]
        x0, x1, y0, y1, _, _ = sb.bbox
        data = sb.data.as_numpy_array()[0]
        mask = sb.mask.as_numpy_array()[0]
        true = true_lookup(int(i))
        obs = observed[i] if observed is not None and np.all(np.isfinite(observed[i])) and observed[i].any() else None
        out.append({
            "data": data, "foreground": (mask & MaskCode.Foreground) != 0, "bbox": (x0, x1, y0, y1),
            "panel": int(sb.panel), "miller_index": hkl[int(i)], "predicted": predicted[i], "observed": obs,
            "true": None if true is None else true[0], "intensity": float(table["intensity.sum.value"][int(i)]),
            "true_intensity": None if true is None else true[1],
        })  # fmt: skip
    return out


@handle_errors
def run(args=None, phil=phil_scope) -> None:
    """Parse the command line and draw the pictures (see the module docstring)."""
    ctx = program.start(sys.argv[1:] if args is None else args, phil=phil)
    draw_pictures(ctx)


def draw_pictures(ctx) -> list[Path]:
    """Draw the pictures for ``ctx.params``; return the files written."""
    params = ctx.params
    if params.input.truth is None:
        raise SpreadError("give input.truth=<simulation>/<prefix>.expt (and input.processed=<stills_process directory>)")
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from spread_dials.command_line.validate import truth_files
    from spread_dials.plots.detector_image import plot_still
    from spread_dials.plots.processing import Overlay, plot_shoeboxes, plot_still_overlay
    from spread_dials.validation.compare import image_key
    from spread_dials.validation.orientation import match_setting

    expt_path, refl_path = truth_files(params.input.truth)
    truth = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    if params.still >= len(truth):
        raise SpreadError(f"still={params.still}: the truth holds {len(truth)} stills (0 ... {len(truth) - 1})")
    processed = Path(params.input.processed) if params.input.processed is not None else None
    if processed is not None and not processed.is_dir():
        raise SpreadError(f"processing directory not found: {processed}")
    true_expt = truth[params.still]
    name, index = image_key(true_expt)
    container = _container_path(true_expt.imageset.paths()[0], expt_path.parent)
    image, detector = _load_image(container, index)
    frames = _panel_frames(detector)
    label = f"still {params.still} ({name} image {index})"
    written = []
    stem = f"still_{params.still:05d}"
    written.append(plot_still(image, *frames, ctx.output_path(f"{stem}.png"), title=f"{label}, simulated",
                              canvas_px=params.canvas_px))  # fmt: skip

    table = flex.reflection_table.from_file(str(refl_path))
    mine = table.select(table["id"] == params.still)
    true_panel = mine["panel"].as_numpy_array().astype(np.int64)
    true_xy = _xy(mine, "xyzcal.px")
    true_hkl = mine["miller_index"].as_vec3_double().as_numpy_array().astype(np.int64).reshape(-1, 3)
    true_i = mine["intensity.sum.value"].as_numpy_array()
    files = _processed_files(processed, name, index) if processed is not None else {}
    if processed is not None and not files:
        logger.warning("%s was not indexed and integrated in %s: no spot pictures", label, processed)
    if files:
        found = flex.reflection_table.from_file(str(files.get("strong", files.get("indexed"))))
        integrated = flex.reflection_table.from_file(str(files["integrated"]))
        processed_expt = ExperimentListFactory.from_json_file(str(files["experiments"]), check_format=False)
        lattice = next(i for i, e in enumerate(processed_expt) if image_key(e) == (name, index))
        integrated = integrated.select(integrated["id"] == lattice)
        bbox = np.stack([p.as_numpy_array() for p in integrated["bbox"].parts()], axis=1)
        overlay = Overlay(
            true_spots=(true_panel[true_i >= 1], true_xy[true_i >= 1]),
            found=(found["panel"].as_numpy_array(), _xy(found, "xyzobs.px.value")),
            predicted=(integrated["panel"].as_numpy_array(), _xy(integrated, "xyzcal.px")),
            shoeboxes=(integrated["panel"].as_numpy_array(), bbox[:, :4]),
        )
        found_from = "strong" if "strong" in files else "indexed"
        written.append(plot_still_overlay(
            image, *frames, overlay, ctx.output_path(f"{stem}_spots.png"), canvas_px=params.canvas_px,
            title=f"{label}: {found.size()} spots found ({found_from}), {integrated.size()} reflections integrated, "
                  f"{int((true_i >= 1).sum())} true spots with >= 1 photon",
        ))  # fmt: skip
        # shoeboxes on true spots (the Miller index in the truth's setting), weak to strong
        match = match_setting(np.array(processed_expt[lattice].crystal.get_A()).reshape(3, 3),
                              np.array(true_expt.crystal.get_A()).reshape(3, 3))  # fmt: skip
        hkl = match.to_true_indices(integrated["miller_index"].as_vec3_double().as_numpy_array().astype(np.int64))
        where = {(int(p), *map(int, h)): j for j, (p, h) in enumerate(zip(true_panel, true_hkl))}
        panels = integrated["panel"].as_numpy_array().astype(np.int64)

        def true_lookup(i: int):
            j = where.get((int(panels[i]), *map(int, hkl[i])))
            return None if j is None else (true_xy[j], float(true_i[j]))

        on_truth = [i for i in range(integrated.size()) if true_lookup(i) is not None]
        if "shoebox" not in integrated:
            logger.warning("%s has no shoeboxes (integration.debug.output=True keeps them): no shoebox picture",
                           files["integrated"])  # fmt: skip
        elif on_truth:
            order = sorted(on_truth, key=lambda i: integrated["intensity.sum.value"][i])
            picks = [order[int(round(k))] for k in np.linspace(0, len(order) - 1, min(params.shoeboxes, len(order)))]
            picks = list(dict.fromkeys(picks))
            written.append(plot_shoeboxes(
                _shoebox_panels(integrated, picks, true_lookup), ctx.output_path(f"{stem}_shoeboxes.png"),
                title=f"{label}: integrated shoeboxes, weak to strong",
            ))  # fmt: skip

    written.extend(_spectrum_pictures(ctx, container, index, expt_path))
    logger.info("Wrote %s", ", ".join(str(p) for p in written))
    return written


def _spectrum_pictures(ctx, container: Path, index: int, expt_path: Path) -> list[Path]:
    """spectrum.png from the container's /entry/spread; anomalous.png from <prefix>_run.json."""
    import h5py
    import torch

    from spread_dials.physics.anomalous import TabulatedCurve
    from spread_dials.plots.anomalous import plot_anomalous
    from spread_dials.plots.processing import plot_spectra

    written = []
    with h5py.File(container, "r") as h5:
        group = h5.get("/entry/spread")
        if group is None or "spectrum_weights" not in group:
            logger.warning("%s has no /entry/spread spectra: no spectrum picture", container)
            return written
        energies = group["spectrum_energies_eV"][()]
        weights = group["spectrum_weights"][()]
        shots = group["shot_index"][()] if "shot_index" in group else np.arange(len(weights))
    labels = [f"shot {int(s)}" for s in shots]
    written.append(plot_spectra(energies, weights, ctx.output_path("spectrum.png"), highlight=index, labels=labels,
                                title=f"pulse spectra of {container.name} ({len(weights)} shots)"))  # fmt: skip
    run_json = expt_path.with_name(expt_path.stem + "_run.json")
    if not run_json.is_file():
        logger.warning("No %s: no f'/f'' picture", run_json)
        return written
    record = json.loads(run_json.read_text())
    channels = torch.tensor(record["channels_eV"], dtype=torch.float64)
    curves = []
    for site in record.get("sites", []):
        state = site.get("oxidation_state")
        label = f"{site['label']}" + (f" ({state})" if state else "")
        curves.append(TabulatedCurve(channels, torch.tensor(site["f_prime"], dtype=torch.float64),
                                     torch.tensor(site["f_double_prime"], dtype=torch.float64), label))  # fmt: skip
    if not curves or len(channels) < 2:
        logger.info("No anomalous sites with several channels in %s: no f'/f'' picture", run_json.name)
        return written
    lo, hi = float(channels.min()), float(channels.max())
    written.append(plot_anomalous(
        ctx.output_path("anomalous.png"), curves, band_eV=None, energy_range_eV=(lo - 1.0, hi + 1.0),
        spectrum=(torch.as_tensor(energies[index]), torch.as_tensor(weights[index])),
        title=f"f', f'' of each anomalous site on the simulation's channels; grey: spectrum of shot {int(shots[index])}",
    ))  # fmt: skip
    return written


if __name__ == "__main__":
    run()
