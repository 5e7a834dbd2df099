"""dials.spread_refine run as a user runs it, on real dials.stills_process output of the shared
4-still fixture: outputs, refined stills, resume from the checkpoint (also after SIGKILL),
negative controls, bad input.

One normal run (the module fixture ``refined``, two macrocycles) serves as the reference of
every test that compares against it."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory
from scitbx import matrix

from spread_dials.physics.crystal import rotation_from_vector

from ..processed_stills import command, run

FAST = ["refinement.macrocycles=1", "uncertainty.bootstrap=2", "crystal.mosaic_domains=6", "refinement.max_shoebox_px=11",
        "plots=False"]  # fmt: skip
#: the reference run: two macrocycles, so that a run killed after the first can resume
REFINED = [*FAST, "refinement.macrocycles=2"]


def _inputs(processed: Path) -> list[str]:
    expts = sorted(processed.glob("idx-*_integrated.expt"))
    assert len(expts) >= 3, (processed / "stills_process.out").read_text()[-3000:]
    return [str(p) for p in expts] + [str(p.with_suffix(".refl")) for p in expts]


def _refined_args(processed: Path, simulated: Path) -> list[str]:
    return [command("dials.spread_refine"), *_inputs(processed), *REFINED, f"truth={simulated / 'images_run.json'}"]


def _record(directory: Path) -> dict:
    return json.loads((directory / "spread_refine_sites.json").read_text())


@pytest.fixture(scope="module")
def refined(processed, simulated, tmp_path_factory) -> Path:
    """The output directory of one normal run (REFINED, the truth given, plots on)."""
    directory = tmp_path_factory.mktemp("refined")
    run(_refined_args(processed, simulated) + ["plots=True"], directory)
    return directory


def test_refine_writes_sites_and_resumes(refined, processed, simulated, tmp_path):
    for path in refined.iterdir():
        if path.is_file():
            shutil.copy2(path, tmp_path / path.name)
    record = _record(tmp_path)
    (site,) = record["sites"]
    assert site["site"].endswith("FE")
    assert site["sigma_eV"] > 0 and site["sigma_bootstrap_eV"] > 0
    assert site["oxidation_state"] in (2, 3)
    assert abs(sum(site["state_probability"].values()) - 1) < 1e-9
    # the truth (oxidized rubredoxin against the Fe(II) reference) is the rigid shift of the two
    # measured curves: about +1.85 eV (SPREAD_NOTES)
    assert 1.5 < site["truth_edge_shift_eV"] < 2.2
    _check_figure9(tmp_path, record)
    with h5py.File(tmp_path / "spread_refine.h5", "r") as h:
        assert h["f_prime"].shape == h["f_double_prime"].shape == (1, h["energy_eV"].shape[0])
        assert h["bootstrap_theta"].shape == (2, 1)
    for png in ("fp_fdp", "edge_shifts", "nll", "residuals"):
        assert (tmp_path / f"spread_refine_{png}.png").stat().st_size > 0
    assert "Summary" in (tmp_path / "dials.spread_refine.log").read_text()
    # a rerun finds the finished macrocycles in the checkpoint and does not refine again
    again = run(_refined_args(processed, simulated), tmp_path)
    log = (tmp_path / "dials.spread_refine.log").read_text()
    assert "Resuming after macrocycle 2" in log, again.stdout[-2000:]
    assert _record(tmp_path)["theta"] == record["theta"]


def _check_figure9(directory: Path, record: dict) -> None:
    """Sauter 2020 Figure 9 against the truth: per site in the .json, a .csv row and a log line;
    the simulation's 40 channels about 7120 eV hold the whole Fe window (31 energies)."""
    (site,) = list(record["figure9"])
    f9 = record["figure9"][site]
    assert f9["window_eV"] == [7105.0, 7135.0] and f9["points"] == 31
    for key in ("cc_f_prime", "cc_f_double_prime"):
        assert -1.0 <= f9[key] <= 1.0, f9
    for key in ("rmsd_f_prime_e", "rmsd_f_double_prime_e"):
        assert 0.0 <= f9[key] < 5.0, f9
    rows = [r for r in csv.DictReader(io.StringIO((directory / "spread_refine_sites.csv").read_text())) if r["cc_f_prime"]]
    assert [r["site"] for r in rows] == [site]
    assert float(rows[0]["rmsd_f_double_prime_e"]) == pytest.approx(f9["rmsd_f_double_prime_e"], rel=1e-12)
    assert f"Figure 9 (against the truth over 7105-7135 eV, 31 points) {site}" in (directory / "dials.spread_refine.log").read_text()


def test_spline_kk_reports_an_edge_shift_and_figure9(processed, simulated, tmp_path):
    """model.anomalous=spline_kk through the program: a node change per 2 eV over the band, the
    edge shift matched to the refined curves with its sigma and oxidation state, Figure 9, the
    curves in the .h5 and the PNGs."""
    run([command("dials.spread_refine"), *_inputs(processed), *FAST, "model.anomalous=spline_kk", "plots=True",
         f"truth={simulated / 'images_run.json'}"], tmp_path)  # fmt: skip
    record = _record(tmp_path)
    assert record["model"] == "spline_kk" and "rigid shift" in record["edge_shift_method"]
    band = record["spectrum_band_eV"]
    assert len(record["theta"]) == len(record["parameters"]) >= (band[1] - band[0]) / 2
    assert record["parameters"][0].startswith("f_double_prime_change[")
    (site,) = record["sites"]
    assert np.isfinite(site["edge_shift_eV"]) and site["sigma_eV"] > 0 and site["sigma_fisher_eV"] > 0
    # robust (the default): the shift's largest variance among Fisher, sandwich and observed sandwich
    assert site["sigma_eV"] >= max(site["sigma_fisher_eV"], site["sigma_sandwich_eV"]) * (1 - 1e-9)
    assert site["oxidation_state"] in (2, 3) and 1.5 < site["truth_edge_shift_eV"] < 2.2
    _check_figure9(tmp_path, record)
    with h5py.File(tmp_path / "spread_refine.h5", "r") as h:
        assert h.attrs["model"] == "spline_kk"
        assert h["f_prime"].shape == h["f_double_prime"].shape == (1, h["energy_eV"].shape[0])
        assert np.isfinite(h["f_prime_sigma"][()]).all() and (h["f_double_prime_sigma"][()] > 0).any()
    for png in ("fp_fdp", "edge_shifts", "nll"):
        assert (tmp_path / f"spread_refine_{png}.png").stat().st_size > 0


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_programs_run_torch_on_its_own_openmp_runtime():
    """Importing a program loads torch's bundled libgomp, not the system's that dxtbx's imports
    (scikit-learn, cctbx's omptbx) bring: on the system's, torch's parallel kernels corrupted
    the heap (spline_kk's curvature aborted) or hung (the free model's)."""
    code = ("import json, spread_dials.command_line.refine\n"
            "print(json.dumps(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert loaded and all("/torch/lib/" in path for path in loaded), loaded


def test_refined_stills_read_back_with_dials(refined, processed):
    """spread_refine.expt/.refl: one experiment per refined still, one row per refined shoebox,
    finite new columns, crystals turned by the logged rotations and their cells rescaled, the
    flag count."""
    record = _record(refined)
    stills = {s["identifier"]: s for s in record["refined_stills"]}
    experiments = ExperimentListFactory.from_json_file(str(refined / "spread_refine.expt"), check_format=False)
    table = flex.reflection_table.from_file(str(refined / "spread_refine.refl"))
    assert len(experiments) == record["stills"] == len(stills) and set(experiments.identifiers()) == set(stills)
    assert len(table) == record["shoeboxes"] == record["residuals"]["shoeboxes"]
    ids = table["id"].as_numpy_array()
    assert dict(table.experiment_identifiers()) == {i: e.identifier for i, e in enumerate(experiments)}
    for i, experiment in enumerate(experiments):
        assert (ids == i).sum() == stills[experiment.identifier]["shoeboxes"]
    columns = {name: table[name].as_numpy_array() for name in ("spread.bragg_photons", "spread.sigma_z", "spread.mean_z",
                                                               "spread.scale", "spread.n_valid", "spread.flagged")}  # fmt: skip
    for name, values in columns.items():
        assert np.isfinite(values.astype(float)).all(), name
    assert (columns["spread.bragg_photons"] >= 0).all() and (columns["spread.n_valid"] > 0).all()
    assert (columns["spread.sigma_z"] > 0).all()
    # sigma_Z ~ 1 where the pixel model is right.  The fixture's pixels are pure Poisson (noise:
    # no readout noise, no gain error), but the test's model (2 mosaic domains, 2 macrocycles)
    # misfits the bright spots (sigma_Z up to ~10 there, the reason flag_sigma_z exists).  The
    # weakest third of the shoeboxes by model Bragg photons is background (~40 photons/pixel,
    # a plane per shoebox) with a little Bragg: there the median sigma_Z must be 1 within 0.25
    # (a shoebox of ~200 pixels has sigma_Z sd ~0.05 from counting alone; the rest is the Bragg
    # misfit left: measured median 1.12).  The median, because a few weak shoeboxes hold a
    # neighbour's spot that the model does not put there (sigma_Z in the hundreds: flagged).
    weak = columns["spread.bragg_photons"] < np.quantile(columns["spread.bragg_photons"], 1 / 3)
    assert abs(np.median(columns["spread.sigma_z"][weak]) - 1) < 0.25, np.median(columns["spread.sigma_z"][weak])
    # the flag: count in the .json and the log == rows flagged == rows over the threshold
    summary = record["residuals"]
    assert summary["flag_sigma_z"] == 3.0
    assert columns["spread.flagged"].sum() == summary["shoeboxes_flagged"]
    assert (columns["spread.flagged"] == (columns["spread.sigma_z"] > 3.0)).all()
    log = (refined / "dials.spread_refine.log").read_text()
    assert f"Flagged {summary['shoeboxes_flagged']} of {len(table)} shoeboxes" in log
    # the crystals: U' = R(r) U with r the logged rotation (log: mrad, 4 decimals)
    logged = {m[0]: 1e-3 * np.array([float(x) for x in m[2:5]]) for m in
              re.findall(r"still (\S+): scale (\S+), rotation \((\S+), (\S+), (\S+)\) mrad", log)}  # fmt: skip
    assert set(logged) == set(stills)
    inputs = {}
    for path in sorted(processed.glob("idx-*_integrated.expt")):
        for e in ExperimentListFactory.from_json_file(str(path), check_format=False):
            inputs[e.identifier] = e.crystal
    for i, experiment in enumerate(experiments):
        still = stills[experiment.identifier]
        rotation = np.array(still["rotation_rad"])
        assert np.abs(rotation - logged[experiment.identifier]).max() < 1e-7
        assert np.linalg.norm(rotation) > 1e-6  # refinement did turn every crystal
        before, after = inputs[experiment.identifier], experiment.crystal
        turn = np.array(matrix.sqr(after.get_U()) * matrix.sqr(before.get_U()).transpose()).reshape(3, 3)
        expected = rotation_from_vector(torch.tensor(rotation)).numpy()
        assert np.abs(turn - expected).max() < 1e-9
        # the cell: each length scaled by the still's refined factor (cctbx's unit cell of the
        # written crystal against the input's), the angles kept
        scale = np.array(still["cell_scale"])
        assert np.abs(scale - 1).max() > 1e-6  # refinement did change every cell
        cell_before, cell_after = (np.array(c.get_unit_cell().parameters()) for c in (before, after))
        assert np.allclose(cell_after[:3], cell_before[:3] * scale, rtol=1e-9)
        assert np.allclose(cell_after[3:], cell_before[3:], atol=1e-9)
        assert columns["spread.scale"][ids == i] == pytest.approx(still["scale"], rel=1e-12)


def test_killed_run_resumes_to_the_uninterrupted_answer(refined, processed, simulated, tmp_path):
    """SIGKILL once the first macrocycle's checkpoint appears; the rerun resumes after it and
    ends where the uninterrupted run (``refined``) ended."""
    args = _refined_args(processed, simulated)
    checkpoint = tmp_path / "spread_refine.checkpoint.pt"
    with open(tmp_path / "killed.out", "w") as out:
        process = subprocess.Popen(args, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.out").read_text()[-2000:]
    assert not (tmp_path / "spread_refine_sites.json").exists()
    assert not (tmp_path / "spread_refine.refl").exists()
    assert torch.load(checkpoint, weights_only=False)["macrocycle"] == 1
    run(args, tmp_path)
    assert "Resuming after macrocycle 1" in (tmp_path / "dials.spread_refine.log").read_text()
    a, b = _record(refined), _record(tmp_path)
    # the resumed run rebuilds the profiles from the checkpoint's float64 state (exactly where the
    # uninterrupted run's stage 1 left them) and runs the same float64 arithmetic: equal to
    # rounding; 1e-9 relative leaves room only for a different summation order
    assert [h["macrocycle"] for h in b["history"]] == [1, 2]
    assert b["theta"] == pytest.approx(a["theta"], rel=1e-9, abs=1e-9)
    assert [h["nll"] for h in b["history"]] == pytest.approx([h["nll"] for h in a["history"]], rel=1e-12)
    assert b["residuals"]["shoeboxes_flagged"] == a["residuals"]["shoeboxes_flagged"]
    for s, t in zip(a["refined_stills"], b["refined_stills"]):
        assert t["rotation_rad"] == pytest.approx(s["rotation_rad"], rel=1e-9, abs=1e-12)
        assert t["scale"] == pytest.approx(s["scale"], rel=1e-9)


def test_changed_parameters_refuse_the_old_checkpoint(processed, tmp_path):
    args = [command("dials.spread_refine"), *_inputs(processed), *FAST, "uncertainty.bootstrap=0"]
    run(args, tmp_path)
    result = run(args + ["crystal.ncells_abc=20,20,20"], tmp_path, check=False)
    assert result.returncode != 0
    assert "Sorry" in result.stdout + result.stderr and "checkpoint" in result.stdout + result.stderr


def test_bad_input_gives_one_sorry_line(processed, tmp_path):
    exe = command("dials.spread_refine")
    cases = {
        "no files": [],
        "unpaired files": _inputs(processed)[:3],
        "no site": [*_inputs(processed), "structure.sites.element=Zn"],
        "missing reference file": [*_inputs(processed), "reference.builtin_fe=False", "reference.curve=/nonexistent.dat"],
        "jitter prior of 0 eV": [*_inputs(processed), "refinement.energy_jitter_sigma_eV=0"],
    }
    for name, args in cases.items():
        result = run([exe, *args, *FAST], tmp_path, check=False)
        text = (result.stdout + result.stderr).strip()
        assert result.returncode != 0, name
        assert "Traceback" not in text, (name, text[-2000:])
        assert text.splitlines()[-1].startswith("Sorry"), (name, text[-500:])
    assert not list(tmp_path.glob("spread_refine_sites.*"))


def test_energy_jitter_and_mosaic_spreads_are_refined_per_still(processed, tmp_path):
    """refinement.energy_jitter_sigma_eV and refine_mosaic (one run, both per-shot latents): each
    still's jitter and mosaic spreads in the log, the sites .json and the columns
    spread.energy_jitter_eV and spread.mosaic_spread_abc_deg, the same numbers; the stills were
    simulated with the isotropic spread, so the spreads found stay inside the prior (within a
    factor exp(3 x 0.5) of crystal.mosaic_spread_deg).  The fixture's spectra are recorded at their
    true energies, but each of its stills fixes the edge only to ~0.7 eV (session 5's demo chain:
    +-0.22 eV from 10 stills), about the 1 eV prior's width, so the jitters found scatter inside
    the prior (measured -0.67 to +1.29 eV): asserted within 3 prior sd (their recovery of
    injected jitters on bright stills: tests/refine/test_energy_jitter.py).  The jitters join in
    the second macrocycle: fitted in the first, against the starting edge shift, they took up its
    error (+0.7 to +2.6 eV on these stills after one macrocycle)."""
    run([command("dials.spread_refine"), *_inputs(processed), *FAST, "uncertainty.bootstrap=0",
         "refinement.refine_cell=True", "refinement.energy_jitter_sigma_eV=1.0", "refinement.macrocycles=3",
         "refinement.refine_mosaic=True"], tmp_path)  # fmt: skip
    refined_stills = _record(tmp_path)["refined_stills"]
    stills = {s["identifier"]: s["energy_jitter_eV"] for s in refined_stills}
    spreads = {s["identifier"]: s["mosaic_spread_abc_deg"] for s in refined_stills}
    assert all(math.isfinite(v) and abs(v) < 3.0 for v in stills.values()) and any(v != 0 for v in stills.values()), stills
    experiments = ExperimentListFactory.from_json_file(str(tmp_path / "spread_refine.expt"), check_format=False)
    table = flex.reflection_table.from_file(str(tmp_path / "spread_refine.refl"))
    column, ids = table["spread.energy_jitter_eV"].as_numpy_array(), table["id"].as_numpy_array()
    mosaic = table["spread.mosaic_spread_abc_deg"].as_numpy_array()
    for i, experiment in enumerate(experiments):
        assert np.allclose(column[ids == i], stills[experiment.identifier], rtol=1e-12)
        assert np.allclose(mosaic[ids == i], spreads[experiment.identifier], rtol=1e-12)
    found = np.array(list(spreads.values()))
    assert found.shape == (len(stills), 3) and np.all(np.isfinite(found)) and np.ptp(found) > 0, found
    assert np.all(np.abs(np.log(found / 0.05)) < 1.5), found  # (crystal.mosaic_spread_deg's default, 0.05)
    log = (tmp_path / "dials.spread_refine.log").read_text()
    assert len(re.findall(r"energy jitter [+-]\d+\.\d{3} eV", log)) == len(stills)
    assert len(re.findall(r"mosaic spread about a, b, c \(\d\.\d{4}, \d\.\d{4}, \d\.\d{4}\) deg", log)) == len(stills)


def test_summed_channels_reach_the_per_channel_answer(refined, processed, simulated, tmp_path):
    """refinement.sum_channels=True (each still's profiles held summed over the channels) on the
    reference run's stills and settings: the log says so, and the edge shift lands where the
    per-channel run's did (the two differ only between the kernel's recomputations: stage 2's
    line search sees the Bragg terms to first order in the edge shift), with the same sigma."""
    run([*_refined_args(processed, simulated), "refinement.sum_channels=True"], tmp_path)
    assert "(summed over the channels)" in (tmp_path / "dials.spread_refine.log").read_text()
    (a,), (b,) = _record(refined)["sites"], _record(tmp_path)["sites"]
    assert abs(b["edge_shift_eV"] - a["edge_shift_eV"]) < 0.1 * a["sigma_fisher_eV"], (a, b)
    assert b["sigma_fisher_eV"] == pytest.approx(a["sigma_fisher_eV"], rel=0.02)


#: the negative controls' settings
CONTROL = [*FAST, "uncertainty.bootstrap=0", "refinement.refine_orientation=False"]


@pytest.mark.parametrize("control", ["spoil_hkl", "shuffle_channels"])
def test_negative_control_runs_and_says_so(control, processed, simulated, tmp_path):
    """controls.spoil_hkl and controls.shuffle_channels reach the engine through the program: the
    run says so in its log and records it.  Whether they fail to recover the truth is measured
    where the normal run recovers it (tests/refine/test_recovery.py): on this 4-still fixture
    the pixel model misfits the bright spots (sigma_Z ~ 6), the likelihood's value is set by that
    misfit, and a shuffled run was measured to fit *better* than the normal one."""
    run([command("dials.spread_refine"), *_inputs(processed), *CONTROL, f"truth={simulated / 'images_run.json'}",
         f"controls.{control}=True"], tmp_path)  # fmt: skip
    bad = _record(tmp_path)
    assert bad["controls"][control] and not bad["controls"][{"spoil_hkl": "shuffle_channels"}.get(control, "spoil_hkl")]
    assert "NEGATIVE CONTROL" in (tmp_path / "dials.spread_refine.log").read_text()


@pytest.mark.mpi
def test_two_mpi_ranks_give_the_serial_result(processed, mpirun, tmp_path):
    serial, mpi = tmp_path / "serial", tmp_path / "mpi"
    serial.mkdir()
    mpi.mkdir()
    args = [command("dials.spread_refine"), *_inputs(processed), *FAST, "uncertainty.bootstrap=0"]
    run(args, serial)
    run([*mpirun, *args, "mp.method=mpi"], mpi)
    a = json.loads((serial / "spread_refine_sites.json").read_text())
    b = json.loads((mpi / "spread_refine_sites.json").read_text())
    assert "MPI: rank 0 of 2" in (mpi / "dials.spread_refine.log").read_text()
    # every sum over stills (sensor mu, NLL, gradients, information, observed Hessian) runs in
    # still order on any number of ranks: the same float64 answer
    assert b["theta"][0] == pytest.approx(a["theta"][0], rel=1e-9, abs=1e-9)
    assert b["sites"][0]["sigma_eV"] == pytest.approx(a["sites"][0]["sigma_eV"], rel=1e-7)
