"""dials.spread_simulate refuses bad input in one line and never leaves wrong or half-written
output (issue 11 part 2).  Full disk and read-only directories are real tmpfs mounts; the
programs run as real subprocesses where the process itself is under test (exit status, no
traceback, no crash at exit), and in-process through the same ``run`` otherwise (faster)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spread_dials.command_line import simulate
from spread_dials.detectors.layout import flatten_layout
from spread_dials.detectors.simple import simple_detector
from spread_dials.physics.constants import HC_EV_A
from tests.command_line.test_simulate import EXE, _images

# 4 panels of 64 x 64 at 40 mm: a run of 2 containers takes about a second
SMALL = ["detector.type=simple", "detector.simple.n_fast=64", "detector.simple.n_slow=64", "detector.distance_mm=40",
         "beam.nchannels=3", "crystal.mosaic_domains=1", "mp.nproc=1"]  # fmt: skip


def _run(directory: Path, *args: str) -> int:
    """simulate.run in this process; its exit status."""
    try:
        simulate.run([*SMALL, *args, f"output.directory={directory}"])
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def _sorry(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("Sorry: "), err
    return err[0]


def _subprocess(directory: Path, *args: str) -> subprocess.CompletedProcess:
    assert EXE, "dials.spread_simulate is not installed (pip install -e .)"
    return subprocess.run([EXE, *SMALL, *args, f"output.directory={directory}"], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def _assert_one_line_sorry(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr and "Fatal Python error" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("Sorry: ") and text in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["structure.file={directory}"], "structure.file '{directory}' is a directory, not a file"),
        (["beam.spectrum_file=/nonexistent/spectra.npz"],
         "beam.spectrum_file is given but beam.spectrum=sase, which does not read it"),
        (["beam.spectrum=file", "beam.spectrum_file={npy}"], "is a single array (.npy), not an .npz"),
        (["beam.spectrum=gaussian", "beam.fwhm_eV=0"], "a Gaussian band needs a width > 0 eV"),
        (["structure.d_min=60"], "no reflection reaches the detector"),
        (["anomalous.reference_files={nan}", "anomalous.reference_states=3"],
         "rows hold values that are not finite (NaN or inf)"),
        (["detector.file={skewed}"], "panel 1 (skewed) has fast_axis [1.0, 0.5, 0.0] and slow_axis [0.0, 1.0, 0.0] "
         "at 63.4 degrees; dxtbx holds only axes at right angles"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_leaves_no_directory(tmp_path, capsys, args, message):
    from spread_dials.adapters.dxtbx_models import detector_from_layout

    detector = detector_from_layout(simple_detector(64, 64, 0.075, 40.0, 2, 1)).to_dict()
    detector["panels"][1].update(name="skewed", fast_axis=[1.0, 0.5, 0.0])  # dxtbx asserts, saying nothing
    (tmp_path / "skewed.expt").write_text(json.dumps({"__id__": "ExperimentList", "detector": [detector],
                                                      "experiment": [{"__id__": "Experiment", "detector": 0}]}))  # fmt: skip
    np.save(tmp_path / "spectra.npy", np.ones((3, 8)))
    energies = np.arange(7000.0, 7300.0)
    np.savetxt(tmp_path / "nan.dat", np.stack([energies, np.where(energies == 7120, np.nan, -5.0), 3.0 + 0 * energies], 1))
    fill = {"directory": tmp_path, "npy": tmp_path / "spectra.npy", "nan": tmp_path / "nan.dat",
            "skewed": tmp_path / "skewed.expt"}
    out = tmp_path / "new" / "out"
    assert _run(out, *(a.format(**fill) for a in args)) == 1
    assert message.format(**fill) in _sorry(capsys)
    assert not (tmp_path / "new").exists()  # no directory holding only a log


def test_refused_rerun_leaves_the_previous_run_untouched(tmp_path, capsys):
    """overwrite=True with bad input deletes nothing, and the log of the run there is kept."""
    assert _run(tmp_path, "nimages=2") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert _run(tmp_path, "nimages=2", "output.overwrite=True", "structure.d_min=60") == 1
    assert "no reflection reaches the detector" in _sorry(capsys)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_damaged_finished_container_is_redone(tmp_path, capsys):
    """A truncated container that looks finished is verified, reported and simulated again."""
    run = ["nimages=4", "output.images_per_container=2"]
    assert _run(tmp_path, *run) == 0
    whole = _images(tmp_path)
    path = tmp_path / "images_00001.h5"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert _run(tmp_path, *run) == 0
    log = (tmp_path / "dials.spread_simulate.log").read_text()
    assert "Container 1 looks finished but images_00001.h5 cannot be read" in log
    assert "Resuming: 1 of 2 containers (2 shots) are already finished" in log
    again = _images(tmp_path)
    assert again.keys() == whole.keys() and all(np.array_equal(again[k], whole[k]) for k in whole)


def test_full_disk_is_one_line_and_leaves_no_temporary_file(tmpfs):
    """A real full disk (a 160 kB tmpfs): one line, exit 1, no traceback, no crash at exit, no
    temporary file; the run record and log stay, so the rerun resumes."""
    directory = tmpfs("full", size="160k") / "run"
    result = _subprocess(directory, "nimages=4", "output.images_per_container=2")
    _assert_one_line_sorry(result, f"not enough space in {directory} for images_00000.h5")
    assert sorted(p.name for p in directory.iterdir()) == ["dials.spread_simulate.log", "images_run.json"]


def test_read_only_output_directory_is_one_line(read_only_dir):
    result = _subprocess(read_only_dir, "nimages=1")
    _assert_one_line_sorry(result, f"cannot write in output.directory {str(read_only_dir)!r}: Read-only file system")


def test_resolution_defaults_to_the_detectors_reach_and_warnings(tmp_path):
    """d_min None: the smallest d the detector records (from its corners, computed here); an
    explicit larger d_min and a band far from every Fe edge are warned about, not refused."""
    assert _run(tmp_path / "reach", "nimages=1", "beam.energy_eV=7120") == 0
    record = json.loads((tmp_path / "reach" / "images_run.json").read_text())
    flat = flatten_layout(simple_detector(64, 64, 0.075, 40.0, 2, 2, gap_mm=1.0))
    corners = np.concatenate([flat.origin_mm + a * 64 * 0.075 * flat.fast_axis + b * 64 * 0.075 * flat.slow_axis
                              for a in (0, 1) for b in (0, 1)])  # fmt: skip
    two_theta = np.arccos(-corners[:, 2] / np.linalg.norm(corners, axis=1)).max()
    reach = HC_EV_A / 7121.0 / (2 * math.sin(two_theta / 2))  # 3 channels of 1 eV around 7120
    assert record["structure_factor_source"]["d_min_A"] == pytest.approx(reach, rel=1e-6)
    log = (tmp_path / "reach" / "dials.spread_simulate.log").read_text()
    assert "leaves the detector empty" not in log

    assert _run(tmp_path / "warned", "nimages=1", "structure.d_min=12", "beam.energy_eV=9500") == 0
    log = (tmp_path / "warned" / "dials.spread_simulate.log").read_text()
    assert "structure.d_min=12 A leaves the detector empty beyond it" in log
    assert "far from every absorption edge of Fe (the nearest is at 7113 eV)" in log


@pytest.mark.mpi
def test_mpi_input_error_is_said_once_without_abort(tmp_path, mpirun):
    """Every rank meets the bad input: rank 0 says it once and the ranks end without MPI_Abort."""
    assert EXE
    out = tmp_path / "out"
    result = subprocess.run([*mpirun, EXE, *SMALL, "mp.method=mpi", "beam.nchannels=0", f"output.directory={out}"],
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 1
    sorry = [line for line in result.stderr.splitlines() if "Sorry" in line]
    assert sorry == ["Sorry: beam.nchannels must be at least 1 (spectral channels), not 0"], result.stderr
    assert "MPI_ABORT" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert not out.exists()


def test_model_without_a_unit_cell_is_refused_or_takes_the_phil_symmetry(shared_data, tmp_path, capsys):
    """1m2a.pdb without its CRYST1 record (cctbx would invent a P1 box around the atoms), and with
    the 1 1 1 placeholder cell: refused; with structure.unit_cell and space_group: simulated
    with them."""
    lines = (shared_data / "models" / "1m2a.pdb").read_text().splitlines(keepends=True)
    no_cell = tmp_path / "no_cell.pdb"
    no_cell.write_text("".join(line for line in lines if not line.startswith("CRYST1")))
    placeholder = tmp_path / "placeholder.pdb"
    placeholder.write_text("CRYST1    1.000    1.000    1.000  90.00  90.00  90.00 P 1           1\n"
                           + no_cell.read_text())  # fmt: skip
    for model in (no_cell, placeholder):
        assert _run(tmp_path / "refused", f"structure.file={model}") == 1
        assert f"the model {model.name} has no usable unit cell and space group" in _sorry(capsys)
    assert not (tmp_path / "refused").exists()
    cell = "67.2,59.8,47.2,90,110.3,90"
    assert _run(tmp_path / "run", f"structure.file={no_cell}", f"structure.unit_cell={cell}",
                "structure.space_group=C2", "nimages=1") == 0  # fmt: skip
    record = json.loads((tmp_path / "run" / "images_run.json").read_text())
    assert np.allclose(record["crystal"]["unit_cell"], [67.2, 59.8, 47.2, 90, 110.3, 90])
    assert record["crystal"]["space_group"].replace(" ", "") == "C121"


def test_measured_spectra_are_never_cut_silently(shared_data, tmp_path):
    """beam.nchannels None takes channels that hold >= 99.9 % of every measured spectrum's
    photons (checked here on the shared spectra with numpy); a narrower window is warned about
    with the fraction it keeps."""
    spectra = shared_data / "spectra" / "sase_spectra.npz"
    args = ["nimages=1", "beam.spectrum=file", f"beam.spectrum_file={spectra}", "beam.energy_eV=7088",
            "beam.nchannels=None"]
    assert _run(tmp_path / "auto", *args) == 0
    channels = np.array(json.loads((tmp_path / "auto" / "images_run.json").read_text())["channels_eV"])
    with np.load(spectra) as npz:
        energies, weights = npz["energies_eV"], np.clip(npz["weights"].astype(np.float64), 0, None)
    shift = 7088.0 - np.mean((weights * energies).sum(1) / weights.sum(1))
    inside = (energies + shift >= channels[0] - 0.5) & (energies + shift <= channels[-1] + 0.5)
    kept = (weights * inside).sum(1) / weights.sum(1)
    assert kept.min() >= 0.999 - 2e-3  # bins are 0.06 eV: the edge bins count in part
    assert len(channels) > 40  # the shared spectra are wider than the preset's 40 channels

    assert _run(tmp_path / "narrow", *args, "beam.nchannels=40") == 0
    log = (tmp_path / "narrow" / "dials.spread_simulate.log").read_text()
    assert f"beam.nchannels=40 of 1 eV keeps only {100 * kept_fraction(energies + shift, weights, 40):.1f}%" in log
    assert f"beam.nchannels={len(channels)} (or None) holds 99.9% of each" in log


def kept_fraction(energies: np.ndarray, weights: np.ndarray, n: int) -> float:
    """The smallest fraction of a spectrum's photons inside n channels of 1 eV around 7088 eV."""
    inside = (energies >= 7088 - n / 2) & (energies <= 7088 + n / 2)
    return float(((weights * inside).sum(1) / weights.sum(1)).min())
