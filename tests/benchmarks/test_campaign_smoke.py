"""The campaign harness (benchmarks/spread_campaign.py) run as a user runs it, on the CI smoke
case: a tiny ladder of two points (2 and 4 stills, one replicate each) from
phil/campaign/ci_smoke.phil, its table made on the fly with cctbx (benchmarks/refine_tables.py
--cases tiny: the built-in rubredoxin to 3.5 A), then its JSON lines, the resume, --summarise and
bad input.  About 30 s on the project's 2-core CPU (issue 12 asks for under two minutes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "benchmarks" / "spread_campaign.py"
SMOKE = REPO / "phil" / "campaign" / "ci_smoke.phil"
TRUTH_SHIFT_EV = 2.0  # ci_smoke.phil's case.truth_shift: the truth is the reference moved by exactly this
FIELDS = {
    "case", "n", "replicate", "seed", "sites", "truth_states", "control", "theta", "truth", "sigma_fisher",
    "sigma_sandwich", "sigma_bootstrap", "bootstrap_draws", "differences", "figure9", "conventional", "shoeboxes", "pixels", "macrocycles", "ranks", "device",
    "cell_error", "truth_shift", "truth_prior_sigma_eV", "seconds", "peak_gpu_bytes", "date", "parameters",
    "energy_jitter_eV", "energy_jitter_sigma_eV", "energy_jitter_found_eV", "resumed_from_macrocycle", "sum_channels",
}  # fmt: skip


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """(output file, seconds of the tables and the harness, harness stdout) of one smoke run."""
    tmp = tmp_path_factory.mktemp("campaign")
    t0 = time.perf_counter()
    tables = _run(str(REPO / "benchmarks" / "refine_tables.py"), "--out", "tables", "--cases", "tiny", cwd=tmp)
    assert tables.returncode == 0, tables.stderr[-3000:]
    run = _run(str(HARNESS), str(SMOKE), "case.data=tables", "output.directory=out", cwd=tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "out" / "campaign_tiny.jsonl", time.perf_counter() - t0, run.stdout


def test_smoke_ladder_runs_under_two_minutes(campaign):
    _, seconds, _ = campaign
    assert seconds < 120, f"the smoke ladder took {seconds:.0f} s"


def test_a_replicate_shows_its_progress(campaign):
    """Long replicates (a 3k rung runs minutes before its first macrocycle) show each phase."""
    _, _, stdout = campaign
    for phase in ("simulated: 4/4 stills", "stills' caches made", "stage 1: 4/4 stills", "macrocycle 1:"):
        assert phase in stdout, phase


def test_every_json_line_has_every_field(campaign):
    path, _, _ = campaign
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["n"], r["replicate"]) for r in rows] == [(2, 0), (4, 0)]
    for r in rows:
        assert set(r) == FIELDS
        assert r["case"] == "tiny" and r["seed"] == 1 and r["control"] == "none" and r["ranks"] == 1
        assert r["peak_gpu_bytes"] is None  # (on the CPU)
        assert r["device"] == "cpu" and r["cell_error"] == 0.001 and r["truth_shift"] == [TRUTH_SHIFT_EV]
        assert len(r["sites"]) == 1 and r["sites"][0].endswith("FE")  # the built-in rubredoxin's one Fe
        assert r["truth_states"] is None  # truth_shift replaces the states
        assert len(r["theta"]) == len(r["truth"]) == len(r["sigma_fisher"]) == 1
        assert r["differences"] == []  # one site: no pairs
        (fig9,) = r["figure9"].values()  # Sauter 2020 Figure 9 over 7105-7135 eV (the channels' 7106.5-7133.5 eV)
        assert fig9["window_eV"] == [7105.0, 7135.0] and fig9["points"] == 31
        assert fig9["cc_f_prime"] > 0.99 and fig9["cc_f_double_prime"] > 0.99 and fig9["rmsd_f_double_prime_e"] < 0.2
        assert r["sigma_bootstrap"] is None and r["bootstrap_draws"] is None  # refine.bootstrap = 0
        assert 1 <= r["macrocycles"] <= 6
        assert r["pixels"] > 9 * r["shoeboxes"] > 0  # boxes of at least 3 x 3 pixels
        assert 0 < r["seconds"] < 120 and len(r["parameters"]) == 10
    assert rows[0]["sigma_sandwich"] is None  # the sandwich needs 3 stills
    assert rows[1]["sigma_sandwich"][0] > 0
    assert rows[1]["shoeboxes"] > rows[0]["shoeboxes"]


def test_estimates_are_near_the_truth(campaign):
    path, _, _ = campaign
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        (theta,), (truth,), (sigma,) = r["theta"], r["truth"], r["sigma_fisher"]
        assert math.isfinite(theta) and 0 < sigma < 0.5
        assert abs(truth - TRUTH_SHIFT_EV) < 0.02  # the rigid shift of an exactly shifted curve
        assert abs(theta - truth) < 4 * sigma, f"N={r['n']}: {theta:.3f} vs {truth:.3f} +- {sigma:.3f} eV"
    assert rows[1]["sigma_fisher"][0] < rows[0]["sigma_fisher"][0]  # 4 stills carry more information than 2


def test_a_rerun_adds_no_lines(campaign):
    """The same run again, its PHIL read without libtbx (as on the GPU machines): the same
    parameters (the design hash every line carries) and nothing left to do."""
    path, _, first = campaign
    before = path.read_text()
    again = _run(str(HARNESS), str(SMOKE), "case.data=tables", "output.directory=out", "--phil-reader", "lite",
                 cwd=path.parent.parent)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 replicates to run (2 already there" in again.stdout
    design = json.loads(before.splitlines()[0])["parameters"]
    assert f"parameters {design})" in first and f"parameters {design})" in again.stdout
    assert path.read_text() == before


def test_shards_split_the_ladder_and_reproduce_its_lines(campaign, tmp_path):
    """Two shards (independent processes) run one (N, replicate) each, and their lines are the
    unsharded run's (every still's seed depends on (seed, N, replicate, still) alone); the
    summary of both shards is the summary of the whole."""
    path, _, _ = campaign
    tables = path.parent.parent / "tables"
    for shard in (0, 1):
        out = _run(str(HARNESS), str(SMOKE), f"case.data={tables}", "output.directory=out", "ladder.shards=2",
                   f"ladder.shard={shard}", cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
    whole = {(r["n"], r["replicate"]): r for r in map(json.loads, path.read_text().splitlines())}
    files = [tmp_path / "out" / f"campaign_tiny.shard{k}of2.jsonl" for k in (0, 1)]
    for k, f in enumerate(files):
        (line,) = f.read_text().splitlines()
        r = json.loads(line)
        assert (r["n"], r["replicate"]) == [(2, 0), (4, 0)][k]
        assert r["theta"] == pytest.approx(whole[(r["n"], r["replicate"])]["theta"], abs=1e-9)
        assert r["sigma_fisher"] == pytest.approx(whole[(r["n"], r["replicate"])]["sigma_fisher"], rel=1e-9)
    both = _run(str(HARNESS), "--summarise", *map(str, files), cwd=tmp_path)
    one = _run(str(HARNESS), "--summarise", str(path), cwd=tmp_path)
    assert both.returncode == 0 and json.loads(both.stdout) == json.loads(one.stdout)
    bad = _run(str(HARNESS), str(SMOKE), f"case.data={tables}", "output.directory=out", "ladder.shards=2",
               "ladder.shard=2", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.strip().startswith("Sorry: ladder.shard = 2")


def test_the_conventional_route_rides_along(campaign, tmp_path):
    """refine.conventional=True adds the conventional route's result on the same stills (its
    estimate, counting-noise sigma, energy bins of >= the minimum reflections) and --summarise
    its statistics; off by default."""
    path, _, _ = campaign
    assert all(json.loads(line)["conventional"] is None for line in path.read_text().splitlines())
    tables = path.parent.parent / "tables"
    out = _run(str(HARNESS), str(SMOKE), f"case.data={tables}", "output.directory=out", "ladder.n=4",
               "refine.conventional=True", "refine.conventional_bin_eV=3", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = (tmp_path / "out" / "campaign_tiny.jsonl").read_text().splitlines()
    conv = json.loads(line)["conventional"]
    assert math.isfinite(conv["theta"][0]) and conv["sigma"][0] > 0 and conv["bin_width_eV"] == 3.0
    assert min(conv["reflections_per_bin"]) >= 20 and sum(conv["reflections_per_bin"]) <= conv["reflections"]
    assert len(conv["bins_eV"]) == len(conv["reflections_per_bin"]) + 1
    summary = json.loads(_run(str(HARNESS), "--summarise", "out/campaign_tiny.jsonl", cwd=tmp_path).stdout)
    assert summary["tiny N=4"]["conventional"]["bias_eV"][0] == pytest.approx(conv["theta"][0] - TRUTH_SHIFT_EV, abs=1e-3)


def test_the_conventional_route_is_the_same_across_still_chunks(campaign, tmp_path, monkeypatch):
    """The conventional route makes per-channel profiles CONVENTIONAL_STILLS stills at a time
    (each chunk's stills renumbered to the refinement's): with chunks of 3 of the 4 stills (a
    boundary inside the data set) its reflections and result are the one-chunk run's."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import spread_campaign

    tables = campaign[0].parent.parent / "tables"
    args = [str(SMOKE), f"case.data={tables}", "ladder.n=4", "refine.conventional=True", "refine.conventional_bin_eV=3"]
    results = {}
    for chunk in (256, 3):
        monkeypatch.setattr(spread_campaign, "CONVENTIONAL_STILLS", chunk)
        assert spread_campaign.main([*args, f"output.directory={tmp_path / str(chunk)}"]) == 0
        (line,) = (tmp_path / str(chunk) / "campaign_tiny.jsonl").read_text().splitlines()
        results[chunk] = json.loads(line)["conventional"]
    assert results[3]["reflections"] == results[256]["reflections"] > 0
    assert results[3]["reflections_per_bin"] == results[256]["reflections_per_bin"]
    assert results[3]["theta"] == pytest.approx(results[256]["theta"], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("control", ["spoil_hkl", "shuffle_channels", "mean_spectrum"])
def test_negative_controls_run_in_the_campaign(campaign, tmp_path, control):
    """control=spoil_hkl / shuffle_channels / mean_spectrum run through the harness (two H200 runs at N = 300
    stopped on them: a negative seed, and l + 1 beyond a table made to the detector's reach) and
    the line says which control it was."""
    path, _, _ = campaign
    tables = path.parent.parent / "tables"
    out = _run(str(HARNESS), str(SMOKE), f"case.data={tables}", "output.directory=out", "ladder.n=3",
               f"control={control}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = (tmp_path / "out" / f"campaign_tiny_{control}.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["control"] == control and all(math.isfinite(x) for x in record["theta"])
    # summarised beside the normal ladder, the control is a group of its own
    summary = json.loads(_run(str(HARNESS), "--summarise", str(path), f"out/campaign_tiny_{control}.jsonl", cwd=tmp_path).stdout)
    assert sorted(summary) == sorted(["tiny N=2", "tiny N=4", f"tiny N=3 {control}"])
    assert summary[f"tiny N=3 {control}"]["replicates"] == 1 and len(summary[f"tiny N=3 {control}"]["sandwich_over_fisher"]) == 1


def test_a_killed_replicate_resumes_to_the_uninterrupted_answer(campaign, tmp_path):
    """SIGKILL once the N = 4 replicate's first checkpoint appears; the rerun resumes after it
    (resumed_from_macrocycle) and ends where the fixture's uninterrupted run ended; the finished
    replicate's checkpoint is removed."""
    path, _, _ = campaign
    tables = path.parent.parent / "tables"
    args = [sys.executable, str(HARNESS), str(SMOKE), f"case.data={tables}", "output.directory=out", "ladder.n=4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "2"}
    with open(tmp_path / "killed.out", "w") as out:
        process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not list((tmp_path / "out").glob("*.checkpoint.pt")) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.out").read_text()[-2000:]
    assert not (tmp_path / "out" / "campaign_tiny.jsonl").exists() or not (tmp_path / "out" / "campaign_tiny.jsonl").read_text()
    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (line,) = (tmp_path / "out" / "campaign_tiny.jsonl").read_text().splitlines()
    resumed = json.loads(line)
    (whole,) = [json.loads(x) for x in path.read_text().splitlines() if json.loads(x)["n"] == 4]
    assert resumed["resumed_from_macrocycle"] >= 1 and whole["resumed_from_macrocycle"] == 0
    assert resumed["macrocycles"] == whole["macrocycles"]
    assert resumed["theta"] == pytest.approx(whole["theta"], rel=1e-9, abs=1e-9)
    assert resumed["sigma_fisher"] == pytest.approx(whole["sigma_fisher"], rel=1e-9)
    assert not list((tmp_path / "out").glob("*.checkpoint.pt"))


def test_a_jitter_is_injected_and_refined_per_still(campaign, tmp_path):
    """stills.energy_jitter_eV injects a recorded-energy jitter per still and
    refine.energy_jitter_sigma_eV refines it: the line holds each still's jitter found."""
    path, _, _ = campaign
    tables = path.parent.parent / "tables"
    out = _run(str(HARNESS), str(SMOKE), f"case.data={tables}", "output.directory=out", "ladder.n=3",
               "stills.energy_jitter_eV=1.0", "refine.energy_jitter_sigma_eV=1.0", "output.name=jitter", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = (tmp_path / "out" / "jitter.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["energy_jitter_eV"] == 1.0 and record["energy_jitter_sigma_eV"] == 1.0
    found = record["energy_jitter_found_eV"]
    assert len(found) == 3 and all(math.isfinite(x) for x in found) and any(x != 0 for x in found)


def test_summed_channels_reach_the_per_channel_estimate(campaign, tmp_path):
    """refine.sum_channels=True (each still's profiles held summed over the channels) ends
    where the per-channel run of the same stills ended (well inside its sigma)."""
    path, _, _ = campaign
    tables = path.parent.parent / "tables"
    out = _run(str(HARNESS), str(SMOKE), f"case.data={tables}", "output.directory=out", "ladder.n=4",
               "refine.sum_channels=True", "output.name=summed", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (summed,) = [json.loads(line) for line in (tmp_path / "out" / "summed.jsonl").read_text().splitlines()]
    (full,) = [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["n"] == 4]
    assert summed["sum_channels"] is True and full["sum_channels"] is False
    assert abs(summed["theta"][0] - full["theta"][0]) < 0.05 * full["sigma_fisher"][0], (summed["theta"], full["theta"])
    assert abs(summed["sigma_fisher"][0] / full["sigma_fisher"][0] - 1) < 0.02


def test_a_shift_per_site_must_match_the_sites(campaign, tmp_path):
    """case.truth_shift takes one value or one per site (the tiny case has one Fe)."""
    path, _, _ = campaign
    out = _run(str(HARNESS), str(SMOKE), f"case.data={path.parent.parent / 'tables'}", "case.truth_shift=2 0", cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.strip().startswith("Sorry: case.truth_shift: give one shift"), out.stderr


def test_summarise(campaign, tmp_path):
    path, _, _ = campaign
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = _run(str(HARNESS), "--summarise", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert sorted(summary) == ["tiny N=2", "tiny N=4"]
    for r in rows:
        entry = summary[f"tiny N={r['n']}"]
        assert entry["replicates"] == 1
        assert entry["bias_eV"][0] == pytest.approx(r["theta"][0] - r["truth"][0], abs=1e-4)
        assert entry["sigma_fisher_eV"][0] == pytest.approx(r["sigma_fisher"][0], abs=1e-4)
        assert math.isnan(entry["spread_eV"][0])  # one replicate: no spread
        z = abs(r["theta"][0] - r["truth"][0]) / r["sigma_fisher"][0]
        assert entry["within_2_fisher_sigma"][0] == float(z < 2)
        (label,) = r["figure9"]
        assert entry["figure9_mean"][label]["cc_f_double_prime"] == pytest.approx(r["figure9"][label]["cc_f_double_prime"], abs=1e-4)


def _calibration_records(rng, replicates: int, sigma_factor: float, n: int = 10) -> list[dict]:
    """Campaign lines of a two-site design whose truths come from the prior N(0, 1 eV) and whose
    estimates scatter with the true sigma (per site, per data set); the reported Fisher sigma is
    the true one times ``sigma_factor``, the bootstrap's 20 refits have the true spread."""
    rows = []
    for r in range(replicates):
        truth = rng.normal(0.0, 1.0, 2)
        sigma = rng.uniform(0.05, 0.1, 2)
        theta = truth + sigma * rng.normal(size=2)
        draws = theta + sigma * rng.normal(size=(20, 2))
        fisher = (sigma * sigma_factor).tolist()
        rows.append({"case": "toy", "n": n, "replicate": r, "seed": 7, "sites": ["a", "b"],
                     "theta": theta.tolist(), "truth": truth.tolist(), "sigma_fisher": fisher, "sigma_sandwich": None,
                     "bootstrap_draws": draws.tolist(), "truth_prior_sigma_eV": 1.0,
                     "differences": [{"sites": ["a", "b"], "estimate": theta[0] - theta[1], "truth": truth[0] - truth[1],
                                      "sigma_fisher": float(np.hypot(*fisher)), "sigma_sandwich": None}]})  # fmt: skip
    return rows


def test_summarise_measures_calibration_and_plots_it(tmp_path):
    """--summarise on lines with a prior-drawn truth reports coverage and SBC uniformity per site
    and pair and method (spread_dials.validation.calibration), --plots writes the coverage curve
    and rank histograms; an overconfident Fisher sigma (half the true one) fails both criteria."""
    rng = np.random.default_rng(11)
    for factor, calibrated in ((1.0, True), (0.5, False)):
        path = tmp_path / f"cal_{factor}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _calibration_records(rng, 400, factor)))
        out = _run(str(HARNESS), "--summarise", str(path), "--plots", str(tmp_path / "png"), cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        cal = json.loads(out.stdout[: out.stdout.rindex("}") + 1])["toy N=10"]["calibration"]
        assert sorted(cal) == ["a - b bootstrap", "a - b fisher", "a bootstrap", "a fisher", "b bootstrap", "b fisher"]
        for key, entry in cal.items():
            assert entry["replicates"] == 400 and entry["levels"] == [0.5, 0.68, 0.9, 0.95]
            good = calibrated or "bootstrap" in key
            assert entry["within_tolerance"] == good and entry["uniform"] == good, (key, entry)
        for png in (f"cal_{factor}_N10_coverage.png", f"cal_{factor}_N10_sbc.png"):
            assert (tmp_path / "png" / png).stat().st_size > 10_000 and f"wrote {tmp_path / 'png' / png}" in out.stdout


def test_plots_draw_the_ladder_beside_the_plan(tmp_path):
    """--plots with two N of several replicates draws a ladder per site and per pair, with the
    bound of a --plan file (its sigma at each N)."""
    rng = np.random.default_rng(2)
    path = tmp_path / "ladder.jsonl"
    rows = _calibration_records(rng, 6, 1.0, n=10) + _calibration_records(rng, 6, 1.0, n=40)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = {"predicted": {str(n): {"sigma_eV": [0.08 / n**0.5, 0.09 / n**0.5],
                                   "differences": [{"sigma_predicted": 0.12 / n**0.5}]} for n in (10, 40)},
            "pseudo_true": [0.03, -0.02]}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = _run(str(HARNESS), "--summarise", str(path), "--plots", "png", "--plan-file", "plan.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[: out.stdout.rindex("}") + 1])["toy N=40"]
    theta = np.array([r["theta"] for r in rows if r["n"] == 40])
    assert summary["bias_from_pseudo_true_eV"] == pytest.approx((theta.mean(0) - [0.03, -0.02]).tolist(), abs=1e-4)
    pair = summary["differences"]["bias_from_pseudo_true_eV"][0]
    assert pair == pytest.approx(float((theta[:, 0] - theta[:, 1]).mean()) - 0.05, abs=1e-4)
    for name in ("ladder_ladder_a.png", "ladder_ladder_b.png", "ladder_ladder_a-b.png"):
        assert (tmp_path / "png" / name).stat().st_size > 10_000, name
    bad = _run(str(HARNESS), "--summarise", str(path), "--plots", "png", "--plan-file", "nowhere.json", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("Sorry: cannot read the plan nowhere.json")


@pytest.mark.parametrize(
    "args, message",
    [
        (["case.data=nowhere"], "no table nowhere/tiny.npz"),
        (["ladder.nn=3"], "nn"),
        (["control=sideways"], "sideways"),
        (["stills.cell_error=lots"], "lots"),
        (["refine.energy_jitter_sigma_eV=0"], "refine.energy_jitter_sigma_eV must be > 0"),
        (["refine.energy_jitter_sigma_eV=1", "stills.cell_error=0"], "needs the cell refined"),
    ],
)
def test_bad_input_is_one_sorry_line(args, message, tmp_path):
    out = _run(str(HARNESS), str(SMOKE), *args, cwd=tmp_path)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Sorry: ") and message in lines[0], out.stderr
    assert not (tmp_path / "campaign_smoke").exists()


def test_pair_differences_follow_the_covariance():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from spread_campaign import pair_differences

    cov = np.array([[0.04, 0.01, 0.0], [0.01, 0.09, -0.02], [0.0, -0.02, 0.16]])
    rows = pair_differences([2.0, 0.5, 1.0], [1.9, 0.0, 1.0], {"fisher": cov, "sandwich": None}, ["a", "b", "c"])
    assert [r["sites"] for r in rows] == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert [r["estimate"] for r in rows] == pytest.approx([1.5, 1.0, -0.5])
    assert [r["truth"] for r in rows] == pytest.approx([1.9, 0.9, -1.0])
    # var(a - b) = 0.04 + 0.09 - 2 * 0.01; var(a - c) = 0.2; var(b - c) = 0.09 + 0.16 + 0.04
    assert [r["sigma_fisher"] for r in rows] == pytest.approx([math.sqrt(0.11), math.sqrt(0.2), math.sqrt(0.29)])
    assert all(r["sigma_sandwich"] is None for r in rows)


def test_ferredoxin_sites_are_tied_across_chains_and_their_difference_is_recorded(tmp_path, shared_data):
    """Ferredoxin (1m2a, Sauter 2020's FE1 and FE2, each both chains) on the smoke design with the
    null truth (both sites reduced: each truth is its reference itself, so the edge-shift model is
    exact): the FE1 - FE2 difference, its truth 0 and its sigma in the line and in --summarise."""
    tables = _run(str(REPO / "benchmarks" / "refine_tables.py"), "--out", "tables", "--cases", "ferredoxin",
                  "--ferredoxin-model", str(shared_data / "models" / "1m2a.pdb"), "--ferredoxin-d-min", "3.5",
                  cwd=tmp_path)  # fmt: skip
    assert tables.returncode == 0, tables.stderr[-3000:]
    run = _run(str(HARNESS), str(SMOKE), "case.name=ferredoxin", "case.truth_shift=None", "case.truth_states=2 2",
               "n=3", "case.data=tables", "output.directory=out", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = (tmp_path / "out" / "campaign_ferredoxin.jsonl").read_text().splitlines()
    r = json.loads(line)
    assert r["sites"] == ["FE1 (2 atoms)", "FE2 (2 atoms)"] and r["truth_states"] == [2, 2]
    assert r["truth"] == pytest.approx([0.0, 0.0], abs=0.01)
    (d,) = r["differences"]
    assert d["sites"] == r["sites"]
    assert d["estimate"] == pytest.approx(r["theta"][0] - r["theta"][1]) and d["truth"] == pytest.approx(0.0, abs=0.01)
    s1, s2 = r["sigma_fisher"]
    assert abs(s1 - s2) <= d["sigma_fisher"] <= s1 + s2  # sqrt(C11 + C22 - 2 C12) with |C12| <= s1 s2
    for theta, sigma in zip(r["theta"], r["sigma_fisher"]):
        assert abs(theta) < 4 * sigma
    assert abs(d["estimate"]) < 4 * d["sigma_fisher"]
    summary = json.loads(_run(str(HARNESS), "--summarise", "out/campaign_ferredoxin.jsonl", cwd=tmp_path).stdout)
    entry = summary["ferredoxin N=3"]["differences"]
    assert entry["pairs"] == [r["sites"]] and entry["estimate_eV"][0] == pytest.approx(d["estimate"], abs=1e-4)
    assert entry["z_mean"][0] == pytest.approx(d["estimate"] / d["sigma_fisher"], abs=0.01)


def _plan(campaign, *args: str) -> dict:
    path, _, _ = campaign
    out = _run(str(HARNESS), str(SMOKE), "case.data=tables", "output.directory=out", "--plan", *args, cwd=path.parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_plan_predicts_the_campaigns_fisher_sigma(campaign):
    """--plan (spread_dials.refine.planning: the mean profiled Fisher information of noise-free
    stills at the truth, sigma_N = sqrt(diag((N I_mean)^-1))) against the refinement's reported
    Fisher sigma at its optimum: with the ladder's own 4 stills as probes the two differ only by
    where the information is evaluated (truth and true per-shot parameters vs the optimum), so
    they agree to a few per cent; with 5 independent probe stills (other orientations and
    spectra: the per-still information of this tiny design varies ~10x) within 1.5x."""
    path, _, _ = campaign
    (n4,) = [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["n"] == 4]
    measured = n4["sigma_fisher"][0]
    same = _plan(campaign, "plan.same_stills_as_n=4", "plan.probe_stills=4")
    assert same["truth"] == pytest.approx([TRUTH_SHIFT_EV], abs=0.02) and same["probe_stills"] == 4
    # the refinement on the noise-free probes converges to the truth where the model can express it
    assert same["pseudo_true"] == pytest.approx(same["truth"], abs=1e-3)
    assert same["predicted"]["4"]["sigma_eV"][0] == pytest.approx(measured, rel=0.03)
    # N scaling: sigma_2 / sigma_4 = sqrt(2) exactly (the information of N exchangeable stills is N I_mean)
    assert same["predicted"]["2"]["sigma_eV"][0] / same["predicted"]["4"]["sigma_eV"][0] == pytest.approx(math.sqrt(2))
    independent = _plan(campaign, "plan.probe_stills=5")
    assert 1 / 1.5 < independent["predicted"]["4"]["sigma_eV"][0] / measured < 1.5
