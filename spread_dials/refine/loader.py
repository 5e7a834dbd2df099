"""The DIALS side of dials.spread_refine: integrated stills -> :class:`~spread_dials.refine.shots.ShotSet`.

Reads what dials.stills_process writes (``idx-*_integrated.expt`` / ``idx-*_integrated.refl``,
one or several experiments per file pair), the raw images those experiments point at, and one
spectrum per still:

- geometry: the detector (one for every still: their panel frames, sizes and trusted ranges must
  agree) as a float64 :class:`~spread_dials.physics.geometry.PanelArray`, and the beam's
  direction and polarization (as :func:`~spread_dials.adapters.dxtbx_models.sources_from_beam`
  derives them, again one for every still).  dxtbx's FormatNXmx computes each panel's mu at the
  wavelength of the first image of a container, so mu differs slightly between containers; the
  PanelArray's attenuation length is 1 / (mu averaged over the stills).
- crystal: the real-space rows a, b, c (A) of each experiment's crystal.
- shoeboxes: the reflections flagged ``integrated_sum`` whose bounding box, clipped to its panel,
  has pixels; ``reflection`` is the row of a shoebox among its experiment's rows of the .refl
  file (its row in the file when the file holds one experiment), so results can be written back.
- pixels: the raw image (``imageset.get_raw_data``) cut to each bbox, counts = ADU / quantum
  gain, and ``valid`` from ``imageset.get_mask`` (static and external masks, trusted range).
  The .refl's ``shoebox`` column is not read: the images are the source.
- spectrum: ``/entry/spread/spectrum_energies_eV[i]`` and ``spectrum_weights[i]`` of the image's
  NXmx container (i = the image's index in its container, as the imageset records it), or a
  spectra file (:func:`write_spectra_file`); weights are normalised to sum 1.

Spectra file: an ``.npz`` holding ``identifiers`` (n,) str (experiment identifiers),
``energies_eV`` (n, m) float and ``weights`` (n, m) float (relative; pad shorter spectra with
weight 0).

Needs dxtbx and DIALS; :mod:`spread_dials.refine.shots` is the pure-torch part.

Example::

    shots = load_shots(sorted(Path("proc").glob("idx-*_integrated.expt")),
                       sorted(Path("proc").glob("idx-*_integrated.refl")))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import torch
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory
from torch import Tensor

from spread_dials.adapters.dxtbx_models import panel_array_from_detector, real_space_from_crystal, sources_from_beam
from spread_dials.refine.shots import Shoeboxes, Shot, ShotSet
from spread_dials.util.errors import SpreadError

__all__ = [
    "REQUIRED_COLUMNS",
    "SPECTRUM_ENERGIES",
    "SPECTRUM_WEIGHTS",
    "load_shots",
    "read_spectra_file",
    "write_spectra_file",
]

logger = logging.getLogger("dials.spread.refine")

#: reflection table columns the loader needs
REQUIRED_COLUMNS = ("id", "bbox", "miller_index", "panel", "flags")
#: the container datasets of the recorded spectra (row i: image i), as spread_dials.io.nxmx writes them
SPECTRUM_ENERGIES = "/entry/spread/spectrum_energies_eV"
SPECTRUM_WEIGHTS = "/entry/spread/spectrum_weights"
#: beams of different stills must agree to this (unit vectors, polarization fraction)
_BEAM_TOL = 1e-6

Spectrum = tuple[np.ndarray, np.ndarray]


def write_spectra_file(
    path: str | Path, identifiers: Sequence[str], energies_eV: np.ndarray, weights: np.ndarray
) -> Path:
    """Write a spectra file: one spectrum (energies in eV, relative weights) per experiment identifier.

    Args:
        path: the ``.npz`` to write (numpy appends ``.npz`` to a name without it).
        identifiers: (n,) experiment identifiers.
        energies_eV, weights: (n, m) channels of each still (pad with weight 0 where fewer).

    Returns:
        The path written.
    """
    ids = np.asarray([str(i) for i in identifiers], dtype=np.str_)
    energies = np.asarray(energies_eV, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if energies.ndim != 2 or energies.shape != w.shape or energies.shape[0] != ids.shape[0]:
        raise ValueError(f"need (n, m) energies and weights for n identifiers: got {energies.shape}, {w.shape}, "
                         f"{ids.shape[0]} identifiers")  # fmt: skip
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    np.savez(path, identifiers=ids, energies_eV=energies, weights=w)
    return path


def read_spectra_file(path: str | Path) -> dict[str, Spectrum]:
    """The spectra of a spectra file (:func:`write_spectra_file`): identifier -> (energies_eV, weights).

    Raises:
        SpreadError: if the file cannot be read or its arrays do not fit together.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("identifiers", "energies_eV", "weights") if k in npz}
    except (OSError, ValueError) as e:
        raise SpreadError(f"cannot read spectra file {path}: {e}") from None
    missing = [k for k in ("identifiers", "energies_eV", "weights") if k not in arrays]
    if missing:
        raise SpreadError(f"spectra file {path} lacks {', '.join(missing)} (needs identifiers, energies_eV, weights)")
    ids, energies, weights = arrays["identifiers"], arrays["energies_eV"], arrays["weights"]
    if ids.ndim != 1 or energies.ndim != 2 or energies.shape != weights.shape or energies.shape[0] != ids.shape[0]:
        raise SpreadError(f"spectra file {path}: identifiers {ids.shape}, energies_eV {energies.shape} and weights "
                          f"{weights.shape} must be (n,), (n, m), (n, m)")  # fmt: skip
    spectra = {str(i): (energies[k].astype(np.float64), weights[k].astype(np.float64)) for k, i in enumerate(ids)}
    if len(spectra) != len(ids):
        raise SpreadError(f"spectra file {path} repeats experiment identifiers")
    return spectra


# -- files -----------------------------------------------------------------------------------------


def _read_experiments(path: Path) -> ExperimentList:
    """The experiments of ``path`` with their images opened (dxtbx format classes checked)."""
    if not path.is_file():
        raise SpreadError(f"experiment file not found: {path}")
    try:
        return ExperimentListFactory.from_json_file(str(path), check_format=True)
    except Exception as e:  # noqa: BLE001  dxtbx raises many kinds for bad JSON or images
        error = e
    # say which: the file itself, a missing image container, or one dxtbx cannot open
    try:
        experiments = ExperimentListFactory.from_json_file(str(path), check_format=False)
    except Exception as e:  # noqa: BLE001
        raise SpreadError(f"cannot read experiments from {path}: {type(e).__name__}: {e}") from None
    images = [p for imageset in experiments.imagesets() for p in imageset.paths()]
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise SpreadError(f"image container not found: {missing[0]} (the images of {path})")
    raise SpreadError(f"cannot open image container {', '.join(dict.fromkeys(images))} (the images of {path}) "
                      f"with dxtbx: {type(error).__name__}: {error}")  # fmt: skip


def _read_reflections(path: Path):
    if not path.is_file():
        raise SpreadError(f"reflection file not found: {path}")
    try:
        table = flex.reflection_table.from_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise SpreadError(f"cannot read reflections from {path}: {type(e).__name__}: {e}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table]
    if missing:
        raise SpreadError(f"missing column(s) {', '.join(missing)} in reflection file {path}: "
                          "give dials.stills_process's *_integrated.refl")  # fmt: skip
    return table


@dataclass
class _Rows:
    """One experiment's integrated reflections (numpy), before pixels are read."""

    reflection: np.ndarray  # (B,) rows among the experiment's rows of the table
    miller_index: np.ndarray  # (B, 3)
    panel: np.ndarray  # (B,)
    bbox: np.ndarray  # (B, 4) x0, x1, y0, y1 clipped to the panel
    n_integrated: int
    n_clipped: int


def _table_arrays(table, path: Path) -> dict[str, np.ndarray]:
    n = table.size()
    arrays = {
        "id": table["id"].as_numpy_array().astype(np.int64),
        "panel": table["panel"].as_numpy_array().astype(np.int64),
        "integrated": table.get_flags(table.flags.integrated_sum).as_numpy_array(),
    }
    if n:
        # int6 and miller_index have no as_numpy_array (DIALS_NOTES section 4)
        arrays["bbox"] = np.stack([p.as_numpy_array() for p in table["bbox"].parts()], axis=1).astype(np.int64)
        arrays["miller_index"] = table["miller_index"].as_vec3_double().as_numpy_array().astype(np.int64)
    else:
        arrays["bbox"] = np.zeros((0, 6), dtype=np.int64)
        arrays["miller_index"] = np.zeros((0, 3), dtype=np.int64)
    if not arrays["integrated"].any():
        raise SpreadError(f"no integrated reflections (flag integrated_sum) in {path}: "
                          "give dials.stills_process's *_integrated.refl")  # fmt: skip
    return arrays


def _experiment_ids(table, experiments: ExperimentList, expt_path: Path, refl_path: Path) -> list[int]:
    """The table's ``id`` of each experiment (-1: none of its rows), matched by identifier."""
    mapping = dict(table.experiment_identifiers())
    ids_present = set(np.unique(table["id"].as_numpy_array()).tolist())
    if not mapping:  # an old table with no identifiers: ids are positions in the list
        if not ids_present <= set(range(len(experiments))):
            raise SpreadError(f"reflection file {refl_path} has experiment ids {sorted(ids_present)} but "
                              f"{expt_path} holds {len(experiments)} experiments")  # fmt: skip
        return list(range(len(experiments)))
    by_identifier = {identifier: i for i, identifier in mapping.items()}
    known = {e.identifier for e in experiments}
    strangers = sorted(identifier for i, identifier in mapping.items() if i in ids_present and identifier not in known)
    if strangers:
        raise SpreadError(f"reflection file {refl_path} does not belong to {expt_path}: its experiment "
                          f"identifier(s) {', '.join(strangers[:3])} are not in it")  # fmt: skip
    return [int(by_identifier.get(e.identifier, -1)) for e in experiments]


def _centre_crop(lo: np.ndarray, hi: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) cut to at most ``size`` pixels about its centre (unchanged when None or smaller)."""
    if size is None:
        return lo, hi
    wide = hi - lo > size
    start = np.where(wide, (lo + hi) // 2 - size // 2, lo)
    return start, np.where(wide, start + size, hi)


def _select_rows(arrays: dict[str, np.ndarray], table_id: int, n_fast: int, n_slow: int, n_panels: int,
                 max_shoebox_px: int | None = None) -> _Rows:  # fmt: skip
    """The integrated reflections of one experiment whose bbox keeps pixels after clipping (each
    bbox first cut to ``max_shoebox_px`` per side about its centre)."""
    rows = np.flatnonzero(arrays["id"] == table_id) if table_id >= 0 else np.zeros(0, dtype=np.int64)
    integrated = arrays["integrated"][rows]
    bbox = arrays["bbox"][rows][:, :4].copy()
    bbox[:, 0], bbox[:, 1] = _centre_crop(bbox[:, 0], bbox[:, 1], max_shoebox_px)
    bbox[:, 2], bbox[:, 3] = _centre_crop(bbox[:, 2], bbox[:, 3], max_shoebox_px)
    x0, x1 = np.clip(bbox[:, 0], 0, n_fast), np.clip(bbox[:, 1], 0, n_fast)
    y0, y1 = np.clip(bbox[:, 2], 0, n_slow), np.clip(bbox[:, 3], 0, n_slow)
    panel = arrays["panel"][rows]
    keep = integrated & (x1 > x0) & (y1 > y0) & (panel >= 0) & (panel < n_panels)
    clipped = np.stack([x0, x1, y0, y1], axis=1)
    n_clipped = int((keep & (clipped != bbox).any(axis=1)).sum())
    return _Rows(
        reflection=np.flatnonzero(keep),
        miller_index=arrays["miller_index"][rows][keep],
        panel=panel[keep],
        bbox=clipped[keep],
        n_integrated=int(integrated.sum()),
        n_clipped=n_clipped,
    )


def _image_source(experiment, expt_path: Path) -> tuple[str, int]:
    """(file, index of the image in that file) of a still experiment's single image."""
    imageset = experiment.imageset
    if imageset is None or len(imageset) != 1:
        n = 0 if imageset is None else len(imageset)
        raise SpreadError(f"experiment {experiment.identifier!r} of {expt_path} has {n} images; "
                          "dials.spread_refine reads stills, one image per experiment")  # fmt: skip
    path = imageset.get_path(0)
    # a multi-image container (NXmx): the imageset records the image's index in the file
    index = int(imageset.indices()[0]) if imageset.reader().is_single_file_reader() else 0
    return path, index


class _ContainerSpectra:
    """Spectra read from the NXmx containers (the last container's arrays kept: stills_process
    output sorted by name visits a container's images one after another)."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._arrays: Spectrum | None = None

    def get(self, path: str, index: int, identifier: str) -> Spectrum:
        if path != self._path:
            try:
                with h5py.File(path, "r") as h5:
                    if SPECTRUM_ENERGIES not in h5 or SPECTRUM_WEIGHTS not in h5:
                        raise SpreadError(f"no spectrum for experiment {identifier!r}: image container {path} has no "
                                          f"{SPECTRUM_ENERGIES} / {SPECTRUM_WEIGHTS}; give a spectra file")  # fmt: skip
                    self._arrays = (h5[SPECTRUM_ENERGIES][()], h5[SPECTRUM_WEIGHTS][()])
                    self._path = path
            except OSError as e:
                raise SpreadError(f"cannot open image container {path} with h5py to read its spectra: {e}") from None
        energies, weights = self._arrays
        if energies.ndim != 2 or energies.shape != weights.shape or not 0 <= index < energies.shape[0]:
            raise SpreadError(f"no spectrum for experiment {identifier!r}: image {index} of {path}, whose spectra "
                              f"are {energies.shape} energies, {weights.shape} weights")  # fmt: skip
        return energies[index], weights[index]


def _normalised(spectrum: Spectrum, identifier: str, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    energies, weights = (np.asarray(a, dtype=np.float64).reshape(-1) for a in spectrum)
    total = weights.sum()
    finite = np.isfinite(energies).all() and np.isfinite(total)
    if energies.size == 0 or energies.size != weights.size or not finite or total <= 0 or (weights < 0).any():
        raise SpreadError(f"bad spectrum for experiment {identifier!r} in {source}: {energies.size} energies, "
                          f"{weights.size} weights summing to {total}")  # fmt: skip
    return torch.from_numpy(energies.copy()), torch.from_numpy(weights / total)


# -- pixels ----------------------------------------------------------------------------------------


def _cut(panels: Sequence[np.ndarray], rows: _Rows) -> np.ndarray:
    """The pixels of every bbox, flat in shoebox order, row-major (slow, fast) inside each."""
    stack = np.stack(panels)  # (P, n_slow, n_fast)
    n_slow, n_fast = stack.shape[1:]
    x0, x1, y0, y1 = rows.bbox.T
    nf, ns = x1 - x0, y1 - y0
    area = nf * ns
    sb = np.repeat(np.arange(len(area)), area)
    local = np.arange(int(area.sum())) - np.repeat(np.cumsum(area) - area, area)
    fast = x0[sb] + local % nf[sb]
    slow = y0[sb] + local // nf[sb]
    return stack.reshape(-1)[(rows.panel[sb] * n_slow + slow) * n_fast + fast]


def _shoeboxes(experiment, rows: _Rows, quantum_gain: float) -> Shoeboxes:
    imageset = experiment.imageset
    raw = [p.as_numpy_array() for p in imageset.get_raw_data(0)]
    mask = [m.as_numpy_array() for m in imageset.get_mask(0)]
    counts = _cut(raw, rows).astype(np.float64) / quantum_gain
    valid = _cut(mask, rows).astype(bool)

    def long(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    x0, x1, y0, y1 = rows.bbox.T
    return Shoeboxes(
        miller_index=long(rows.miller_index),
        panel=long(rows.panel),
        fast0=long(x0),
        slow0=long(y0),
        n_fast=long(x1 - x0),
        n_slow=long(y1 - y0),
        counts=torch.from_numpy(counts),
        valid=torch.from_numpy(valid),
        reflection=long(rows.reflection),
    )


# -- geometry --------------------------------------------------------------------------------------


class _Geometry:
    """The detector and beam of the first still; every other still must agree with them."""

    def __init__(self) -> None:
        self.detector = None
        self.beam = None
        self.where = ""

    def add(self, experiment, expt_path: Path) -> None:
        detector, beam = experiment.detector, experiment.beam
        if detector is None or beam is None:
            raise SpreadError(f"experiment {experiment.identifier!r} of {expt_path} has no detector or beam")
        if self.detector is None:
            self.detector, self.beam, self.where = detector, beam, f"{expt_path} ({experiment.identifier})"
            return
        if detector is not self.detector and not self._same_detector(detector):
            raise SpreadError(f"experiments with different detectors: {experiment.identifier!r} of {expt_path} and "
                              f"{self.where}; dials.spread_refine needs one detector geometry")  # fmt: skip
        if beam is not self.beam and not self._same_beam(beam):
            raise SpreadError(f"experiments with different beam directions or polarization: {experiment.identifier!r} "
                              f"of {expt_path} and {self.where}")  # fmt: skip

    def _same_detector(self, detector) -> bool:
        ref = self.detector
        if len(detector) != len(ref) or not detector.is_similar_to(ref):
            return False
        return all(abs(a.get_thickness() - b.get_thickness()) <= 1e-9 for a, b in zip(detector, ref))

    def _same_beam(self, beam) -> bool:
        ref = self.beam
        vectors = ("get_sample_to_source_direction", "get_polarization_normal")
        for name in vectors:
            a = np.asarray(getattr(beam, name)(), dtype=np.float64)
            b = np.asarray(getattr(ref, name)(), dtype=np.float64)
            if np.abs(a / np.linalg.norm(a) - b / np.linalg.norm(b)).max() > _BEAM_TOL:
                return False
        return abs(beam.get_polarization_fraction() - ref.get_polarization_fraction()) <= _BEAM_TOL

    def panels(self, n_layers: int, shots: list[Shot]):
        try:
            panels = panel_array_from_detector(self.detector, n_layers=n_layers, dtype=torch.float64)
        except ValueError as e:
            raise SpreadError(f"detector of {self.where}: {e}") from None
        # (the programs average over every rank's stills afterwards and log that mean)
        return with_mean_sensor_mu(panels, [s.sensor_mu_per_mm for s in shots], log=False)


def with_mean_sensor_mu(panels, mus: list[Tensor], log: bool = True):
    """``panels`` with the attenuation length 1 / (mean of the stills' sensor mu), the mean summed
    in the order given (so that any split of the stills over MPI ranks, gathered in one order,
    gives the same bits).  dxtbx's FormatNXmx computes mu per container at its first image's
    wavelength, so the stills differ slightly; the log gives their range.

    Args:
        panels: a PanelArray.
        mus: one (P,) tensor (1/mm) per still.
        log: log the mean and the stills' range.
    """
    total = None
    for mu in mus:
        total = mu.clone() if total is None else total + mu
    mu = total / len(mus)
    if log and bool((mu > 0).any()):
        stacked = torch.stack(mus)
        spread_pct = 100 * float(((stacked.amax(0) - stacked.amin(0)) / torch.where(mu > 0, mu, 1.0)).max())
        logger.info("Sensor mu %.4g 1/mm (mean over %d stills and the panels; the stills range over %.2g%%)",
                    float(mu[mu > 0].mean()), len(mus), spread_pct)  # fmt: skip
    att = torch.where(mu > 0, 1.0 / torch.where(mu > 0, mu, 1.0), 0.0)
    return replace(panels, attenuation_length_mm=att.to(panels.attenuation_length_mm.dtype))


#: unit-cell length ties (a, b, c) of each crystal system (cctbx names)
_CELL_TIES = {"Triclinic": (0, 1, 2), "Monoclinic": (0, 1, 2), "Orthorhombic": (0, 1, 2), "Tetragonal": (0, 0, 1),
              "Trigonal": (0, 0, 1), "Hexagonal": (0, 0, 1), "Cubic": (0, 0, 0)}  # fmt: skip


def cell_ties(crystal) -> tuple[int, int, int]:
    """Which unit-cell length parameter scales a, b, c of a dxtbx crystal under its lattice
    symmetry (a = b for tetragonal, trigonal and hexagonal settings, a = b = c for cubic)."""
    return _CELL_TIES[crystal.get_space_group().crystal_system()]


# -- the loader ------------------------------------------------------------------------------------


def load_shots(
    experiment_files: Sequence[Path],
    reflection_files: Sequence[Path],
    quantum_gain: float = 1.0,
    spectra_file: Path | None = None,
    n_layers: int = 1,
    min_shoeboxes: int = 1,
    max_shoebox_px: int | None = None,
    stripe: tuple[int, int] = (0, 1),
) -> ShotSet:
    """The integrated stills of dials.stills_process output, with their pixels and spectra.

    Args:
        experiment_files: ``*_integrated.expt`` files (one or several experiments each).
        reflection_files: the matching ``*_integrated.refl`` files, in the same order; rows are
            matched to experiments by experiment identifier (the ``id`` column).
        quantum_gain: ADU per photon: counts = raw pixel value / quantum_gain.
        spectra_file: a spectra file (:func:`write_spectra_file`) to use instead of the spectra
            in the image containers.
        n_layers: sensor layers of the PanelArray.
        min_shoeboxes: stills with fewer usable shoeboxes are skipped (and counted in the log).
        max_shoebox_px: each shoebox is cut to at most this many pixels per side about the
            centre of its bbox (None: the whole bbox).  dials.stills_process makes boxes of
            ~30 x 30 pixels around spots a few pixels wide; the rest is background.
        stripe: (rank, size): keep only the experiments whose index among all experiments of
            all files (file order, then experiment order) is rank modulo size (MPI ranks sharing
            one file).

    Returns:
        The stills in file order (then experiment order), with the shared geometry.

    Raises:
        SpreadError: for bad input: unequal numbers of files, unreadable files, reflection files
            without the needed columns or with no integrated reflections, a reflection file that
            does not belong to its experiment file, image containers that cannot be found or
            opened, missing spectra, stills with different detectors or beams, a repeated
            experiment identifier, or no still with ``min_shoeboxes`` shoeboxes.
    """
    experiment_files = [Path(p) for p in experiment_files]
    reflection_files = [Path(p) for p in reflection_files]
    if not experiment_files:
        raise SpreadError("no experiment files given")
    if len(experiment_files) != len(reflection_files):
        raise SpreadError(f"mismatched input: {len(experiment_files)} experiment files but {len(reflection_files)} "
                          "reflection files (give one .refl per .expt, in the same order)")  # fmt: skip
    if quantum_gain <= 0:
        raise SpreadError(f"quantum_gain must be positive, not {quantum_gain}")
    spectra = read_spectra_file(spectra_file) if spectra_file is not None else None
    from_containers = _ContainerSpectra()
    geometry = _Geometry()
    shots: list[Shot] = []
    sources: list[str] = []
    seen: dict[str, Path] = {}
    ties: tuple[int, int, int] | None = None
    n_few = n_integrated = n_dropped = n_clipped = 0
    counter = -1

    for expt_path, refl_path in zip(experiment_files, reflection_files):
        experiments = _read_experiments(expt_path)
        table = _read_reflections(refl_path)
        arrays = _table_arrays(table, refl_path)
        table_ids = _experiment_ids(table, experiments, expt_path, refl_path)
        for experiment, table_id in zip(experiments, table_ids):
            identifier = experiment.identifier
            if identifier in seen:
                raise SpreadError(f"experiment identifier {identifier!r} appears in {seen[identifier]} and {expt_path}")
            seen[identifier] = expt_path
            if experiment.crystal is None:
                raise SpreadError(f"experiment {identifier!r} of {expt_path} has no crystal: give integrated stills")
            counter += 1
            if counter % stripe[1] != stripe[0]:
                continue
            geometry.add(experiment, expt_path)
            if ties is None:
                ties = cell_ties(experiment.crystal)
            elif cell_ties(experiment.crystal) != ties:
                raise SpreadError(f"experiment {identifier!r} of {expt_path} has a {experiment.crystal.get_space_group().crystal_system()} "
                                  "crystal unlike the first still's: dials.spread_refine needs one lattice symmetry")  # fmt: skip
            n_fast, n_slow = experiment.detector[0].get_image_size()
            rows = _select_rows(arrays, table_id, n_fast, n_slow, len(experiment.detector), max_shoebox_px)
            n_integrated += rows.n_integrated
            n_dropped += rows.n_integrated - len(rows.reflection)
            n_clipped += rows.n_clipped
            if len(rows.reflection) < min_shoeboxes:
                n_few += 1
                continue
            image_path, image_index = _image_source(experiment, expt_path)
            if spectra is not None:
                if identifier not in spectra:
                    raise SpreadError(f"no spectrum for experiment {identifier!r} (of {expt_path}) in spectra file "
                                      f"{spectra_file}")  # fmt: skip
                energy, weight = _normalised(spectra[identifier], identifier, str(spectra_file))
            else:
                spectrum = from_containers.get(image_path, image_index, identifier)
                energy, weight = _normalised(spectrum, identifier, image_path)
            try:
                shoeboxes = _shoeboxes(experiment, rows, quantum_gain)
            except (RuntimeError, OSError) as e:
                raise SpreadError(f"cannot read image {image_index} of {image_path} (of {expt_path}): {e}") from None
            mu = torch.tensor([p.get_mu() for p in experiment.detector], dtype=torch.float64)
            shots.append(Shot(identifier, real_space_from_crystal(experiment.crystal), energy, weight, shoeboxes, mu))
            sources.append(f"{image_path}:{image_index}")
            logger.debug("%s: %d shoeboxes, %d pixels (%s)", identifier, shoeboxes.n_shoeboxes, shoeboxes.n_pixels,
                         sources[-1])  # fmt: skip

    if n_dropped:
        logger.info("Left out %d of %d integrated reflections whose bounding box has no pixel on its panel",
                    n_dropped, n_integrated)  # fmt: skip
    if n_clipped:
        logger.info("Clipped %d bounding boxes to their panel", n_clipped)
    if n_few:
        logger.info("Skipped %d of %d stills with fewer than %d shoeboxes", n_few, len(seen), min_shoeboxes)
    if not shots:
        raise SpreadError(f"no still has at least {min_shoeboxes} integrated shoeboxes in {len(experiment_files)} "
                          f"experiment file(s) starting with {experiment_files[0]}")  # fmt: skip
    beam = sources_from_beam(geometry.beam, 1.0, dtype=torch.float64)
    n_boxes = sum(s.shoeboxes.n_shoeboxes for s in shots)
    n_pixels = sum(s.shoeboxes.n_pixels for s in shots)
    n_valid = sum(int(s.shoeboxes.valid.sum()) for s in shots)
    logger.info("Loaded %d stills: %d shoeboxes, %d pixels (%d valid)", len(shots), n_boxes, n_pixels, n_valid)
    return ShotSet(
        panels=geometry.panels(n_layers, shots),
        beam_direction=beam.direction[0].clone(),
        e_vector=beam.e_vector.clone(),
        polarization_fraction=float(beam.polarization_fraction),
        shots=shots,
        sources=sources,
        cell_ties=ties,
    )
