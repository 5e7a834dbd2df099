"""dials.spread_plan run as a user runs it, on a small design (the built-in rubredoxin with the
packaged Fe(III) curve, a 2 x 2 grid of 128^2 px, 10 channels of 3 eV, 4 domains, a bright
crystal: seconds): outputs, the 1/sqrt(N) law and the stills-needed boundary, the Poisson
information's closed-form response to a brighter crystal, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ..processed_stills import command, run

DESIGN = [
    "rubredoxin.phil", "detector.type=simple", "detector.simple.n_fast=128", "detector.simple.n_slow=128",
    "detector.simple.pixel_mm=0.1", "detector.distance_mm=40", "beam.nchannels=10", "beam.channel_width_eV=3",
    "crystal.mosaic_domains=4", "crystal.ncells_abc=30,30,30", "plan.probe_stills=2", "plan.n_stills=10,40,1000",
    "plan.min_bragg_photons=0", "mp.nproc=1",
]  # fmt: skip


def _plan(directory: Path, *extra: str, check: bool = True):
    return run([command("dials.spread_plan"), *DESIGN, *extra], directory, check=check)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("plan")
    _plan(directory, "crystal.spot_scale=1e4", "plan.target.sigma_eV=0.004")
    return directory, json.loads((directory / "spread_plan.json").read_text())


def test_plan_writes_its_outputs(planned):
    directory, result = planned
    for name in ("spread_plan.json", "spread_plan.png", "dials.spread_plan.log"):
        assert (directory / name).is_file(), name
    assert (directory / "spread_plan.png").stat().st_size > 10_000
    (site,) = result["sites"]
    assert site["label"].endswith("FE") and site["state"] == 3 and site["curve"] == "Fe(III)"
    assert result["pairs"] == [] and result["probe_stills"] == 2 and min(result["shoeboxes_per_probe"]) > 0
    assert result["channels_eV"][2] == 10 and result["spot_scale"] == 1e4
    log = (directory / "dials.spread_plan.log").read_text()
    assert "sigma (eV) at N stills" in log and "stills for 0.004 eV" in log


def test_sigma_follows_one_over_root_n_and_the_stills_needed_meet_the_target(planned):
    _, result = planned
    (site,) = result["sites"]
    one = site["sigma_one_still_eV"]
    per_probe = [row[0] for row in result["information_per_probe_eV-2"]]
    assert one == pytest.approx(1 / math.sqrt(sum(per_probe) / len(per_probe)), rel=1e-9)  # one site: 1 / sqrt(mean I)
    for n, entry in result["predicted"].items():
        assert entry["sigma_eV"][0] == pytest.approx(one / math.sqrt(int(n)), rel=1e-12)
    needed = site["stills_for_target_sigma"]
    assert needed > 1
    assert one / math.sqrt(needed) <= 0.004 < one / math.sqrt(needed - 1)


def test_a_brighter_crystal_gains_between_two_and_four_times_the_information(planned, tmp_path):
    """Poisson information sum_p (d lambda_p / d Delta)^2 / lambda_p with lambda = s B + b: twice
    the spot scale s gives 4 s^2 B'^2 / (2 s B + b), between 2x (Bragg-limited pixels) and 4x
    (background-limited); with min_bragg_photons=0 both runs keep the same shoeboxes."""
    _, dim = planned
    _plan(tmp_path, "crystal.spot_scale=2e4")
    bright = json.loads((tmp_path / "spread_plan.json").read_text())
    assert bright["shoeboxes_per_probe"] == dim["shoeboxes_per_probe"]
    for a, b in zip(dim["information_per_probe_eV-2"], bright["information_per_probe_eV-2"]):
        assert 2.0 < b[0] / a[0] < 4.0


def test_a_jitter_prior_adds_its_variance_to_every_still(planned, tmp_path):
    """plan.energy_jitter_sigma_eV: a still's jitter moves the one site as its edge shift does,
    so profiling it under the prior N(0, s^2) turns the still's information I into I' with
    1 / I' = 1 / I + s^2 (same probe stills)."""
    _, plain = planned
    _plan(tmp_path, "crystal.spot_scale=1e4", "plan.energy_jitter_sigma_eV=0.05")
    jitter = json.loads((tmp_path / "spread_plan.json").read_text())
    assert jitter["energy_jitter_sigma_eV"] == 0.05 and jitter["shoeboxes_per_probe"] == plain["shoeboxes_per_probe"]
    for a, b in zip(plain["information_per_probe_eV-2"], jitter["information_per_probe_eV-2"]):
        assert 1 / b[0] == pytest.approx(1 / a[0] + 0.05**2, rel=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan.target.sigma_eV=0"], "plan.target.sigma_eV must be a positive number"),
        (["structure.file=nowhere.pdb"], "nowhere.pdb"),
        (["plan.n_stills=0"], "n_stills"),
        (["plan.energy_jitter_sigma_eV=-1"], "plan.energy_jitter_sigma_eV must be a positive number"),
    ],
)
def test_bad_input_is_one_sorry_line_and_no_output(args, message, tmp_path):
    result = _plan(tmp_path, *args, check=False)
    assert result.returncode != 0
    sorry = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Sorry")]
    assert len(sorry) == 1 and message in sorry[0], result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "spread_plan.json").exists() and not (tmp_path / "spread_plan.png").exists()
