"""benchmarks/correct.py: its error families (--errors), each name giving the InjectedErrors it
says and a bad one one Sorry line; its summary over data sets (--summarise)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from correct import main, parse_error  # noqa: E402

from ..physics.scene_factory import grid_panels  # noqa: E402

PANELS = grid_panels(n_fast=24, n_slow=20, pixel_mm=0.1, distance_mm=40.0, grid=(2, 2), gap_mm=0.5, tilt_deg=0.0)


def test_each_family_sets_its_error():
    e = parse_error("psf1.5+gain0.05+pixgain0.1+offset1+jitter0.5+aniso2+charge0.3", PANELS, seed=3, spread_deg=0.05)
    assert e.psf_fwhm_px == 1.5 and e.spectrometer_offset_eV == 1.0 and e.energy_jitter_eV == 0.5
    assert e.photon_charge_rms == 0.3
    assert e.panel_gain.shape == (4,) and 0 < float((e.panel_gain - 1).abs().max()) < 0.5
    assert e.pixel_gain.shape == (4, 20, 24) and abs(float(e.pixel_gain.std()) - 0.1) < 0.01
    assert e.mosaic_spread_abc_deg == pytest.approx((0.1, 0.05, 0.025))
    none = parse_error("none", PANELS, seed=3, spread_deg=0.05)
    assert none.pixel_gain is None and none.mosaic_spread_abc_deg is None and none.psf_fwhm_px == 0
    # the flat field is the detector's: the same map for every replicate's seed
    assert torch.equal(parse_error("pixgain0.1", PANELS, seed=4, spread_deg=0.05).pixel_gain, e.pixel_gain)


@pytest.mark.parametrize("text, says", [("blur2", "unknown error 'blur2'"), ("aniso0", "must be > 0"),
                                        ("pixgain", "needs a number")])  # fmt: skip
def test_a_bad_family_is_one_sorry_line(text, says):
    with pytest.raises(SystemExit, match=says) as raised:
        parse_error(text, PANELS, seed=3, spread_deg=0.05)
    assert str(raised.value).startswith("Sorry:") and "\n" not in str(raised.value)


@pytest.mark.parametrize("flag", ["--n", "--replicates", "--epochs"])
def test_a_count_below_one_is_one_sorry_line(flag, tmp_path):
    with pytest.raises(SystemExit, match="must be >= 1") as raised:
        main([flag, "0", "--out", str(tmp_path)])
    assert str(raised.value).startswith("Sorry:") and not any(tmp_path.iterdir())


def test_the_noise_flow_without_a_gaussian_likelihood_is_one_sorry_line(tmp_path):
    with pytest.raises(SystemExit, match="needs a Gaussian likelihood") as raised:
        main(["--errors", "charge1", "--noise-flow", "--out", str(tmp_path)])
    assert str(raised.value).startswith("Sorry:") and not any(tmp_path.iterdir())


def test_a_negative_anchor_is_one_sorry_line(tmp_path):
    with pytest.raises(SystemExit, match="--anchor-beta must be >= 0") as raised:
        main(["--anchor-beta", "-0.001", "--out", str(tmp_path)])
    assert str(raised.value).startswith("Sorry:") and not any(tmp_path.iterdir())


def _record(seed: int, z: float, offset: float) -> dict:
    """A corrected-arm record whose common shift (edge + offset) is z sigmas off a +2 eV truth."""
    sigma = 0.025
    return {"case": "rubredoxin", "error": "psf1.5", "n": 20, "seed": seed, "sites": ["A/FE54/FE"], "truth": [2.0],
            "parameters": ["edge_shift_eV[A/FE54/FE]", "spectrometer_offset_eV", "spectrometer_dispersion"],
            "theta": [2.0 + z * sigma - offset, offset, 0.0], "sigma_given_calibration": [sigma, 0.0, 0.0],
            "sigma_robust_given_calibration": [2 * sigma, 0.0, 0.0],
            "sigma_joint": [0.995, 0.995, 0.001], "physics_theta": [2.5], "physics_sigma": [0.02],
            "oracle_theta": None, "seconds_per_epoch": 1.0, "posterior_predictive": _check(1.0 + abs(z)),
            "leaky": {"theta": [1.0 - offset, offset, 0.0], "sigma_given_calibration": [0.5, 0.0, 0.0]}}  # fmt: skip


def _check(sd: float) -> dict:
    """A held-out check of one panel group and one shell whose z has mean 0 and ``sd`` before, 1 after."""
    def groups(sd: float) -> dict:
        return {"panel_groups": [{"panels": [0, 255], "pixels": 100, "mean": 0.0, "sd": sd}],
                "resolution_shells": [{"d_max_A": None, "d_min_A": None, "pixels": 100, "mean": 0.0, "sd": sd}]}
    return {"held_out_stills": ["still 3"], "before": groups(sd), "after": groups(1.0)}


def test_the_summary_scores_the_common_shift(tmp_path):
    """--summarise over two files: the corrected arm's edge shift + offset over its sigma given the
    spectrometer (and over its sandwich sigma); coverage counted by hand from the z's (|z| below the normal quantiles 0.674,
    0.994, 1.645, 1.960); the PNGs written; a record without the spectrometer latents one Sorry line."""
    from records import append_record

    zs = [0.1, -0.5, 0.9, -1.5, 2.5]
    for k, z in enumerate(zs):
        append_record(tmp_path / f"part{k % 2}.jsonl", _record(60 + k, z, offset=0.02 * k))
    summary = main(["--summarise", str(tmp_path / "part0.jsonl"), str(tmp_path / "part1.jsonl"), "--plots", str(tmp_path / "png")])
    assert summary == 0
    from correct import summarise

    entry = summarise([tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"])["rubredoxin psf1.5 N=20"]
    corrected = entry["corrected"]["A/FE54/FE"]
    assert entry["replicates"] == 5 and corrected["coverage"] == [0.4, 0.6, 0.8, 0.8]
    assert corrected["bias_eV"] == pytest.approx(0.025 * sum(zs) / 5, abs=1e-4)
    # the same shifts over the sandwich sigma, twice the Laplace one here: |z| / 2 = 0.05 ... 1.25
    assert entry["corrected_sandwich"]["A/FE54/FE"]["coverage"] == [0.6, 0.8, 1.0, 1.0]
    assert entry["physics"]["A/FE54/FE"]["bias_sigma"] == pytest.approx(25.0)
    # physics 2.5 +- 0.02: the corrected common shifts 2 + 0.025 z are (0.025 z - 0.5) / 0.02 physics sigmas from it
    assert entry["corrected_minus_physics_sigma"]["A/FE54/FE"]["max_abs"] == pytest.approx((0.5 + 0.025 * 1.5) / 0.02, abs=1e-3)
    assert "oracle" not in entry
    # the leaky arm's common shift, 1 eV for a +2 eV truth over its sigma 0.5: bias -1 eV, -2 sigma
    assert entry["leaky"]["A/FE54/FE"]["bias_eV"] == pytest.approx(-1.0) and entry["leaky"]["A/FE54/FE"]["bias_sigma"] == pytest.approx(-2.0)
    # the held-out checks pooled: 5 x 100 pixels of mean 0, each sd 1 (ddof 1): sd sqrt(5 x 99 / 499)
    assert entry["predictive"]["data_sets"] == 5 and entry["predictive"]["after"]["panel_groups"][0]["pixels"] == 500
    assert entry["predictive"]["after"]["panel_groups"][0]["sd"] == pytest.approx((5 * 99 / 499) ** 0.5, rel=1e-12)
    assert entry["predictive"]["before"]["resolution_shells"][0]["sd"] > 1.5
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "correct_scale_psf1.5_A_FE54_FE_coverage.png", "correct_scale_psf1.5_A_FE54_FE_sbc.png", "correct_scale_psf1.5_predictive.png"]
    old = _record(70, 0.0, 0.0)
    del old["parameters"]
    append_record(tmp_path / "old.jsonl", old)
    with pytest.raises(SystemExit, match="before the spectrometer latents") as raised:
        main(["--summarise", str(tmp_path / "old.jsonl")])
    assert str(raised.value).startswith("Sorry:")


def test_a_leaky_arm_with_the_spectrometer_held_is_scored_by_its_edge_shift():
    """common_shift of a leaky arm run with --leaky-hold-spectrometer (its own parameter names,
    no offset latent): its edge shift itself; with the latents (no names of its own: the
    corrected arm's) edge shift + offset, as before."""
    from correct import common_shift

    record = _record(60, 0.0, offset=0.3)
    estimate, sigma = common_shift(record, "leaky")
    assert estimate.tolist() == pytest.approx([1.0]) and sigma.tolist() == [0.5]
    record["leaky"] = {"parameters": ["edge_shift_eV[A/FE54/FE]"], "theta": [1.7], "sigma_given_calibration": [0.4]}
    estimate, sigma = common_shift(record, "leaky")
    assert estimate.tolist() == [1.7] and sigma.tolist() == [0.4]


def test_oracle_only_records_are_a_group_of_their_own(tmp_path):
    """--summarise over --oracle-only records beside full ones: the oracle-only records are their
    own group ("... oracle only", the oracle arm alone: no physics or corrected arm), scored as the
    full group's arms; coverage counted by hand from the z's (|z| below 0.674, 0.994, 1.645,
    1.960); the full group unchanged; each group's PNGs written under its own name."""
    from correct import summarise
    from records import append_record

    zs = [0.3, -0.8, 1.2, -1.8, 2.2, 0.0]
    for k, z in enumerate(zs):
        append_record(tmp_path / "oracle.jsonl", {"case": "rubredoxin", "error": "psf1.5", "n": 20, "seed": 145 + k, "noise_seed": None,
                                                  "sites": ["A/FE54/FE"], "truth": [2.0], "held_out_stills": [],
                                                  "oracle_theta": [2.0 + 0.02 * z], "oracle_sigma": [0.02]})  # fmt: skip
    append_record(tmp_path / "full.jsonl", _record(60, 0.1, offset=0.0))
    summary = summarise([tmp_path / "oracle.jsonl", tmp_path / "full.jsonl"])
    assert sorted(summary) == ["rubredoxin psf1.5 N=20", "rubredoxin psf1.5 N=20 oracle only"]
    only = summary["rubredoxin psf1.5 N=20 oracle only"]
    assert only["replicates"] == 6 and only["seeds"] == list(range(145, 151))
    assert "physics" not in only and "corrected" not in only
    oracle = only["oracle"]["A/FE54/FE"]
    assert oracle["coverage"] == pytest.approx([2 / 6, 3 / 6, 4 / 6, 5 / 6], abs=1e-4)
    assert oracle["rms_z"] == pytest.approx((sum(z * z for z in zs) / 6) ** 0.5, abs=1e-3)
    assert summary["rubredoxin psf1.5 N=20"]["replicates"] == 1 and "oracle" not in summary["rubredoxin psf1.5 N=20"]
    assert main(["--summarise", str(tmp_path / "oracle.jsonl"), str(tmp_path / "full.jsonl"), "--plots", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "correct_scale_psf1.5_A_FE54_FE_coverage.png", "correct_scale_psf1.5_A_FE54_FE_sbc.png",
        "correct_scale_psf1.5_oracle_only_A_FE54_FE_coverage.png", "correct_scale_psf1.5_oracle_only_A_FE54_FE_sbc.png",
        "correct_scale_psf1.5_predictive.png"]


def test_the_conditional_summary_of_a_parametric_bootstrap(tmp_path):
    """--summarise --conditional: per data set's stills (seed), the oracle's mean error, the sd of
    its estimates over the noise draws against its sigma, and the ratio's chi-square interval,
    checked by hand (estimates 2 + (-0.03, -0.01, 0.01, 0.05), sigma 0.02: mean error 0.005, sd
    sqrt(0.0035 / 3)); records without a noise seed one Sorry line."""
    from correct import conditional_summary
    from records import append_record

    for k, e in enumerate([-0.03, -0.01, 0.01, 0.05]):
        append_record(tmp_path / "boot.jsonl", {"case": "rubredoxin", "error": "none", "n": 20, "seed": 133, "noise_seed": k + 1,
                                                "sites": ["A/FE54/FE"], "truth": [2.0], "oracle_theta": [2.0 + e], "oracle_sigma": [0.02]})  # fmt: skip
    append_record(tmp_path / "boot.jsonl", {"case": "rubredoxin", "error": "none", "n": 20, "seed": 134, "noise_seed": 1,
                                            "sites": ["A/FE54/FE"], "truth": [2.0], "oracle_theta": [2.1], "oracle_sigma": [0.02]})  # fmt: skip
    summary = conditional_summary([tmp_path / "boot.jsonl"])
    assert sorted(summary) == ["rubredoxin none N=20 seed 133", "rubredoxin none N=20 seed 134"]
    site = summary["rubredoxin none N=20 seed 133"]["oracle"]["A/FE54/FE"]
    sd = (((-0.035) ** 2 + (-0.015) ** 2 + 0.005**2 + 0.045**2) / 3) ** 0.5
    assert site["mean_error_eV"] == pytest.approx(0.005, abs=1e-4) and site["sd_eV"] == pytest.approx(sd, abs=1e-4)
    assert site["sd_over_sigma"] == pytest.approx(sd / 0.02, abs=1e-3) and site["mean_error_se_eV"] == pytest.approx(sd / 2, abs=1e-4)
    # chi-square with 3 degrees of freedom: quantiles 0.2158 and 9.348
    assert site["sd_over_sigma_95"] == pytest.approx([sd / 0.02 * (3 / 9.348) ** 0.5, sd / 0.02 * (3 / 0.2158) ** 0.5], abs=2e-3)
    assert summary["rubredoxin none N=20 seed 133"]["noise_draws"] == 4
    append_record(tmp_path / "plain.jsonl", {"case": "rubredoxin", "error": "none", "n": 20, "seed": 1})
    with pytest.raises(SystemExit, match="made with --noise-seed only") as raised:
        main(["--summarise", str(tmp_path / "plain.jsonl"), "--conditional"])
    assert str(raised.value).startswith("Sorry:")


def test_the_recovery_summary_fits_the_estimate_on_the_truth(tmp_path):
    """--summarise --recovery: per data set's stills, each arm's least-squares line of estimate on
    truth, checked by hand.  Corrected common shift exactly the truth (slope 1, intercept 0, no
    residual); the leaky arm 0.5 T - 3 + (0.1, -0.1, 0.1, -0.1) at T = -2, -1, 0, 2 (slope
    0.5 + S_Te / S_TT with e the wiggle, T mean -0.25: S_TT = 8.75, S_Te = 0.1 (-1.75 + 0.75 +
    0.25 - 2.25) = -0.3); the sigma-propagated sd sqrt(sum w^2) 0.4 = 0.4 / sqrt(S_TT); one truth
    twice, a single truth, or --recovery without --summarise, one Sorry line."""
    from correct import recovery_summary
    from records import append_record

    wiggle = {-2.0: 0.1, -1.0: -0.1, 0.0: 0.1, 2.0: -0.1}
    for t, e in wiggle.items():
        record = _record(111, 0.0, offset=0.0)
        record["truth"], record["theta"][0] = [t], t
        record["leaky"] = {"parameters": ["edge_shift_eV[A/FE54/FE]"], "theta": [0.5 * t - 3.0 + e], "sigma_given_calibration": [0.4]}
        append_record(tmp_path / "old.jsonl", record)
        # a record of session 30 on: the NLL histories and the sigma with the correction held
        record["history"] = [{"nll": 100.0}, {"nll": 10.0}]
        record["leaky"] |= {"history": [{"nll": 50.0}, {"nll": 10.0 - 600.0 - 10.0 * t}], "sigma_correction_held": [0.4 / (5.0 + t)],
                            "converged": t != 2.0}  # fmt: skip
        append_record(tmp_path / "recovery.jsonl", record)
    assert "leak_absorption" not in recovery_summary([tmp_path / "old.jsonl"])["rubredoxin psf1.5 N=20 seed 111"]
    entry = recovery_summary([tmp_path / "recovery.jsonl"])["rubredoxin psf1.5 N=20 seed 111"]
    assert entry["truths"] == 4
    corrected, leaky = entry["corrected"]["A/FE54/FE"], entry["leaky"]["A/FE54/FE"]
    assert corrected["slope"] == pytest.approx(1.0) and corrected["intercept_eV"] == pytest.approx(0.0, abs=1e-4)
    assert corrected["slope_se_residuals"] == pytest.approx(0.0, abs=1e-4)
    assert leaky["slope"] == pytest.approx(0.5 - 0.3 / 8.75, abs=1e-4)
    # intercept: mean estimate (0.5 x -0.25 - 3, the wiggle sums to 0) minus slope x mean truth
    assert leaky["intercept_eV"] == pytest.approx(-3.125 + 0.25 * (0.5 - 0.3 / 8.75), abs=1e-4)
    assert leaky["slope_sd_from_sigmas"] == pytest.approx(0.4 / 8.75**0.5, abs=1e-4)
    assert [p[0] for p in leaky["points"]] == [-2.0, -1.0, 0.0, 2.0]
    # the leak's absorption: sigma ratios 5 + T (3 to 7); NLL 600 + 10 T below (580 to 620);
    # the largest error, at T = +2 (0.5 x 2 - 3 - 0.1 = -2.1, 4.1 off), over sigma 0.025: 164
    absorbed = entry["leak_absorption"]
    assert absorbed["A/FE54/FE"]["sigma_ratio"] == pytest.approx([3.0, 7.0])
    assert absorbed["nll_below_corrected_nats"] == pytest.approx([580.0, 620.0])
    assert absorbed["A/FE54/FE"]["largest_error_over_corrected_sigma"] == pytest.approx(164.0)
    assert absorbed["converged"] == "3 of 4"
    append_record(tmp_path / "twice.jsonl", _record(111, 0.0, offset=0.0))
    append_record(tmp_path / "twice.jsonl", _record(111, 0.3, offset=0.0))
    append_record(tmp_path / "single.jsonl", _record(112, 0.0, offset=0.0))
    for name in ("twice.jsonl", "single.jsonl"):
        with pytest.raises(SystemExit, match="one record per truth and at least two truths") as raised:
            main(["--summarise", str(tmp_path / name), "--recovery"])
        assert str(raised.value).startswith("Sorry:")
    with pytest.raises(SystemExit, match="give them with --summarise") as raised:
        main(["--recovery"])
    assert str(raised.value).startswith("Sorry:")
