"""benchmarks/correct_calibration.py: a replicate line per data set with both arms, resumable,
and its summary (coverage, KS, rank histogram per arm and quantity)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import correct_calibration  # noqa: E402


def test_two_replicates_resume_and_summarise(tmp_path, capsys):
    args = ["--replicates", "2", "--n", "2", "--spot-scale", "2000", "--epochs", "3", "--out", str(tmp_path)]
    assert correct_calibration.main(args) == 0
    path = tmp_path / "correct_calibration_toy.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["replicate"] for r in lines] == [0, 1] and lines[0]["truth"] != lines[1]["truth"]
    for r in lines:
        assert len(r["theta"]) >= 2 and len(r["covariance"]) == 2 and 1 <= r["epochs"] <= 3
        assert r["covariance"][0][0] > 0 and r["physics_covariance"][0][0] > 0
    assert correct_calibration.main(args) == 0  # a rerun adds no line
    assert len(path.read_text().splitlines()) == 2
    capsys.readouterr()
    assert correct_calibration.main(["--summarise", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["replicates"] == 2
    for arm in ("physics", "corrected"):
        assert set(summary[arm]) == {"A", "B", "A - B"}
        assert all(len(v["coverage"]) == 4 and sum(v["rank_histogram"]) == 2 for v in summary[arm].values())


def test_the_jitter_design_widens_the_absolute_interval(tmp_path, capsys):
    """--jitter with --jitter-sigma: the corrected arm refines each still's jitter, so each site's
    sigma holds the mean jitter's ~jitter / sqrt(n) (0.58 eV here) while physics only's holds
    the counting noise alone (0.21 eV on average over the 100-data-set study of
    benchmarks/RESULTS.md, session 12; 0.49 eV with the jitter refined); the plots are named by
    --plot-stem and titled by the design."""
    args = ["--replicates", "1", "--n", "3", "--psf", "0", "--jitter", "1.0", "--jitter-sigma", "1.0", "--epochs", "3",
            "--out", str(tmp_path)]  # fmt: skip
    assert correct_calibration.main(args) == 0
    path = tmp_path / "correct_calibration_toy.jsonl"
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["jitter_eV"] == 1.0 and line["jitter_sigma_eV"] == 1.0
    for k in (0, 1):
        sigma, physics = line["covariance"][k][k] ** 0.5, line["physics_covariance"][k][k] ** 0.5
        assert sigma > 0.8 / 3**0.5 and sigma > 1.5 * physics, (sigma, physics)
    capsys.readouterr()
    assert correct_calibration.main(["--summarise", str(path), "--plots", str(tmp_path), "--plot-stem", "jitter"]) == 0
    assert (tmp_path / "jitter_coverage.png").stat().st_size > 0 and (tmp_path / "jitter_sbc.png").stat().st_size > 0


def test_the_oracle_is_physics_told_the_error(tmp_path, capsys):
    """--oracle: with nothing injected the oracle arm is the physics arm exactly; with an
    anisotropic mosaic (--aniso) it is physics with the stills' anisotropy, another fit; the
    summary gains an oracle arm; --oracle with --jitter is one Sorry line."""
    lines = {}
    for aniso in ("1", "2"):
        out = tmp_path / aniso
        args = ["--replicates", "1", "--n", "2", "--psf", "0", "--aniso", aniso, "--oracle", "--epochs", "2", "--out", str(out)]
        assert correct_calibration.main(args) == 0
        (lines[aniso],) = [json.loads(x) for x in (out / "correct_calibration_toy.jsonl").read_text().splitlines()]
    assert lines["1"]["oracle_theta"] == lines["1"]["physics_theta"]
    assert lines["1"]["oracle_covariance"] == lines["1"]["physics_covariance"]
    assert max(abs(a - b) for a, b in zip(lines["2"]["oracle_theta"], lines["2"]["physics_theta"])) > 1e-3
    capsys.readouterr()
    assert correct_calibration.main(["--summarise", str(tmp_path / "2" / "correct_calibration_toy.jsonl")]) == 0
    assert set(json.loads(capsys.readouterr().out)["oracle"]) == {"A", "B", "A - B"}
    with pytest.raises(SystemExit, match="^Sorry: --oracle is not told") as raised:
        correct_calibration.main(["--oracle", "--jitter", "1", "--out", str(tmp_path)])
    assert "\n" not in str(raised.value)
