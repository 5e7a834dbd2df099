"""Stills processing results compared with the simulation's ground truth, still by still.

The truth is the simulation's merged ``<prefix>.expt`` / ``<prefix>.refl`` (true crystal of every
shot; true Bragg spots: Miller index, panel, intensity-weighted centroid ``xyzcal.px`` and
expected photons ``intensity.sum.value``).  The processing results are dials.stills_process's
``idx-<tag>_integrated.expt/.refl`` (one pair per still, ``output.composite_output=False``) or
composite files (several experiments in one pair).  Images are matched by the imageset's file
name and image index, so moved directories still match.

For every still: was it indexed; the misorientation of the indexed crystal (in the basis setting
closest to the truth, :mod:`spread_dials.validation.orientation`); the cell error; and for its
integrated reflections, which ones lie on a true spot (same panel, predicted centroid within
``max_separation_px`` of the true one, and the same Miller index up to the space group's
symmetry), the position error and the correlation of integrated and true intensities.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spread_dials.util.errors import SpreadError
from spread_dials.validation.orientation import SettingMatch, match_setting

__all__ = [
    "ImageKey",
    "ProcessedStill",
    "StillReport",
    "TruthStill",
    "compare_still",
    "find_processed",
    "load_processed",
    "load_truth",
    "report_rows",
    "summarize",
    "validate",
]

logger = logging.getLogger("dials.spread.validation")

ImageKey = tuple[str, int]  # (container file name, image index in it)
#: integrated reflections with I / sigma(I) at least this are "significant" in the reports
SIGNIFICANT_I_OVER_SIGMA = 2.0


def image_key(experiment) -> ImageKey:
    """(file name, image index) of a still experiment's single image."""
    imageset = experiment.imageset
    paths, indices = imageset.paths(), list(imageset.indices())
    if len(paths) < 1 or len(indices) != 1:
        raise SpreadError(f"experiment {experiment.identifier!r} does not hold exactly one image")
    return os.path.basename(paths[0]), int(indices[0])


def _table_arrays(table, columns: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in columns:
        if name not in table:
            continue
        column = table[name]
        if name == "miller_index":
            out[name] = column.as_vec3_double().as_numpy_array().astype(np.int64).reshape(-1, 3)
        elif name in ("bbox",):
            out[name] = np.stack([p.as_numpy_array() for p in column.parts()], axis=1).reshape(-1, 6)
        else:
            out[name] = np.asarray(column.as_numpy_array())
    return out


@dataclass
class TruthStill:
    """The truth of one shot: its A matrix and true spots (numpy)."""

    key: ImageKey
    identifier: str
    a_matrix: np.ndarray
    cell: np.ndarray
    spots: dict[str, np.ndarray]


def load_truth(expt_path: str | Path, refl_path: str | Path) -> dict[ImageKey, TruthStill]:
    """The simulation's truth (``<prefix>.expt``, ``<prefix>.refl``) per image.

    Raises:
        SpreadError: unreadable files, or files that are not a spread_dials truth.
    """
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    for path in (expt_path, refl_path):
        if not Path(path).is_file():
            raise SpreadError(f"truth file not found: {path}")
    try:
        experiments = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    except Exception as e:  # noqa: BLE001  dxtbx raises many kinds for a bad file
        raise SpreadError(f"cannot read the truth experiments {expt_path}: {e}") from None
    try:
        table = flex.reflection_table.from_file(str(refl_path))
    except Exception as e:  # noqa: BLE001  so does flex.reflection_table.from_file
        raise SpreadError(f"cannot read the truth reflections {refl_path}: {e}") from None
    missing = [c for c in ("miller_index", "panel", "xyzcal.px", "intensity.sum.value", "id") if c not in table]
    if missing:
        raise SpreadError(f"{refl_path} is not a spread_dials truth table (no {', '.join(missing)})")
    if any(e.crystal is None for e in experiments):
        raise SpreadError(f"{expt_path} has experiments without a crystal: not a spread_dials truth")
    arrays = _table_arrays(table, ("miller_index", "panel", "xyzcal.px", "intensity.sum.value", "id", "d"))
    truth = {}
    for i, expt in enumerate(experiments):
        sel = arrays["id"] == i
        a = np.array(expt.crystal.get_A(), dtype=np.float64).reshape(3, 3)
        key = image_key(expt)
        truth[key] = TruthStill(key, expt.identifier, a, np.array(expt.crystal.get_unit_cell().parameters()),
                                {k: v[sel] for k, v in arrays.items()})  # fmt: skip
    return truth


@dataclass
class ProcessedStill:
    """One indexed lattice of a still from stills_process."""

    key: ImageKey
    tag: str
    a_matrix: np.ndarray
    crystal_type: str
    integrated: dict[str, np.ndarray]
    n_indexed: int = 0
    n_strong: int | None = None
    files: dict[str, str] = field(default_factory=dict)


def find_processed(directory: str | Path) -> list[Path]:
    """The integrated experiment files of a stills_process output directory (sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SpreadError(f"processing directory not found: {directory}")
    return sorted(Path(p) for p in glob.glob(str(directory / "*_integrated.expt")))


def _sibling(expt_file: Path, suffix: str) -> Path:
    return expt_file.with_name(expt_file.name[: -len("_integrated.expt")] + suffix)


def load_processed(directory: str | Path) -> dict[ImageKey, list[ProcessedStill]]:
    """Every indexed and integrated lattice in ``directory`` per image (key: file name, index)."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    columns = ("miller_index", "panel", "xyzcal.px", "xyzobs.px.value", "intensity.sum.value",
               "intensity.sum.variance", "id", "d", "bbox", "flags")  # fmt: skip
    out: dict[ImageKey, list[ProcessedStill]] = {}
    for expt_file in find_processed(directory):
        refl_file = _sibling(expt_file, "_integrated.refl")
        if not refl_file.is_file():
            logger.warning("No %s beside %s: skipped", refl_file.name, expt_file.name)
            continue
        experiments = ExperimentListFactory.from_json_file(str(expt_file), check_format=False)
        table = flex.reflection_table.from_file(str(refl_file))
        arrays = _table_arrays(table, columns)
        indexed = _count_by_id(_sibling(expt_file, "_indexed.refl"))
        strong = _count_by_id(_sibling(expt_file, "_strong.refl"), by_id=False)
        tag = expt_file.name[: -len("_integrated.expt")]
        for i, expt in enumerate(experiments):
            if expt.crystal is None:
                continue
            sel = arrays["id"] == i
            key = image_key(expt)
            out.setdefault(key, []).append(
                ProcessedStill(
                    key, tag, np.array(expt.crystal.get_A(), dtype=np.float64).reshape(3, 3),
                    type(expt.crystal).__name__, {k: v[sel] for k, v in arrays.items()},
                    n_indexed=indexed.get(i, 0) if isinstance(indexed, dict) else 0,
                    n_strong=strong if isinstance(strong, int) else None,
                    files={"experiments": str(expt_file), "reflections": str(refl_file)},
                )
            )  # fmt: skip
    return out


def _count_by_id(path: Path, by_id: bool = True):
    """Reflections per experiment id in ``path`` (or their total); None if there is no such file."""
    if not path.is_file():
        return None
    from dials.array_family import flex

    table = flex.reflection_table.from_file(str(path))
    if not by_id:
        return table.size()
    ids = table["id"].as_numpy_array() if "id" in table else np.zeros(table.size(), int)
    values, counts = np.unique(ids, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _asu_indices(miller_index: np.ndarray, space_group: str) -> np.ndarray:
    """Miller indices mapped to the asymmetric unit (Friedel mates merged), (n, 3) int."""
    if len(miller_index) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    from cctbx import crystal, miller
    from cctbx.array_family import flex as cflex

    symmetry = crystal.symmetry(space_group_symbol=space_group)
    indices = cflex.miller_index([tuple(int(v) for v in h) for h in miller_index])
    mapped = miller.set(symmetry, indices, anomalous_flag=False).map_to_asu().indices()
    return np.array(list(mapped), dtype=np.int64).reshape(-1, 3)


@dataclass
class StillReport:
    """The comparison of one still with its truth (JSON-ready; None where it does not apply)."""

    image: str
    index: int
    identifier: str
    true_spots: int
    indexed: bool
    tag: str | None = None
    lattices: int = 0
    crystal_type: str | None = None
    misorientation_deg: float | None = None
    setting: list[list[int]] | None = None
    cell: list[float] | None = None
    cell_error_A: list[float] | None = None
    cell_error_max_pct: float | None = None
    n_strong: int | None = None
    n_indexed: int | None = None
    n_integrated: int = 0
    n_matched: int = 0
    n_index_exact: int = 0
    matched_fraction: float | None = None
    n_significant: int = 0
    n_significant_matched: int = 0
    true_spots_found: int = 0
    position_rmsd_px: float | None = None
    intensity_correlation: float | None = None
    intensity_rank_correlation: float | None = None
    matched_intensities: dict[str, list[float]] | None = None


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def compare_still(truth: TruthStill, lattices: Sequence[ProcessedStill], space_group: str,
                  max_separation_px: float = 5.0, keep_intensities: bool = False) -> StillReport:  # fmt: skip
    """Compare the lattices found on one image with its truth (the closest lattice counts)."""
    report = StillReport(truth.key[0], truth.key[1], truth.identifier, int(len(truth.spots["panel"])), bool(lattices))
    if not lattices:
        return report
    matches = [match_setting(p.a_matrix, truth.a_matrix) for p in lattices]
    best = int(np.argmin([m.angle_deg for m in matches]))
    processed, match = lattices[best], matches[best]
    report.tag = processed.tag
    report.lattices = len(lattices)
    report.crystal_type = processed.crystal_type
    report.misorientation_deg = match.angle_deg
    report.setting = match.setting.tolist()
    report.cell = match.cell.tolist()
    error = match.cell[:3] - truth.cell[:3]
    report.cell_error_A = error.tolist()
    report.cell_error_max_pct = float(np.max(np.abs(error) / truth.cell[:3]) * 100.0)
    report.n_strong = processed.n_strong
    report.n_indexed = processed.n_indexed
    _match_reflections(report, truth, processed, match, space_group, max_separation_px, keep_intensities)
    return report


def _match_reflections(report: StillReport, truth: TruthStill, processed: ProcessedStill, match: SettingMatch,
                       space_group: str, max_separation_px: float, keep_intensities: bool) -> None:  # fmt: skip
    integrated = processed.integrated
    n = len(integrated.get("panel", ()))
    report.n_integrated = int(n)
    if n == 0:
        return
    true_panel = truth.spots["panel"].astype(np.int64)
    true_xy = truth.spots["xyzcal.px"].reshape(-1, 3)[:, :2]
    true_hkl = truth.spots["miller_index"]
    true_i = truth.spots["intensity.sum.value"]
    panel = integrated["panel"].astype(np.int64)
    xy = integrated["xyzcal.px"].reshape(-1, 3)[:, :2]
    hkl = match.to_true_indices(integrated["miller_index"])
    # nearest true spot on the same panel
    nearest = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, np.inf)
    for p in np.unique(panel):
        mine = np.nonzero(panel == p)[0]
        theirs = np.nonzero(true_panel == p)[0]
        if len(theirs) == 0:
            continue
        d = np.linalg.norm(xy[mine, None, :] - true_xy[None, theirs, :], axis=2)
        j = np.argmin(d, axis=1)
        nearest[mine] = theirs[j]
        distance[mine] = d[np.arange(len(mine)), j]
    close = (nearest >= 0) & (distance <= max_separation_px)
    exact = np.zeros(n, dtype=bool)
    same = np.zeros(n, dtype=bool)
    if close.any():
        ours, theirs = hkl[close], true_hkl[nearest[close]]
        exact[close] = np.all(ours == theirs, axis=1)
        same[close] = np.all(_asu_indices(ours, space_group) == _asu_indices(theirs, space_group), axis=1)
    report.n_matched = int(same.sum())
    report.n_index_exact = int(exact.sum())
    report.matched_fraction = float(same.mean())
    if "intensity.sum.variance" in integrated:
        variance = integrated["intensity.sum.variance"]
        significant = integrated["intensity.sum.value"] >= SIGNIFICANT_I_OVER_SIGMA * np.sqrt(np.clip(variance, 0, None))
        significant &= variance > 0
        report.n_significant = int(significant.sum())
        report.n_significant_matched = int((significant & same).sum())
    report.true_spots_found = int(len(np.unique(nearest[same])))
    if same.any():
        report.position_rmsd_px = float(np.sqrt(np.mean(distance[same] ** 2)))
        observed = integrated["intensity.sum.value"][same]
        true = true_i[nearest[same]]
        report.intensity_correlation = _pearson(observed, true)
        report.intensity_rank_correlation = _pearson(_ranks(observed), _ranks(true))
        if keep_intensities:
            report.matched_intensities = {"integrated": observed.tolist(), "true": true.tolist()}


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def summarize(reports: Sequence[StillReport], targets: dict[str, float] | None = None) -> dict[str, Any]:
    """Totals over stills, with pass/fail against ``targets`` (min_indexed_fraction,
    max_median_misorientation_deg, min_matched_fraction)."""
    indexed = [r for r in reports if r.indexed]
    angles = [r.misorientation_deg for r in indexed]
    n_integrated = sum(r.n_integrated for r in indexed)
    n_matched = sum(r.n_matched for r in indexed)
    pooled_obs = [v for r in indexed if r.matched_intensities for v in r.matched_intensities["integrated"]]
    pooled_true = [v for r in indexed if r.matched_intensities for v in r.matched_intensities["true"]]
    pearson = _pearson(np.array(pooled_obs), np.array(pooled_true)) if pooled_obs else None
    spearman = _pearson(_ranks(np.array(pooled_obs)), _ranks(np.array(pooled_true))) if pooled_obs else None
    summary: dict[str, Any] = {
        "stills": len(reports),
        "stills_indexed": len(indexed),
        "indexed_fraction": len(indexed) / len(reports) if reports else 0.0,
        "misorientation_deg": {
            "median": _median(angles),
            "mean": float(np.mean(angles)) if angles else None,
            "max": float(np.max(angles)) if angles else None,
        },
        "non_identity_settings": sum(1 for r in indexed if r.setting != np.eye(3, dtype=int).tolist()),
        "cell_error_max_pct": {"median": _median([r.cell_error_max_pct for r in indexed]),
                               "max": max((r.cell_error_max_pct for r in indexed), default=None)},  # fmt: skip
        "integrated_reflections": n_integrated,
        "integrated_per_indexed_still": n_integrated / len(indexed) if indexed else None,
        "matched_reflections": n_matched,
        "matched_fraction": n_matched / n_integrated if n_integrated else None,
        "significant_reflections": sum(r.n_significant for r in indexed),
        "significant_matched_fraction": (sum(r.n_significant_matched for r in indexed) / sum(r.n_significant for r in indexed)
                                         if sum(r.n_significant for r in indexed) else None),  # fmt: skip
        "index_exact_fraction": sum(r.n_index_exact for r in indexed) / n_integrated if n_integrated else None,
        "true_spots": sum(r.true_spots for r in reports),
        "true_spots_found": sum(r.true_spots_found for r in indexed),
        "position_rmsd_px": _median([r.position_rmsd_px for r in indexed if r.position_rmsd_px is not None]),
        "intensity_correlation": pearson,
        "intensity_rank_correlation": spearman,
    }
    if targets:
        checks = {}
        if targets.get("min_indexed_fraction") is not None:
            checks["indexed_fraction"] = summary["indexed_fraction"] >= targets["min_indexed_fraction"]
        if targets.get("max_median_misorientation_deg") is not None:
            median = summary["misorientation_deg"]["median"]
            checks["median_misorientation"] = median is not None and median < targets["max_median_misorientation_deg"]
        if targets.get("min_matched_fraction") is not None:
            mf = summary["matched_fraction"]
            checks["matched_fraction"] = mf is not None and mf >= targets["min_matched_fraction"]
        summary["targets"] = {"values": dict(targets), "passed": checks, "all_passed": all(checks.values())}
    return summary


def validate(truth_expt: str | Path, truth_refl: str | Path, processed_dir: str | Path, space_group: str | None = None,
             max_separation_px: float = 5.0) -> tuple[list[StillReport], dict[ImageKey, list[ProcessedStill]]]:  # fmt: skip
    """Compare every still of the truth with the processing results in ``processed_dir``.

    Raises:
        SpreadError: missing or unreadable inputs; processed images that are not in the truth.
    """
    truth = load_truth(truth_expt, truth_refl)
    processed = load_processed(processed_dir)
    strangers = sorted(set(processed) - set(truth))
    if strangers:
        raise SpreadError(
            f"{len(strangers)} processed images are not in the truth {truth_expt}, e.g. {strangers[0][0]} image "
            f"{strangers[0][1]}: a different simulation?"
        )
    if space_group is None:
        from dxtbx.model.experiment_list import ExperimentListFactory

        crystal = ExperimentListFactory.from_json_file(str(truth_expt), check_format=False)[0].crystal
        space_group = str(crystal.get_space_group().info())
    reports = [compare_still(t, processed.get(key, []), space_group, max_separation_px, keep_intensities=True)
               for key, t in sorted(truth.items())]  # fmt: skip
    return reports, processed


def report_rows(reports: Sequence[StillReport]) -> list[dict[str, Any]]:
    """JSON-ready per-still dicts without the bulky matched intensities."""
    rows = []
    for r in reports:
        d = asdict(r)
        d.pop("matched_intensities", None)
        rows.append(d)
    return rows
