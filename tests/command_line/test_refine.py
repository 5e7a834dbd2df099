"""dials.spread_refine run as a user runs it, on real dials.stills_process output of the shared
4-still fixture: outputs, resume from the checkpoint, negative controls, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest

from ..processed_stills import command, run

FAST = ["refinement.macrocycles=1", "uncertainty.bootstrap=2", "crystal.mosaic_domains=2", "plots=False"]


def _inputs(processed: Path) -> list[str]:
    expts = sorted(processed.glob("idx-*_integrated.expt"))
    assert len(expts) >= 3, (processed / "stills_process.out").read_text()[-3000:]
    return [str(p) for p in expts] + [str(p.with_suffix(".refl")) for p in expts]


def test_refine_writes_sites_and_resumes(processed, simulated, tmp_path):
    args = [command("dials.spread_refine"), *_inputs(processed), *FAST, f"truth={simulated / 'images_run.json'}"]
    run(args + ["plots=True"], tmp_path)
    record = json.loads((tmp_path / "spread_refine_sites.json").read_text())
    (site,) = record["sites"]
    assert site["site"].endswith("FE")
    assert site["sigma_eV"] > 0 and site["sigma_bootstrap_eV"] > 0
    assert site["oxidation_state"] in (2, 3)
    assert abs(sum(site["state_probability"].values()) - 1) < 1e-9
    # the truth (oxidized rubredoxin against the Fe(II) reference) is the rigid shift of the two
    # measured curves: about +1.85 eV (SPREAD_NOTES)
    assert 1.5 < site["truth_edge_shift_eV"] < 2.2
    with h5py.File(tmp_path / "spread_refine.h5", "r") as h:
        assert h["f_prime"].shape == h["f_double_prime"].shape == (1, h["energy_eV"].shape[0])
        assert h["bootstrap_theta"].shape == (2, 1)
    for png in ("fp_fdp", "edge_shifts", "nll"):
        assert (tmp_path / f"spread_refine_{png}.png").stat().st_size > 0
    assert "Summary" in (tmp_path / "dials.spread_refine.log").read_text()
    # a rerun finds the finished macrocycle in the checkpoint and does not refine again
    again = run(args, tmp_path)
    log = (tmp_path / "dials.spread_refine.log").read_text()
    assert "Resuming after macrocycle 1" in log, again.stdout[-2000:]
    assert json.loads((tmp_path / "spread_refine_sites.json").read_text())["theta"] == record["theta"]


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
    }
    for name, args in cases.items():
        result = run([exe, *args, *FAST], tmp_path, check=False)
        text = (result.stdout + result.stderr).strip()
        assert result.returncode != 0, name
        assert "Traceback" not in text, (name, text[-2000:])
        assert text.splitlines()[-1].startswith("Sorry"), (name, text[-500:])
    assert not list(tmp_path.glob("spread_refine_sites.*"))


def test_negative_control_moves_the_answer(processed, tmp_path):
    """spoil_hkl (F at h, k, l+1): the fit is worse than with the true indices."""
    good = tmp_path / "good"
    bad = tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    args = [command("dials.spread_refine"), *_inputs(processed), *FAST, "uncertainty.bootstrap=0"]
    run(args, good)
    run(args + ["controls.spoil_hkl=True"], bad)
    nll_good = json.loads((good / "spread_refine_sites.json").read_text())["history"][-1]["nll"]
    nll_bad = json.loads((bad / "spread_refine_sites.json").read_text())["history"][-1]["nll"]
    assert nll_bad > nll_good
    shutil.rmtree(bad)


@pytest.mark.mpi
@pytest.mark.xfail(strict=True, reason="known defect: stage 1 (L-BFGS, 50 iterations, unconverged) amplifies the "
                   "~1e-17 relative difference of the rank-summed sensor mu into different per-still fits (one still's "
                   "stage-1 NLL differs by 5e4); needs a converged stage 1 and a rank-independent mu sum")
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
    # per-still values are summed in still order on any number of ranks; the sensor's mean mu is
    # summed over ranks, the one place where the split changes float64 rounding
    assert b["theta"][0] == pytest.approx(a["theta"][0], rel=1e-9, abs=1e-9)
    assert b["sites"][0]["sigma_eV"] == pytest.approx(a["sites"][0]["sigma_eV"], rel=1e-7)
