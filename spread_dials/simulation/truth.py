"""Ground truth beside the images: per-shot arrays in the container, a DIALS experiment list and
reflection table per container, and their union for the whole run.

The experiment list is built by dxtbx from the finished container itself (so its detector and
beams are exactly what ``dials.import`` sees), with the true crystal of each shot attached and
the beam's polarization set to the simulated one.  Each experiment's identifier is
``spread-<seed>-<shot>`` so that truth tables of different runs never mix silently.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np

from spread_dials.physics.constants import HC_EV_A
from spread_dials.util.atomic import atomic_path

__all__ = ["container_truth_arrays", "experiment_identifier", "write_container_truth", "merge_truth"]


def experiment_identifier(seed: int, shot: int) -> str:
    return f"spread-{seed}-{shot:07d}"


def container_truth_arrays(results: Sequence) -> dict[str, tuple[np.ndarray, str, str]]:
    """Per-image truth for ``/entry/spread``: name -> (array with row i = image i, units, description)."""
    real = np.stack([r.real_space for r in results])
    return {
        "shot_index": (np.array([r.plan.index for r in results], np.int64), "", "shot number in the run"),
        "seeds": (np.stack([r.plan.seeds.as_array() for r in results]), "",
                  "per-shot seeds: orientation, mosaic, spectrum, noise, model_error (from random.seed and the shot)"),
        "real_space_A": (real, "angstrom", "rows a, b, c of the crystal in the lab frame (dxtbx frame)"),
        "A_matrix": (np.linalg.inv(real), "1/angstrom", "dxtbx A = UB: columns a*, b*, c*"),
        "U_matrix": (np.stack([r.plan.rotation for r in results]), "", "orientation applied to the model's setting"),
        "mosaic_domain_rotations": (np.stack([r.domain_rotations for r in results]), "",
                                    "rotation of each mosaic domain (real space of domain m: real_space @ R_m^T)"),
        "fluence_photons_per_m2": (np.array([r.plan.fluence_photons_per_m2 for r in results]), "1/m^2", "photons per m^2"),
        "photons": (np.array([r.plan.photons for r in results]), "", "photons in the pulse"),
        "mean_energy_eV": (np.array([r.plan.mean_energy_eV for r in results]), "eV",
                           "true spectrum-weighted mean energy"),
        "true_energies_eV": (np.stack([r.plan.energies_eV for r in results]), "eV",
                             "channel energies used to simulate (the container's spectrum is the recorded one)"),
        "recorded_energy_offset_eV": (np.array([r.plan.recorded_offset_eV for r in results]), "eV",
                                      "recorded minus true energy axis (model errors: spectrometer offset + jitter)"),
        "bragg_photons": (np.array([r.bragg_photons for r in results]), "", "expected Bragg photons on the detector"),
        "background_photons": (np.array([r.background_photons for r in results]), "", "expected background photons"),
        "peak_bragg_photons": (np.array([r.peak_bragg_photons for r in results]), "",
                               "expected Bragg photons in the brightest pixel (the strongest spot's peak)"),
    }  # fmt: skip


def write_container_truth(
    h5_path: Path,
    expt_path: Path,
    refl_path: Path,
    results: Sequence,
    seed: int,
    space_group: str,
    unit_cell: Sequence[float],
    polarization_fraction: float,
) -> None:
    """Write the .expt (one experiment per image) and then the .refl of a finished container."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    from spread_dials.adapters.dxtbx_models import crystal_from_real_space

    experiments = ExperimentListFactory.from_filenames([str(h5_path)])
    if len(experiments) != len(results):
        raise RuntimeError(f"{h5_path.name}: dxtbx sees {len(experiments)} images, expected {len(results)}")
    for expt, result in zip(experiments, results):
        expt.crystal = crystal_from_real_space(result.real_space, space_group)
        # the truth's beam is the true one: the container holds the recorded wavelength, which
        # model_errors may shift (spectrometer offset, jitter)
        expt.beam = copy.deepcopy(expt.beam)
        expt.beam.set_wavelength(wavelength_A(result.plan.mean_energy_eV))
        expt.beam.set_polarization_fraction(float(polarization_fraction))
        expt.identifier = experiment_identifier(seed, result.plan.index)
    with atomic_path(expt_path) as tmp:
        experiments.as_file(str(tmp))

    table = flex.reflection_table()
    parts = {k: [] for k in ("miller_index", "panel", "intensity", "xyzcal_px", "bbox", "id", "d")}
    for i, result in enumerate(results):
        s = result.spots
        n = len(s["intensity"])
        for k in ("miller_index", "panel", "intensity", "xyzcal_px", "bbox"):
            parts[k].append(s[k])
        parts["id"].append(np.full(n, i, np.int32))
        q = s["miller_index"].astype(np.float64) @ np.linalg.inv(result.real_space).T
        parts["d"].append(1.0 / np.linalg.norm(q, axis=1) if n else np.zeros(0))
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    n = len(cat["intensity"])
    table["miller_index"] = flex.miller_index(np.ascontiguousarray(cat["miller_index"].reshape(n, 3), dtype=np.int32))
    table["panel"] = flex.size_t(cat["panel"].astype(np.uint64))
    table["id"] = flex.int(cat["id"].astype(np.int32))
    table["xyzcal.px"] = flex.vec3_double(np.ascontiguousarray(cat["xyzcal_px"].reshape(n, 3), dtype=np.float64))
    table["intensity.sum.value"] = flex.double(cat["intensity"].astype(np.float64))
    table["intensity.sum.variance"] = flex.double(cat["intensity"].astype(np.float64))
    table["d"] = flex.double(cat["d"].astype(np.float64))
    table["bbox"] = flex.int6(np.ascontiguousarray(cat["bbox"].reshape(n, 6), dtype=np.int32))
    # xyzcal.mm through each panel's px -> mm mapping (parallax-corrected like DIALS' own)
    detector = experiments[0].detector
    xyz_px = cat["xyzcal_px"].reshape(n, 3)
    xyz_mm = np.zeros((n, 3))
    for p in np.unique(cat["panel"]).tolist():  # one vectorised call per panel
        rows = np.flatnonzero(cat["panel"] == p)
        mm = detector[int(p)].pixel_to_millimeter(flex.vec2_double(np.ascontiguousarray(xyz_px[rows, :2])))
        xyz_mm[rows, :2] = mm.as_double().as_numpy_array().reshape(-1, 2)
    table["xyzcal.mm"] = flex.vec3_double(xyz_mm)
    table.set_flags(flex.bool(n, True), table.flags.predicted)
    for i, expt in enumerate(experiments):
        table.experiment_identifiers()[i] = expt.identifier
    with atomic_path(refl_path) as tmp:
        table.as_file(str(tmp))


def merge_truth(pairs: Sequence[tuple[Path, Path]], expt_path: Path, refl_path: Path) -> tuple[int, int]:
    """Join per-container (.expt, .refl) pairs into one list and one table (ids renumbered).

    Returns (experiments, reflections).
    """
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    experiments = ExperimentList()
    tables = []
    for expt_file, refl_file in pairs:
        el = ExperimentListFactory.from_json_file(str(expt_file), check_format=False)
        table = flex.reflection_table.from_file(str(refl_file))
        offset = len(experiments)
        ids = table["id"].as_numpy_array() + offset
        identifiers = dict(table.experiment_identifiers())
        new = flex.reflection_table()
        for key in table.keys():
            new[key] = table[key]
        new["id"] = flex.int(ids.astype(np.int32))
        for local, identifier in identifiers.items():
            new.experiment_identifiers()[local + offset] = identifier
        tables.append(new)
        experiments.extend(el)
    merged = flex.reflection_table()
    for t in tables:
        merged.extend(t)
    for t in tables:
        for k, v in dict(t.experiment_identifiers()).items():
            merged.experiment_identifiers()[k] = v
    with atomic_path(expt_path) as tmp:
        experiments.as_file(str(tmp))
    with atomic_path(refl_path) as tmp:
        merged.as_file(str(tmp))
    return len(experiments), merged.size()


def wavelength_A(mean_energy_eV: float) -> float:
    """The per-image wavelength written to the container: hc / (spectrum-weighted mean energy)."""
    return HC_EV_A / mean_energy_eV
