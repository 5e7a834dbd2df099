"""dials.spread_simulate end to end: real subprocesses, real HDF5, the stock /usr/bin/dials.import,
2 real MPI ranks and a real SIGKILL.  The truth is checked against dxtbx reading the files and
against DIALS' own models."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory

from spread_dials.adapters.dxtbx_models import detector_from_layout
from spread_dials.command_line import simulate
from spread_dials.detectors.layout import silicon_mu_per_mm
from spread_dials.detectors.simple import simple_detector
from spread_dials.physics.constants import HC_EV_A

EXE = shutil.which("dials.spread_simulate", path=str(Path(sys.executable).parent)) or shutil.which("dials.spread_simulate")
ENERGY = 7120.0
# a small, fully featured run: 4 containers of 2 shots, SASE spectra, noise, gain error, PSF
RUN = [
    "detector.type=simple", "detector.simple.n_fast=256", "detector.simple.n_slow=256", "detector.distance_mm=60",
    "detector.simple.tilt_deg=5", f"beam.energy_eV={ENERGY:g}", "beam.nchannels=20", "crystal.mosaic_domains=4",
    "nimages=8", "output.images_per_container=2", "noise.readout_noise_adu=2", "noise.gain_error_rms=0.02",
    "noise.adc_offset_adu=10", "psf.fwhm_px=1", "random.seed=7", "mp.nproc=1",
]  # fmt: skip


def _layout():
    """The detector of RUN, built independently of the program."""
    return simple_detector(256, 256, 0.075, 60.0, 2, 2, gap_mm=1.0, thickness_mm=0.32,
                           mu_per_mm=silicon_mu_per_mm(ENERGY), tilt_deg=5.0)  # fmt: skip


def _simulate(directory: Path, *args: str, prefix: list[str] | None = None, check: bool = True, **kwargs):
    assert EXE, "dials.spread_simulate is not installed (pip install -e .)"
    cmd = [*(prefix or []), EXE, *args, f"output.directory={directory}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _images(directory: Path, prefix: str = "images") -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(directory.glob(f"{prefix}_[0-9]*.h5")):
        with h5py.File(path, "r") as h5:
            out[path.name] = h5["/entry/data/data"][()]
    return out


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("serial")
    _simulate(directory, *RUN)
    return directory


def test_outputs_and_stock_dials_import(serial):
    """The stock dials.import reads every container: geometry identical to the truth, one beam per
    shot at hc / (its spectrum's mean energy), pixels identical to the file."""
    containers = sorted(serial.glob("images_[0-9]*.h5"))
    assert [p.name for p in containers] == [f"images_{c:05d}.h5" for c in range(4)]
    assert not list(serial.glob(".*tmp*"))
    result = subprocess.run(["/usr/bin/dials.import", *map(str, containers)], cwd=serial, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    imported = ExperimentListFactory.from_json_file(str(serial / "imported.expt"), check_format=True)
    assert len(imported) == 8
    truth = detector_from_layout(_layout())
    for i, expt in enumerate(imported):
        assert expt.scan is None and expt.goniometer is None
        for panel, ref in zip(expt.detector, truth):
            for getter in ("get_origin", "get_fast_axis", "get_slow_axis", "get_pixel_size"):
                assert np.abs(np.subtract(getattr(panel, getter)(), getattr(ref, getter)())).max() <= 1e-6
            assert panel.get_image_size() == ref.get_image_size()
        with h5py.File(containers[i // 2], "r") as h5:
            energy = h5["/entry/spread/mean_energy_eV"][i % 2]
            e, w = h5["/entry/spread/spectrum_energies_eV"][i % 2], h5["/entry/spread/spectrum_weights"][i % 2]
            data = h5["/entry/data/data"][i % 2]
        assert energy == pytest.approx((e * w).sum() / w.sum(), rel=1e-12)
        assert expt.beam.get_wavelength() == pytest.approx(HC_EV_A / energy, rel=1e-12)
        raw = expt.imageset.get_raw_data(0)
        assert np.array_equal(np.concatenate([r.as_numpy_array() for r in raw]), data)
        assert data.dtype == np.int32
    record = json.loads((serial / "images_run.json").read_text())
    assert record["status"] == "complete" and record["summary"]["shots_simulated"] == 8
    assert record["parameters"]["nimages"] == "8" and "beam" in record["phil"]
    assert len(record["sites"]) == 1 and len(record["sites"][0]["f_double_prime"]) == 20
    assert record["structure_factor_source"]["model_sha256"]


def test_truth_experiments_and_reflections(serial):
    """The truth .expt points at each container and index and carries the simulated A matrix; the
    .refl holds one table with ids per shot and positions where DIALS' stills predictor puts them."""
    from dials.algorithms.spot_prediction import StillsReflectionPredictor

    experiments = ExperimentListFactory.from_json_file(str(serial / "images.expt"), check_format=False)
    table = flex.reflection_table.from_file(str(serial / "images.refl"))
    assert len(experiments) == 8 and len(set(experiments.identifiers())) == 8
    assert set(table["id"]) == set(range(8))
    assert dict(table.experiment_identifiers()) == {i: e.identifier for i, e in enumerate(experiments)}
    for i, expt in enumerate(experiments):
        path = Path(expt.imageset.paths()[0])
        assert path.name == f"images_{i // 2:05d}.h5" and list(expt.imageset.indices()) == [i % 2]
        with h5py.File(serial / path.name, "r") as h5:
            a_matrix = h5["/entry/spread/A_matrix"][i % 2]
            assert h5["/entry/spread/shot_index"][i % 2] == i
            assert h5["/entry/spread/mosaic_domain_rotations"].shape == (2, 4, 3, 3)
        assert np.allclose(np.array(expt.crystal.get_A()).reshape(3, 3), a_matrix, atol=1e-12)
        assert expt.crystal.get_space_group().type().lookup_symbol() == "P 21 21 21"
        sel = table.select(table["id"] == i)
        assert sel.size() > 0
        # xyzcal.mm is each panel's own (parallax-corrected) px -> mm mapping of xyzcal.px
        for p, px, mm in zip(sel["panel"], sel["xyzcal.px"], sel["xyzcal.mm"]):
            assert np.allclose(expt.detector[int(p)].pixel_to_millimeter(px[:2]), mm[:2], atol=1e-12) and mm[2] == 0
        # DIALS' own stills prediction (spherical relp) of the same Miller indices at the mean wavelength
        predicted = StillsReflectionPredictor(expt, dmin=1.0, spherical_relp=True)(sel["miller_index"])
        where = {(tuple(h), int(p)): xyz[:2] for h, p, xyz in zip(predicted["miller_index"], predicted["panel"],
                                                                   predicted["xyzcal.px"])}  # fmt: skip
        pairs = [(xyz[:2], where[(tuple(h), int(p))]) for h, p, xyz, i_sum in
                 zip(sel["miller_index"], sel["panel"], sel["xyzcal.px"], sel["intensity.sum.value"])
                 if i_sum > 1.0 and (tuple(h), int(p)) in where]  # fmt: skip
        assert len(pairs) >= 3
        obs, pred = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        offsets = np.linalg.norm(obs - pred, axis=1)
        assert np.median(offsets) < 1.0, offsets


def test_same_seed_gives_identical_images(serial, tmp_path):
    _simulate(tmp_path, *RUN)
    a, b = _images(serial), _images(tmp_path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ta = flex.reflection_table.from_file(str(serial / "images.refl"))
    tb = flex.reflection_table.from_file(str(tmp_path / "images.refl"))
    assert ta.size() == tb.size() and list(ta["intensity.sum.value"]) == list(tb["intensity.sum.value"])
    other = tmp_path / "seed8"
    _simulate(other, *RUN[:-2], "random.seed=8")
    assert not np.array_equal(_images(other)["images_00000.h5"], a["images_00000.h5"])


@pytest.mark.mpi
def test_mpi_two_ranks_equal_serial(serial, tmp_path, mpirun):
    """mpirun -n 2 ... mp.method=mpi: each rank writes its containers; the images equal serial's."""
    result = _simulate(tmp_path, *RUN, "mp.method=mpi", prefix=mpirun)
    assert "MPI: rank 0 of 2" in (tmp_path / "dials.spread_simulate.log").read_text()
    assert (tmp_path / "dials.spread_simulate.rank0001.log").is_file()
    a, b = _images(serial), _images(tmp_path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), result.stdout[-2000:]
    experiments = ExperimentListFactory.from_json_file(str(tmp_path / "images.expt"), check_format=False)
    assert len(experiments) == 8


def test_sigkill_then_resume(serial, tmp_path):
    """Kill the run after its first container; no partial file at a final name; the rerun simulates
    exactly the missing shots and ends with the same images as an uninterrupted run."""
    assert EXE
    args = [EXE, *RUN, f"output.directory={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = tmp_path / "images_00000.refl"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = sorted(p.name for p in tmp_path.glob("images_[0-9]*.refl"))
    assert 1 <= len(finished) < 4
    for h5_path in tmp_path.glob("images_[0-9]*.h5"):  # every container at a final name is whole
        with h5py.File(h5_path, "r") as h5:
            assert h5["/entry/data/data"].shape[0] == 2
    assert not (tmp_path / "images.expt").exists()
    result = _simulate(tmp_path, *RUN)
    log = result.stdout
    skipped = len(finished)
    assert f"Resuming: {skipped} of 4 containers ({2 * skipped} shots) are already finished" in log
    assert f"Done: {8 - 2 * skipped} shots simulated ({2 * skipped} already finished)" in log
    assert not list(tmp_path.glob(".*tmp*"))
    a, b = _images(serial), _images(tmp_path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert len(ExperimentListFactory.from_json_file(str(tmp_path / "images.expt"), check_format=False)) == 8
    # a further rerun has nothing to do
    assert "Done: 0 shots simulated (8 already finished)" in _simulate(tmp_path, *RUN).stdout


def test_changed_parameters_refused_unless_overwrite(tmp_path):
    small = ["detector.type=simple", "detector.simple.n_fast=64", "detector.simple.n_slow=64", "detector.distance_mm=40",
             "nimages=1", "beam.nchannels=3", "crystal.mosaic_domains=1"]  # fmt: skip
    _simulate(tmp_path, *small)
    refused = _simulate(tmp_path, *small, "beam.photons=2e12", check=False)
    assert refused.returncode == 1
    lines = [line for line in refused.stderr.splitlines() if line.startswith("Sorry:")]
    assert len(lines) == 1 and "other parameters (changed: beam.photons)" in lines[0] and "overwrite" in lines[0]
    _simulate(tmp_path, *small, "beam.photons=2e12", "output.overwrite=True")
    record = json.loads((tmp_path / "images_run.json").read_text())
    assert float(record["parameters"]["beam.photons"]) == 2e12


def test_missing_isal_gives_one_line_sorry(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "isal", None)  # as if python-isal were not installed
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    with pytest.raises(SystemExit) as exit_info:
        simulate.run(["detector.type=simple", f"output.directory={tmp_path / 'out'}"])
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["Sorry: output.deflate=isal needs python-isal (pip install isal); or set output.deflate=zlib"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["structure.file=/nonexistent/model.pdb"], "structure.file '/nonexistent/model.pdb' does not exist"),
        (["beam.nchannels=0"], "beam.nchannels must be at least 1"),
        (["beam.photons=-1e12"], "beam.photons (photons per pulse, sets the fluence) must be > 0"),
        (["structure.d_min=1.0"], "structure.d_min=1 A is beyond the detector's reach"),
        (["detector.file={bad}"], "is not an experiment list dxtbx can read"),
        (["structure.file={bad}"], "cannot read the model"),
        (["structure.preset=psii"], "the psii preset needs the model"),
        (["beam.spectrum=file"], "beam.spectrum=file needs beam.spectrum_file"),
        (["bogus=1"], "Unknown command line parameter definition"),
    ],
)
def test_bad_input_gives_one_line_sorry(tmp_path, capsys, args, message):
    bad = tmp_path / "garbage.txt"
    bad.write_text("this is neither JSON nor PDB {{{\n")
    args = [a.format(bad=bad) for a in args]
    small = ["detector.type=simple", "detector.simple.n_fast=64", "detector.simple.n_slow=64", "detector.distance_mm=40"]
    with pytest.raises(SystemExit) as exit_info:
        simulate.run([*small, *args, f"output.directory={tmp_path / 'out'}"])
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("Sorry: ") and message in err[0], err


def test_shipped_phil_files_parse(tmp_path):
    """rubredoxin.phil and psii.phil are found by name and hold the documented settings."""
    from libtbx.phil import parse

    files = simulate.shipped_phil_files(["psii.phil", "rubredoxin.phil", "x=1"])
    assert Path(files[0]).is_file() and Path(files[1]).is_file() and files[2] == "x=1"
    psii = simulate.phil_scope.fetch(parse(file_name=files[0])).extract()
    assert (psii.structure.preset, psii.structure.d_min, psii.beam.energy_eV) == ("psii", 3.4, 6550)
    assert (psii.beam.nchannels, psii.beam.channel_width_eV, psii.crystal.mosaic_domains) == (100, 1.0, 25)
    assert psii.detector.type == "jungfrau16m" and psii.noise.enable and psii.psf.fwhm_px == 0
    assert math.isclose(psii.beam.energy_eV, 6550.0)


def test_model_errors_are_in_the_images_not_in_the_recorded_metadata(serial, tmp_path):
    """Spectrometer offset + per-shot jitter change only what is recorded; a per-panel gain error
    scales every pixel of a panel by one factor.  The truth keeps the true values."""
    errors = ["model_errors.spectrometer_offset_eV=3", "model_errors.energy_jitter_eV=1",
              "model_errors.panel_gain_rms=0.05"]  # fmt: skip
    _simulate(tmp_path, *RUN, *errors)
    with h5py.File(serial / "images_00000.h5", "r") as clean, h5py.File(tmp_path / "images_00000.h5", "r") as bad:
        true_e = clean["/entry/spread/spectrum_energies_eV"][()]
        recorded_e = bad["/entry/spread/spectrum_energies_eV"][()]
        offsets = bad["/entry/spread/recorded_energy_offset_eV"][()]
        assert np.allclose(bad["/entry/spread/true_energies_eV"][()], true_e)
        clean_wl = clean["/entry/instrument/beam/incident_wavelength"][()]
        bad_wl = bad["/entry/instrument/beam/incident_wavelength"][()]
        weights = clean["/entry/spread/spectrum_weights"][()]
        clean_img, bad_img = clean["/entry/data/data"][()].astype(float), bad["/entry/data/data"][()].astype(float)
    # recorded = true + offset, offsets = 3 eV + a different jitter per shot
    assert np.allclose(recorded_e - true_e, offsets[:, None])
    assert np.all(np.abs(offsets - 3.0) < 5.0) and offsets[0] != offsets[1]
    mean_true = (weights * true_e).sum(1) / weights.sum(1)
    assert np.allclose(clean_wl, HC_EV_A / mean_true, rtol=1e-9)
    assert np.allclose(bad_wl, HC_EV_A / (mean_true + offsets), rtol=1e-9)
    # the truth .expt carries the true wavelength (that of the error-free run's container)
    truth = ExperimentListFactory.from_json_file(str(tmp_path / "images.expt"), check_format=False)
    assert np.allclose([truth[i].beam.get_wavelength() for i in range(2)], clean_wl, rtol=1e-9)
    # same seed, same photons: each panel's counts (less the ADC offset) scale by one factor
    n_panels = 4
    clean_p = (clean_img - 10.0).reshape(2, n_panels, -1).sum(-1)
    bad_p = (bad_img - 10.0).reshape(2, n_panels, -1).sum(-1)
    ratio = bad_p / clean_p
    assert np.allclose(ratio[0], ratio[1], rtol=2e-3)  # the same factor on every shot
    assert 0.005 < ratio[0].std() < 0.2 and not np.allclose(ratio[0], 1.0, atol=1e-3)
